"""The emulator backend: VM page tables over :class:`MachineMemory`, traps and virtual time.

Each VM has a GPP -> MPN map (``p2m``, ``-1`` when not present) and one byte of flags per page.
A batch of guest accesses is handled in one vectorised pass that finds the touches that trap;
only the first trap of each page in a batch is delivered, as one batched hook call per kind
(faults first, then traced accesses, then writes to protected or shared pages); the pass
repeats until nothing traps, then sets accessed and dirty bits and lands the writes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.arrays import first_occurrences, has_duplicates, unique, unique_counts
from memvisor.backend import AccessResult, Backend, Capability
from memvisor.errors import BackendError, UserError
from memvisor.events import AccessBatch, FaultBatch, WriteBatch
from memvisor.identity import MODELS, is_identities
from memvisor_backend_emulator.costs import CostModel
from memvisor_backend_emulator.machine import ZERO_MPN, MachineMemory

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.contents import ContentSpec
    from memvisor.host import VM, Host, HostConfig

PRESENT = np.uint8(1)
TRACED = np.uint8(2)
PROTECTED = np.uint8(4)
COW = np.uint8(8)
ACCESSED = np.uint8(16)
DIRTY = np.uint8(32)
LARGE = np.uint8(64)

MAX_TRAP_ROUNDS = 16
FILL_CHUNK = 16384  # pages of contents generated at a time when a VM is laid out
IDENTITY_FILL_CHUNK = 1 << 20  # pages of identities generated at a time (no bytes: 8 MiB)


class _VMState:
    """Page table and flags of one VM: 5 bytes per page below 8 TiB of machine memory."""

    def __init__(self, pages: int, index_dtype):
        self.p2m = np.full(pages, -1, dtype=index_dtype)
        self.flags = np.zeros(pages, dtype=np.uint8)


class EmulatorBackend(Backend):
    """In-process emulated host: page bytes or content identities, virtual time, deterministic
    under a seed."""

    name = "emulator"
    capabilities = frozenset(Capability.ALL) - {Capability.NUMA}
    contents_models = MODELS

    def __init__(self, config: HostConfig):
        nodes = config.numa_nodes
        per_node = [config.memory_pages // nodes] * nodes
        self.contents_model = config.contents_model(MODELS)
        self.memory = MachineMemory(per_node, self.contents_model)
        self.store = self.memory.store
        if nodes > 1:
            self.capabilities = frozenset(Capability.ALL)
        self.costs = CostModel.from_options(dict(config.backend_options.get("costs", {})))
        self.seed = config.seed
        self._now = 0.0
        self._charged = 0.0  # seconds of hypervisor work charged to the batch being run
        self._in_batch = False
        self.background_seconds: dict[str, float] = {}
        self._vms: dict[int, _VMState] = {}
        self._held: set[int] = set()  # machine pages held by hold_page and not released
        self._host: Host | None = None

    # -- wiring and time ----------------------------------------------------------------------

    def attach(self, host: Host) -> None:
        self._host = host

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise BackendError("time cannot go backwards")
        self._now += seconds

    def account(self, kind: str, nbytes: int, ops: int = 1) -> float:
        seconds = self.costs.work_seconds(kind, nbytes, ops)
        if self._in_batch:
            self._charged += seconds  # the guest waits for work done inside its trap
        else:
            self.background_seconds[kind] = self.background_seconds.get(kind, 0.0) + seconds
        return seconds

    def work_seconds(self, kind: str, nbytes: int, ops: int = 1) -> float:
        """The cost model's time for the work (``[host.costs]``), not charged."""
        return self.costs.work_seconds(kind, nbytes, ops)

    # -- VMs ----------------------------------------------------------------------------------

    def _state(self, vm: VM) -> _VMState:
        try:
            return self._vms[vm.id]
        except KeyError:
            raise BackendError(f"VM {vm.name!r} is not on this backend") from None

    def _pages(self, vm: VM, gpps) -> np.ndarray:
        gpps = np.asarray(gpps, dtype=np.int64).reshape(-1)
        if len(gpps) and (gpps.min() < 0 or gpps.max() >= vm.pages):
            raise BackendError(f"page number outside VM {vm.name!r} ({vm.pages} pages)")
        return gpps

    def create_vm(self, vm: VM, contents: ContentSpec | None = None) -> None:
        if vm.id in self._vms:
            raise BackendError(f"VM {vm.name!r} exists already")
        mem = self.memory
        st = _VMState(vm.pages, mem.index_dtype)
        self._vms[vm.id] = st
        large = vm.pages // LARGE_PAGE_PAGES if vm.large_pages else 0
        for index in range(large):
            base = mem.alloc_frame(vm.home_node)
            if base < 0:  # no free frame: the rest is backed by small pages
                break
            mem.zero(np.arange(base, base + LARGE_PAGE_PAGES))
            first = index * LARGE_PAGE_PAGES
            st.p2m[first : first + LARGE_PAGE_PAGES] = np.arange(base, base + LARGE_PAGE_PAGES)
            st.flags[first : first + LARGE_PAGE_PAGES] = PRESENT | LARGE
        small = np.flatnonzero(st.p2m < 0)
        if len(small):
            st.p2m[small] = mem.alloc(len(small), vm.home_node)
            st.flags[small] = PRESENT
        if contents is not None:
            identity = self.contents_model == "identity"
            chunk = IDENTITY_FILL_CHUNK if identity else FILL_CHUNK
            for start in range(0, vm.pages, chunk):
                gpps = np.arange(start, min(vm.pages, start + chunk), dtype=np.int64)
                if identity:  # no bytes: the identities the generator would make bytes from
                    ids = contents.identities(vm.pages, vm.seed, gpps)
                    nonzero = np.flatnonzero(ids)
                    mem.store.ids[st.p2m[gpps[nonzero]]] = ids[nonzero]
                    continue
                nonzero = gpps[contents.kinds(vm.pages, vm.seed, gpps) != 0]
                if len(nonzero):
                    mem.store.store(st.p2m[nonzero], contents.fill(vm.pages, vm.seed, nonzero))

    def destroy_vm(self, vm: VM) -> None:
        st = self._state(vm)
        self.memory.put(st.p2m[st.p2m >= 0])
        del self._vms[vm.id]

    # -- guest activity -----------------------------------------------------------------------

    def access(self, vm: VM, gpps: np.ndarray, writes: np.ndarray, stamp: int) -> AccessResult:
        st = self._state(vm)
        gpps = self._pages(vm, gpps)
        writes = np.asarray(writes, dtype=bool)
        counts, flags = self._settle(vm, st, gpps, writes)
        # The flags as the last round read them are current (nothing trapped after it): set the
        # bits without reading them again, and only where they are not set yet (hot pages keep
        # theirs between readers): each access to a large VM's table is a cache miss.
        fresh = (flags & ACCESSED) == 0
        if fresh.any():
            st.flags[gpps[fresh]] = flags[fresh] | ACCESSED
        if writes.any():
            written = gpps[writes]
            clean = (flags[writes] & DIRTY) == 0
            if clean.any():
                st.flags[written[clean]] = flags[writes][clean] | (ACCESSED | DIRTY)
            self.store.stamp(st.p2m[written], stamp)
        remote = 0
        if self.memory.nodes > 1:
            remote = int(np.count_nonzero(self.memory.node_of(st.p2m[gpps]) != vm.home_node))
        c = self.costs
        handler = sum(counts) * c.trap_ns * 1e-9 + self._take_charged()
        seconds = (len(gpps) - remote) * c.dram_local_ns * 1e-9 + remote * c.dram_remote_ns * 1e-9 + handler
        return AccessResult(seconds, len(gpps), remote, *counts, handler_seconds=handler)

    def trapping(self, vm: VM, gpps: np.ndarray, writes: np.ndarray) -> np.ndarray:
        f = self._state(vm).flags[self._pages(vm, gpps)]
        return ((f & (PRESENT | TRACED)) != PRESENT) | (np.asarray(writes, bool) & ((f & (PROTECTED | COW)) != 0))

    def guest_write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        st = self._state(vm)
        gpps = self._pages(vm, gpps)
        self._settle(vm, st, gpps, np.ones(len(gpps), dtype=bool))
        self._take_charged()
        self.store.store(st.p2m[gpps], data)
        st.flags[gpps] |= ACCESSED | DIRTY

    def guest_read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        return self.store.load_bytes(self._guest_touch(vm, gpps))

    def guest_contents(self, vm: VM, gpps: np.ndarray):
        return self.store.load(self._guest_touch(vm, gpps))

    def _guest_touch(self, vm: VM, gpps) -> np.ndarray:
        """The guest reads ``gpps`` (traps delivered, accessed bits set); their machine pages."""
        st = self._state(vm)
        gpps = self._pages(vm, gpps)
        self._settle(vm, st, gpps, np.zeros(len(gpps), dtype=bool))
        self._take_charged()
        st.flags[gpps] |= ACCESSED
        return st.p2m[gpps]

    def _take_charged(self) -> float:
        charged, self._charged = self._charged, 0.0
        return charged

    def _settle(self, vm: VM, st: _VMState, gpps: np.ndarray,
                writes: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
        """Deliver the traps of a batch until none is left; returns (faults, traced, writes) and
        the pages' flags as they are then."""
        faults = traced = write_traps = 0
        self._in_batch = True
        try:
            for _ in range(MAX_TRAP_ROUNDS):
                f = st.flags[gpps]
                trap = (f & (PRESENT | TRACED)) != PRESENT
                trap |= writes & ((f & (PROTECTED | COW)) != 0)
                if not trap.any():
                    return (faults, traced, write_traps), f
                where = np.flatnonzero(trap)
                pages, first = _first_touch(gpps[where])
                positions = where[first]
                flags = f[positions]
                missing = (flags & PRESENT) == 0
                if missing.any():
                    batch = FaultBatch(pages[missing], writes[positions[missing]], self._now)
                    self._host.deliver_faults(vm, batch)
                    faults += len(batch.gpps)
                    continue
                is_traced = (flags & TRACED) != 0
                if is_traced.any():
                    touched = pages[is_traced]
                    st.flags[touched] &= ~TRACED
                    batch = AccessBatch(touched, writes[positions[is_traced]], positions[is_traced], self._now)
                    self._host.deliver_accesses(vm, batch)
                    traced += len(touched)
                    continue
                # Only writes to protected or shared pages are left.
                mpns = st.p2m[pages]
                shared = ((flags & COW) != 0) & ((mpns == ZERO_MPN) | (self.memory.refcount[mpns] > 1))
                self._host.deliver_writes(vm, WriteBatch(pages, mpns, shared, self._now))
                write_traps += len(pages)
            raise BackendError(
                f"traps of VM {vm.name!r} did not settle after {MAX_TRAP_ROUNDS} rounds: "
                "a plugin re-arms pages inside a trap hook"
            )
        finally:
            self._in_batch = False

    # -- contents and presence ----------------------------------------------------------------

    def _present_mpns(self, vm: VM, gpps, what: str) -> np.ndarray:
        mpns = self._state(vm).p2m[self._pages(vm, gpps)]
        if np.any(mpns < 0):
            raise BackendError(f"{what} of a page that is not present in VM {vm.name!r}")
        return mpns

    def read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        return self.store.load_bytes(self._present_mpns(vm, gpps, "read"))

    def contents(self, vm: VM, gpps: np.ndarray):
        return self.store.load(self._present_mpns(vm, gpps, "read"))

    def fingerprint(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        return self.store.fingerprint(self._present_mpns(vm, gpps, "fingerprint"))

    def is_zero(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        return self.store.is_zero(self._present_mpns(vm, gpps, "is_zero"))

    def write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        st = self._state(vm)
        gpps = self._pages(vm, gpps)
        if np.any(st.p2m[gpps] < 0):
            raise BackendError(f"write to a page that is not present in VM {vm.name!r}")
        self.break_sharing(vm, gpps)
        self.store.store(st.p2m[gpps], data)

    def present(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        return self._flag(vm, gpps, PRESENT)

    def populate(self, vm: VM, gpps: np.ndarray, data: np.ndarray | None = None) -> None:
        st = self._state(vm)
        gpps = self._pages(vm, gpps)
        if np.any(st.p2m[gpps] >= 0):
            raise BackendError(f"populate of a page that is present already in VM {vm.name!r}")
        if has_duplicates(gpps):
            raise BackendError("populate of the same page twice in one call")
        mpns = self.memory.alloc(len(gpps), vm.home_node, zero=data is None)
        if data is None:
            self.account("zero_fill", len(gpps) * PAGE_SIZE)
        else:
            self.store.store(mpns, data)
        st.p2m[gpps] = mpns
        st.flags[gpps] = (st.flags[gpps] & (TRACED | PROTECTED)) | PRESENT

    def unmap(self, vm: VM, gpps: np.ndarray) -> None:
        st = self._state(vm)
        gpps = unique(self._pages(vm, gpps))
        large = unique(gpps[(st.flags[gpps] & LARGE) != 0] // LARGE_PAGE_PAGES)
        if len(large):
            self.split(vm, large)
        mpns = st.p2m[gpps]
        self.memory.put(mpns[mpns >= 0])
        st.p2m[gpps] = -1
        st.flags[gpps] &= TRACED | PROTECTED

    # -- traps and bits -----------------------------------------------------------------------

    def _flag(self, vm: VM, gpps, bit) -> np.ndarray:
        st = self._state(vm)
        flags = st.flags if gpps is None else st.flags[self._pages(vm, gpps)]
        return (flags & bit) != 0

    def _set(self, vm: VM, gpps, bit, on: bool) -> None:
        st = self._state(vm)
        gpps = self._pages(vm, gpps)
        if on:
            st.flags[gpps] |= bit
        else:
            st.flags[gpps] &= ~bit

    def _take(self, vm: VM, gpps, bit) -> np.ndarray:
        st = self._state(vm)
        if gpps is None:
            out = (st.flags & bit) != 0
            st.flags &= ~bit
            return out
        gpps = self._pages(vm, gpps)
        out = (st.flags[gpps] & bit) != 0
        st.flags[gpps] &= ~bit
        return out

    def trace(self, vm: VM, gpps: np.ndarray) -> None:
        self._set(vm, gpps, TRACED, True)

    def untrace(self, vm: VM, gpps: np.ndarray) -> None:
        self._set(vm, gpps, TRACED, False)

    def traced(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        return self._flag(vm, gpps, TRACED)

    def protect(self, vm: VM, gpps: np.ndarray) -> None:
        self._set(vm, gpps, PROTECTED, True)

    def unprotect(self, vm: VM, gpps: np.ndarray) -> None:
        self._set(vm, gpps, PROTECTED, False)

    def protected(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        return self._flag(vm, gpps, PROTECTED)

    def take_accessed(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        return self._take(vm, gpps, ACCESSED)

    def take_dirty(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        return self._take(vm, gpps, DIRTY)

    # -- machine pages and sharing ------------------------------------------------------------

    @property
    def zero_mpn(self) -> int:
        return ZERO_MPN

    def mpns(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        st = self._state(vm)
        return st.p2m.astype(np.int64) if gpps is None else st.p2m[self._pages(vm, gpps)].astype(np.int64)

    def refcounts(self, mpns: np.ndarray) -> np.ndarray:
        return self.memory.refcount[np.asarray(mpns, dtype=np.int64)]

    def share(self, vm: VM, gpps: np.ndarray, mpns: np.ndarray, *, discard: bool = False) -> int:
        st = self._state(vm)
        gpps = self._pages(vm, gpps)
        targets = np.asarray(mpns, dtype=np.int64).reshape(-1)
        if len(targets) != len(gpps):
            raise BackendError("share needs one machine page per guest page")
        if has_duplicates(gpps):
            raise BackendError("share of the same guest page twice in one call")
        old = st.p2m[gpps]
        if np.any(old < 0):
            raise BackendError(f"share of a page that is not present in VM {vm.name!r}")
        if np.any((st.flags[gpps] & LARGE) != 0):
            raise BackendError("share of a large-page member: split the large page first")
        if np.any((targets != ZERO_MPN) & (self.memory.refcount[targets] < 1)):
            raise BackendError("share onto a machine page that is free")
        moving = old != targets
        gpps, old, targets = gpps[moving], old[moving], targets[moving]
        if not discard and not self.store.equal(old, targets).all():
            raise BackendError("share of pages whose contents differ")
        # A target still private to the page that maps it becomes shared: that page must turn
        # copy-on-write too, or a write to it would reach every sharer. (A page held by
        # hold_page has no guest mapping: no page table is searched for it.)
        private = unique(targets[(targets != ZERO_MPN) & (self.memory.refcount[targets] == 1)])
        if self._held and len(private):
            private = private[~np.isin(private, np.fromiter(self._held, np.int64, len(self._held)))]
        owners = [(other, np.flatnonzero(np.isin(other.p2m, private))) for other in self._vms.values()] \
            if len(private) else []
        if any(np.any((other.flags[o] & LARGE) != 0) for other, o in owners):
            raise BackendError("share onto a large-page member: split the large page first")
        for other, o in owners:
            other.flags[o] |= COW
        self.memory.get(targets)
        st.p2m[gpps] = targets
        st.flags[gpps] |= COW
        return len(self.memory.put(old))

    def break_sharing(self, vm: VM, gpps: np.ndarray) -> int:
        st = self._state(vm)
        gpps = unique(self._pages(vm, gpps))
        cow = gpps[(st.flags[gpps] & COW) != 0]
        if not len(cow):
            return 0
        mpns = st.p2m[cow]
        alone = (mpns != ZERO_MPN) & (self.memory.refcount[mpns] == 1)
        st.flags[cow[alone]] &= ~COW  # the other sharers are gone: nothing to copy
        copy, sources = cow[~alone], mpns[~alone]
        if len(copy):
            fresh = self.memory.alloc(len(copy), vm.home_node, zero=False)
            self.store.copy(fresh, sources)
            self.account("copy", len(copy) * PAGE_SIZE)
            st.p2m[copy] = fresh
            st.flags[copy] &= ~COW
            self.memory.put(sources)
        return len(copy)

    def hold_page(self, data: np.ndarray | None = None, node: int = 0) -> int:
        mpn = self.memory.alloc(1, node, zero=data is None)
        if data is not None:
            self.store.store(mpn, data if is_identities(data) else np.asarray(data, np.uint8).reshape(1, PAGE_SIZE))
        self._held.add(int(mpn[0]))
        return int(mpn[0])

    def release_page(self, mpn: int) -> None:
        self._held.discard(int(mpn))
        self.memory.put_one(int(mpn))

    def hold_pages(self, contents, nodes: np.ndarray) -> np.ndarray:
        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
        out = np.empty(len(nodes), dtype=np.int64)
        for node in np.unique(nodes).tolist():
            rows = np.flatnonzero(nodes == node)
            out[rows] = self.memory.alloc(len(rows), node, zero=False)
        self.store.store(out, contents if is_identities(contents) else np.asarray(contents, np.uint8))
        self._held.update(out.tolist())
        return out

    def release_pages(self, mpns: np.ndarray) -> None:
        mpns = np.asarray(mpns, dtype=np.int64).reshape(-1)
        self._held.difference_update(mpns.tolist())
        self.memory.put(mpns)

    # -- large pages --------------------------------------------------------------------------

    def large(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        return self._flag(vm, gpps, LARGE)

    def _large_runs(self, vm: VM, large_indices) -> np.ndarray:
        idx = unique(np.asarray(large_indices, dtype=np.int64).reshape(-1))
        if len(idx) and (idx.min() < 0 or (idx.max() + 1) * LARGE_PAGE_PAGES > vm.pages):
            raise BackendError(f"large page index outside VM {vm.name!r}")
        return idx

    def split(self, vm: VM, large_indices: np.ndarray) -> int:
        st = self._state(vm)
        idx = self._large_runs(vm, large_indices)
        members = (idx[:, None] * LARGE_PAGE_PAGES + np.arange(LARGE_PAGE_PAGES)).ravel()
        was_large = (st.flags[members].reshape(-1, LARGE_PAGE_PAGES)[:, 0] & LARGE) != 0
        st.flags[members] &= ~LARGE
        return int(np.count_nonzero(was_large))

    def collapse(self, vm: VM, large_indices: np.ndarray) -> int:
        st = self._state(vm)
        done = 0
        for index in self._large_runs(vm, large_indices):
            run = np.arange(index * LARGE_PAGE_PAGES, (index + 1) * LARGE_PAGE_PAGES)
            flags = st.flags[run]
            if (flags[0] & LARGE) or np.any((flags & PRESENT) == 0) or np.any((flags & COW) != 0):
                continue
            base = self.memory.alloc_frame(vm.home_node)
            if base < 0:
                break
            fresh = np.arange(base, base + LARGE_PAGE_PAGES)
            old = st.p2m[run].astype(np.int64)
            self.store.copy(fresh, old)
            self.account("copy", LARGE_PAGE_PAGES * PAGE_SIZE)
            self.memory.put(old)
            st.p2m[run] = fresh
            st.flags[run] |= LARGE
            done += 1
        return done

    # -- NUMA and accounting ------------------------------------------------------------------

    @property
    def numa_nodes(self) -> int:
        return self.memory.nodes

    def node_of(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        st = self._state(vm)
        mpns = st.p2m if gpps is None else st.p2m[self._pages(vm, gpps)]
        nodes = self.memory.node_of(np.maximum(mpns, 0)).astype(np.int64)
        nodes[mpns < 0] = -1
        return nodes

    def migrate(self, vm: VM, gpps: np.ndarray, node: int) -> int:
        if not 0 <= node < self.memory.nodes:
            raise UserError(f"NUMA node {node} does not exist (the host has {self.memory.nodes})")
        st = self._state(vm)
        gpps = unique(self._pages(vm, gpps))
        mpns = st.p2m[gpps]
        flags = st.flags[gpps]
        movable = (mpns >= 0) & ((flags & (COW | LARGE)) == 0)
        movable &= self.memory.node_of(np.maximum(mpns, 0)) != node
        gpps, mpns = gpps[movable], mpns[movable]
        gpps, mpns = gpps[: self.memory.free_count(node)], mpns[: self.memory.free_count(node)]
        if not len(gpps):
            return 0
        fresh = self.memory.alloc(len(gpps), node, strict=True, zero=False)
        self.store.copy(fresh, mpns)
        self.account("numa_copy", len(gpps) * PAGE_SIZE)
        st.p2m[gpps] = fresh
        self.memory.put(mpns)
        return len(gpps)

    def free_pages(self, node: int | None = None) -> int:
        return self.memory.free_count(node)

    def total_pages(self, node: int | None = None) -> int:
        # The zero page is the host's, not allocatable: it is not counted.
        if node is None:
            return self.memory.total - 1
        return self.memory.node_pages[node] - (1 if node == 0 else 0)

    def describe(self) -> dict:
        out = super().describe()
        out["contents"] = self.contents_model
        out["costs"] = attrs.asdict(self.costs)
        return out

    # -- checks -------------------------------------------------------------------------------

    def check_invariants(self) -> int:
        """Recount every machine page's references from the page tables and compare (slow).

        Raises :class:`BackendError` on a leaked, double-mapped or miscounted page; returns the
        number of machine pages held outside page tables (:meth:`hold_page`).
        """
        expected = np.zeros(self.memory.total, dtype=np.int64)
        for st in self._vms.values():
            mapped = st.p2m[st.p2m >= 0]
            pages, counts = unique_counts(mapped)
            expected[pages] += counts
            if np.any(((st.flags & PRESENT) != 0) != (st.p2m >= 0)):
                raise BackendError("present flag and page table disagree")
        held = self.memory.refcount.astype(np.int64) - expected
        held[ZERO_MPN] = 0
        free = self.memory.is_free()
        if np.any(held < 0):
            raise BackendError(f"{int(np.count_nonzero(held < 0))} machine pages have too few references")
        if np.any(free & (self.memory.refcount != 0)):
            raise BackendError("a free machine page has references")
        if np.any(~free & (self.memory.refcount == 0)):
            raise BackendError(f"{int(np.count_nonzero(~free & (self.memory.refcount == 0)))} machine pages leaked")
        return int(np.count_nonzero(held > 0))


_first_touch = first_occurrences
