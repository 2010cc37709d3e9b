"""``memvisor qemu restore``: memvisor is the source of an incoming migration into a QEMU
started with ``-incoming defer``, from a memvisor checkpoint.

Before QEMU sees one byte, everything is checked: the checkpoint (structure, metadata checksum
covering the ``qemu`` section, the MAC with a key), its QEMU version and machine type against the
destination's, the RAM blocks, and that its records resolve (disk references against the disk).

- **Eager**: the core's eager restore loads every page into the qemu backend's memory, then
  memvisor sends every page, the device sections and the description: QEMU runs once it has
  all of it.
- **Lazy** (post-copy): memvisor advises post-copy, sends the RAM block list, then the device
  sections in a package that ends with RUN: the VM runs at once. The lazy-restore plugin takes
  the restore (every page not present); each page QEMU asks for on the return path is a fault
  that the plugin serves with its window and page blocks, sent to QEMU at once; the plugin's
  prefetcher brings the rest in hottest first (the order sidecar), which memvisor streams
  between requests; the pages left (zero pages) follow; then the stream ends and QEMU reports
  the migration completed. Each page is sent exactly once (QEMU refuses a page twice in
  post-copy).
"""

from __future__ import annotations

import socket
import struct
import time

import attrs
import numpy as np

from memvisor.arrays import first_occurrences
from memvisor.builtins.checkpoint import CheckpointReader
from memvisor.builtins.checkpoint.vm import check_restorable
from memvisor.events import RestoreRequest
from memvisor_qemu import stream as S
from memvisor_qemu.qmp import SUPPORTED, Monitor
from memvisor_qemu.session import Link, connect, make_host, socket_dir
from memvisor_qemu.state import TAG, QemuState

WINDOW_PAGES = 512
"""Pages lazy-restore makes present around a requested page (its ``window_pages``): 2 MiB, so
that a guest walking its working set asks once per 2 MiB (measured on the 1 GiB bench guest:
first marker after 0.48-0.54 s with 512 against 0.63-0.92 s with the plugin's default of 64)."""
SECTION_PAGES = 64
"""Pages per RAM section memvisor streams in the background (256 KiB): QEMU reads one stream,
so a requested page waits behind whatever background pages are already on their way."""
SEND_BUFFER = 128 << 10
"""The socket's send buffer on a lazy restore: bounds the background bytes queued ahead of a
requested page (measured: with 2 MiB sections and the default buffer, p99 of 8.3 ms)."""


@attrs.define
class RestoreResult:
    """What a restore did."""

    path: str
    method: str
    pages: int
    stream_bytes: int
    pages_sent: int
    zero_pages_sent: int
    resumed_s: float
    seconds: float
    requests: int = 0
    request_service_ms: list = attrs.field(factory=list)
    job: dict = attrs.field(factory=dict)

    def to_json(self) -> dict:
        out = attrs.asdict(self)
        times = np.array(self.request_service_ms)
        out["request_service_ms"] = ({"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)),
                                      "max": float(times.max())} if len(times) else None)
        return out


def open_checkpoint(path, key: bytes | None) -> QemuState:
    """The checkpoint's QEMU state (the file fully checked on open: metadata, MAC)."""
    from memvisor.files import check_regular

    check_regular(path, "checkpoint")
    with CheckpointReader(path, key=key) as reader:
        if reader.contents_model != "bytes":
            raise S.QemuError(f"{path}: a checkpoint of pages by content identity (an identity-model emulator's "
                              "host); QEMU restores checkpoints of page bytes only")
        state = QemuState.decode(reader.section(TAG), path)
        if reader.vm_pages != state.pages:
            raise S.QemuError(f"{path}: {reader.vm_pages} pages, its RAM blocks hold {state.pages}")
    major_minor = tuple(int(x) for x in state.qemu.split(".")[:2] if x.isdigit())
    if major_minor != SUPPORTED:
        raise S.QemuError(f"{path}: saved by QEMU {state.qemu}; memvisor restores checkpoints of QEMU "
                          f"{SUPPORTED[0]}.{SUPPORTED[1]} only")
    return state


def check_destination(mon: Monitor, state: QemuState, path) -> None:
    """Refuse a destination that cannot load the checkpoint, before it sees any byte."""
    mon.check_version()
    machine = mon.machine()
    if machine != state.machine:
        raise S.QemuError(f"{path}: a checkpoint of machine type {state.machine}, the QEMU at {mon.path} "
                          f"runs {machine}")
    status = mon.status()
    if status != "inmigrate":
        raise S.QemuError(f"{mon.path}: the VM is {status}; start QEMU with -incoming defer to restore into it")
    theirs = {b.name: b for b in mon.ram_blocks()}
    for block in state.blocks:
        have = theirs.get(block.name)
        if have is None or not have.takes(block.length):
            size = "no such block" if have is None else f"{have.used} bytes"
            raise S.QemuError(f"{path}: RAM block {block.name!r} of {block.length} bytes, the QEMU at "
                              f"{mon.path} has {size} (another memory size or device set)")
    extra = set(theirs) - {b.name for b in state.blocks}
    if extra:
        raise S.QemuError(f"{path}: the QEMU at {mon.path} has RAM block {sorted(extra)[0]!r}, the checkpoint not")


