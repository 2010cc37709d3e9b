"""The contract between the memvisor core and its plugins: every hook specification.

Each docstring opens with the kind of call:

- **decision** -- ``firstresult``: the first implementation that returns a value other than
  ``None`` decides, and the rest are not called;
- **observer** -- every implementation is called and return values are ignored;
- **collector** -- every implementation is called and every non-``None`` result is kept.

Implementations may take fewer arguments than the specification (pluggy's opt-in arguments), so
new arguments can be added without breaking plugins. Guest activity arrives in batches: one call
carries a numpy array of pages, never one page.

Every hook here is called by the core. Hooks that plugins ask each other (how hot pages are,
how much memory a VM can give up) are declared by those plugins
(:func:`memvisor_register_hookspecs`), not here; docs/hooks.md lists both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

import memvisor

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from collections.abc import Callable

    import click

    from memvisor.builtins.checkpoint.vm import RestoreJob, SaveJob
    from memvisor.events import (
        AccessBatch,
        DiskIOBatch,
        FaultBatch,
        MemoryErrorEvent,
        MemoryPressure,
        MigrationPhase,
        PageRecords,
        RestoreRequest,
        RestoreStart,
        SaveRequest,
        Tick,
        VcpuMove,
        WriteBatch,
    )
    from memvisor.host import VM, Host
    from memvisor.registry import Registry
    from memvisor.report import ReportSection
    from memvisor.testing.integration import Selftest

hookspec = memvisor.hookspec


# ---------------------------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------------------------


@hookspec
def memvisor_host_started(host: Host) -> None:
    """Observer. The host is built: backend attached, plugins registered, no VM yet.

    A plugin reads its settings here (``host.plugin_settings(NAME)``), checks the backend's
    capabilities (``host.require(...)``) and sets up per-host state.

    :param host: the host that owns this plugin manager.
    """


@hookspec
def memvisor_vm_created(host: Host, vm: VM) -> None:
    """Observer. A VM was created and its memory laid out; the guest has not run yet.

    :param host: the host.
    :param vm: the new VM.
    """


@hookspec
def memvisor_vm_destroyed(host: Host, vm: VM) -> None:
    """Observer. A VM is about to be destroyed; its memory is still mapped during the call.

    A plugin drops its bookkeeping for the VM and releases machine pages it holds for it.

    :param host: the host.
    :param vm: the VM being destroyed.
    """


@hookspec
def memvisor_tick(host: Host, tick: Tick) -> None:
    """Observer. Time advanced by one tick interval (``host.tick_interval``).

    Periodic work goes here: retracing pages, scanning, prefetching, migrating a budget of
    pages. It runs between guest batches, never inside one.

    :param host: the host.
    :param tick: the time and number of this tick.
    """


@hookspec
def memvisor_host_stopping(host: Host) -> None:
    """Observer. The scenario ended; VMs still exist. Last chance to flush state before reports.

    :param host: the host.
    """


# ---------------------------------------------------------------------------------------------
# faults and traps
# ---------------------------------------------------------------------------------------------


@hookspec
def memvisor_page_fault(host: Host, vm: VM, fault: FaultBatch) -> np.ndarray | None:
    """Collector. The guest touched pages that are not present.

    Each implementation makes present the pages it owns among ``fault.gpps`` (through the
    backend, e.g. ``host.backend.populate``) and returns the array of pages it served, or
    ``None``. Implementations run in hook order; one that serves a page hides it from those that
    follow only in the sense that ``host.backend.present`` is then true, so an implementation
    checks presence before serving. The core's default (``trylast``) fills every page that is
    still missing with zeros, which is what a guest sees of memory that nobody has written.

    The core uses what each implementation returns: it checks that the pages are present (a
    plugin that claims a page it did not serve is stopped like one that raised: the VM stops,
    no wrong page is handed over) and counts them per plugin (``faults_served_by`` in the
    report's memory section, zero-fill included, which adds up to the VM's faults).

    :param host: the host.
    :param vm: the faulting VM.
    :param fault: the faulting pages, each once per guest batch.
    :returns: the pages this implementation made present, or ``None``.
    """


@hookspec
def memvisor_traced_access(host: Host, vm: VM, access: AccessBatch) -> None:
    """Observer. The guest touched pages that a plugin traced (``host.backend.trace``).

    A trap on *traced* pages, not a reading of accessed bits (those are read without traps:
    ``host.take_accessed``). The core has untraced the pages before the call: they stay
    untraced until a plugin traces them again, typically from :func:`memvisor_tick`. Only the
    first touch of a page in a guest batch traps. Formerly ``memvisor_page_accessed``.

    :param host: the host.
    :param vm: the VM.
    :param access: the touched pages in order of first touch, with positions in the batch.
    """


@hookspec
def memvisor_write_trap(host: Host, vm: VM, write: WriteBatch) -> None:
    """Observer. A write trap: the guest is about to write pages that are shared or
    write-protected (``host.backend.protect``).

    Every implementation sees the whole batch before the write lands: save the old contents,
    drop a mapping, reset a balloon. Afterwards the core gives each page that is still shared a
    private copy and clears write protection on all of them, so the guest's write never fails
    and never reaches another page. An implementation that wants the page protected again
    re-protects it later (from a tick), not inside this call. Formerly ``memvisor_page_write``.

    :param host: the host.
    :param vm: the writing VM.
    :param write: the pages, their machine pages and whether each is shared, as of the trap
        (an implementation that runs earlier may already have remapped some of them).
    """


@hookspec
def memvisor_disk_io(host: Host, vm: VM, io: DiskIOBatch) -> None:
    """Observer. The guest read disk blocks into its pages or wrote pages back to disk blocks.

    Called after the transfer (``host.disk_io``): after a read each page of ``io.gpps`` holds
    its block's bytes, after a write each block holds its page's bytes. A read lands in guest
    memory as the guest's own write would (it traps on write-protected pages first, so
    :func:`memvisor_write_trap` sees it before this hook does). One call per batch of I/O.

    :param host: the host.
    :param vm: the VM doing the I/O.
    :param io: the disk, the pages, the blocks and the direction of each transfer.
    """


@hookspec
def memvisor_memory_error(host: Host, vm: VM, error: MemoryErrorEvent) -> np.ndarray | None:
    """Collector. An uncorrectable memory error hit machine pages behind pages of ``vm``.

    The bytes of ``error.gpps`` are wrong. An implementation that can rebuild some of them
    exactly (from an identical disk block, say) writes the right bytes with
    ``host.backend.write`` and returns the pages it repaired. The core reports every page that
    nobody repaired to the guest as lost (``host.memory_error``); a page is never left silently
    wrong by a repair.

    :param host: the host.
    :param vm: the VM whose pages were hit.
    :param error: the pages and their machine pages.
    :returns: the pages this implementation repaired, or ``None``.
    """


# ---------------------------------------------------------------------------------------------
# migration between NUMA nodes
# ---------------------------------------------------------------------------------------------


@hookspec
def memvisor_vcpus_moved(host: Host, vm: VM, move: VcpuMove) -> None:
    """Observer. A VM's virtual CPUs moved to another NUMA node; its memory did not move.

    Accesses to pages on other nodes are remote (and cost more) until a plugin migrates them
    with ``host.backend.migrate``.

    :param host: the host.
    :param vm: the VM whose home node changed (``vm.home_node`` is already the new node).
    :param move: the old and new node.
    """


# ---------------------------------------------------------------------------------------------
# checkpoints and page records
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def memvisor_checkpoint_save(host: Host, vm: VM, request: SaveRequest) -> SaveJob | None:
    """Decision. Save ``vm``'s memory to ``request.path``.

    A lazy-save plugin returns its job when it takes the save (the VM keeps running and the
    job's ``done`` turns true later; its ``flush`` finishes it at once, which the core calls
    before the VM's memory is replaced by a restore); the core's stop-the-world save
    (``trylast``) takes it otherwise. Either writes the checkpoint format (docs/checkpoint-format.md), asking
    :func:`memvisor_describe_pages` for records of pages other plugins describe more cheaply.

    :param host: the host.
    :param vm: the VM to save.
    :param request: where and how.
    :returns: a :class:`memvisor.builtins.checkpoint.vm.SaveJob`, or ``None`` to leave the save to others.
    """


@hookspec(firstresult=True)
def memvisor_checkpoint_restore(host: Host, vm: VM, request: RestoreRequest) -> RestoreJob | None:
    """Decision. Replace ``vm``'s memory with the checkpoint at ``request.path``.

    Called after the core checked that the restore can finish (the file opens and holds every
    page, its records still resolve) and after :func:`memvisor_restore_starting`. A
    lazy-restore plugin returns its job after making every page not present (it then serves
    faults from the file); the core's eager restore (``trylast``) loads every page first.
    Pages stored as records are turned back into bytes by :func:`memvisor_resolve_records`.
    A plugin that only needs to know that the VM's memory is replaced implements
    :func:`memvisor_restore_starting`, not this.

    :param host: the host.
    :param vm: the VM whose memory is replaced.
    :param request: the checkpoint and how.
    :returns: a :class:`memvisor.builtins.checkpoint.vm.RestoreJob`, or ``None``.
    """


@hookspec
def memvisor_restore_starting(host: Host, vm: VM, restore: RestoreStart) -> None:
    """Observer. Every page of ``vm`` is about to be replaced by a checkpoint's.

    Fires once the restore passed the core's checks (a restore refused there changes nothing
    and does not fire this), before :func:`memvisor_checkpoint_restore` and before any page
    changes. A plugin drops what it knows of the VM's pages here: a balloon ends (the guest's
    driver starts over), a mapping of pages to disk blocks is void, a save in progress is
    finished first, a lazy restore in progress ends.

    :param host: the host.
    :param vm: the VM whose memory is replaced.
    :param restore: the request, and the pages the checkpoint stores as records of each kind.
    """


@hookspec
def memvisor_describe_pages(host: Host, vm: VM, gpps: np.ndarray, purpose: str) -> PageRecords | None:
    """Collector. Describe some of ``gpps`` more cheaply than by their bytes.

    Called before pages are saved to a checkpoint (``purpose="checkpoint"``) or sent in a
    migration stream (``purpose="migration"``). A plugin returns records for the pages it can
    describe (a reference to an identical disk block, say); a page claimed twice keeps the first
    record. The description must let :func:`memvisor_resolve_records` give the exact bytes back.

    :param host: the host.
    :param vm: the VM.
    :param gpps: candidate pages (present, not zero).
    :param purpose: ``"checkpoint"`` or ``"migration"``.
    :returns: a :class:`memvisor.events.PageRecords`, or ``None``.
    """


@hookspec(firstresult=True)
def memvisor_resolve_records(host: Host, vm: VM, records: PageRecords) -> np.ndarray | None:
    """Decision. Turn records of a kind this plugin writes back into page bytes.

    A plugin answers only for ``records.kind`` values it wrote, and checks what it reads (a
    disk block changed since must not come back as a guest page).

    :param host: the host.
    :param vm: the VM being restored.
    :param records: the records.
    :returns: ``(len(records.gpps), PAGE_SIZE)`` uint8 bytes, or ``None`` (not my kind).
    """


@hookspec
def memvisor_migration_phase(host: Host, vm: VM, phase: MigrationPhase) -> None:
    """Observer. A live migration of ``vm`` from ``host`` reached a phase.

    Fires on the source host at ``"start"``, at each pre-copy ``"round"``, at
    ``"stop_and_copy"`` (the VM is stopped), at ``"postcopy"`` (the destination resumes and
    pulls the pages still missing, when post-copy is on) and at ``"end"``; a migration that
    fails after ``"start"`` ends with ``"aborted"`` instead (the VM runs on on the source), so
    every ``"start"`` is followed by one ``"end"`` or ``"aborted"``. Pages sent in the
    stream come from :func:`memvisor_describe_pages` (``purpose="migration"``) where a plugin
    describes them, and are turned back into bytes on the destination by
    :func:`memvisor_resolve_records`.

    :param host: the source host.
    :param vm: the migrating VM (on the source).
    :param phase: the phase, its round, pages to send and the destination host.
    """


# ---------------------------------------------------------------------------------------------
# memory pressure
# ---------------------------------------------------------------------------------------------


@hookspec
def memvisor_memory_pressure(host: Host, pressure: MemoryPressure) -> int | None:
    """Collector. Free machine memory is below the host's low watermark.

    Implementations run in hook order (``tryfirst`` / ``trylast`` set the order among
    reclaimers) and each reclaims what it can; it reads ``host.backend.free_pages()`` first, so
    it does nothing once an earlier one covered the deficit. The intended order, cheapest for
    the guest first: page sharing (``tryfirst``: no guest sees a difference), then ballooning
    (no marker: the guest gives up memory it chooses), then dropping or swapping pages
    (``trylast``: the guest pays a fault later).

    :param host: the host.
    :param pressure: a :class:`memvisor.events.MemoryPressure`: ``free_pages``,
        ``target_free_pages``, ``deficit_pages`` (what is left to reclaim) and ``time``.
    :returns: the number of machine pages this implementation freed, or ``None``.
    """


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


@hookspec
def memvisor_register_backends(register: Registry) -> None:
    """Observer. Register hypervisor backends: ``register(name, factory)``.

    ``factory(config)`` receives the host configuration (:class:`memvisor.host.HostConfig`) and
    returns a :class:`memvisor.backend.Backend`. A name registered twice is an error.

    :param register: the backend registry.
    """


@hookspec
def memvisor_register_settings(register: Registry) -> None:
    """Observer. Declare your plugin's settings: ``register(NAME, cls)``.

    ``NAME`` is the plugin's entry-point name (its ``[plugins.NAME]`` table); ``cls`` is a
    frozen attrs class whose every field is made with :func:`memvisor.settings.setting` (type
    from the annotation; default, bounds or choices, one-line doc). The core checks the table
    when the scenario is loaded (one line naming the file and the dotted key), fills the
    defaults and hands the plugin an instance of ``cls`` from ``host.plugin_settings(NAME)``.
    A plugin without settings registers a class without fields, so that a misspelt key in its
    table is refused too.

    :param register: the settings registry.
    """


@hookspec
def memvisor_register_hookspecs(register: Callable[[object], None]) -> None:
    """Observer. Declare hooks your plugin offers other plugins: ``register(namespace)``, a
    module or class of functions marked ``@memvisor.hookspec`` (pytest's ``pytest_addhooks``).

    A plugin that asks the others something (numa asks how hot pages are) declares the hook and
    calls it through ``host.hook``; plugins that answer implement it with
    ``@memvisor.hookimpl(optionalhook=True)``, so that they still load where no plugin declares
    it. Plugins never import each other, so several may declare one hook: they must declare it
    alike (same arguments, same kind of call), else loading fails in one line naming both.
    Names start with ``memvisor_`` and are not the core's. Declarations are read when a
    plugin manager is built; docs/hooks.md lists those of the installed plugins.

    :param register: adds the hook specifications of a module or class.
    """


@hookspec
def memvisor_register_workloads(register: Registry) -> None:
    """Observer. Register workload kinds: ``register(kind, factory)``.

    ``factory(spec, vm_pages, seed)`` receives the workload's table from the scenario (a dict),
    the VM's size in pages and a seed, and returns a :class:`memvisor.workloads.Workload`.

    :param register: the workload registry.
    """


@hookspec
def memvisor_register_actions(register: Registry) -> None:
    """Observer. Register scenario timeline actions: ``register(name, function)``.

    ``function(run, step)`` receives the running scenario (:class:`memvisor.runner.ScenarioRun`)
    and the step (:class:`memvisor.runner.Step`: the step's table with checked access, every
    error naming the file and the dotted key), and performs the step. A function that also takes
    ``plugin`` (``function(run, step, plugin)``) gets the running host's instance of the plugin
    that registered it, or None when the scenario does not enable that plugin (refuse with
    ``raise step.error("do", "...needs the NAME plugin...")``). Register functions, not bound
    methods: registration hooks are called on a catalog of every installed plugin, not on the
    host's plugins.

    :param register: the action registry.
    """


@hookspec
def memvisor_register_benchmarks(register: Registry) -> None:
    """Observer. Register benchmark cases for ``memvisor bench``: ``register(group, case)``.

    ``case`` is a :class:`memvisor.bench.BenchCase`; the group is the word after
    ``memvisor bench``.

    :param register: the benchmark registry.
    """


@hookspec
def memvisor_register_commands(cli: click.Group) -> None:
    """Observer. Add subcommands to the ``memvisor`` command line (``cli.add_command``).

    :param cli: the top-level click group.
    """


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------


@hookspec
def memvisor_report(host: Host) -> ReportSection | list[ReportSection] | None:
    """Collector. Contribute to the run's report at the end of a scenario.

    Return one or more :class:`memvisor.report.ReportSection` (metrics as JSON-able values, and
    plots as data; the core draws them), or ``None``.

    :param host: the host, after :func:`memvisor_host_stopping`.
    :returns: report sections, or ``None``.
    """


# ---------------------------------------------------------------------------------------------
# self-test
# ---------------------------------------------------------------------------------------------


@hookspec
def memvisor_selftest(selftest: Selftest) -> None:
    """Observer. Take part in ``memvisor selftest``: the all-techniques state machine
    (:mod:`memvisor.testing.integration`) that drives one host with every installed plugin
    through random interleavings of guest activity, pressure, checkpoints, restores, live
    migrations and memory errors, and checks every guest page against the reference model
    after each step.

    Every installed plugin takes part, with its default settings, without this hook. With it,
    a plugin adds what only it knows, through ``selftest``
    (:class:`memvisor.testing.integration.Selftest`): ``selftest.settings({...})`` (its table
    on the machine's hosts), ``selftest.step(name, function, **ranges)`` (a step of its own:
    ``function(plugin, host, vm=VM, **arguments)``), ``selftest.check(function)`` (its own
    invariant after every step: ``function(plugin, host)`` raises ``AssertionError``, returns
    the machine pages it holds outside page tables), ``selftest.guest_view(function)`` (pages
    the guest gave up to its driver and what they read), ``selftest.command(path, arguments)``
    (a valid invocation of its command for the CLI matrix). Every function gets the machine
    host's instance of the plugin first.

    :param selftest: what the machine collects from each plugin in turn.
    """


# ---------------------------------------------------------------------------------------------
# deprecated names (kept for one release; the core still calls them)
# ---------------------------------------------------------------------------------------------


@hookspec(warn_on_impl=DeprecationWarning(
    "memvisor_page_accessed is renamed memvisor_traced_access (same arguments); the old name goes in the next release"))
def memvisor_page_accessed(host: Host, vm: VM, access: AccessBatch) -> None:
    """Observer. Deprecated: implement :func:`memvisor_traced_access` (same arguments, same call).

    :param host: the host.
    :param vm: the VM.
    :param access: the touched traced pages.
    """


@hookspec(warn_on_impl=DeprecationWarning(
    "memvisor_page_write is renamed memvisor_write_trap (same arguments); the old name goes in the next release"))
def memvisor_page_write(host: Host, vm: VM, write: WriteBatch) -> None:
    """Observer. Deprecated: implement :func:`memvisor_write_trap` (same arguments, same call).

    :param host: the host.
    :param vm: the writing VM.
    :param write: the pages about to be written.
    """


DEPRECATED: dict[str, str] = {"memvisor_page_accessed": "memvisor_traced_access",
                              "memvisor_page_write": "memvisor_write_trap"}
"""Old hook names and their replacements: the core calls both for one release."""


def _all_hook_names() -> list[str]:
    return [name for name in globals() if name.startswith("memvisor_")]


HOOK_NAMES: tuple[str, ...] = tuple(_all_hook_names())
"""Names of every hook specification in this module."""

