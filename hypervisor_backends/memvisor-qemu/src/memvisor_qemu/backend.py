"""The ``qemu`` backend: a VM's memory is the RAM that QEMU's migration stream carries.

QEMU stays the hypervisor. memvisor holds a copy of the VM's RAM blocks, one after the other
(see :class:`memvisor_qemu.stream.BlockIndex`): received from QEMU on a save, or sent to QEMU on
a restore or a migration. Through this backend the core and the plugins work on that memory
unchanged: the core's save reads it page by page and asks ``memvisor_describe_pages`` (diskmap
answers with disk references); a lazy restore makes every page not present and serves faults.

A *fault* here is a page that QEMU asked for (a post-copy page request on the return path):
the restore session calls :meth:`request`, which delivers the missing pages to the host's
fault hook. Every page a plugin makes present (:meth:`populate`) is queued in the VM's
*outbox*, which the session sends to QEMU, each page once.

Capabilities: ``fault`` only. QEMU keeps the VM's page tables, so tracing, write protection,
accessed and dirty bits, sharing, large pages and NUMA are not offered; time is real.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from memvisor import PAGE_SIZE
from memvisor.arrays import unique
from memvisor.backend import AccessResult, Backend, Capability
from memvisor.errors import BackendError, CapabilityError
from memvisor.events import FaultBatch

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.contents import ContentSpec
    from memvisor.host import VM, Host, HostConfig

REFUSAL = "QEMU keeps the VM's page tables; memvisor sees its RAM only through the migration stream"


class _Memory:
    """One VM's RAM as memvisor holds it."""

    def __init__(self, pages: int):
        self.data = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)  # committed as it is written
        self.present = np.ones(pages, dtype=bool)
        self.present_count = pages  # kept as pages come and go: the host asks at every tick
        self.outbox: list[np.ndarray] = []
        self.heat = np.zeros(pages, dtype=np.float64)


