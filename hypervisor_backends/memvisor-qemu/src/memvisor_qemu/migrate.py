"""``memvisor qemu migrate``: a running VM moves between two QEMUs through memvisor.

The source QEMU migrates to memvisor (pre-copy: the VM runs until QEMU's own switch-over), and
a QEMU started with ``-incoming defer`` receives from memvisor. Between them, memvisor's two
sides talk over a link of their own (a socket; both sides run in this process), in the typed
records of :mod:`memvisor.migration.stream`:

- the **sending side** reads QEMU's stream into the qemu backend's memory; of each RAM section
  it sends zero pages as ``zero`` records, pages that ``memvisor_describe_pages`` describes
  (diskmap, with the shared ``disk``: pages equal to its blocks) as those records, the rest as
  zstd-compressed ``page`` records; everything else (the stream's header, commands, the device
  sections) travels verbatim in ``qemu`` records;
- the **receiving side** resolves the records (``memvisor_resolve_records``: diskmap reads the
  blocks from its copy of the disk and checks their hashes) into its own qemu backend memory and
  writes QEMU's stream to the destination, each RAM section with the same pages.

The return path runs back the same way, verbatim: the source QEMU (its ``return-path``
capability is set for the migration) completes only once the destination QEMU reported that
it loaded everything; a failure anywhere (the destination killed, the link cut) closes every
connection, the source's migration fails, and the source VM keeps running.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time

import attrs
import numpy as np
import zstandard

from memvisor.arrays import unique
from memvisor.checkpoint.vm import describe
from memvisor.errors import BackendError
from memvisor.events import PageRecords
from memvisor.migration import stream as wire
from memvisor_qemu import stream as S
from memvisor_qemu.qmp import Monitor
from memvisor_qemu.save import UNSUPPORTED_CAPABILITIES
from memvisor_qemu.session import accept, connect, listen, make_host, socket_dir

RAW = "qemu"
"""Record kind of bytes of QEMU's stream that travel verbatim."""
BLOCKS = "qemu-ram"
"""Record kind of the RAM block list (JSON), before the RAM setup section."""
PAGE_RECORD = 256
"""Pages per ``page`` record (compressed together)."""


@attrs.define
class MigrateResult:
    """What a migration moved: bytes of QEMU's stream and bytes on memvisor's link."""

    pages: int
    qemu_stream_bytes: int
    link_bytes: int
    pages_sent: int
    zero_pages: int
    record_pages: int
    data_pages: int
    seconds: float
    downtime_ms: float | None

    def to_json(self) -> dict:
        return attrs.asdict(self)


