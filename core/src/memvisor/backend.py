"""The abstract hypervisor backend: everything a technique may do to a VM's memory.

Plugins act on memory only through this interface (``host.backend``), so a plugin runs on every
backend that offers the capabilities it needs. Every operation takes arrays of page numbers.

Capabilities are plain names (the ``Capability`` constants). A backend lists the ones it has in
``capabilities``; a plugin that needs one calls ``host.require(...)`` when the host starts and
refuses to run, with one line naming the backend and the capability, where it is missing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import attrs
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.contents import ContentSpec
    from memvisor.host import VM, Host


_QUERY_CHUNK = 8192  # pages the default content queries read at once (32 MiB)


class Capability:
    """Names of backend capabilities."""

    FAULT = "fault"
    """Pages can be made not present; a touch raises a page fault that plugins serve."""
    TRACE = "trace"
    """Pages can be traced: the next touch traps once (access hook), then the page is untraced."""
    WRITE_PROTECT = "write_protect"
    """Pages can be write-protected: a write traps (write hook) before it lands."""
    ACCESSED = "accessed"
    """Accessed bits can be read and cleared without traps."""
    DIRTY = "dirty"
    """Dirty bits can be read and cleared without traps."""
    SHARE = "share"
    """Pages of equal contents can share one machine page, copy-on-write (any two pages)."""
    ZERO_PAGE = "zero_page"
    """Pages can be mapped to the one zero page, copy-on-write."""
    LARGE_PAGES = "large_pages"
    """2 MiB large pages can be split into small pages and collapsed again."""
    NUMA = "numa"
    """More than one NUMA node; pages can be migrated between nodes."""
    VIRTUAL_TIME = "virtual_time"
    """Time is virtual and deterministic under a seed (the emulator)."""

    ALL = (FAULT, TRACE, WRITE_PROTECT, ACCESSED, DIRTY, SHARE, ZERO_PAGE, LARGE_PAGES, NUMA, VIRTUAL_TIME)
    """Every capability name."""


@attrs.frozen
class AccessResult:
    """What one batch of guest accesses cost and how many of its touches trapped.

    :ivar seconds: time the batch took (virtual on the emulator), traps and their service included.
    :ivar accesses: accesses in the batch.
    :ivar remote: accesses to pages on another NUMA node than the VM's home node.
    :ivar faults: page-fault events delivered.
    :ivar traced: traced-access events delivered.
    :ivar write_traps: write-to-shared or write-protected events delivered.
    :ivar handler_seconds: the part of ``seconds`` the host's trap handler worked for the
        batch (trap delivery and the work done inside the traps): the handler is shared by the
        VMs, so the runner queues it: a batch that traps waits for the handler time of the
        other VMs' batches queued before it.
    """

    seconds: float
    accesses: int
    remote: int = 0
    faults: int = 0
    traced: int = 0
    write_traps: int = 0
    handler_seconds: float = 0.0


class Backend(ABC):
    """A hypervisor backend: machine memory, VM page tables, traps and a clock.

    Operations never trap: they are the hypervisor's own view of memory. Guest activity goes
    through :meth:`access`, which turns the touches that trap into batched hook calls on the
    attached host.

    Page arguments are int64 arrays of guest page numbers; per-page answers are arrays in the
    same order. Errors: an operation whose arguments break its contract — a page number
    outside the VM, a VM not on this backend, a page that must be present and is not (``read``,
    ``write``, ``share``) or must not be and is (``populate``), the same page twice in one
    call, a large-page member where small pages are needed, contents that differ in ``share``
    — raises :class:`memvisor.errors.BackendError` (a bug of the caller, one line saying
    which) before it changes anything. An operation that needs a capability the backend lacks
    raises :class:`memvisor.errors.CapabilityError` (one line); a plugin checks its
    capabilities once, with ``host.require``, when the host starts.
    """

    name: str = "?"
    """The name the backend is registered under (``[host] backend``)."""
    capabilities: frozenset[str] = frozenset()
    """The :class:`Capability` names this backend offers (``host.require`` checks them)."""
    contents_model: str = "bytes"
    """How this backend holds page contents: ``"bytes"`` (real bytes) or ``"identity"`` (by
    content identity, :mod:`memvisor.identity`: the emulator's model for hosts larger than the
    machine that runs it). :meth:`contents` hands out, and :meth:`populate`, :meth:`write`,
    :meth:`guest_write` and :meth:`hold_page` take, contents in this model."""
    contents_models: tuple[str, ...] = ("bytes",)
    """The models this backend can be built with (``[host] contents``)."""
    stops_guests: bool = False
    """True when the backend itself stops a guest whose fault or write trap a plugin failed to
    handle (the host then leaves the stop to it); otherwise the host stops the VM."""

    # -- wiring and time ----------------------------------------------------------------------

    @abstractmethod
    def attach(self, host: Host) -> None:
        """Attach the host whose hooks this backend calls for guest traps."""

    @abstractmethod
    def now(self) -> float:
        """Current time in seconds (virtual in the emulator)."""

    @abstractmethod
    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of time pass with no guest activity (virtual backends add it; a real
        clock sleeps)."""

    @abstractmethod
    def account(self, kind: str, nbytes: int, ops: int = 1) -> float:
        """Charge the time of hypervisor work (``"disk_read"``, ``"disk_write"``, ``"network"``,
        ``"copy"``, ``"compress"``) to the current guest batch; returns the seconds charged
        (0 on backends with real time, where the work takes real time by itself)."""

    # -- VMs ----------------------------------------------------------------------------------

    @abstractmethod
    def create_vm(self, vm: VM, contents: ContentSpec | None = None) -> None:
        """Lay out a VM's memory: every page present, filled by ``contents`` (zeros if None),
        backed by large pages where ``vm.large_pages``, on ``vm.home_node``."""

    @abstractmethod
    def destroy_vm(self, vm: VM) -> None:
        """Free every machine page the VM holds."""

    @abstractmethod
    def access(self, vm: VM, gpps: np.ndarray, writes: np.ndarray, stamp: int) -> AccessResult:
        """Run one batch of guest accesses (page numbers and a write mask, in program order).

        Touches that trap are delivered to the host as batched hook calls before the batch
        completes; then accessed and dirty bits are set and every write stores ``stamp`` as a
        little-endian uint64 in the first 8 bytes of its page (the guest's real store, which the
        reference model of guest memory mirrors).
        """

    def work_seconds(self, kind: str, nbytes: int, ops: int = 1) -> float | None:
        """How long hypervisor work of ``kind`` (those of :meth:`account`, and ``"numa_copy"``:
        migrating pages between NUMA nodes, ``"zero_fill"``) on ``nbytes`` in ``ops`` calls
        takes in this backend's cost model, without charging it; ``None`` on a backend without
        a cost model (real time). A policy that plans by cost (a migration budget per tick)
        asks this."""
        return None

    def trapping(self, vm: VM, gpps: np.ndarray, writes: np.ndarray) -> np.ndarray | None:
        """Per access of a batch, whether it would trap if the batch ran now (a fault, a traced
        page, a write to a protected or shared page), without running it; ``None`` when the
        backend cannot tell cheaply. Lets the host cut a batch at a VM's trap budget
        (:mod:`memvisor.budgets`) instead of charging the whole batch after the fact."""
        return None

    @abstractmethod
    def guest_write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        """The guest writes whole pages (``data``: ``(n, PAGE_SIZE)`` uint8), trapping like
        :meth:`access` does; used by tests and by workloads that carry real contents."""

    @abstractmethod
    def guest_read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        """The guest reads whole pages, trapping like :meth:`access` does."""

    # -- contents and presence ----------------------------------------------------------------

    @abstractmethod
    def read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        """Contents of present pages as ``(n, PAGE_SIZE)`` uint8 (a copy)."""

    @abstractmethod
    def write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        """Store contents into present pages; a shared page first gets a private copy."""

    def contents(self, vm: VM, gpps: np.ndarray):
        """Contents of present pages in this backend's model (:attr:`contents_model`): bytes
        ``(n, PAGE_SIZE)`` uint8 (the default: :meth:`read`), or :class:`memvisor.identity.
        Identities` on an identity-model backend. What a technique copies, saves or sends and
        gives back to :meth:`populate` or :meth:`write`; :func:`memvisor.identity.rows_equal`,
        :func:`~memvisor.identity.zero_rows` and :func:`~memvisor.identity.fingerprints` work on
        either form."""
        return self.read(vm, gpps)

    def guest_contents(self, vm: VM, gpps: np.ndarray):
        """The guest reads whole pages, trapping like :meth:`access` does; their contents in
        this backend's model (the default: :meth:`guest_read`)."""
        return self.guest_read(vm, gpps)

    def fingerprint(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        """A uint64 per present page: equal contents have equal fingerprints, and 0 is the page
        of zeros and no other. Techniques compare fingerprints to find candidates (sharing,
        disk mappings) and confirm with a comparison. The default hashes :meth:`read` bytes
        with xxh3 a chunk at a time; a backend that knows its pages otherwise answers faster."""
        from memvisor.identity import byte_fingerprints

        gpps = np.asarray(gpps, dtype=np.int64).reshape(-1)
        out = np.empty(len(gpps), np.uint64)
        for start in range(0, len(gpps), _QUERY_CHUNK):
            out[start : start + _QUERY_CHUNK] = byte_fingerprints(self.read(vm, gpps[start : start + _QUERY_CHUNK]))
        return out

    def is_zero(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        """Per present page, whether it holds only zeros (the default reads the bytes)."""
        from memvisor.identity import zero_rows

        gpps = np.asarray(gpps, dtype=np.int64).reshape(-1)
        out = np.empty(len(gpps), bool)
        for start in range(0, len(gpps), _QUERY_CHUNK):
            out[start : start + _QUERY_CHUNK] = zero_rows(self.read(vm, gpps[start : start + _QUERY_CHUNK]))
        return out

    @abstractmethod
    def present(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Per page, whether it is present (all pages of the VM when ``gpps`` is None)."""

    @abstractmethod
    def populate(self, vm: VM, gpps: np.ndarray, data: np.ndarray | None = None) -> None:
        """Make not-present pages present with ``data`` (zeros if None)."""

    @abstractmethod
    def unmap(self, vm: VM, gpps: np.ndarray) -> None:
        """Make pages not present, dropping their contents and freeing their machine pages.

        The next guest touch is a page fault: whoever unmapped a page serves it again.
        """

    # -- traps and bits -----------------------------------------------------------------------

    @abstractmethod
    def trace(self, vm: VM, gpps: np.ndarray) -> None:
        """Trace pages: the next guest touch of each traps once (access hook)."""

    @abstractmethod
    def untrace(self, vm: VM, gpps: np.ndarray) -> None:
        """Stop tracing pages."""

    @abstractmethod
    def traced(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Per page, whether it is traced."""

    @abstractmethod
    def protect(self, vm: VM, gpps: np.ndarray) -> None:
        """Write-protect pages: the next guest write of each traps (write hook)."""

    @abstractmethod
    def unprotect(self, vm: VM, gpps: np.ndarray) -> None:
        """Remove write protection (a shared page stays copy-on-write)."""

    @abstractmethod
    def protected(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Per page, whether it is write-protected."""

    @abstractmethod
    def take_accessed(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Read and clear accessed bits. Plugins call :meth:`memvisor.host.Host.take_accessed`
        instead, which shares the bits among their readers."""

    @abstractmethod
    def take_dirty(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Read and clear dirty bits."""

    # -- machine pages and sharing ------------------------------------------------------------

    @property
    @abstractmethod
    def zero_mpn(self) -> int:
        """The machine page number of the one zero page."""

    @abstractmethod
    def mpns(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Machine page behind each guest page (``-1`` where not present)."""

    @abstractmethod
    def refcounts(self, mpns: np.ndarray) -> np.ndarray:
        """Reference count of each machine page (guest mappings plus holds)."""

    @abstractmethod
    def share(self, vm: VM, gpps: np.ndarray, mpns: np.ndarray, *, discard: bool = False) -> int:
        """Map each guest page onto ``mpns[i]`` copy-on-write, freeing its old machine page.

        Contents must be byte-equal unless ``discard`` is true (only for pages the guest gave
        up, such as balloon pages): a mismatch raises :class:`memvisor.errors.BackendError` and
        changes nothing. Large-page members must be split first. Returns machine pages freed.
        """

    @abstractmethod
    def break_sharing(self, vm: VM, gpps: np.ndarray) -> int:
        """Give each shared page a private copy of its contents; returns pages allocated."""

    @abstractmethod
    def hold_page(self, data: np.ndarray | None = None, node: int = 0) -> int:
        """Allocate a machine page that the caller holds (reference count 1), filled with
        ``data`` or zeros; guests can then be mapped onto it with :meth:`share`."""

    @abstractmethod
    def release_page(self, mpn: int) -> None:
        """Drop the caller's hold on a machine page from :meth:`hold_page`."""

    def hold_pages(self, contents, nodes: np.ndarray) -> np.ndarray:
        """:meth:`hold_page` for many pages at once: page ``i`` holds row ``i`` of ``contents``
        (bytes or, on an identity-model backend, identities) on node ``nodes[i]``; returns
        their machine page numbers. The default holds them one by one."""
        from memvisor.identity import take

        nodes = np.asarray(nodes, dtype=np.int64).reshape(-1)
        return np.array([self.hold_page(take(contents, np.array([i])), node=int(n)) for i, n in enumerate(nodes)],
                        dtype=np.int64)

    def release_pages(self, mpns: np.ndarray) -> None:
        """:meth:`release_page` for many pages at once (the default releases them one by one)."""
        for mpn in np.asarray(mpns, dtype=np.int64).reshape(-1).tolist():
            self.release_page(mpn)

    # -- large pages --------------------------------------------------------------------------

    @abstractmethod
    def large(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Per page, whether it is a member of a 2 MiB large page."""

    @abstractmethod
    def split(self, vm: VM, large_indices: np.ndarray) -> int:
        """Split large pages (index = gpp // 512) into small pages; returns how many split."""

    @abstractmethod
    def collapse(self, vm: VM, large_indices: np.ndarray) -> int:
        """Collapse aligned runs of 512 private present pages into large pages; returns how
        many collapsed (a run that cannot be collapsed is skipped)."""

    # -- NUMA and accounting ------------------------------------------------------------------

    @property
    @abstractmethod
    def numa_nodes(self) -> int:
        """Number of NUMA nodes."""

    @abstractmethod
    def node_of(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """NUMA node of each page's machine page (``-1`` where not present)."""

    @abstractmethod
    def migrate(self, vm: VM, gpps: np.ndarray, node: int) -> int:
        """Copy pages to machine pages on ``node`` (contents unchanged); returns pages moved.

        Pages that are shared, not present, already there, or that do not fit are skipped.
        """

    @abstractmethod
    def free_pages(self, node: int | None = None) -> int:
        """Free machine pages (on one node, or all)."""

    @abstractmethod
    def total_pages(self, node: int | None = None) -> int:
        """Machine pages (on one node, or all)."""

    def check_invariants(self) -> int | None:
        """Recount every machine page's references from the page tables and compare (slow:
        for tests and ``memvisor selftest``). Raises :class:`memvisor.errors.BackendError` on a
        leaked, double-mapped or miscounted page; returns the number of machine pages held
        outside page tables (:meth:`hold_page`), or None on a backend that cannot recount."""
        return None

    def describe(self) -> dict:
        """A JSON-able description for reports: name, capabilities, sizes."""
        return {
            "name": self.name,
            "capabilities": sorted(self.capabilities),
            "numa_nodes": self.numa_nodes,
            "total_pages": self.total_pages(),
        }