class QemuBackend(Backend):
    """RAM of QEMU virtual machines, moved through QEMU's migration stream."""

    name = "qemu"
    capabilities = frozenset({Capability.FAULT})

    def __init__(self, config: HostConfig):
        self.config = config
        self.host: Host | None = None
        self.vms: dict[str, _Memory] = {}
        self._start = time.perf_counter()

    # -- wiring and time ------------------------------------------------------------------------

    def attach(self, host: Host) -> None:
        self.host = host

    def now(self) -> float:
        return time.perf_counter() - self._start

    def advance(self, seconds: float) -> None:
        """Real time passes by itself."""

    def account(self, kind: str, nbytes: int, ops: int = 1) -> float:
        return 0.0

    # -- VMs ------------------------------------------------------------------------------------

    def create_vm(self, vm: VM, contents: ContentSpec | None = None) -> None:
        if contents is not None:
            raise BackendError("backend 'qemu': a VM's contents come from QEMU, not from a generator")
        self.vms[vm.name] = _Memory(vm.pages)

    def destroy_vm(self, vm: VM) -> None:
        self.vms.pop(vm.name, None)

    def memory(self, vm: VM) -> np.ndarray:
        """The VM's RAM, ``(pages, 4096)`` uint8, written in place by a save session."""
        return self.vms[vm.name].data

    def take_outbox(self, vm: VM) -> np.ndarray:
        """Pages made present since the last call, in the order they were made present."""
        m = self.vms[vm.name]
        out = np.concatenate(m.outbox) if m.outbox else np.zeros(0, dtype=np.int64)
        m.outbox.clear()
        return out

    def set_heat(self, vm: VM, heat: np.ndarray) -> None:
        """How hot each page is, as QEMU's dirty tracking showed it (see the qemu plugin's
        ``memvisor_page_heat``)."""
        self.vms[vm.name].heat = np.asarray(heat, dtype=np.float64)

    def heat(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        return self.vms[vm.name].heat[gpps]

    # -- guest activity: QEMU's page requests ---------------------------------------------------

    def request(self, vm: VM, gpps: np.ndarray) -> int:
        """QEMU asked for ``gpps``: the ones not present go to the fault hook; returns how many."""
        gpps = unique(np.asarray(gpps, dtype=np.int64))
        missing = gpps[~self.vms[vm.name].present[gpps]]
        if len(missing):
            self.host.deliver_faults(vm, FaultBatch(missing, np.zeros(len(missing), bool), self.now()))
        return len(missing)

    def access(self, vm: VM, gpps: np.ndarray, writes: np.ndarray, stamp: int) -> AccessResult:
        """A read of ``gpps`` by memvisor on the guest's behalf (the core's probe after a
        restore): missing pages fault as QEMU's requests do. Writes are refused: only QEMU's
        guest writes its memory."""
        if np.any(writes):
            raise BackendError("backend 'qemu': the guest runs inside QEMU; memvisor does not write for it")
        started = self.now()
        faults = self.request(vm, gpps)
        return AccessResult(seconds=self.now() - started, accesses=len(gpps), faults=faults)

    def guest_write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        raise BackendError("backend 'qemu': the guest runs inside QEMU; memvisor does not write for it")

    def guest_read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        self.request(vm, gpps)
        return self.read(vm, gpps)

    # -- contents and presence ------------------------------------------------------------------

    def read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        return self.vms[vm.name].data[np.asarray(gpps, dtype=np.int64)]

    def write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        m = self.vms[vm.name]
        gpps = np.asarray(gpps, dtype=np.int64)
        if not m.present[gpps].all():
            raise BackendError("backend 'qemu': write to a page that is not present")
        m.data[gpps] = np.asarray(data, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)

    def present(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        p = self.vms[vm.name].present
        return p.copy() if gpps is None else p[np.asarray(gpps, dtype=np.int64)]

    def populate(self, vm: VM, gpps: np.ndarray, data: np.ndarray | None = None) -> None:
        m = self.vms[vm.name]
        gpps = np.asarray(gpps, dtype=np.int64)
        if not len(gpps):
            return
        if m.present[gpps].any():
            raise BackendError("backend 'qemu': populate of a page that is present")
        m.data[gpps] = 0 if data is None else np.asarray(data, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)
        m.present[gpps] = True
        m.present_count += len(gpps)
        m.outbox.append(gpps.copy())

    def unmap(self, vm: VM, gpps: np.ndarray) -> None:
        m = self.vms[vm.name]
        gpps = unique(np.asarray(gpps, dtype=np.int64))
        m.present_count -= int(np.count_nonzero(m.present[gpps]))
        m.present[gpps] = False  # its bytes are stale now; populate writes every byte again

    # -- what QEMU keeps to itself --------------------------------------------------------------

    def _refuse(self, what: str):
        raise CapabilityError(f"backend 'qemu' cannot {what}: {REFUSAL}")

    def trace(self, vm, gpps):
        self._refuse("trace pages")

    def untrace(self, vm, gpps):
        """Nothing is ever traced."""

    def traced(self, vm, gpps=None):
        return np.zeros(vm.pages if gpps is None else len(gpps), dtype=bool)

    def protect(self, vm, gpps):
        self._refuse("write-protect pages")

    def unprotect(self, vm, gpps):
        """Nothing is ever protected."""

    def protected(self, vm, gpps=None):
        return np.zeros(vm.pages if gpps is None else len(gpps), dtype=bool)

    def take_accessed(self, vm, gpps=None):
        self._refuse("read accessed bits")

    def take_dirty(self, vm, gpps=None):
        self._refuse("read dirty bits")

    @property
    def zero_mpn(self) -> int:
        return -2  # there is no machine page memvisor could map

    def mpns(self, vm, gpps=None):
        """A number unique to each present page of each VM (its own copy of the page)."""
        m = self.vms[vm.name]
        gpps = np.arange(vm.pages) if gpps is None else np.asarray(gpps, dtype=np.int64)
        return np.where(m.present[gpps], (vm.id << 40) + gpps, -1)

    def refcounts(self, mpns):
        return np.where(np.asarray(mpns) >= 0, 1, 0)

    def share(self, vm, gpps, mpns, *, discard=False):
        self._refuse("share pages")

    def break_sharing(self, vm, gpps):
        return 0  # nothing is shared

    def hold_page(self, data=None, node=0):
        self._refuse("hold machine pages")

    def release_page(self, mpn):
        self._refuse("hold machine pages")

    def large(self, vm, gpps=None):
        return np.zeros(vm.pages if gpps is None else len(gpps), dtype=bool)

    def split(self, vm, large_indices):
        return 0

    def collapse(self, vm, large_indices):
        self._refuse("collapse large pages")

    @property
    def numa_nodes(self) -> int:
        return 1

    def node_of(self, vm, gpps=None):
        m = self.vms[vm.name]
        gpps = np.arange(vm.pages) if gpps is None else np.asarray(gpps, dtype=np.int64)
        return np.where(m.present[gpps], 0, -1)

    def migrate(self, vm, gpps, node):
        return 0

    def free_pages(self, node=None):
        return max(0, self.total_pages() - sum(m.present_count for m in self.vms.values()))

    def total_pages(self, node=None):
        return int(self.config.memory_pages)