class _Failure:
    """The first error of any side; it closes every connection so that the others stop."""

    def __init__(self, sockets: list[socket.socket]):
        self.sockets, self.error, self.lock = sockets, None, threading.Lock()

    def __call__(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def migrate(src: str, dst: str, *, disk: str | None = None, timeout: float = 600.0) -> MigrateResult:
    """Migrate the VM of the QEMU at ``src`` to the QEMU at ``dst`` (see the module)."""
    started = time.perf_counter()
    with Monitor(src) as smon, Monitor(dst) as dmon:
        smon.check_version()
        dmon.check_version()
        status = smon.status()
        if status not in ("running", "paused"):
            raise S.QemuError(f"{src}: the VM is {status}; a migration needs a running or paused VM")
        if dmon.status() != "inmigrate":
            raise S.QemuError(f"{dst}: the VM is {dmon.status()}; start QEMU with -incoming defer")
        if smon.machine() != dmon.machine():
            raise S.QemuError(f"{src} runs machine type {smon.machine()}, {dst} {dmon.machine()}")
        theirs = {b.name: b for b in dmon.ram_blocks()}
        for block in smon.ram_blocks():
            if block.name not in theirs or not theirs[block.name].takes(block.used):
                raise S.QemuError(f"{dst}: RAM block {block.name!r} of {block.used} bytes does not fit there "
                                  "(another memory size or device set)")
        on = [c for c, state in smon.capabilities().items() if state and c in UNSUPPORTED_CAPABILITIES]
        if on:
            raise S.QemuError(f"{src}: migration capability {on[0]!r} is on; turn it off")
        smon.set_capabilities(return_path=True)
        try:
            with socket_dir() as folder:
                dmon.execute("migrate-incoming", uri=f"unix:{folder / 'in.sock'}")
                to_qemu = connect(folder / "in.sock", 30.0, dst)
                server = listen(folder / "out.sock")
                smon.execute("migrate", uri=f"unix:{folder / 'out.sock'}")
                from_qemu = accept(server, 30.0, src)
                server.close()
                result = _relay(from_qemu, to_qemu, src, dst, disk, smon, timeout)
            info = smon.wait_migration(timeout)
            dmon.wait_migration(timeout)
        finally:
            _settle(smon)
    result.downtime_ms = info.get("downtime")
    result.seconds = time.perf_counter() - started
    return result


def _settle(mon: Monitor) -> None:
    """Give the source its return-path capability back once its migration is over (QEMU refuses
    to change capabilities while one runs); never hides the error that ended it."""
    with contextlib.suppress(S.QemuError):
        limit = time.monotonic() + 10
        while mon.migration().get("status") in ("setup", "active", "pre-switchover", "device", "cancelling"):
            if time.monotonic() > limit:
                return
            time.sleep(0.01)
        mon.set_capabilities(return_path=False)


def _relay(from_qemu, to_qemu, src, dst, disk, smon, timeout) -> MigrateResult:
    link_send, link_recv = socket.socketpair()
    fail = _Failure([from_qemu, to_qemu, link_send, link_recv])
    sender = _Sender(from_qemu, link_send, src, disk, fail)
    receiver = _Receiver(link_recv, to_qemu, dst, disk, fail)
    threads = [threading.Thread(target=fn, daemon=True, name=name) for fn, name in (
        (sender.run, "memvisor-qemu-send"), (receiver.run, "memvisor-qemu-receive"),
        (lambda: _copy(link_send, from_qemu, fail), "memvisor-qemu-return-1"),
        (lambda: _copy(to_qemu, link_recv, fail), "memvisor-qemu-return-2"))]
    for t in threads:
        t.start()
    limit = time.monotonic() + timeout
    for t in threads[:2]:
        t.join(max(0.0, limit - time.monotonic()))
        if t.is_alive():
            fail(S.QemuError(f"{src} -> {dst}: not finished after {timeout:.0f} s"))
            t.join(10)
    if fail.error is not None:
        error = fail.error
        if not isinstance(error, S.QemuError):
            error = S.QemuError(f"{src} -> {dst}: {type(error).__name__}: {error}")
        raise error from None
    for s in (link_send, link_recv):
        s.close()
    return MigrateResult(sender.pages, sender.reader.position if sender.reader else 0, sender.link_bytes,
                         int(sender.counts.sum()) if sender.counts is not None else 0, sender.zero,
                         sender.records, sender.data, 0.0, None)


def _copy(source: socket.socket, target: socket.socket, fail: _Failure) -> None:
    """The return path, verbatim, until either side closes."""
    try:
        while chunk := source.recv(1 << 16):
            target.sendall(chunk)
    except OSError:
        pass  # closed by the other threads when the migration ends or fails
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


class _Sender:
    """QEMU's stream in, memvisor's records out."""

    def __init__(self, from_qemu, link, name, disk, fail):
        self.from_qemu, self.link, self.name, self.disk, self.fail = from_qemu, link, name, disk, fail
        self.reader: S.StreamReader | None = None
        self.counts: np.ndarray | None = None
        self.pages = self.zero = self.records = self.data = self.link_bytes = 0
        self.compressor = zstandard.ZstdCompressor(level=1)

    def emit(self, kind: str, gpps=(), payload: bytes = b"") -> None:
        record = wire.encode(kind, np.asarray(gpps, dtype=np.int64), payload)
        self.link.sendall(record)
        self.link_bytes += len(record)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by migrate() in one line
            self.fail(exc if isinstance(exc, S.QemuError) or not isinstance(exc, OSError)
                      else S.QemuError(f"{self.name}: connection lost ({exc.strerror or exc})"))

    def _run(self) -> None:
        r = self.reader = S.StreamReader(self.from_qemu, f"migration stream from {self.name}")
        header, _ = S.read_header(r)
        self.emit(RAW, payload=header)
        host = vm = receiver = None
        while True:
            r.capture = bytearray()
            kind = r.u8()
            if kind == S.COMMAND:
                cmd, length = r.u16(), r.u16()
                if cmd not in (S.CMD_OPEN_RETURN_PATH, S.CMD_PING):
                    raise r.error(f"command {S.COMMAND_NAMES.get(cmd, cmd)}: post-copy is not supported here")
                r.take(length)
                self.emit(RAW, payload=bytes(r.capture))
            elif kind == S.START:
                sid = S.read_section_id(r, kind)
                if sid.idstr != "ram" or host is not None:
                    raise r.error(f"iterative section {sid.idstr!r}: only RAM is supported")
                blocks = S.read_ram_setup(r)
                S.read_footer(r, sid.section_id)
                index = S.BlockIndex(S.block_layout(blocks))
                host, vm = make_host(index.pages, disk=self.disk)
                self.pages = index.pages
                self.counts = np.zeros(index.pages, dtype=np.int32)
                receiver = S.RamReceiver(index, host.backend.memory(vm), self.counts)
                self.emit(BLOCKS, payload=json.dumps(blocks).encode())
                self.emit(RAW, payload=bytes(r.capture))
            elif kind in (S.PART, S.END) and receiver is not None:
                sid = S.read_section_id(r, kind)
                self.emit(RAW, payload=bytes(r.capture))
                r.capture = None
                gpps = receiver.read_section(r)
                self._pages(host, vm, gpps)
                r.capture = bytearray()
                S.read_footer(r, sid.section_id)
                self.emit(RAW, payload=struct.pack(">Q", S.RAM_EOS) + bytes(r.capture))
                if kind == S.END:
                    break
            else:
                raise r.error(f"section type {kind:#x} where memvisor expects RAM or a command")
        r.capture = None
        host.stop()
        # The device sections, the EOF mark and the description: verbatim, as they come.
        while True:
            try:
                chunk = r.rest_chunk()
            except OSError as exc:
                raise S.QemuError(f"{self.name}: connection lost ({exc.strerror or exc})") from None
            if not chunk:
                break
            self.emit(RAW, payload=chunk)
        with contextlib.suppress(OSError):
            self.link.shutdown(socket.SHUT_WR)

    def _pages(self, host, vm, gpps: np.ndarray) -> None:
        """One section's pages as records: zero, described by a plugin, or compressed data."""
        if not len(gpps):
            return
        memory = host.backend.memory(vm)
        gpps = unique(gpps)  # a page sent twice in one section: its last bytes are in memory
        zero = ~memory[gpps].view(np.uint64).any(axis=1)
        if zero.any():
            self.emit("zero", gpps[zero])
            self.zero += int(zero.sum())
        rest = gpps[~zero]
        taken = np.zeros(len(rest), dtype=bool)
        for records in describe(host, vm, rest, "migration") if len(rest) else ():
            self.emit(records.kind, records.gpps, wire.pack_payloads(records.payloads))
            taken[np.searchsorted(rest, records.gpps)] = True
            self.records += len(records.gpps)
        rest = rest[~taken]
        for start in range(0, len(rest), PAGE_RECORD):
            part = rest[start : start + PAGE_RECORD]
            self.emit("page", part, wire.page_payload(memory[part], self.compressor))
        self.data += len(rest)


class _Receiver:
    """memvisor's records in, QEMU's stream out."""

    def __init__(self, link, to_qemu, name, disk, fail):
        self.link, self.to_qemu, self.name, self.disk, self.fail = link, to_qemu, name, disk, fail
        self.decompressor = zstandard.ZstdDecompressor()
        self.buf = bytearray()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.fail(exc if isinstance(exc, S.QemuError) or not isinstance(exc, OSError)
                      else S.QemuError(f"{self.name}: connection to QEMU lost ({exc.strerror or exc})"))

    def _record(self) -> wire.Record | None:
        while True:
            if len(self.buf) >= wire.HEADER.size:
                _, _, name_len, pages, payload_len, _ = wire.HEADER.unpack_from(self.buf)
                size = wire.HEADER.size + name_len + 8 * pages + payload_len
                if len(self.buf) >= size:
                    record = bytes(self.buf[:size])
                    del self.buf[:size]
                    try:
                        return wire.decode(record)
                    except wire.StreamError as exc:
                        raise S.QemuError(f"memvisor's link to {self.name}: {exc}") from None
            chunk = self.link.recv(1 << 20)
            if not chunk:
                if self.buf:
                    raise S.QemuError(f"memvisor's link to {self.name} was cut in the middle of a record")
                return None
            self.buf += chunk

    def _run(self) -> None:
        host = vm = index = memory = None
        while (record := self._record()) is not None:
            if record.kind == RAW:
                self.to_qemu.sendall(record.payload)
                continue
            if record.kind == BLOCKS:
                index = S.BlockIndex(S.block_layout([(n, int(s)) for n, s in json.loads(record.payload)]))
                host, vm = make_host(index.pages, disk=self.disk)
                memory = host.backend.memory(vm)
                continue
            if index is None or np.any((record.gpps < 0) | (record.gpps >= index.pages)):
                raise S.QemuError(f"memvisor's link to {self.name}: pages outside the VM")
            gpps, n = record.gpps, len(record.gpps)
            try:
                if record.kind == "zero":
                    memory[gpps] = 0
                elif record.kind == "page":
                    memory[gpps] = wire.page_data(record.payload, n, self.decompressor)
                else:
                    payloads = wire.unpack_payloads(record.payload, n)
                    data = host.hook.memvisor_resolve_records(host=host, vm=vm,
                                                              records=PageRecords(record.kind, gpps, payloads))
                    if data is None:
                        raise S.QemuError(f"{self.name}: no plugin resolves records of kind {record.kind!r}")
                    memory[gpps] = np.asarray(data, dtype=np.uint8).reshape(n, S.PAGE_SIZE)
            except (wire.StreamError, ValueError) as exc:
                raise S.QemuError(f"memvisor's link to {self.name}: {exc}") from None
            except BackendError as exc:  # a resolver refusing (a disk block changed since)
                raise S.QemuError(f"{self.name}: {exc}") from None
            self.to_qemu.sendall(S.ram_records(index, gpps, memory)[0])
        if host is not None:
            host.stop()
        with contextlib.suppress(OSError):
            self.to_qemu.shutdown(socket.SHUT_WR)
