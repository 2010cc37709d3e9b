"""The host: one hypervisor with its machine memory, VMs, backend and plugin manager.

The host owns a fresh plugin manager (no global state), builds its backend from the registry of
installed backends, and turns the backend's trap batches into hook calls. It is what every hook
receives as ``host``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import pluggy
import structlog

from memvisor import PAGE_SIZE
from memvisor.arrays import first_occurrences
from memvisor.backend import AccessResult, Backend, Capability
from memvisor.budgets import Budget, Budgets
from memvisor.errors import BackendError, CapabilityError, UserError, VMStoppedError
from memvisor.events import (
    AccessBatch,
    DiskIOBatch,
    FaultBatch,
    MemoryErrorEvent,
    MemoryPressure,
    RestoreRequest,
    RestoreStart,
    SaveRequest,
    Tick,
    VcpuMove,
    WriteBatch,
)
from memvisor.identity import auto_model, host_memory_bytes
from memvisor.limits import check_machine_memory
from memvisor.metrics import COUNTERS, Metrics
from memvisor.plugins import new_plugin_manager
from memvisor.registry import Registry, SettingsRegistry, fill

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.contents import ContentSpec
    from memvisor.disks import Disk

log = structlog.get_logger("memvisor.host")

_MAX_PROBES = 64  # probes for an unpinned page before a guest access falls back to the first one

TIME_EPSILON = 1e-12
"""Seconds below which two times are the same (rounding of sums of float seconds)."""


@attrs.frozen
class HostConfig:
    """What a host is made of.

    :ivar memory_pages: machine memory in 4 KiB pages, split evenly among the NUMA nodes.
    :ivar numa_nodes: number of NUMA nodes.
    :ivar backend: name of the backend to build.
    :ivar seed: seed of every random choice the host and its workloads make.
    :ivar tick_interval: seconds between :func:`memvisor_tick` calls.
    :ivar low_watermark: fraction of machine memory; free memory below it is memory pressure.
    :ivar high_watermark: fraction of machine memory that reclaim aims to free.
    :ivar backend_options: the backend's own settings (the emulator's ``costs``).
    :ivar plugin_settings: each plugin's settings, by plugin name.
    :ivar budget: the resource budget of every VM created without its own (:mod:`memvisor.budgets`).
    :ivar handler_threads: threads of the host's trap handler; the trap work of every VM's
        batches queues for them (a batch that traps waits for the work queued before it).
    :ivar contents: how the backend holds page contents, ``"bytes"`` or ``"identity"``
        (:mod:`memvisor.identity`); None chooses: the identity model for hosts of more than
        :data:`memvisor.identity.IDENTITY_AUTO_BYTES` when the backend has it, bytes otherwise.
        A :class:`Host` resolves it before it builds its backend.
    """

    memory_pages: int
    numa_nodes: int = 1
    backend: str = "emulator"
    seed: int = 0
    tick_interval: float = 0.01
    low_watermark: float = 0.02
    high_watermark: float = 0.05
    backend_options: Mapping[str, Any] = attrs.field(factory=dict)
    plugin_settings: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    budget: Budget = attrs.field(factory=Budget)
    handler_threads: int = 1
    contents: str | None = None

    def contents_model(self, supported: tuple[str, ...] = ("bytes", "identity")) -> str:
        """The model of page contents for a backend that offers the ``supported`` models:
        :attr:`contents` when given (a :class:`UserError` when the backend lacks it), else the
        identity model for a host larger than :data:`memvisor.identity.IDENTITY_AUTO_BYTES`."""
        if self.contents is None:
            return auto_model(self.memory_pages, supported)
        if self.contents not in supported:
            raise UserError(f"host.contents: backend {self.backend!r} holds page contents as "
                            f"{' or '.join(supported)}, not {self.contents!r}")
        return self.contents


@attrs.define(eq=False)
class VM:
    """A virtual machine as the core knows it: identity, size and placement.

    :ivar id: a number unique within the host.
    :ivar name: the scenario's name for it.
    :ivar pages: guest physical memory in 4 KiB pages.
    :ivar home_node: the NUMA node its virtual CPUs run on.
    :ivar large_pages: whether its memory is backed by 2 MiB large pages where possible.
    :ivar seed: seed of its contents and workload.
    :ivar write_epoch: the value the guest's writes of the current batch store (see
        :meth:`memvisor.backend.Backend.access`); the host increments it for every batch.
    """

    id: int
    name: str
    pages: int
    home_node: int = 0
    large_pages: bool = False
    seed: int = 0
    write_epoch: int = 0
    stopped: str | None = None

    @property
    def bytes(self) -> int:
        """Guest memory in bytes."""
        return self.pages * PAGE_SIZE


def _disk_seed(vm_seed: int, index: int) -> int:
    """Seed of a VM's generated disk: apart from every VM seed, so a disk's blocks never equal
    the VM's own generated pages by accident."""
    return (int(vm_seed) % 2**64) * 2**20 + 0xD15C0 + index


