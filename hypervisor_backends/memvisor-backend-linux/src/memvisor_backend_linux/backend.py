"""The Linux backend: real memory, real faults.

Each VM is a guest process (:mod:`memvisor_backend_linux.guest`) whose memory is a memfd
mapping. memvisor creates the memfd and keeps its own mapping of it (never registered with
userfaultfd, so memvisor's own reads and writes never fault to a handler); the guest creates a
userfaultfd, registers its mapping and sends the descriptor back. A page is *present* when the
memfd holds it; :meth:`LinuxBackend.unmap` punches a hole, and the guest's next touch is a
missing fault that memvisor turns into :func:`memvisor_page_fault` and resolves with one
``UFFDIO_COPY`` (or ``UFFDIO_ZEROPAGE``) per run of pages.

The per-page state (present, traced, protected, staged) lives in a byte array that the compiled
fault loop (``native.c``) reads and updates: minor faults of present pages (their PTE zapped to
trace them, or never made) and missing faults of staged pages are served there without Python;
everything else comes back to Python as one batch of the faults pending.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from typing import TYPE_CHECKING

import numpy as np
import structlog

from memvisor import PAGE_SIZE
from memvisor.backend import AccessResult, Backend, Capability
from memvisor.errors import BackendError, CapabilityError, GuestDied
from memvisor.events import AccessBatch, FaultBatch, WriteBatch
from memvisor_backend_linux import protocol
from memvisor_backend_linux._native import cache_dir, load
from memvisor_backend_linux.guest import (
    FEATURE_MINOR_SHMEM,
    FEATURE_MISSING_SHMEM,
    FEATURE_PAGEFAULT_FLAG_WP,
    FEATURE_WP_ASYNC,
    FEATURE_WP_HUGETLBFS_SHMEM,
    O_CLOEXEC,
    O_NONBLOCK,
)

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.contents import ContentSpec
    from memvisor.host import VM, Host, HostConfig

log = structlog.get_logger("memvisor.backend.linux")

# Per-page state bits (native.c: ST_*). ZERO: mapped onto a zero page (the zero MPN or a held
# zero-filled page): a hole in the memfd until the guest reads it, then (ZFILLED) a zero-filled
# memfd page the guest maps write-protected. ZFILLED is Python's only.
PRESENT, TRACED, PROTECTED, STAGED, WPASYNC, ZERO, ZFILLED = 1, 2, 4, 8, 16, 32, 64
# Event flags from the fault loop (native.c: EV_*).
EV_WRITE, EV_WP, EV_MINOR = 1, 2, 4
# mv_serve results.
SERVE_DONE, SERVE_FAULTS, SERVE_TIMEOUT, SERVE_LOG_FULL, SERVE_ERROR = 0, 1, 2, 3, -1
# mv_resolve_runs kinds.
RES_COPY, RES_ZERO, RES_CONTINUE = 0, 1, 2
# Registration modes (uapi).
MODE_MISSING, MODE_WP, MODE_MINOR = 1, 2, 4

FILL_CHUNK = 16384  # pages of contents generated at a time when a VM is laid out
START_TIMEOUT = 60.0  # seconds a guest may take to start and send its userfaultfd

SHARE_REFUSAL = ("two memfd pages cannot share one physical page (KSM never merges shmem; an alias "
                 "mapping would cost a VMA per page); only zero-filled pages can be shared, onto a zero page")
"""The one line of a refused share (docs/backends/linux.md, "Sharing")."""

MISSING_CAPABILITIES = {
    Capability.SHARE: SHARE_REFUSAL + ", and only with the backend option zero_share = true",
    Capability.ZERO_PAGE: "zero pages need userfaultfd write-protect faults on shmem (6.x), and not the option "
    "dirty = true (async write protection would let the first write through unseen)",
    Capability.LARGE_PAGES: "shmem transparent huge pages are not available here "
    "(/sys/kernel/mm/transparent_hugepage/shmem_enabled is absent or 'deny')",
    Capability.NUMA: "this machine has one NUMA node",
    Capability.ACCESSED: "accessed bits need the backend option accessed = true (pagemap PTE bits; "
    "populate then maps only the faulting pages)",
    Capability.DIRTY: "dirty bits need the backend option dirty = true (userfaultfd WP_ASYNC), "
    "which replaces synchronous write protection",
    Capability.WRITE_PROTECT: "with the backend option dirty = true, write-protect faults are resolved by the "
    "kernel (WP_ASYNC) to record dirty pages, not delivered",
    Capability.VIRTUAL_TIME: "time is real",
}
"""Capabilities this backend does not offer, and why (the text of its CapabilityErrors)."""


LARGE = 512  # pages per 2 MiB large page
THP_SHMEM = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def shmem_thp_mode() -> str | None:
    """The selected mode of ``shmem_enabled`` (``never``, ``advise``, ...; None without THP).
    ``MADV_COLLAPSE`` works in every mode but ``deny`` (and ``force`` is all the same)."""
    try:
        with open(THP_SHMEM) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def machine_numa_nodes() -> int:
    """NUMA nodes of this machine (``/sys/devices/system/node``; 1 where it cannot be read)."""
    try:
        return max(1, sum(1 for e in os.listdir("/sys/devices/system/node")
                          if e.startswith("node") and e[4:].isdigit()))
    except OSError:
        return 1


def numa_refusal() -> str:
    """The one line of a refused NUMA request: what this machine has."""
    nodes = machine_numa_nodes()
    if nodes == 1:
        return "this machine has one NUMA node"
    return f"this backend models one NUMA node (the machine has {nodes}; move_pages(2) is not wired in)"


def kernel_features(lib, ffi) -> int:
    """The userfaultfd features this kernel offers (a probe descriptor, closed at once).

    :raises CapabilityError: userfaultfd is not available here (no permission, no kernel
        support), or it cannot serve missing faults on shmem.
    """
    fd = lib.mv_uffd_open(O_CLOEXEC | O_NONBLOCK)
    if fd < 0:
        raise CapabilityError(f"backend 'linux' needs userfaultfd, which this process cannot open: "
                              f"{os.strerror(-fd)}")
    try:
        got, ioctls = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        rc = lib.mv_uffd_api(fd, 0, got, ioctls)
    finally:
        os.close(fd)
    if rc < 0:
        raise CapabilityError(f"backend 'linux': UFFDIO_API failed: {os.strerror(-rc)}")
    if not got[0] & FEATURE_MISSING_SHMEM:
        raise CapabilityError("backend 'linux' needs userfaultfd missing faults on shmem, which this kernel lacks")
    return int(got[0])


def unavailable_reason() -> str | None:
    """Why the backend cannot run on this machine (no C compiler or cffi, no userfaultfd, no
    missing faults on shmem), or None when it can. For tests that skip with the reason."""
    if sys.platform != "linux":
        return "backend 'linux' runs on Linux only"
    try:
        native = load()
    except Exception as exc:  # no compiler, no cffi, no headers
        return f"backend 'linux': cannot build its compiled helpers: {type(exc).__name__}: {exc}"
    try:
        kernel_features(native.lib, native.ffi)
    except CapabilityError as exc:
        return str(exc)
    return None


def _how(status: int | None) -> str:
    """How a guest process ended, from its exit status (negative: the signal that killed it)."""
    return f"killed by signal {-status}" if status is not None and status < 0 else f"exit status {status}"


def _errno_text(code: int) -> str:
    return os.strerror(-code) if code < 0 else str(code)


class _Guest:
    """One VM's guest process and memvisor's view of its memory."""

    def __init__(self, name: str, pages: int):
        self.name = name
        self.pages = pages
        self.memfd = -1
        self.mem: mmap.mmap | None = None
        self.data: np.ndarray | None = None  # (pages, PAGE_SIZE) uint8 over memvisor's mapping
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.uffd = -1
        self.base = 0
        self.pid = 0
        self.modes = 0
        self.features = 0
        self.state = np.zeros(pages, dtype=np.uint8)
        self.stage: mmap.mmap | None = None
        self.stage_data: np.ndarray | None = None
        self.out_pages = np.zeros(4096, dtype=np.int64)
        self.out_flags = np.zeros(4096, dtype=np.uint8)
        self.log_pages = np.zeros(max(pages, 1), dtype=np.int64)
        self.log_writes = np.zeros(max(pages, 1), dtype=np.uint8)
        self.ctx = None
        self.busy = False
        self.pending_zap: list[np.ndarray] = []
        self.handler_s = 0.0  # real seconds the host spent on this guest's traps in its last request
        self.faulting: np.ndarray | None = None  # pages of the fault batch being delivered
        self.dirty_pending = np.zeros(pages, dtype=bool)  # written pages whose PTE was zapped
        self.zero_mpn = np.full(pages, -1, dtype=np.int64)  # where ZERO: the zero page it maps
        self.huge = False  # a large-page VM: aligned mapping, no minor faults, collapsible
        self.large = np.zeros(pages // LARGE, dtype=bool)  # per 2 MiB block: collapsed (a shmem THP)
        self.dead = False
        self.exit_status: int | None = None

    def close(self) -> None:
        """Kill the guest first (it can then never wait on a fault nobody serves), reap it,
        then close every descriptor and mapping. Idempotent."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # reaped already
                    self.proc.send_signal(signal.SIGKILL)
            self.exit_status = self.proc.wait()
            self.proc = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for attr in ("uffd", "memfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
        self.ctx = None
        self.data = None
        self.stage_data = None
        for attr in ("mem", "stage"):
            m = getattr(self, attr)
            if m is not None:
                with contextlib.suppress(BufferError):  # a view escaped: it goes with the last view
                    m.close()
                setattr(self, attr, None)


def _close_all(guests: dict) -> None:
    for guest in list(guests.values()):
        guest.close()
    guests.clear()


class LinuxBackend(Backend):
    """Guests in their own processes on real memory; faults through userfaultfd.

    Capabilities: ``fault`` always; ``trace`` where the kernel offers minor faults on shmem;
    ``write_protect`` and ``zero_page`` where it offers write-protect faults on shmem;
    ``large_pages`` where shmem THP is not denied (VMs created with ``large_pages``: collapsed
    shmem THPs the guest maps with PMDs, no ``trace``); ``dirty``, ``accessed`` and ``share``
    (onto zero pages only) with the options below. The rest raise
    :class:`memvisor.errors.CapabilityError` with the reason (:data:`MISSING_CAPABILITIES`).

    Backend options (``HostConfig.backend_options``): ``python`` (the guest interpreter,
    default this one); ``dirty`` (default false): track dirty pages with userfaultfd's
    asynchronous write protection and ``PAGEMAP_SCAN`` (capability ``dirty``), which replaces
    ``write_protect``; ``accessed`` (default false): accessed bits from the guest's page table
    (capability ``accessed``), for which ``populate`` maps only the pages the guest faulted on
    and leaves the rest in the memfd for the guest's next touch to map; ``zero_share`` (default
    false): capability ``share``, restricted to mapping pages onto a zero page (the zero MPN or a
    zero-filled page from ``hold_page``), as the balloon does; anything else is refused
    (:data:`SHARE_REFUSAL`). A zero-mapped page is a hole in the memfd (freed): a guest read maps
    a zero-filled page write-protected, a guest write is a write to a shared page.
    """

    name = "linux"
    stops_guests = True
    """A hook that raises while a guest waits on its fault kills the guest process: the backend
    stops it (its next batch raises :class:`~memvisor.errors.GuestDied` saying it died), not the host."""
    capabilities: frozenset[str] = frozenset({Capability.FAULT, Capability.TRACE, Capability.WRITE_PROTECT,
                                              Capability.DIRTY, Capability.ACCESSED, Capability.ZERO_PAGE,
                                              Capability.SHARE, Capability.LARGE_PAGES})
    """At most these (``dirty`` instead of ``write_protect`` and ``zero_page`` with the option
    ``dirty``, ``accessed`` with the option ``accessed``, ``share`` with the option
    ``zero_share``); an instance keeps those the running kernel offers."""

    def __init__(self, config: HostConfig):
        if config.numa_nodes != 1:
            raise CapabilityError(f"backend 'linux' does not offer {config.numa_nodes} NUMA nodes: {numa_refusal()}")
        native = load()
        self.ffi, self.lib = native.ffi, native.lib
        self.config = config
        self._python = str(config.backend_options.get("python", sys.executable))
        self._host: Host | None = None
        self._guests: dict[int, _Guest] = {}
        self._mpn_base: dict[int, int] = {}
        self._next_mpn = 1  # MPN 0 is the (notional) zero page
        self._start = time.monotonic()
        self._finalizer = weakref.finalize(self, _close_all, self._guests)
        self.features = kernel_features(self.lib, self.ffi)
        self.dirty_tracking = bool(config.backend_options.get("dirty", False))
        self.exact_accessed = bool(config.backend_options.get("accessed", False))
        self.zero_share = bool(config.backend_options.get("zero_share", False))
        self._held: dict[int, int] = {}  # held zero pages: MPN -> 1 (notional: no memory behind them)
        caps = {Capability.FAULT}
        if self.exact_accessed:
            caps.add(Capability.ACCESSED)
        if self.features & FEATURE_MINOR_SHMEM:
            caps.add(Capability.TRACE)
        wp = self.features & FEATURE_PAGEFAULT_FLAG_WP and self.features & FEATURE_WP_HUGETLBFS_SHMEM
        if self.dirty_tracking:
            if not (wp and self.features & FEATURE_WP_ASYNC):
                raise CapabilityError("backend 'linux': the option dirty needs userfaultfd WP_ASYNC on shmem, "
                                      "which this kernel lacks")
            caps.add(Capability.DIRTY)
        elif wp:
            caps.add(Capability.WRITE_PROTECT)
            caps.add(Capability.ZERO_PAGE)
            if self.zero_share:
                caps.add(Capability.SHARE)
        if shmem_thp_mode() not in (None, "deny"):
            caps.add(Capability.LARGE_PAGES)
        self.capabilities = frozenset(caps)
        self.stats = {"faults": 0, "fault_batches": 0, "served_minor": 0, "served_staged": 0, "ioctls": 0,
                      "zero_reads": 0, "zero_writes": 0}

    # -- wiring and time ----------------------------------------------------------------------

    def attach(self, host: Host) -> None:
        self._host = host

    def now(self) -> float:
        """Real monotonic seconds since the backend started."""
        return time.monotonic() - self._start

    def advance(self, seconds: float) -> None:
        """Sleep ``seconds``: time is real (the host counts the time work took already, see
        :meth:`memvisor.host.Host.advance`)."""
        if seconds > 0:
            time.sleep(seconds)

    def account(self, kind: str, nbytes: int, ops: int = 1) -> float:
        """0: real work takes real time by itself."""
        return 0.0

    def close(self) -> None:
        """Kill every guest and release its memory and descriptors."""
        self._finalizer()

    # -- helpers ------------------------------------------------------------------------------

    def _guest(self, vm: VM) -> _Guest:
        try:
            g = self._guests[vm.id]
        except KeyError:
            raise BackendError(f"VM {vm.name!r} does not exist on backend 'linux'") from None
        if g.dead:
            raise GuestDied(f"VM {vm.name!r}: its guest process died ({_how(g.exit_status)})")
        return g

    def _pages(self, vm: VM, gpps) -> np.ndarray:
        gpps = np.asarray(gpps, dtype=np.int64).ravel()
        if len(gpps) and (gpps.min() < 0 or gpps.max() >= vm.pages):
            raise BackendError(f"page number outside VM {vm.name!r} ({vm.pages} pages)")
        return gpps

    def _all(self, vm: VM, gpps) -> np.ndarray:
        return np.arange(vm.pages, dtype=np.int64) if gpps is None else self._pages(vm, gpps)

    def _ptr(self, ctype: str, array: np.ndarray):
        return self.ffi.cast(ctype, array.ctypes.data)

    def _missing(self, capability: str):
        return CapabilityError(f"backend 'linux' does not offer {capability}: {MISSING_CAPABILITIES[capability]}")

    # -- VMs ----------------------------------------------------------------------------------

    def create_vm(self, vm: VM, contents: ContentSpec | None = None) -> None:
        if vm.id in self._guests:
            raise BackendError(f"VM {vm.name!r} exists already")
        if vm.large_pages and Capability.LARGE_PAGES not in self.capabilities:
            raise self._missing(Capability.LARGE_PAGES)
        used = sum(g.pages for g in self._guests.values())
        if used + vm.pages > self.config.memory_pages:
            raise BackendError(f"VM {vm.name!r}: {vm.pages} pages do not fit in the host's free memory")
        g = _Guest(vm.name, vm.pages)
        g.huge = bool(vm.large_pages)
        self._guests[vm.id] = g
        try:
            self._lay_out(g, vm, contents)
            self._start_guest(g, vm)
            if g.huge:
                self.collapse(vm, np.arange(vm.pages // LARGE))
        except BaseException:
            self._guests.pop(vm.id, None)
            g.close()
            raise
        self._mpn_base[vm.id] = self._next_mpn
        self._next_mpn += vm.pages
        log.debug("guest started", vm=vm.name, pid=g.pid, modes=g.modes, pages=vm.pages)

    def _lay_out(self, g: _Guest, vm: VM, contents) -> None:
        g.memfd = os.memfd_create(f"memvisor-{vm.name}", os.MFD_CLOEXEC)
        os.ftruncate(g.memfd, vm.bytes)
        rc = self.lib.mv_allocate(g.memfd, 0, vm.bytes)  # every page present, zeros
        if rc < 0:
            raise BackendError(f"VM {vm.name!r}: fallocate of {vm.bytes} bytes: {_errno_text(rc)}")
        g.mem = mmap.mmap(g.memfd, vm.bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        g.data = np.frombuffer(g.mem, dtype=np.uint8).reshape(vm.pages, PAGE_SIZE)
        g.state[:] = PRESENT
        if contents is not None:
            for start in range(0, vm.pages, FILL_CHUNK):
                gpps = np.arange(start, min(vm.pages, start + FILL_CHUNK), dtype=np.int64)
                nonzero = gpps[contents.kinds(vm.pages, vm.seed, gpps) != 0]
                if len(nonzero):
                    g.data[nonzero] = contents.fill(vm.pages, vm.seed, nonzero)

    def _start_guest(self, g: _Guest, vm: VM) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        g.sock = ours
        env = dict(os.environ, MEMVISOR_LINUX_CACHE=str(cache_dir()))
        try:
            g.proc = subprocess.Popen(
                [self._python, "-m", "memvisor_backend_linux.guest", str(theirs.fileno()), str(g.memfd),
                 str(vm.pages), str(os.getpid()), "dirty" if self.dirty_tracking else "plain",
                 "large" if g.huge else "small"],
                pass_fds=(theirs.fileno(), g.memfd), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            theirs.close()
        ours.settimeout(START_TIMEOUT)
        try:
            msg, fds, _, _ = socket.recv_fds(ours, 1 << 16, 1)
        except (TimeoutError, OSError) as exc:
            raise BackendError(f"VM {vm.name!r}: the guest process did not start ({exc})") from None
        ours.settimeout(None)
        if len(msg) < protocol.HEADER.size:
            raise BackendError(f"VM {vm.name!r}: the guest process exited before sending its userfaultfd")
        op, _, _, _, length = protocol.HEADER.unpack_from(msg)
        body = bytes(msg[protocol.HEADER.size:protocol.HEADER.size + length])
        if op != protocol.OK or not fds:
            for fd in fds:
                os.close(fd)
            raise BackendError(f"VM {vm.name!r}: the guest cannot serve faults: {body.decode(errors='replace')}")
        g.uffd = fds[0]
        layout = json.loads(body)
        g.base, g.pid, g.modes, g.features = layout["base"], layout["pid"], layout["modes"], layout["features"]
        if self.dirty_tracking:
            if not (g.modes & MODE_WP and g.features & FEATURE_WP_ASYNC):
                raise BackendError(f"VM {vm.name!r}: the guest could not register async write protection")
            g.state |= WPASYNC
            every = np.arange(vm.pages, dtype=np.int64)  # clean from the start
            rc = self.lib.mv_protect_runs(g.uffd, g.base, self._ptr("const int64_t *", every), vm.pages, 1)
            if rc < 0:
                raise BackendError(f"VM {vm.name!r}: UFFDIO_WRITEPROTECT: {_errno_text(rc)}")
        ctx = self.ffi.new("struct mv_serve_ctx *")
        ctx.uffd, ctx.sock, ctx.base, ctx.npages = g.uffd, g.sock.fileno(), g.base, vm.pages
        ctx.state = self._ptr("uint8_t *", g.state)
        ctx.stage = self.ffi.NULL
        ctx.block_pages = 1
        ctx.out_pages, ctx.out_flags = self._ptr("int64_t *", g.out_pages), self._ptr("uint8_t *", g.out_flags)
        ctx.out_cap = len(g.out_pages)
        ctx.log_pages, ctx.log_writes = self._ptr("int64_t *", g.log_pages), self._ptr("uint8_t *", g.log_writes)
        ctx.log_cap = len(g.log_pages)
        g.ctx = ctx

    def destroy_vm(self, vm: VM) -> None:
        g = self._guests.pop(vm.id, None)
        if g is None:
            raise BackendError(f"VM {vm.name!r} does not exist on backend 'linux'")
        g.close()
        self._mpn_base.pop(vm.id, None)

    def guest_pid(self, vm: VM) -> int:
        """Process id of the VM's guest."""
        return self._guest(vm).pid

    def memfd_pages(self, vm: VM) -> int:
        """Pages the VM's memfd really holds (``fstat`` ``st_blocks``): the measure of memory a
        VM uses here (holes cost nothing)."""
        return os.fstat(self._guest(vm).memfd).st_blocks * 512 // PAGE_SIZE

    def guest_smaps(self, vm: VM) -> dict[str, int]:
        """The guest's ``/proc/PID/smaps`` entry for its memory mapping, in kB (``Rss``,
        ``Shared_Clean``, ``ShmemPmdMapped``, ...); reading another process's smaps needs root or
        ptrace rights."""
        g = self._guest(vm)
        out: dict[str, int] = {}
        start = f"{g.base:x}-"
        with open(f"/proc/{g.pid}/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    inside = line.startswith(start)
                elif inside and line.rstrip().endswith("kB"):
                    out[head.rstrip(":")] = int(line.split()[1])
        return out

    # -- talking to the guest -----------------------------------------------------------------

    def _call(self, vm: VM, g: _Guest, op: int, n: int, arg: int, *payloads) -> tuple[bytearray, list[int]]:
        """Send one request and serve the guest's faults until it replies.

        Returns the reply's payload and the counts (faults, traced, write traps)."""
        if g.busy:
            raise BackendError(f"VM {vm.name!r}: guest activity inside one of its own trap hooks")
        counts = [0, 0, 0]
        g.busy = True
        g.handler_s = 0.0
        g.ctx.log_n = 0
        try:
            try:
                protocol.send(g.sock, op, n, arg, *payloads)
            except OSError:
                self._died(vm, g)
            try:
                while True:
                    rc = self.lib.mv_serve(g.ctx, -1)
                    if rc == SERVE_DONE:
                        break
                    if rc == SERVE_FAULTS:
                        started = time.perf_counter()
                        self._handle(vm, g, counts)
                        g.handler_s += time.perf_counter() - started
                    elif rc == SERVE_ERROR:
                        raise BackendError(f"VM {vm.name!r}: the fault loop failed: {os.strerror(self.ffi.errno)}")
            except BackendError:
                if g.proc is not None and g.proc.poll() is not None:
                    self._died(vm, g)  # the real cause: the guest is gone
                self._abandon(vm, g)
                raise
            except BaseException:
                # A hook raised (or we were interrupted) while the guest waits on a fault whose
                # event was read already: nobody would ever wake it. Stop it rather than let it
                # hang or read a page nobody filled.
                self._abandon(vm, g)
                raise
            try:
                rop, _, _, _, payload = protocol.recv(g.sock)
            except (protocol.GuestGone, OSError):
                self._died(vm, g)
        finally:
            g.busy = False
            self.stats["served_minor"] += g.ctx.served_minor if g.ctx is not None else 0
            if g.ctx is not None:
                self.stats["served_staged"] += g.ctx.served_staged
                self.stats["ioctls"] += g.ctx.ioctls
                g.ctx.served_minor = g.ctx.served_staged = g.ctx.ioctls = 0
        if rop != protocol.OK:
            raise BackendError(f"VM {vm.name!r}: the guest refused: {payload.decode(errors='replace')}")
        started = time.perf_counter()
        counts[1] += self._deliver_traced(vm, g)
        g.handler_s += time.perf_counter() - started
        if g.pending_zap:
            zap, g.pending_zap = np.unique(np.concatenate(g.pending_zap)), []
            self._zap(vm, g, zap)
        return payload, counts

    def _abandon(self, vm: VM, g: _Guest) -> None:
        """Stop a guest whose batch cannot finish; the VM is dead from now on."""
        log.warning("guest stopped: its batch could not finish", vm=vm.name, pid=g.pid)
        g.busy = False
        g.close()
        g.dead = True

    def _died(self, vm: VM, g: _Guest):
        """The guest's socket closed: reap the process, release everything, say so."""
        g.busy = False
        g.close()
        g.dead = True
        raise GuestDied(f"VM {vm.name!r}: its guest process died ({_how(g.exit_status)})")

    def _handle(self, vm: VM, g: _Guest, counts: list[int]) -> None:
        """Faults the compiled loop handed back: deliver them as batches, resolve them."""
        n = g.ctx.out_n
        pages, flags = g.out_pages[:n].copy(), g.out_flags[:n].copy()
        self.stats["fault_batches"] += 1
        host = self._host
        wp = (flags & EV_WP) != 0
        minor = ((flags & EV_MINOR) != 0) & ~wp
        missing = ~wp & ~minor
        zero = missing & ((g.state[pages] & ZERO) != 0)
        if zero.any():  # a touch of a hole mapped onto a zero page
            self._zero_faults(vm, g, pages[zero], flags[zero], counts)
            missing &= ~zero
        if minor.any():  # the trace log was full, or a page cache page memvisor thinks absent
            mp = np.unique(pages[minor])
            present = (g.state[mp] & PRESENT) != 0
            traced = mp[present & ((g.state[mp] & TRACED) != 0)]
            if len(traced):
                g.state[traced] &= ~np.uint8(TRACED)
                host.deliver_accesses(vm, AccessBatch(traced, np.zeros(len(traced), bool),
                                                      np.arange(len(traced)), self.now()))
                counts[1] += len(traced)
            ok = mp[present]
            self._resolve(g, RES_CONTINUE, ok, None, protected=True)
            stray = mp[~present]
            if len(stray):  # drop what the memfd holds there: the page is served afresh
                self.lib.mv_punch_runs(g.memfd, self._ptr("const int64_t *", stray), len(stray))
                pages = np.concatenate([pages, stray])
                missing = np.concatenate([missing, np.ones(len(stray), bool)])
                flags = np.concatenate([flags, np.zeros(len(stray), np.uint8)])
        if missing.any():
            fp, first = np.unique(pages[missing], return_index=True)
            order = np.argsort(first)
            fp, fw = fp[order], (flags[missing][first[order]] & EV_WRITE) != 0
            already = (g.state[fp] & PRESENT) != 0
            if already.any():  # resolved meanwhile: wake the waiter
                woken = np.sort(fp[already])
                self.lib.mv_wake_runs(g.uffd, g.base, self._ptr("const int64_t *", woken), len(woken))
            fp, fw = fp[~already], fw[~already]
            if len(fp):
                self.stats["faults"] += len(fp)
                g.faulting = np.sort(fp)
                try:
                    host.deliver_faults(vm, FaultBatch(fp, fw, self.now()))
                finally:
                    g.faulting = None
                counts[0] += len(fp)
        if wp.any():
            wpages, first = np.unique(pages[wp], return_index=True)
            wpages = wpages[np.argsort(first)]
            protected = (g.state[wpages] & (PROTECTED | ZERO)) != 0
            if protected.any():
                pp = wpages[protected]
                shared = (g.state[pp] & ZERO) != 0
                self.stats["zero_writes"] += int(np.count_nonzero(shared))
                host.deliver_writes(vm, WriteBatch(pp, self.mpns(vm, pp), shared, self.now()))
                counts[2] += len(pp)
            stale = np.sort(wpages[~protected])
            if len(stale):  # not ours to stop: let the write through
                self.lib.mv_protect_runs(g.uffd, g.base, self._ptr("const int64_t *", stale), len(stale), 0)

    def _zero_faults(self, vm: VM, g: _Guest, pages: np.ndarray, flags: np.ndarray, counts: list[int]) -> None:
        """Missing faults on holes mapped onto a zero page. A read maps a zero-filled page
        write-protected (shmem has no shared zero page: this allocates a page); a write is a
        write to a shared page (``memvisor_write_trap``, ``shared`` set), after which the core's
        ``break_sharing`` gives the page a private zero-filled page and wakes the guest."""
        zp = np.unique(pages)
        written = np.unique(pages[(flags & EV_WRITE) != 0])
        traced = zp[(g.state[zp] & TRACED) != 0]
        if len(traced):  # the trap of a traced page is still an access
            g.state[traced] &= ~np.uint8(TRACED)
            self._host.deliver_accesses(vm, AccessBatch(traced, np.isin(traced, written), np.arange(len(traced)),
                                                        self.now()))
            counts[1] += len(traced)
        reads = np.setdiff1d(zp, written)
        reads = reads[(g.state[reads] & (ZERO | PRESENT)) == (ZERO | PRESENT)]
        if len(reads):
            self.stats["zero_reads"] += len(reads)
            zeros = np.zeros((len(reads), PAGE_SIZE), np.uint8)  # kept alive across the call
            rc = self.lib.mv_resolve_runs(g.uffd, RES_COPY, g.base, self._ptr("const int64_t *", reads), len(reads),
                                          self._ptr("const uint8_t *", zeros), 1)
            if rc < 0:
                raise BackendError(f"VM {g.name!r}: mapping {len(reads)} zero pages: {_errno_text(rc)}")
            self.stats["ioctls"] += rc
            g.state[reads] |= ZFILLED
        if len(written):
            self.stats["zero_writes"] += len(written)
            self._host.deliver_writes(vm, WriteBatch(written, self.mpns(vm, written), np.ones(len(written), bool),
                                                     self.now()))
            counts[2] += len(written)
            # Whatever the hooks did (private page, unmapped, remapped), the guest retries.
            self.lib.mv_wake_runs(g.uffd, g.base, self._ptr("const int64_t *", written), len(written))

    def _deliver_traced(self, vm: VM, g: _Guest) -> int:
        n = g.ctx.log_n if g.ctx is not None else 0
        if not n:
            return 0
        pages = g.log_pages[:n].copy()
        writes = g.log_writes[:n].astype(bool)
        g.ctx.log_n = 0
        self._host.deliver_accesses(vm, AccessBatch(pages, writes, np.arange(n), self.now()))
        return n

    def _zap(self, vm: VM, g: _Guest, gpps: np.ndarray) -> None:
        """Drop the guest's PTEs of ``gpps`` (the memfd keeps the pages): the next touch of each
        is a minor fault."""
        if len(gpps):
            self._call(vm, g, protocol.ZAP, len(gpps), 0, np.ascontiguousarray(gpps, dtype=np.int64))

    def _resolve(self, g: _Guest, kind: int, gpps: np.ndarray, data: np.ndarray | None, protected: bool) -> None:
        """Resolve sorted ``gpps`` with one ioctl per run; protected pages stay protected."""
        if not len(gpps):
            return
        groups = [(gpps, data)]
        if protected and g.modes & MODE_WP:
            wp = (g.state[gpps] & (PROTECTED | WPASYNC | ZERO)) != 0
            if wp.any():
                groups = [(gpps[~wp], None if data is None else data[~wp]),
                          (gpps[wp], None if data is None else data[wp])]
        for index, (pages, rows) in enumerate(groups):
            if not len(pages):
                continue
            is_wp = int(len(groups) == 2 and index == 1)
            pages = np.ascontiguousarray(pages)
            if is_wp and kind == RES_ZERO:  # UFFDIO_ZEROPAGE cannot map write-protected
                kind, rows = RES_COPY, np.zeros((len(pages), PAGE_SIZE), dtype=np.uint8)
            src = self.ffi.NULL
            if rows is not None:
                rows = np.ascontiguousarray(rows)
                src = self._ptr("const uint8_t *", rows)
            rc = self.lib.mv_resolve_runs(g.uffd, kind, g.base, self._ptr("const int64_t *", pages), len(pages),
                                          src, is_wp)
            if rc < 0:
                raise BackendError(f"VM {g.name!r}: resolving {len(pages)} pages: {_errno_text(rc)}")
            self.stats["ioctls"] += rc

    # -- guest activity -----------------------------------------------------------------------

    def access(self, vm: VM, gpps: np.ndarray, writes: np.ndarray, stamp: int) -> AccessResult:
        g = self._guest(vm)
        gpps = np.ascontiguousarray(self._pages(vm, gpps))
        writes = np.ascontiguousarray(writes, dtype=bool)
        if len(writes) != len(gpps):
            raise BackendError("access: pages and write mask differ in length")
        started = time.perf_counter()
        _, counts = self._call(vm, g, protocol.ACCESS, len(gpps), int(stamp) & (2**64 - 1), gpps,
                               writes.view(np.uint8))
        # The hook path's real time is the handler's work (faults the C loop serves alone, a
        # few microseconds each, are not in it).
        return AccessResult(time.perf_counter() - started, len(gpps), 0, *counts, handler_seconds=g.handler_s)

    def trapping(self, vm: VM, gpps: np.ndarray, writes: np.ndarray) -> np.ndarray:
        """From the per-page state: a page not present (missing or staged: a fault, served by
        Python or by the C loop), traced (a minor fault), or written while write-protected or
        mapped onto a zero page. Pages under async write protection never trap."""
        state = self._guest(vm).state[self._pages(vm, gpps)]
        wp = (state & (PROTECTED | ZERO)) != 0
        return ((state & PRESENT) == 0) | ((state & TRACED) != 0) | (np.asarray(writes, bool) & wp)

    def guest_write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        g = self._guest(vm)
        gpps = np.ascontiguousarray(self._pages(vm, gpps))
        data = np.ascontiguousarray(data, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)
        self._call(vm, g, protocol.WRITE_PAGES, len(gpps), 0, gpps, data)

    def guest_read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        g = self._guest(vm)
        gpps = np.ascontiguousarray(self._pages(vm, gpps))
        payload, _ = self._call(vm, g, protocol.READ_PAGES, len(gpps), 0, gpps)
        return np.frombuffer(payload, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)

    # -- contents and presence ----------------------------------------------------------------

    def _check_present(self, vm: VM, g: _Guest, gpps: np.ndarray, what: str) -> None:
        if len(gpps) and not np.all(g.state[gpps] & PRESENT):
            raise BackendError(f"{what} of a page that is not present in VM {vm.name!r}")

    def read(self, vm: VM, gpps: np.ndarray) -> np.ndarray:
        g = self._guest(vm)
        gpps = self._pages(vm, gpps)
        self._check_present(vm, g, gpps, "read")  # reading a hole through the mapping would fill it
        zero = (g.state[gpps] & ZERO) != 0
        if not zero.any():
            return g.data[gpps]
        out = np.zeros((len(gpps), PAGE_SIZE), dtype=np.uint8)  # zero pages: never touch the hole
        out[~zero] = g.data[gpps[~zero]]
        return out

    def write(self, vm: VM, gpps: np.ndarray, data: np.ndarray) -> None:
        g = self._guest(vm)
        gpps = self._pages(vm, gpps)
        self._check_present(vm, g, gpps, "write")
        if np.any(g.state[gpps] & ZERO):  # a shared page first gets a private copy
            self.break_sharing(vm, gpps)
        g.data[gpps] = np.asarray(data, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)

    def present(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        g = self._guest(vm)
        return (g.state[self._all(vm, gpps)] & PRESENT) != 0

    def populate(self, vm: VM, gpps: np.ndarray, data: np.ndarray | None = None) -> None:
        """Make pages present: ``UFFDIO_COPY`` of ``data`` (``UFFDIO_ZEROPAGE`` for zeros), one
        ioctl per run of consecutive pages, which also wakes a guest waiting on them. Traced
        pages are written into the memfd instead, so that the guest's next touch still traps; so
        are, with the option ``accessed``, all but the pages the guest is faulting on, so that
        only a touch makes a page accessed."""
        g = self._guest(vm)
        gpps = self._pages(vm, gpps)
        if not len(gpps):
            return
        if np.any(g.state[gpps] & PRESENT):
            raise BackendError(f"populate of a page that is present already in VM {vm.name!r}")
        order = np.argsort(gpps, kind="stable")
        gpps = gpps[order]
        if np.any(gpps[1:] == gpps[:-1]):
            raise BackendError("populate of the same page twice in one call")
        rows = None
        if data is not None:
            rows = np.asarray(data, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)
            if not np.all(order[1:] > order[:-1]):
                rows = rows[order]
        traced = (g.state[gpps] & TRACED) != 0
        if self.exact_accessed:
            faulting = g.faulting if g.faulting is not None else np.zeros(0, np.int64)
            traced |= ~np.isin(gpps, faulting, assume_unique=True)
        if traced.any():
            tp = gpps[traced]
            for start, length in _runs(tp):
                rc = self.lib.mv_allocate(g.memfd, start * PAGE_SIZE, length * PAGE_SIZE)
                if rc < 0:
                    raise BackendError(f"VM {vm.name!r}: fallocate: {_errno_text(rc)}")
            if rows is not None:
                g.data[tp] = rows[traced]
            g.state[tp] = (g.state[tp] & ~np.uint8(STAGED)) | PRESENT
            self.lib.mv_wake_runs(g.uffd, g.base, self._ptr("const int64_t *", np.ascontiguousarray(tp)), len(tp))
            gpps = gpps[~traced]
            rows = None if rows is None else rows[~traced]
        if len(gpps):
            self._resolve(g, RES_ZERO if rows is None else RES_COPY, gpps, rows, protected=True)
            g.state[gpps] = (g.state[gpps] & ~np.uint8(STAGED)) | PRESENT

    def stage(self, vm: VM, gpps: np.ndarray, data: np.ndarray, block_pages: int = 1) -> None:
        """Prepare the contents of not-present pages without making them present: the fault loop
        resolves a missing fault on a staged page by itself, with one ``UFFDIO_COPY`` of the
        staged run around it within its aligned block of ``block_pages`` (no hook call). For
        prefetching and benchmarks; ``populate`` and ``unmap`` drop the staging."""
        g = self._guest(vm)
        gpps = self._pages(vm, gpps)
        if np.any(g.state[gpps] & PRESENT):
            raise BackendError(f"stage of a page that is present in VM {vm.name!r}")
        if g.stage is None:
            g.stage = mmap.mmap(-1, vm.bytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            g.stage_data = np.frombuffer(g.stage, dtype=np.uint8).reshape(vm.pages, PAGE_SIZE)
            g.ctx.stage = self._ptr("const uint8_t *", g.stage_data)
        g.stage_data[gpps] = np.asarray(data, dtype=np.uint8).reshape(len(gpps), PAGE_SIZE)
        # With exact accessed bits a block resolution would map pages the guest never touched.
        g.ctx.block_pages = 1 if self.exact_accessed else max(1, int(block_pages))
        g.state[gpps] |= STAGED

    def unmap(self, vm: VM, gpps: np.ndarray) -> None:
        """Punch holes in the memfd (which also drops the guest's PTEs)."""
        g = self._guest(vm)
        gpps = np.unique(self._pages(vm, gpps))
        if not len(gpps):
            return
        rc = self.lib.mv_punch_runs(g.memfd, self._ptr("const int64_t *", gpps), len(gpps))
        if rc < 0:
            raise BackendError(f"VM {vm.name!r}: punching holes: {_errno_text(rc)}")
        self._unlarge(g, gpps)
        g.state[gpps] &= ~np.uint8(PRESENT | STAGED | ZERO | ZFILLED)
        g.zero_mpn[gpps] = -1
        g.dirty_pending[gpps] = False

    # -- traps and bits -----------------------------------------------------------------------

    def _require(self, g: _Guest, mode: int, capability: str) -> None:
        if not g.modes & mode:
            raise CapabilityError(f"backend 'linux' does not offer {capability} on this kernel")

    def trace(self, vm: VM, gpps: np.ndarray) -> None:
        """Mark pages traced and zap the guest's PTEs of the present ones: the next touch is a
        minor fault that the fault loop logs and resolves with ``UFFDIO_CONTINUE``."""
        g = self._guest(vm)
        if g.huge:
            raise CapabilityError(f"backend 'linux' does not trace pages of VM {vm.name!r}: a large-page VM's guest "
                                  f"registers no minor faults (their UFFDIO_CONTINUE would map 4 KiB)")
        self._require(g, MODE_MINOR, Capability.TRACE)
        gpps = np.unique(self._pages(vm, gpps))
        g.state[gpps] |= TRACED
        zap = gpps[(g.state[gpps] & PRESENT) != 0]
        if g.busy:  # inside a trap: the guest is stopped on a fault; zap once it replies
            g.pending_zap.append(zap)
        else:
            self._zap(vm, g, zap)

    def untrace(self, vm: VM, gpps: np.ndarray) -> None:
        g = self._guest(vm)
        g.state[self._pages(vm, gpps)] &= ~np.uint8(TRACED)

    def traced(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        g = self._guest(vm)
        return (g.state[self._all(vm, gpps)] & TRACED) != 0

    def protect(self, vm: VM, gpps: np.ndarray) -> None:
        """``UFFDIO_WRITEPROTECT`` over runs of pages; a guest write then stops on a
        write-protect fault that becomes :func:`memvisor_write_trap`."""
        g = self._guest(vm)
        if Capability.WRITE_PROTECT not in self.capabilities:
            raise self._missing(Capability.WRITE_PROTECT)
        gpps = np.unique(self._pages(vm, gpps))
        rc = self.lib.mv_protect_runs(g.uffd, g.base, self._ptr("const int64_t *", gpps), len(gpps), 1)
        if rc < 0:
            raise BackendError(f"VM {vm.name!r}: UFFDIO_WRITEPROTECT: {_errno_text(rc)}")
        g.state[gpps] |= PROTECTED

    def unprotect(self, vm: VM, gpps: np.ndarray) -> None:
        """Clear write protection (waking a guest stopped on it)."""
        g = self._guest(vm)
        gpps = np.unique(self._pages(vm, gpps))
        if not len(gpps) or Capability.WRITE_PROTECT not in self.capabilities:
            return
        zero = (g.state[gpps] & ZERO) != 0
        if zero.any():  # a zero-mapped page stays write-protected (its first write must trap): wake only
            zp = gpps[zero]
            g.state[zp] &= ~np.uint8(PROTECTED)
            self.lib.mv_wake_runs(g.uffd, g.base, self._ptr("const int64_t *", zp), len(zp))
            gpps = gpps[~zero]
            if not len(gpps):
                return
        rc = self.lib.mv_protect_runs(g.uffd, g.base, self._ptr("const int64_t *", gpps), len(gpps), 0)
        if rc < 0:
            raise BackendError(f"VM {vm.name!r}: UFFDIO_WRITEPROTECT: {_errno_text(rc)}")
        g.state[gpps] &= ~np.uint8(PROTECTED)

    def protected(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        g = self._guest(vm)
        return (g.state[self._all(vm, gpps)] & PROTECTED) != 0

    def take_accessed(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """With the option ``accessed``: a page is accessed when the guest's page table maps it
        (bit 63 of its ``/proc/PID/pagemap`` entry: only a guest touch maps a page then); taking
        drops those mappings in the guest (``MADV_DONTNEED``; the memfd keeps the page), so the
        next touch maps it again (a minor fault). Not from inside a trap hook."""
        if Capability.ACCESSED not in self.capabilities:
            raise self._missing(Capability.ACCESSED)
        g = self._guest(vm)
        if g.busy:
            raise BackendError(f"VM {vm.name!r}: take_accessed inside one of its own trap hooks")
        gpps = self._all(vm, gpps)
        fd = os.open(f"/proc/{g.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.pread(fd, 8 * vm.pages, (g.base // PAGE_SIZE) * 8)
        finally:
            os.close(fd)
        mapped = (np.frombuffer(raw, dtype=np.uint64) >> np.uint64(63)).astype(bool)
        mapped &= (g.state & PRESENT) != 0
        accessed = mapped[gpps]
        zap = np.unique(gpps[accessed])
        if len(zap):
            if Capability.DIRTY in self.capabilities:  # a zap forgets writes: keep them first
                g.dirty_pending[zap] = self.take_dirty(vm, zap)
            self._zap(vm, g, zap)
        return accessed

    def take_dirty(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """With the option ``dirty``: one ``PAGEMAP_SCAN`` per run of ``gpps`` on the guest's
        ``/proc/PID/pagemap`` reports the pages written since they were last write-protected and
        write-protects them again (userfaultfd ``WP_ASYNC``), in the same walk."""
        if Capability.DIRTY not in self.capabilities:
            raise self._missing(Capability.DIRTY)
        g = self._guest(vm)
        gpps = self._all(vm, gpps)
        dirty = np.zeros(vm.pages, dtype=np.uint8)
        fd = os.open(f"/proc/{g.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for start, length in _runs(np.unique(gpps)):
                rc = self.lib.mv_take_written(fd, g.base, g.base + start * PAGE_SIZE,
                                              g.base + (start + length) * PAGE_SIZE, self._ptr("uint8_t *", dirty))
                if rc < 0:
                    raise BackendError(f"VM {vm.name!r}: PAGEMAP_SCAN: {_errno_text(rc)}")
        finally:
            os.close(fd)
        out = ((dirty[gpps] != 0) | g.dirty_pending[gpps]) & ((g.state[gpps] & PRESENT) != 0)
        g.dirty_pending[gpps] = False
        return out

    # -- machine pages and sharing ------------------------------------------------------------

    @property
    def zero_mpn(self) -> int:
        """0: the notional zero page. A page mapped onto it (or onto a held zero page) is a hole
        in the memfd that reads as zeros and whose first guest write traps."""
        return 0

    def mpns(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Page identities: each VM's memfd pages are numbered apart (``-1`` where not present);
        pages mapped onto a zero page have its number. They are not physical frame numbers."""
        g = self._guest(vm)
        gpps = self._all(vm, gpps)
        st = g.state[gpps]
        out = self._mpn_base[vm.id] + gpps
        zero = (st & ZERO) != 0
        out[zero] = g.zero_mpn[gpps[zero]]
        out[(st & PRESENT) == 0] = -1
        return out

    def refcounts(self, mpns: np.ndarray) -> np.ndarray:
        """1 for a guest's own page; for a zero page, the guest pages mapped onto it plus the
        hold (held zero pages)."""
        mpns = np.asarray(mpns, dtype=np.int64).ravel()
        out = np.ones(len(mpns), dtype=np.int64)
        special = (mpns == self.zero_mpn) | np.isin(mpns, np.fromiter(self._held, np.int64, len(self._held)))
        if special.any():
            mapped = [g.zero_mpn[g.zero_mpn >= 0] for g in self._guests.values() if not g.dead]
            mapped = np.concatenate(mapped) if mapped else np.zeros(0, np.int64)
            values, counts = np.unique(mapped, return_counts=True)
            for i in np.flatnonzero(special):
                k = np.searchsorted(values, mpns[i])
                n = int(counts[k]) if k < len(values) and values[k] == mpns[i] else 0
                out[i] = n + (1 if int(mpns[i]) in self._held else 0)
        return out

    def share(self, vm: VM, gpps: np.ndarray, mpns: np.ndarray, *, discard: bool = False) -> int:
        """Map pages onto a zero page: the zero MPN (capability ``zero_page``) or a page from
        :meth:`hold_page` (option ``zero_share``): punch their holes in the memfd (their memory is freed at once) and
        mark them zero-mapped. A guest read then maps a zero-filled page write-protected, a guest
        write is a ``memvisor_write_trap`` with ``shared`` set. Sharing onto any other page is a
        one-line :class:`CapabilityError` (:data:`SHARE_REFUSAL`). Without ``discard`` the pages
        must read zeros. Returns the memfd pages freed."""
        if Capability.ZERO_PAGE not in self.capabilities:
            raise self._missing(Capability.ZERO_PAGE)
        g = self._guest(vm)
        gpps = self._pages(vm, gpps)
        mpns = np.asarray(mpns, dtype=np.int64).ravel()
        if len(mpns) != len(gpps):
            raise BackendError("share: pages and machine pages differ in length")
        if not len(gpps):
            return 0
        onto_zero = (mpns == self.zero_mpn) | np.isin(mpns, np.fromiter(self._held, np.int64, len(self._held)))
        if not onto_zero.all():
            raise CapabilityError(f"backend 'linux' cannot share onto machine page {int(mpns[~onto_zero][0])}: "
                                  f"{SHARE_REFUSAL}")
        if len(np.unique(gpps)) != len(gpps):
            raise BackendError("share of the same page twice in one call")
        st = g.state[gpps]
        if not np.all(st & PRESENT):
            raise BackendError(f"share of a page that is not present in VM {vm.name!r}")
        private = gpps[(st & ZERO) == 0]
        if not discard and len(private) and g.data[private].any():
            raise BackendError(f"share of pages of VM {vm.name!r} whose contents are not zeros")
        freed = np.unique(np.concatenate([private, gpps[(st & ZFILLED) != 0]]))
        rc = self.lib.mv_punch_runs(g.memfd, self._ptr("const int64_t *", freed), len(freed))
        if rc < 0:
            raise BackendError(f"VM {vm.name!r}: punching holes: {_errno_text(rc)}")
        self._unlarge(g, freed)
        g.state[gpps] = (g.state[gpps] & ~np.uint8(STAGED | ZFILLED)) | ZERO
        g.zero_mpn[gpps] = mpns
        g.dirty_pending[gpps] = False
        return len(freed)

    def break_sharing(self, vm: VM, gpps: np.ndarray) -> int:
        """Give zero-mapped pages private zero-filled pages: ``fallocate`` their holes (and wake a
        guest waiting on one: its retry maps the new page) and lift the write protection of
        those a read had mapped. Returns the pages allocated."""
        g = self._guest(vm)
        gpps = np.unique(self._pages(vm, gpps))
        z = gpps[(g.state[gpps] & ZERO) != 0]
        if not len(z):
            return 0
        holes = z[(g.state[z] & ZFILLED) == 0]
        filled = z[(g.state[z] & (ZFILLED | PROTECTED)) == ZFILLED]
        for start, length in _runs(holes):
            rc = self.lib.mv_allocate(g.memfd, start * PAGE_SIZE, length * PAGE_SIZE)
            if rc < 0:
                raise BackendError(f"VM {vm.name!r}: fallocate: {_errno_text(rc)}")
        g.state[z] &= ~np.uint8(ZERO | ZFILLED)
        g.zero_mpn[z] = -1
        if len(holes):
            self.lib.mv_wake_runs(g.uffd, g.base, self._ptr("const int64_t *", holes), len(holes))
        if len(filled):
            rc = self.lib.mv_protect_runs(g.uffd, g.base, self._ptr("const int64_t *", filled), len(filled), 0)
            if rc < 0:
                raise BackendError(f"VM {vm.name!r}: UFFDIO_WRITEPROTECT: {_errno_text(rc)}")
        return len(holes)

    def hold_page(self, data: np.ndarray | None = None, node: int = 0) -> int:
        """A zero page the caller holds, with the option ``zero_share``: a number only (no memory
        is behind it: pages mapped onto it are holes). Only zero-filled pages can be held."""
        if Capability.SHARE not in self.capabilities:
            raise self._missing(Capability.SHARE)
        if node != 0:
            raise CapabilityError(f"backend 'linux' does not offer node {node}: {numa_refusal()}")
        if data is not None and np.asarray(data).any():
            raise CapabilityError(f"backend 'linux' holds only zero-filled pages: {SHARE_REFUSAL}")
        mpn = self._next_mpn
        self._next_mpn += 1
        self._held[mpn] = 1
        return mpn

    def release_page(self, mpn: int) -> None:
        if Capability.SHARE not in self.capabilities:
            raise self._missing(Capability.SHARE)
        if self._held.pop(int(mpn), None) is None:
            raise BackendError(f"machine page {mpn} is not held")

    # -- large pages --------------------------------------------------------------------------

    def _unlarge(self, g: _Guest, gpps: np.ndarray) -> None:
        """A hole punched in a shmem THP splits it (the kernel does): forget those blocks."""
        if len(gpps) and g.large.any():
            blocks = np.unique(gpps // LARGE)
            g.large[blocks[blocks < len(g.large)]] = False

    def large(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        """Per page, whether its 2 MiB block is a shmem THP that this backend collapsed (and
        has not split or punched since)."""
        g = self._guest(vm)
        blocks = self._all(vm, gpps) // LARGE
        out = np.zeros(len(blocks), dtype=bool)
        inside = blocks < len(g.large)
        out[inside] = g.large[blocks[inside]]
        return out

    def split(self, vm: VM, large_indices: np.ndarray) -> int:
        """Split large pages: copy each 2 MiB out, punch it, allocate it again in 4 KiB pages
        (``shmem_enabled`` decides the size of a fresh allocation: not ``always`` / ``force``)
        and copy it back; write protection is applied again. The guest's next touch maps 4 KiB."""
        g = self._guest(vm)
        idx = np.unique(np.asarray(large_indices, dtype=np.int64).ravel())
        idx = idx[(idx >= 0) & (idx < len(g.large))]
        idx = idx[g.large[idx]]
        for b in idx:
            pages = np.arange(b * LARGE, (b + 1) * LARGE, dtype=np.int64)
            present = pages[(g.state[pages] & (PRESENT | ZERO)) == PRESENT]
            rows = g.data[present].copy()
            rc = self.lib.mv_punch_hole(g.memfd, int(b) * LARGE * PAGE_SIZE, LARGE * PAGE_SIZE)
            if rc < 0:
                raise BackendError(f"VM {vm.name!r}: punching a large page: {_errno_text(rc)}")
            for start, length in _runs(present):
                rc = self.lib.mv_allocate(g.memfd, start * PAGE_SIZE, length * PAGE_SIZE)
                if rc < 0:
                    raise BackendError(f"VM {vm.name!r}: fallocate: {_errno_text(rc)}")
            g.data[present] = rows
            wp = np.ascontiguousarray(pages[(g.state[pages] & (PROTECTED | WPASYNC)) != 0])
            if len(wp):
                self.lib.mv_protect_runs(g.uffd, g.base, self._ptr("const int64_t *", wp), len(wp), 1)
            g.large[b] = False
        return len(idx)

    def collapse(self, vm: VM, large_indices: np.ndarray) -> int:
        """Collapse aligned runs of 512 present private pages into shmem THPs: the guest calls
        ``MADV_COLLAPSE`` on its second, unregistered mapping (≈ 1 ms per 2 MiB) and drops its
        PTEs there, so that its next touch maps the 2 MiB page with one PMD. Only VMs created
        with ``large_pages`` (their guests map memory 2 MiB-aligned and register no minor
        faults); a block that cannot collapse is skipped."""
        if Capability.LARGE_PAGES not in self.capabilities:
            raise self._missing(Capability.LARGE_PAGES)
        g = self._guest(vm)
        if not g.huge:
            raise CapabilityError(f"backend 'linux' collapses only VMs created with large_pages: the guest of VM "
                                  f"{vm.name!r} maps 4 KiB pages (userfaultfd minor faults)")
        idx = np.unique(np.asarray(large_indices, dtype=np.int64).ravel())
        idx = idx[(idx >= 0) & (idx < len(g.large))]
        idx = idx[~g.large[idx]]
        if len(idx):
            st = g.state[(idx[:, None] * LARGE + np.arange(LARGE)).ravel()].reshape(len(idx), LARGE)
            idx = idx[np.all((st & (PRESENT | ZERO | STAGED)) == PRESENT, axis=1)]
        if not len(idx):
            return 0
        idx = np.ascontiguousarray(idx)
        payload, _ = self._call(vm, g, protocol.COLLAPSE, len(idx), 0, idx)
        results = np.frombuffer(payload, dtype=np.int64, count=len(idx))
        done = idx[results == 0]
        g.large[done] = True
        if (results != 0).any():
            log.debug("large pages not collapsed", vm=vm.name, blocks=int(np.count_nonzero(results != 0)),
                      error=_errno_text(int(results[results != 0][0])))
        return len(done)

    # -- NUMA and accounting ------------------------------------------------------------------

    @property
    def numa_nodes(self) -> int:
        return 1

    def node_of(self, vm: VM, gpps: np.ndarray | None = None) -> np.ndarray:
        g = self._guest(vm)
        gpps = self._all(vm, gpps)
        return np.where((g.state[gpps] & PRESENT) != 0, 0, -1).astype(np.int64)

    def migrate(self, vm: VM, gpps: np.ndarray, node: int) -> int:
        if node != 0:
            raise CapabilityError(f"backend 'linux' cannot migrate to node {node}: {numa_refusal()}")
        return 0

    def free_pages(self, node: int | None = None) -> int:
        """The host's memory budget (``memory_pages``) less the pages every VM holds in its memfd
        (present pages, less the zero-mapped holes)."""
        used = sum(int(np.count_nonzero((g.state & (PRESENT | ZERO)) == PRESENT))
                   + int(np.count_nonzero(g.state & ZFILLED)) for g in self._guests.values())
        return self.config.memory_pages - used

    def total_pages(self, node: int | None = None) -> int:
        return self.config.memory_pages

    def describe(self) -> dict:
        out = super().describe()
        out["missing"] = {c: MISSING_CAPABILITIES[c] for c in sorted(MISSING_CAPABILITIES)
                          if c not in self.capabilities}
        out["kernel"] = os.uname().release
        return out


def _runs(gpps: np.ndarray):
    """(first page, length) of each run of consecutive pages in sorted unique ``gpps``."""
    if not len(gpps):
        return
    breaks = np.flatnonzero(np.diff(gpps) != 1) + 1
    for run in np.split(gpps, breaks):
        yield int(run[0]), len(run)