def restore(path, qmp: str, *, lazy: bool, disk: str | None = None, key: bytes | None = None,
            prefetch: str = "hot", prefetch_share: float = 0.5, window_pages: int = WINDOW_PAGES,
            timeout: float = 600.0, progress=None) -> RestoreResult:
    """Restore checkpoint ``path`` into the QEMU behind ``qmp`` (see the module)."""
    started = time.perf_counter()
    state = open_checkpoint(path, key)
    with Monitor(qmp) as mon:
        check_destination(mon, state, path)
        settings = {"lazy-restore": {"prefetch": prefetch, "prefetch_share": prefetch_share,
                                     "window_pages": window_pages}} if lazy else {}
        host, vm = make_host(state.pages, plugins=("lazy-restore",) if lazy else (), disk=disk, settings=settings)
        request = RestoreRequest(str(path), lazy=lazy, key=key)
        with CheckpointReader(path, key=key) as reader:
            if reader.record_kinds and disk is None:
                raise S.QemuError(f"{path}: holds {reader.record_pages} pages as {', '.join(reader.record_kinds)} "
                                  "records: give the disk they refer to (--disk)")
        check_restorable(host, vm, request)  # records resolve: refused here, before QEMU sees a byte
        mon.set_capabilities(postcopy_ram=lazy)
        with socket_dir() as folder:
            mon.execute("migrate-incoming", uri=f"unix:{folder / 'restore.sock'}")
            sock = connect(folder / "restore.sock", 30.0, qmp)
            if lazy:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            link = Link(sock, f"restore of {path} into {qmp}")
            try:
                session = _Session(host, vm, state, link, progress, resume=state.running)
                if lazy:
                    result = session.lazy(request, mon, timeout)
                else:
                    result = session.eager(request, mon, timeout)
            finally:
                link.close()
                host.stop()
    result.path, result.seconds = str(path), time.perf_counter() - started
    return result