def registries(pm: pluggy.PluginManager, extra: tuple[pluggy.PluginManager, Iterable[object]] | None = None,
               ) -> dict[str, Registry]:
    """Fill the backend, workload, action and settings registries from every plugin in ``pm``,
    and from the plugin objects of ``extra`` (a plugin manager and the objects registered in
    it as they are) whose class is not one of ``pm``'s plugins already."""
    out: dict[str, Registry] = {}
    installed = {type(p) for p in pm.get_plugins()}
    for kind, hook, registry in (("backend", "memvisor_register_backends", Registry("backend")),
                                 ("workload", "memvisor_register_workloads", Registry("workload")),
                                 ("action", "memvisor_register_actions", Registry("action")),
                                 ("settings", "memvisor_register_settings", SettingsRegistry())):
        out[kind] = fill(getattr(pm.hook, hook), registry, pm)
        if extra is not None:
            extra_pm, objects = extra
            objects = [o for o in objects if type(o) not in installed]
            if objects:
                fill(getattr(extra_pm.hook, hook), registry, extra_pm, only=objects)
    return out


class Host:
    """A hypervisor host: what every hook receives as ``host``.

    :param config: the host's configuration.
    :param plugins: names of installed plugins to enable (entry-point names).
    :param extra_plugins: plugin objects to register as they are (tests, embedding programs).
    :param catalog: a plugin manager with every installed plugin, for the registries of
        backends, workloads and actions (a new one is made when None).

    :ivar config: the :class:`HostConfig` it was built from.
    :ivar backend: the :class:`memvisor.backend.Backend` every technique acts through.
    :ivar vms: the VMs by name.
    :ivar hook: the hook caller of the host's plugin manager, to call a hook plugins offer
        each other (``host.hook.memvisor_page_heat(host=host, vm=vm, gpps=gpps)``).
    :ivar pm: the host's plugin manager (``host.pm.get_plugin(NAME)``: a plugin's instance).
    :ivar tick_interval: seconds between two :func:`memvisor_tick` calls.
    :ivar disks: each VM's disks, by VM name and disk name (:class:`memvisor.disks.Disk`).
    :ivar budgets: the VMs' budgets and their use (:class:`memvisor.budgets.Budgets`):
        a content scanner asks ``host.budgets.take_scan(vm, pages, host.now)``.
    :ivar checkpoint_jobs: every checkpoint save and restore of the run, in order.
    :ivar migrations: the figures of every live migration from this host.
    :ivar memory_errors: every memory error and what became of its pages.
    :ivar plugin_failures: every failure of a plugin inside a hook (:mod:`memvisor.isolation`).
    :ivar reclaimed_by: machine pages each plugin reclaimed under memory pressure.
    :ivar faults_served_by: faulting pages each plugin served (``zero-fill``: the core's default).
    :ivar stopped: whether the run ended (:meth:`stop`).
    """

    def __init__(
        self,
        config: HostConfig,
        plugins: Iterable[str] = (),
        *,
        extra_plugins: Iterable[object] = (),
        catalog: pluggy.PluginManager | None = None,
    ):
        extra_plugins = list(extra_plugins)
        self.pm = new_plugin_manager(list(plugins), extra=extra_plugins)
        self.hook = self.pm.hook
        self.registries = registries(catalog or new_plugin_manager(None, strict=False), (self.pm, extra_plugins))
        backend_class = self.registries["backend"][config.backend]
        model = config.contents_model(getattr(backend_class, "contents_models", ("bytes",)))
        if config.contents is None and model != auto_model(config.memory_pages):
            # A scenario checked this host's size for the identity model its backend lacks.
            try:
                check_machine_memory(host_memory_bytes(config.memory_pages, model), "a host")
            except ValueError as exc:
                raise UserError(f"host.memory: {exc} (backend {config.backend!r} holds page bytes)") from None
        config = attrs.evolve(config, contents=model)
        self.config = config
        self._settings = self._checked_settings()
        self.backend: Backend = backend_class(config)
        self.backend.attach(self)
        self.vms: dict[str, VM] = {}
        self._pinned: dict[str, np.ndarray] = {}
        self._given_up: dict[str, np.ndarray] = {}  # VM -> times each page was pinned
        self.checkpoint_jobs: list = []
        self.disks: dict[str, dict[str, Disk]] = {}
        self.migrations: list = []
        self.memory_errors: list[dict] = []
        # VM -> (reader -> its bit, per page the bits of the readers that have not seen a touch)
        self._accessed: dict[str, tuple[dict[str, int], np.ndarray]] = {}
        self._ids = itertools.count()
        self.metrics = Metrics()
        self.tick_interval = config.tick_interval
        self._ticks = 0
        self._next_tick = config.tick_interval
        self._advanced_to = 0.0  # a real clock: when the previous advance ended
        self.stopped = False
        self.plugin_failures: list[dict] = []
        self.restore_records: dict[str, tuple[str, dict]] = {}
        self.reclaimed_by: dict[str, int] = {}
        self.budgets = Budgets(config.budget)
        from memvisor.isolation import isolate
        from memvisor.plugins import BUILTIN_MODULES

        # Plugins still implementing a hook under its old name (one release): called too.
        self._legacy_traced = bool(self.hook.memvisor_page_accessed.get_hookimpls())
        self._legacy_write = bool(self.hook.memvisor_page_write.get_hookimpls())
        self.faults_served_by: dict[str, int] = {}
        isolate(self, BUILTIN_MODULES)
        self.hook.memvisor_host_started(host=self)

    # -- configuration ------------------------------------------------------------------------

    def _checked_settings(self) -> dict[str, Any]:
        """Each plugin's settings object (:func:`memvisor_register_settings`): its table from
        the configuration checked, defaults filled (one line naming the dotted key otherwise)."""
        from memvisor.settings import load

        declared = self.registries["settings"]
        out = {}
        for name in declared:
            table = self.config.plugin_settings.get(name, {})
            out[name] = load(declared[name], table, f"plugins.{name}")
        return out

    def plugin_settings(self, name: str) -> Any:
        """The settings of plugin ``name``: an instance of the class it declared
        (:func:`memvisor_register_settings`), checked, defaults filled. For a plugin that
        declares none, its table from the scenario as it is (empty when it has none)."""
        if name in self._settings:
            return self._settings[name]
        return self.config.plugin_settings.get(name, {})

    def require(self, plugin: str, *capabilities: str) -> None:
        """Raise :class:`CapabilityError` (one line) unless the backend has ``capabilities``."""
        missing = [c for c in capabilities if c not in self.backend.capabilities]
        if missing:
            raise CapabilityError(
                f"plugin {plugin!r} needs {', '.join(missing)} which backend "
                f"{self.backend.name!r} does not offer"
            )

    @property
    def now(self) -> float:
        """Current time in seconds (virtual on the emulator)."""
        return self.backend.now()

    # -- the core's measurements --------------------------------------------------------------

    def counters(self, vm: VM) -> dict[str, int]:
        """The core's counters of ``vm`` so far (:data:`memvisor.metrics.COUNTERS`: its guest's
        accesses and remote accesses, the faults, traced accesses and write traps delivered,
        its guest's own traps); zeros before its first batch. A copy."""
        counts = self.metrics.counters.get(vm.name)
        return dict(counts) if counts is not None else dict.fromkeys(COUNTERS, 0)

    def record_event(self, kind: str, **fields: Any) -> None:
        """Add an event of ``kind`` (with JSON-able ``fields``) to the run's report, stamped
        with the time now: ``report.json``'s ``events`` and the sweep's ``events.KIND`` counts."""
        self.metrics.event(self.now, kind, **fields)

    # -- VMs ----------------------------------------------------------------------------------

    def create_vm(
        self,
        name: str,
        pages: int,
        *,
        home_node: int = 0,
        large_pages: bool = False,
        contents: ContentSpec | None = None,
        seed: int | None = None,
        budget: Budget | None = None,
    ) -> VM:
        """Create a VM with every page present and filled by ``contents`` (zeros if None),
        under ``budget`` (the host's default budget when None)."""
        if name in self.vms:
            raise BackendError(f"a VM named {name!r} exists already")
        if not 0 <= home_node < self.backend.numa_nodes:
            raise BackendError(f"VM {name!r}: NUMA node {home_node} does not exist")
        vm_id = next(self._ids)
        vm = VM(vm_id, name, pages, home_node, large_pages, self.config.seed * 1000 + vm_id if seed is None else seed)
        self.backend.create_vm(vm, contents)
        self.vms[name] = vm
        self.budgets.add(vm, budget, self.now)
        self.hook.memvisor_vm_created(host=self, vm=vm)
        return vm

    def destroy_vm(self, vm: VM) -> None:
        """Destroy a VM after telling the plugins."""
        self.hook.memvisor_vm_destroyed(host=self, vm=vm)
        self.backend.destroy_vm(vm)
        del self.vms[vm.name]
        for disk in self.disks.pop(vm.name, {}).values():
            disk.flush()
        self._pinned.pop(vm.name, None)
        self._given_up.pop(vm.name, None)
        self._accessed.pop(vm.name, None)
        self.restore_records.pop(vm.name, None)

    def stop_vm(self, vm: VM, reason: str) -> None:
        """Stop ``vm`` cleanly: its guest runs no more (every later batch raises
        :class:`VMStoppedError` with ``reason``); its memory stays as it is for inspection."""
        if vm.stopped is None:
            vm.stopped = reason
            log.error("VM stopped", vm=vm.name, reason=reason)
            self.metrics.event(self.now, "vm_stopped", vm=vm.name, reason=reason)

    def record_plugin_failure(self, plugin: str, hook: str, error: str, *, handled: bool) -> None:
        """Internal (:mod:`memvisor.isolation`): a plugin raised inside a hook; log it with the
        plugin's name and keep it in :attr:`plugin_failures`."""
        entry = {"plugin": plugin, "hook": hook, "error": error, "time": self.now, "handled": handled}
        self.plugin_failures.append(entry)
        log.error("plugin failed in a hook", **entry)
        self.metrics.event(self.now, "plugin_failure", plugin=plugin, hook=hook, error=error)

    def _fatal(self, vm: VM, what: str, exc: BaseException) -> None:
        if isinstance(exc, UserError) or self.backend.stops_guests:
            return  # a plugin's own one-line stop (a failed lazy restore), or the backend's
        plugin = getattr(exc, "memvisor_plugin", None)
        who = f"plugin {plugin!r}" if plugin else "a plugin"
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.stop_vm(vm, f"VM {vm.name!r} stopped: {who} failed {what}: {message}")

    def move_vcpus(self, vm: VM, node: int) -> None:
        """Move a VM's virtual CPUs to NUMA ``node``; its memory stays where it is."""
        if not 0 <= node < self.backend.numa_nodes:
            raise BackendError(f"NUMA node {node} does not exist (the host has {self.backend.numa_nodes})")
        old, vm.home_node = vm.home_node, node
        self.metrics.event(self.now, "vcpus_moved", vm=vm.name, old_node=old, new_node=node)
        self.hook.memvisor_vcpus_moved(host=self, vm=vm, move=VcpuMove(old, node, self.now))

    # -- guest activity -----------------------------------------------------------------------

    def access(self, vm: VM, gpps: np.ndarray, writes: np.ndarray, *, within_budget: bool = False) -> AccessResult:
        """Run one batch of the guest's accesses; returns what it cost (time is not advanced:
        the caller decides how batches of several VMs overlap). Accesses that land on pages
        the guest has pinned (:meth:`pin_guest_pages`) go to other pages, as the guest's own
        allocator would place them.

        With ``within_budget``, a VM with a trap budget runs only the first accesses of the
        batch whose traps its budget pays for (exactly when the backend can tell which would
        trap, :meth:`Backend.trapping`; else as many as its recent costs per access pay for);
        ``result.accesses`` says how many ran, and the caller runs the rest later. At least one
        access runs."""
        if vm.stopped is not None:
            raise VMStoppedError(vm.stopped)
        vm.write_epoch += 1
        gpps = self.guest_pages(vm, gpps)
        writes = np.asarray(writes, dtype=bool)
        cut = self._budget_cut(vm, gpps, writes) if within_budget else len(gpps)
        result = self.backend.access(vm, gpps[:cut], writes[:cut], vm.write_epoch)
        self.metrics.add_access(vm.name, result)
        self.budgets.charge_traps(vm, result, self.now)
        if cut < len(gpps):
            self.budgets.batch_cut(vm, self.now)
        return result

    def _budget_cut(self, vm: VM, gpps: np.ndarray, writes: np.ndarray) -> int:
        """How many of the batch's accesses the VM's trap budget pays for: the batch ends just
        before the first trap it cannot pay (each page traps once per batch)."""
        allowed = self.budgets.allowed_traps(vm, self.now)
        if allowed >= len(gpps):  # each access traps at most once in a first round: it all fits
            return len(gpps)
        positions = self.first_traps(vm, gpps, writes)
        if positions is None:  # the backend cannot tell: the VM's recent costs per access decide
            return self.budgets.batch_size(vm, len(gpps), self.now)
        allowed = max(1, int(allowed))  # at least one trap, or the VM could never run
        return len(gpps) if len(positions) <= allowed else int(positions[allowed])

    def first_traps(self, vm: VM, gpps: np.ndarray, writes: np.ndarray) -> np.ndarray | None:
        """Where in a batch (of pages the guest's accesses land on) each page that would trap
        traps first, ascending; None when the backend cannot tell (:meth:`Backend.trapping`)."""
        trapping = self.backend.trapping(vm, gpps, writes)
        if trapping is None:
            return None
        where = np.flatnonzero(trapping)
        _, first = first_occurrences(gpps[where])
        return where[first]  # sorted: the first trap of each page, in program order

    # -- accessed bits, shared by their readers ------------------------------------------------

    def take_accessed(self, vm: VM, reader: str, gpps: np.ndarray | None = None) -> np.ndarray:
        """Which of ``gpps`` (every page when None) the guest touched since ``reader`` last
        asked — for ``reader`` alone.

        The backend's accessed bits are read-and-clear: a plugin that took them (the balloon
        sampling idle memory) would hide the touches from the next (NUMA aging, a lazy save's
        access order). The host takes them from the backend for every page at each call and
        keeps what each reader has not seen yet, so each reader sees every touch once. A
        reader's first call reports the touches since any reader last asked. (One byte a page
        for up to 8 readers: a bit each.)"""
        fresh = self.backend.take_accessed(vm)
        bits, unseen = self._accessed.setdefault(vm.name, ({}, np.zeros(vm.pages, dtype=np.uint8)))
        if reader not in bits:
            if len(bits) == 8:
                raise BackendError(f"VM {vm.name!r}: more than 8 readers of accessed bits")
            bits[reader] = 1 << len(bits)
            unseen &= np.uint8(~bits[reader] & 0xFF)
        everyone = np.uint8(sum(bits.values()))
        unseen |= fresh.view(np.uint8) * everyone
        bit = np.uint8(bits[reader])
        if gpps is None:
            out = (unseen & bit) != 0
            unseen &= ~bit
        else:
            gpps = np.asarray(gpps, dtype=np.int64)
            out = (unseen[gpps] & bit) != 0
            unseen[gpps] &= ~bit
        return out

    # -- the guest's own allocator --------------------------------------------------------------

    def pin_guest_pages(self, vm: VM, gpps: np.ndarray, pinned: bool = True) -> None:
        """Mark guest pages as taken by a guest driver (a balloon): the guest's workloads stop
        using them, their accesses move to the VM's other pages. ``pinned=False`` gives them
        back to the guest (a deflate, or a driver reset that forgot its pages)."""
        mask = self._pinned.get(vm.name)
        if mask is None:
            mask = self._pinned[vm.name] = np.zeros(vm.pages, dtype=bool)
            self._given_up[vm.name] = np.zeros(vm.pages, dtype=np.uint32)
        gpps = np.asarray(gpps, dtype=np.int64)
        if pinned:
            self._given_up[vm.name][gpps[~mask[gpps]]] += 1
        mask[gpps] = pinned
        if mask.all():
            raise BackendError(f"VM {vm.name!r}: a guest driver pinned every page; the guest cannot run")

    def times_given_up(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Per page of ``vm`` (of ``gpps`` when given), how many times the guest has given it up
        (pinned it for a driver) so far, modulo 2**32. A page given up may come back with other
        bytes than it had (a balloon's zeros) without a guest write: a plugin that trusts what
        it once saw in a page checks that this has not changed since (machine page numbers are
        reused, so they cannot tell)."""
        counts = self._given_up.get(vm.name)
        n = vm.pages if gpps is None else len(gpps)
        if counts is None:
            return np.zeros(n, dtype=np.int64)
        return (counts if gpps is None else counts[np.asarray(gpps, dtype=np.int64)]).astype(np.int64)

    def guest_pinned(self, vm: VM) -> np.ndarray:
        """Per page of ``vm``, whether a guest driver has pinned it."""
        mask = self._pinned.get(vm.name)
        return np.zeros(vm.pages, dtype=bool) if mask is None else mask.copy()

    def guest_pages(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        """The pages a batch of the guest's accesses really lands on (pinned pages moved)."""
        mask = self._pinned.get(vm.name)
        gpps = np.asarray(gpps, dtype=np.int64)
        if mask is None:
            return gpps
        hit = np.flatnonzero(mask[gpps])
        if not len(hit):
            return gpps
        # A pinned page's accesses go to the first unpinned page of a fixed, seed-free probe
        # sequence of its own: spread over the free pages, with no table per page.
        out, origin = gpps.copy(), gpps[hit].astype(np.uint64)
        for probe in range(1, _MAX_PROBES + 1):
            with np.errstate(over="ignore"):
                step = origin * np.uint64(0x9E3779B97F4A7C15) + np.uint64(probe * 0xBF58476D1CE4E5B9 % 2**64)
            out[hit] = ((step >> np.uint64(32)) * np.uint64(vm.pages) >> np.uint64(32)).astype(np.int64)
            again = mask[out[hit]]
            hit, origin = hit[again], origin[again]
            if not len(hit):
                return out
        out[hit] = int(np.argmin(mask))  # a VM with nearly every page pinned: its first free page
        return out

    def deliver_faults(self, vm: VM, fault: FaultBatch) -> None:
        """Called by the backend: let plugins serve faulting pages (the core zero-fills the rest)."""
        self.metrics.add_traps(vm.name, "faults", len(fault.gpps))
        try:
            self.hook.memvisor_page_fault(host=self, vm=vm, fault=fault)
        except Exception as exc:  # no safe fallback: the failing plugin may own these pages
            self._fatal(vm, "serving a page fault", exc)
            raise
        if not self.backend.present(vm, fault.gpps).all():
            raise BackendError(f"VM {vm.name!r}: page faults left unserved")

    def served_faults(self, vm: VM, plugin: str, gpps) -> None:
        """Internal (:mod:`memvisor.isolation`). What a :func:`memvisor_page_fault`
        implementation of ``plugin`` returned: the pages it
        served, which must be present now (else :class:`BackendError`, and the VM stops as
        when the plugin raised); counted in :attr:`faults_served_by`."""
        gpps = np.asarray(gpps, dtype=np.int64).reshape(-1)
        if len(gpps) and not self.backend.present(vm, gpps).all():
            missing = gpps[~self.backend.present(vm, gpps)]
            raise BackendError(f"returned {len(missing)} pages it did not make present (first: {int(missing[0])})")
        self.faults_served_by[plugin] = self.faults_served_by.get(plugin, 0) + len(gpps)

    def deliver_accesses(self, vm: VM, access: AccessBatch) -> None:
        """Called by the backend: tell plugins which traced pages were touched (now untraced)."""
        self.metrics.add_traps(vm.name, "traced", len(access.gpps))
        self.hook.memvisor_traced_access(host=self, vm=vm, access=access)
        if self._legacy_traced:
            self.hook.memvisor_page_accessed(host=self, vm=vm, access=access)

    def deliver_writes(self, vm: VM, write: WriteBatch) -> None:
        """Called by the backend: let plugins see writes to shared or protected pages, then make
        the pages writable (private copy for shared ones, protection cleared)."""
        self.metrics.add_traps(vm.name, "write_traps", len(write.gpps))
        try:
            self.hook.memvisor_write_trap(host=self, vm=vm, write=write)
            if self._legacy_write:
                self.hook.memvisor_page_write(host=self, vm=vm, write=write)
        except Exception as exc:  # no safe fallback: the plugin may need to act before the write
            self._fatal(vm, "handling a write trap", exc)
            raise
        present = write.gpps[self.backend.present(vm, write.gpps)]
        self.backend.break_sharing(vm, present)
        self.backend.unprotect(vm, present)

    # -- disks and memory errors ---------------------------------------------------------------

    def attach_disk(self, vm: VM, path: str | None = None, *, blocks: int | None = None,
                    contents: ContentSpec | None = None, name: str | None = None, seed: int | None = None,
                    disk: Disk | None = None, writable: bool = True) -> Disk:
        """Attach a disk to ``vm``: the raw image file ``path`` (read and written in place
        unless not ``writable``), ``blocks`` generated blocks of ``contents`` (text when None)
        held in memory, or an existing ``disk`` (shared storage: the destination of a live
        migration sees the source's disks)."""
        from memvisor.disks import make_disk

        disks = self.disks.setdefault(vm.name, {})
        name = name or (disk.name if disk is not None else f"disk{len(disks)}")
        if name in disks:
            raise BackendError(f"VM {vm.name!r} has a disk named {name!r} already")
        number = sum(len(d) for d in self.disks.values())
        if disk is None:
            disk = make_disk(name, path=path, blocks=blocks, contents=contents,
                             seed=_disk_seed(vm.seed, len(disks)) if seed is None else seed, number=number,
                             writable=writable, model=self.backend.contents_model)
        elif disk.contents_model != self.backend.contents_model:
            raise BackendError(f"disk {disk.name!r} holds {disk.contents_model}, VM {vm.name!r}'s host "
                               f"{self.backend.contents_model}")
        disks[name] = disk
        return disk

    def disk(self, vm: VM, name: str | None = None) -> Disk:
        """``vm``'s disk ``name`` (its first disk when None)."""
        disks = self.disks.get(vm.name, {})
        if not disks:
            raise BackendError(f"VM {vm.name!r} has no disk")
        if name is None:
            return next(iter(disks.values()))
        if name not in disks:
            raise BackendError(f"VM {vm.name!r} has no disk named {name!r} (disks: {', '.join(disks)})")
        return disks[name]

    def disk_io(self, vm: VM, disk: Disk, gpps: np.ndarray, blocks: np.ndarray, writes: np.ndarray) -> float:
        """The guest's disk I/O: each transfer reads ``blocks[i]`` into page ``gpps[i]`` or
        (where ``writes[i]``) writes the page to the block. Reads happen before writes; a page or
        block named twice keeps the last transfer. Charges the disk costs and calls
        :func:`memvisor_disk_io`; returns the seconds the I/O took (the caller lets them pass)."""
        gpps = np.asarray(gpps, dtype=np.int64).reshape(-1)
        blocks = np.asarray(blocks, dtype=np.int64).reshape(-1)
        writes = np.asarray(writes, dtype=bool).reshape(-1)
        if not len(gpps):
            return 0.0
        # The last transfer of each page wins (a page cache slot reused within one batch).
        order = np.arange(len(gpps))[::-1]
        _, last = np.unique(gpps[::-1] * 2 + writes[::-1], return_index=True)
        keep = np.sort(order[last])
        gpps, blocks, writes = gpps[keep], blocks[keep], writes[keep]
        backend, seconds = self.backend, 0.0
        reads = ~writes
        if reads.any():
            data = disk.read(blocks[reads])
            seconds += backend.account("disk_read", int(reads.sum()) * PAGE_SIZE, 1)
            backend.guest_write(vm, gpps[reads], data)
        if writes.any():
            data = backend.guest_contents(vm, gpps[writes])
            disk.write(blocks[writes], data)
            seconds += backend.account("disk_write", int(writes.sum()) * PAGE_SIZE, 1)
        counters = self.metrics.counters[vm.name]
        counters["disk_reads"] = counters.get("disk_reads", 0) + int(reads.sum())
        counters["disk_writes"] = counters.get("disk_writes", 0) + int(writes.sum())
        self.hook.memvisor_disk_io(host=self, vm=vm, io=DiskIOBatch(disk, gpps, blocks, writes, self.now))
        return seconds

    def fill_page_cache(self, vm: VM, disk: Disk, fraction: float, seed: int | None = None) -> np.ndarray:
        """Fill the last ``fraction`` of ``vm``'s pages with copies of disk blocks, read through
        :meth:`disk_io` (the guest's page cache after it read files): runs of consecutive blocks
        from a seeded start. Returns the pages filled."""
        count = min(vm.pages, int(round(fraction * vm.pages)))
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        gpps = np.arange(vm.pages - count, vm.pages, dtype=np.int64)
        rng = np.random.default_rng(vm.seed if seed is None else seed)
        start = int(rng.integers(disk.blocks))
        blocks = (np.arange(count, dtype=np.int64) + start) % disk.blocks
        self.disk_io(vm, disk, gpps, blocks, np.zeros(count, dtype=bool))
        return gpps

    def memory_error(self, vm: VM, gpps: np.ndarray) -> dict:
        """An uncorrectable memory error hit ``gpps`` (their bytes are already wrong): plugins
        repair what they can (:func:`memvisor_memory_error`); the rest is reported to the guest
        as lost. Returns ``{"pages", "repaired", "lost"}`` (lists of pages), also kept in
        :attr:`memory_errors`."""
        gpps = np.unique(np.asarray(gpps, dtype=np.int64))
        event = MemoryErrorEvent(gpps, self.backend.mpns(vm, gpps), self.now)
        repaired = np.zeros(0, dtype=np.int64)
        for result in self.hook.memvisor_memory_error(host=self, vm=vm, error=event):
            if result is not None:
                repaired = np.union1d(repaired, np.asarray(result, dtype=np.int64))
        repaired = np.intersect1d(repaired, gpps)
        lost = np.setdiff1d(gpps, repaired)
        outcome = {"vm": vm.name, "time": self.now, "pages": gpps.tolist(), "repaired": repaired.tolist(),
                   "lost": lost.tolist()}
        self.memory_errors.append(outcome)
        self.metrics.event(self.now, "memory_error", vm=vm.name, pages=len(gpps), repaired=len(repaired),
                           lost=len(lost))
        return outcome

    # -- time ---------------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass, firing a tick for every interval crossed and checking memory
        pressure at each tick.

        On a real clock (a backend without ``virtual_time``) the work the caller did since the
        previous advance ended (a guest batch, a restore) took its real time already: the host
        sleeps only what is left of ``seconds`` from then, firing every tick at its time."""
        if Capability.VIRTUAL_TIME in self.backend.capabilities:
            self.backend.advance(seconds)
            self._fire_due_ticks()
        else:
            self.wait_until(self._advanced_to + max(0.0, seconds))

    def wait_until(self, when: float) -> None:
        """Let time pass until ``when`` (nothing if it has come): virtual time jumps there; a
        real clock sleeps, a tick interval at most at a time, so that ticks fire at their
        interval and memory pressure is checked at each."""
        if Capability.VIRTUAL_TIME in self.backend.capabilities:
            if when > self.now:
                self.backend.advance(when - self.now)
            self._fire_due_ticks()
            return
        while True:
            self._fire_due_ticks()
            now = self.now
            if now >= when:
                break
            self.backend.advance(max(0.0, min(when, self._next_tick) - now))
        self._advanced_to = self.now

    def _fire_due_ticks(self) -> None:
        real = Capability.VIRTUAL_TIME not in self.backend.capabilities
        # A tick is due when time reaches it, up to rounding: time advanced in several steps to
        # exactly a tick (0.1 + 0.2 …) must fire it.
        while self.now >= self._next_tick - TIME_EPSILON:
            if real:
                # Intervals that passed while the host was busy (a long save, a tick's own work)
                # are one late tick, not a burst of ticks back to back that starves the guests.
                missed = max(0, int((self.now - self._next_tick) // self.tick_interval))
                self._next_tick += missed * self.tick_interval
                self._ticks += missed
            tick = Tick(self._next_tick, self.tick_interval, self._ticks)
            self._ticks += 1
            self._next_tick += self.tick_interval
            self.hook.memvisor_tick(host=self, tick=tick)
            self.check_pressure()
            self.metrics.sample_memory(self)
            self.budgets.sample(tick.now)
            if real:
                break  # the next one fires at the next call: a guest batch runs in between

    def check_pressure(self, target_free_pages: int | None = None) -> int:
        """Call :func:`memvisor_memory_pressure` if free memory is below the low watermark (or
        below ``target_free_pages`` when given); returns the machine pages reclaimed. The core
        calls it after every tick; a test causes pressure with ``target_free_pages``
        (``host.check_pressure(target_free_pages=host.backend.free_pages() + 1024)``)."""
        total = self.backend.total_pages()
        free = self.backend.free_pages()
        if target_free_pages is None:
            if free >= self.config.low_watermark * total:
                return 0
            target_free_pages = int(self.config.high_watermark * total)
        if free >= target_free_pages:
            return 0
        pressure = MemoryPressure(free, target_free_pages, self.now)
        results = self.hook.memvisor_memory_pressure(host=self, pressure=pressure)
        reclaimed = int(sum(r for r in results if r))
        self.metrics.event(self.now, "memory_pressure", free_pages=free, target_free_pages=target_free_pages,
                           reclaimed_pages=reclaimed)
        return reclaimed

    # -- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, vm: VM, request: SaveRequest):
        """Save ``vm``'s memory (:func:`memvisor_checkpoint_save`); returns the job, which a
        lazy save finishes later (``job.done``)."""
        job = self.hook.memvisor_checkpoint_save(host=self, vm=vm, request=request)
        self.checkpoint_jobs.append(job)
        self.metrics.event(self.now, "checkpoint_save", vm=vm.name, method=job.method)
        return job

    def restore_checkpoint(self, vm: VM, request: RestoreRequest):
        """Replace ``vm``'s memory with a checkpoint's, then measure the time until the guest's
        first access is served: one read of page 0 (the first page a booting guest touches).

        A save of the VM still running finishes first (its job's ``flush``: the file holds the
        memory the save began with). Then the restore is checked
        (:func:`memvisor.builtins.checkpoint.vm.check_restorable`: the file opens and holds every page,
        its records still resolve) and refused with nothing of the VM changed; then
        :func:`memvisor_restore_starting` tells every plugin, and
        :func:`memvisor_checkpoint_restore` decides who restores (a lazy restore, or the core's
        eager one)."""
        from memvisor.builtins.checkpoint.vm import check_restorable

        for job in self.checkpoint_jobs:
            if job.vm == vm.name and getattr(job, "flush", None) is not None and not job.done:
                job.flush()  # a save of the VM still running (lazy)
        record_pages = check_restorable(self, vm, request)
        self.hook.memvisor_restore_starting(host=self, vm=vm, restore=RestoreStart(request, record_pages))
        job = self.hook.memvisor_checkpoint_restore(host=self, vm=vm, request=request)
        probe = self.access(vm, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=bool))
        self.advance(probe.seconds)
        job.first_access_s = self.now - job.started
        self.checkpoint_jobs.append(job)
        self.metrics.event(self.now, "checkpoint_restore", vm=vm.name, method=job.method)
        return job

    def stop(self) -> None:
        """End the run: plugins flush their state (:func:`memvisor_host_stopping`)."""
        if not self.stopped:
            self.stopped = True
            self.hook.memvisor_host_stopping(host=self)

    def report_sections(self) -> list:
        """Every plugin's report sections (:func:`memvisor_report`), flattened."""
        out = []
        for result in self.hook.memvisor_report(host=self):
            out.extend(result if isinstance(result, list) else [result])
        # Each technique's standing contribution to reclaimed memory, by the convention that a
        # section's ``reclaimed_mib`` metric is what the plugin keeps free now.
        reclaimed = {s.plugin: s.metrics["reclaimed_mib"] for s in out
                     if isinstance(s.metrics.get("reclaimed_mib"), (int, float))}
        for i, s in enumerate(out):
            if s.plugin == "memvisor" and "overcommit" in s.metrics:
                from memvisor.report import Column, Table

                s.metrics["reclaimed_now_mib_by_technique"] = reclaimed
                table = Table("Kept free now, by technique", [Column(k, k, "MiB") for k in reclaimed],
                              record=("reclaimed_now_mib_by_technique",))
                out[i] = attrs.evolve(s, tables=[*(s.tables or ()), table])
        return out
