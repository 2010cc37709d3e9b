"""The contract between the memvisor core and its plugins: every hook specification.

Each docstring opens with the kind of call:

- **decision** -- ``firstresult``: the first implementation that returns a value other than
  ``None`` decides, and the rest are not called;
- **observer** -- every implementation is called and return values are ignored;
- **collector** -- every implementation is called and every non-``None`` result is kept.

Implementations may take fewer arguments than the specification (pluggy's opt-in arguments), so
new arguments can be added without breaking plugins. Guest activity arrives in batches: one call
carries a numpy array of pages, never one page.

Hooks that later techniques need are added here by the change that makes the core call them;
docs/architecture.md lists them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pluggy

from memvisor import PROJECT_NAME

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import click

    from memvisor.checkpoint.vm import RestoreJob, SaveJob
    from memvisor.events import (
        AccessBatch,
        DiskIOBatch,
        FaultBatch,
        MemoryErrorEvent,
        MemoryPressure,
        MigrationPhase,
        PageRecords,
        RestoreRequest,
        SaveRequest,
        Tick,
        VcpuMove,
        WriteBatch,
    )
    from memvisor.host import VM, Host
    from memvisor.registry import Registry
    from memvisor.report import ReportSection

hookspec = pluggy.HookspecMarker(PROJECT_NAME)


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

    :param host: the host.
    :param vm: the faulting VM.
    :param fault: the faulting pages, each once per guest batch.
    :returns: the pages this implementation made present, or ``None``.
    """


@hookspec
def memvisor_page_accessed(host: Host, vm: VM, access: AccessBatch) -> None:
    """Observer. The guest touched traced pages.

    The core has untraced the pages before the call: they stay untraced until a plugin traces
    them again (``host.backend.trace``), typically from :func:`memvisor_tick`. Only the first
    touch of a page in a guest batch traps.

    :param host: the host.
    :param vm: the VM.
    :param access: the touched pages in order of first touch, with positions in the batch.
    """


@hookspec
def memvisor_page_write(host: Host, vm: VM, write: WriteBatch) -> None:
    """Observer. The guest is about to write pages that are shared or write-protected.

    Every implementation sees the whole batch before the write lands: save the old contents,
    drop a mapping, reset a balloon. Afterwards the core gives each page that is still shared a
    private copy and clears write protection on all of them, so the guest's write never fails
    and never reaches another page. An implementation that wants the page protected again
    re-protects it later (from a tick), not inside this call.

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
    :func:`memvisor_page_write` sees it before this hook does). One call per batch of I/O.

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


@hookspec(firstresult=True)
def memvisor_page_heat(host: Host, vm: VM, gpps: np.ndarray) -> np.ndarray | None:
    """Decision. How hot each of ``gpps`` is, by a plugin that measures page use.

    A plugin that tracks accesses (an MRC plugin's LRU, for one) answers with a float per page,
    higher meaning hotter (more recently or more often used); pages it knows nothing of get 0.
    Consumers order work by it: NUMA migration moves the hottest pages first, lazy restore
    prefetches them first. ``None`` means no plugin can tell; consumers fall back to their own
    measure (accessed bits).

    :param host: the host.
    :param vm: the VM.
    :param gpps: the pages to rate.
    :returns: float64 array, one heat per page of ``gpps``, or ``None``.
    """


# ---------------------------------------------------------------------------------------------
# checkpoints and page records
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def memvisor_checkpoint_save(host: Host, vm: VM, request: SaveRequest) -> SaveJob | None:
    """Decision. Save ``vm``'s memory to ``request.path``.

    A lazy-save plugin returns its job when it takes the save (the VM keeps running and the
    job's ``done`` turns true later); the core's stop-the-world save (``trylast``) takes it
    otherwise. Either writes the checkpoint format (docs/checkpoint-format.md), asking
    :func:`memvisor_describe_pages` for records of pages other plugins describe more cheaply.

    :param host: the host.
    :param vm: the VM to save.
    :param request: where and how.
    :returns: a :class:`memvisor.checkpoint.vm.SaveJob`, or ``None`` to leave the save to others.
    """


@hookspec(firstresult=True)
def memvisor_checkpoint_restore(host: Host, vm: VM, request: RestoreRequest) -> RestoreJob | None:
    """Decision. Replace ``vm``'s memory with the checkpoint at ``request.path``.

    A lazy-restore plugin returns its job after making every page not present (it then serves
    faults from the file); the core's eager restore (``trylast``) loads every page first.
    Pages stored as records are turned back into bytes by :func:`memvisor_resolve_records`.

    :param host: the host.
    :param vm: the VM whose memory is replaced.
    :param request: the checkpoint and how.
    :returns: a :class:`memvisor.checkpoint.vm.RestoreJob`, or ``None``.
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
    pulls the pages still missing, when post-copy is on) and at ``"end"``. Pages sent in the
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
    :param pressure: free pages and the target.
    :returns: the number of machine pages this implementation freed, or ``None``.
    """


@hookspec(firstresult=True)
def memvisor_giveable_pages(host: Host, vm: VM, miss_ratio_increase: float) -> int | None:
    """Decision. How many pages ``vm`` could give up for at most ``miss_ratio_increase`` more
    misses, by a plugin that knows the VM's miss-rate curve.

    A reclaim policy (the balloon's, for one) asks this to take memory where the miss ratio
    rises least. ``None`` means no plugin can tell; the policy falls back to its own measure.
    The count is of the VM's whole memory: ``vm.pages`` minus the smallest size whose miss
    ratio is at most the miss ratio at the VM's current allocation (its pages less those a
    guest driver has pinned) plus ``miss_ratio_increase``; pages already taken by a balloon are
    included, so a caller subtracts what it holds.

    :param host: the host.
    :param vm: the VM.
    :param miss_ratio_increase: the largest acceptable rise of the VM's miss ratio (0..1).
    :returns: pages the VM can give up, or ``None``.
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


def _all_hook_names() -> list[str]:
    return [name for name in globals() if name.startswith("memvisor_")]


HOOK_NAMES: tuple[str, ...] = tuple(_all_hook_names())
"""Names of every hook specification in this module."""