class _Session:
    """Sending a checkpoint's pages to QEMU, each once."""

    def __init__(self, host, vm, state: QemuState, link: Link, progress, resume: bool):
        self.host, self.vm, self.state, self.link = host, vm, state, link
        self.resume = resume
        self.backend = host.backend
        self.index = S.BlockIndex(state.blocks)
        self.memory = self.backend.memory(vm)
        self.sent = np.zeros(vm.pages, dtype=bool)
        self.zero_sent = 0
        self.progress = progress or (lambda done, total: None)
        self.started = time.perf_counter()

    def send_pages(self, gpps: np.ndarray, kind: int = S.PART) -> None:
        """One RAM section with the pages of ``gpps`` not sent yet (in the order given)."""
        gpps = gpps[~self.sent[gpps]]
        gpps = first_occurrences(gpps)[0]  # each once, in order of first occurrence
        if not self.backend.present(self.vm, gpps).all():  # a page nobody made present has no bytes yet
            raise S.QemuError(f"{self.link.name}: a page to send is not loaded (a bug)")
        if not len(gpps) and kind == S.PART:
            return
        records, zero = S.ram_records(self.index, gpps, self.memory)
        self.link.send(S.ram_section(kind, self.state.ram, records))
        self.sent[gpps] = True
        self.zero_sent += zero
        self.progress(int(self.sent.sum()), self.vm.pages)

    def preamble(self, postcopy: bool) -> None:
        self.link.send(self.state.header)
        if postcopy:
            self.link.send(S.command(S.CMD_OPEN_RETURN_PATH) + S.command(S.CMD_POSTCOPY_ADVISE, S.advise_data()))
        self.link.send(S.ram_setup_section(self.state.ram, self.state.blocks))
        if postcopy:
            # A discard before LISTEN, as QEMU's own source always sends one: QEMU 7.2 entering
            # LISTEN straight from ADVISE leaves its post-copy state at DISCARD, and then
            # refuses RUN. Nothing was sent yet, so the discarded page is empty anyway.
            self.link.send(S.discard_command(self.state.blocks[0], 0, S.PAGE_SIZE))

    def result(self, method: str, job, resumed: float) -> RestoreResult:
        return RestoreResult("", method, self.vm.pages, self.link.bytes, int(self.sent.sum()), self.zero_sent,
                             resumed, 0.0, job=job.to_json())

    # -- eager ------------------------------------------------------------------------------------

    def eager(self, request: RestoreRequest, mon: Monitor, timeout: float) -> RestoreResult:
        self.preamble(postcopy=False)
        job = self.host.restore_checkpoint(self.vm, request)  # every page into memvisor's memory
        pages = self.backend.take_outbox(self.vm)
        for start in range(0, len(pages), 32 * SECTION_PAGES):
            self.send_pages(pages[start : start + 32 * SECTION_PAGES])
        self._check_all_sent()
        self.send_pages(np.zeros(0, dtype=np.int64), S.END)
        description = self.state.description
        self.link.send(self.state.devices + bytes([S.EOF, S.VMDESCRIPTION]) + struct.pack(">I", len(description))
                       + description)
        mon.wait_migration(timeout)
        self._run(mon)
        return self.result("eager", job, time.perf_counter() - self.started)

    def _run(self, mon: Monitor) -> None:
        """Resume the VM if it ran when saved (QEMU resumes it itself only if it was running
        when the stream's device state was taken; a stop-the-world save stopped it first)."""
        if self.resume and mon.status() == "paused":
            mon.execute("cont")

    def _check_all_sent(self) -> None:
        if not self.sent.all():
            raise S.QemuError(f"{self.link.name}: {int((~self.sent).sum())} pages were not restored")

    # -- lazy -------------------------------------------------------------------------------------

    def lazy(self, request: RestoreRequest, mon: Monitor, timeout: float) -> RestoreResult:
        self.preamble(postcopy=True)
        job = self.host.restore_checkpoint(self.vm, request)  # the plugin takes it: nothing present
        # The core's probe of page 0 (and what a first tick prefetched) goes out after RUN: the
        # VM runs as soon as QEMU has the device state.
        background = self.backend.take_outbox(self.vm)
        package = S.command(S.CMD_POSTCOPY_LISTEN) + self.state.devices + S.command(S.CMD_POSTCOPY_RUN)
        if len(package) > S.MAX_PACKAGE:
            raise S.QemuError(f"{request.path}: device state of {len(package)} bytes exceeds QEMU's post-copy "
                              f"package limit ({S.MAX_PACKAGE}); restore it eagerly")
        self.link.send(S.command(S.CMD_PACKAGED, struct.pack(">I", len(package))) + package)
        # QEMU loads the device state (asking for pages meanwhile: its main thread waits for
        # them, so no monitor command may be sent until the end) and runs the VM itself after
        # RUN, unless it was started with -S.
        resumed = time.perf_counter() - self.started
        rp = S.ReturnPath(self.link.sock, self.link.name)
        service: list[float] = []
        requests = 0
        limit = time.monotonic() + timeout
        while not self.sent.all():
            if time.monotonic() > limit:
                raise S.QemuError(f"{self.link.name}: not finished after {timeout:.0f} s")
            idle = not len(background)
            asks = rp.poll(0.002 if idle else 0.0)
            if rp.closed or rp.shut is not None:
                raise S.QemuError(f"{self.link.name}: QEMU closed the migration with "
                                  f"{int((~self.sent).sum())} pages not restored (was it stopped?)")
            if asks:
                requests += len(asks)
                wanted = self._requested_pages(asks)
                self.backend.request(self.vm, wanted[~self.sent[wanted]])
                fresh = self.backend.take_outbox(self.vm)
                self.send_pages(np.concatenate([wanted, fresh]))
                now = time.perf_counter()
                service += [(now - a.time) * 1000 for a in asks]
                background = background[~self.sent[background]]
                continue
            if len(background):
                self.send_pages(background[:SECTION_PAGES])
                background = background[SECTION_PAGES:]
                continue
            self.host.advance(0.0)  # a tick: the plugin's prefetcher loads its share of blocks
            background = self.backend.take_outbox(self.vm)
            if not len(background) and "complete_s" in job.stats:
                # Everything that needed I/O is in; what is left (zero pages) comes in as faults.
                left = np.flatnonzero(~self.backend.present(self.vm))[: 128 * SECTION_PAGES]
                if len(left):
                    self.backend.request(self.vm, left)
                background = self.backend.take_outbox(self.vm)
        self.send_pages(np.zeros(0, dtype=np.int64), S.END)
        self.link.send(bytes([S.EOF]))
        mon.wait_migration(timeout)
        result = self.result("lazy", job, resumed)
        result.requests, result.request_service_ms = requests, service
        return result

    def _requested_pages(self, asks: list[S.PageRequest]) -> np.ndarray:
        out = []
        for a in asks:
            block = self.index.by_name.get(a.block)
            if block is None or a.offset % S.PAGE_SIZE or a.offset + a.length > block.length or a.length <= 0:
                raise S.QemuError(f"{self.link.name}: QEMU asked for {a.length} bytes at {a.offset:#x} of RAM block "
                                  f"{a.block!r}, which the checkpoint does not hold")
            first = block.first_page + a.offset // S.PAGE_SIZE
            out.append(np.arange(first, first + -(-a.length // S.PAGE_SIZE), dtype=np.int64))
        return np.concatenate(out)
