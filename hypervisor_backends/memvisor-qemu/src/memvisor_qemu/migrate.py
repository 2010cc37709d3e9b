"""``memvisor qemu migrate``: a running VM moves between two QEMUs through memvisor.

The source QEMU migrates to memvisor (pre-copy: the VM runs until QEMU's own switch-over), and
a QEMU started with ``-incoming defer`` receives from memvisor. Between them, memvisor's two
sides talk over a link of their own (a socket; both sides run in this process) in the records
of memvisor's migration stream (:mod:`memvisor.builtins.migration.stream`, numbered from 0):

1. a ``qemu`` record: QEMU's stream from its first byte to the end of its RAM setup section
   (header, configuration, the return path's commands, the RAM block list), verbatim;
2. for each RAM section QEMU sends, a **round**: a ``round`` record owing the section's pages,
   then those pages as ``zero`` records, as records that ``memvisor_describe_pages`` makes of
   them (diskmap, with the shared ``disk``: pages equal to its blocks), and as zstd ``page``
   records (:func:`memvisor.builtins.migration.live.sort_pages`, as the core's own source sorts them);
3. once QEMU's last RAM section is across, the ``switch`` record (stop-and-copy);
4. ``qemu`` records: the rest of QEMU's stream (device sections, EOF, description), verbatim.

The **receiving side** is the core's :class:`~memvisor.builtins.migration.live.Destination`: it takes
each record once and in sequence, only pages the current round owes, checks that each round
delivered all it owed and, at the switch-over, that every page arrived; ``qemu`` records are
its opaque records. It passes the first ``qemu`` record to the destination QEMU after reading
the RAM blocks from it as from any QEMU stream, writes each round's pages (resolved by diskmap
from its copy of the disk and checked by hash) as a RAM section of its own, and passes QEMU's
device state on only after the switch-over was verified: the destination QEMU loads the device
state and runs the VM only once every page is there. A record out of sequence, not owed, or
damaged, a round left short, QEMU's bytes between the rounds: the migration aborts.

The return path runs back the same way, verbatim: the source QEMU (its ``return-path``
capability is set for the migration) completes only once the destination QEMU reported that
it loaded everything; a failure anywhere (the destination killed, the link cut, a record
refused) closes every connection, the source's migration fails, and the source VM keeps
running.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import threading
import time

import attrs
import numpy as np
import zstandard

from memvisor.arrays import unique
from memvisor.builtins.migration import stream as wire
from memvisor.builtins.migration.live import Destination, sort_pages
from memvisor_qemu import stream as S
from memvisor_qemu.qmp import Monitor
from memvisor_qemu.save import UNSUPPORTED_CAPABILITIES
from memvisor_qemu.session import accept, connect, listen, make_host, socket_dir

RAW = "qemu"
"""Record kind of QEMU's own bytes, passed on verbatim: the stream's start and its device state."""
PAGE_RECORD = 256
"""Pages per ``page`` record (compressed together)."""
MAX_RAW = 1 << 20
"""Bytes of QEMU's stream per ``qemu`` record."""
RETURN_PATH_COMMANDS = (S.CMD_OPEN_RETURN_PATH, S.CMD_PING)
"""The commands QEMU sends before its RAM section when its ``return-path`` capability is on."""
EMPTY = np.zeros(0, dtype=np.int64)


@attrs.define
class MigrateResult:
    """What a migration moved: bytes of QEMU's stream and bytes on memvisor's link.

    :ivar pages: pages of the VM.
    :ivar qemu_stream_bytes: bytes of the source QEMU's stream.
    :ivar link_bytes: bytes of the records on memvisor's link.
    :ivar rounds: rounds on the link (one per RAM section QEMU sent).
    :ivar pages_sent: pages the rounds carried (a page QEMU sent again, again).
    :ivar zero_pages: pages of them sent as ``zero`` records.
    :ivar record_pages: pages of them sent as plugin records (disk references).
    :ivar data_pages: pages of them sent as ``page`` data.
    :ivar pages_verified: pages the receiving side took, each owed by its round.
    :ivar seconds: wall-clock time of the whole command.
    :ivar downtime_ms: the downtime QEMU reports.
    """

    pages: int
    qemu_stream_bytes: int
    link_bytes: int
    rounds: int
    pages_sent: int
    zero_pages: int
    record_pages: int
    data_pages: int
    pages_verified: int
    seconds: float = 0.0
    downtime_ms: float | None = None

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
    receiver = _Receiver(link_recv, to_qemu, src, dst, disk, fail)
    threads = [threading.Thread(target=fn, daemon=True, name=name) for fn, name in (
        (sender.run, "memvisor-qemu-send"), (receiver.run, "memvisor-qemu-receive"),
        (lambda: _copy(link_send, from_qemu, fail), "memvisor-qemu-return-1"),
        (lambda: _copy(to_qemu, link_recv, fail), "memvisor-qemu-return-2"))]
    for t in threads:
        t.start()
    limit = time.monotonic() + timeout
    try:
        for t in threads[:2]:
            t.join(max(0.0, limit - time.monotonic()))
            if t.is_alive():
                fail(S.QemuError(f"{src} -> {dst}: not finished after {timeout:.0f} s"))
                t.join(10)
    except BaseException as exc:  # SIGTERM, ^C: close every connection, the source VM runs on
        fail(exc)
        raise
    if fail.error is not None:
        error = fail.error
        if not isinstance(error, S.QemuError):
            error = S.QemuError(f"{src} -> {dst}: {type(error).__name__}: {error}")
        raise error from None
    for s in (link_send, link_recv):
        s.close()
    return MigrateResult(sender.pages, sender.reader.position if sender.reader else 0, sender.link_bytes,
                         sender.rounds, sender.pages_sent, sender.zero, sender.records, sender.data,
                         receiver.pages_verified)


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
    """QEMU's stream in, memvisor's records out (see the module)."""

    def __init__(self, from_qemu, link, name, disk, fail):
        self.from_qemu, self.link, self.name, self.disk, self.fail = from_qemu, link, name, disk, fail
        self.reader: S.StreamReader | None = None
        self.seq = self.rounds = 0
        self.pages = self.pages_sent = self.zero = self.records = self.data = self.link_bytes = 0
        self.compressor = zstandard.ZstdCompressor(level=1)

    def emit(self, kind: str, gpps: np.ndarray = EMPTY, payload: bytes = b"") -> None:
        record = wire.encode(kind, gpps, payload, self.seq)
        self.seq += 1
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
        r.capture = bytearray()
        _, _, ram, blocks = S.read_prelude(r, RETURN_PATH_COMMANDS)
        prelude, r.capture = bytes(r.capture), None
        if len(prelude) > MAX_RAW:  # bounded by the prelude's own limits; checked where it is taken
            raise r.error(f"{len(prelude)} bytes before the first RAM section")
        self.emit(RAW, payload=prelude)
        index = S.BlockIndex(blocks)
        host, vm = make_host(index.pages, disk=self.disk)
        try:
            self.pages = index.pages
            memory = host.backend.memory(vm)
            receiver = S.RamReceiver(index, memory, np.zeros(index.pages, dtype=np.int32))
            for gpps in S.ram_sections(r, ram, receiver):
                self._round(host, vm, memory, unique(gpps))  # a page twice in a section: its last bytes
        finally:
            host.stop()
        self.emit(wire.SWITCH, payload=wire.pack_ranges(EMPTY, 0))
        # The device sections, the EOF mark and the description: verbatim, as they come.
        tail = 0
        while chunk := r.rest_chunk():
            tail += len(chunk)
            if tail > S.MAX_DEVICE_STATE:
                raise r.error(f"more than {S.MAX_DEVICE_STATE} bytes of device state")
            for start in range(0, len(chunk), MAX_RAW):
                self.emit(RAW, payload=chunk[start : start + MAX_RAW])
        with contextlib.suppress(OSError):
            self.link.shutdown(socket.SHUT_WR)

    def _round(self, host, vm, memory: np.ndarray, gpps: np.ndarray) -> None:
        """One RAM section's pages as a round: the ``round`` record owing them, then the pages."""
        if not len(gpps):
            return
        self.rounds += 1
        self.emit(wire.ROUND, payload=wire.pack_ranges(gpps, self.rounds))
        for start in range(0, len(gpps), wire.MAX_RECORD_PAGES):
            part = gpps[start : start + wire.MAX_RECORD_PAGES]
            zero, described, rows = sort_pages(host, vm, part, memory[part])
            if zero.any():
                self.emit(wire.ZERO, part[zero])
            for records in described:
                self.emit(records.kind, records.gpps, wire.pack_payloads(records.payloads))
                self.records += len(records.gpps)
            for first in range(0, len(rows), PAGE_RECORD):
                chunk = part[rows[first : first + PAGE_RECORD]]
                self.emit(wire.PAGE, chunk, wire.page_payload(memory[chunk], self.compressor))
            self.zero += int(np.count_nonzero(zero))
            self.data += len(rows)
        self.pages_sent += len(gpps)


def read_record(r: S.StreamReader, vm_pages: int | None) -> wire.Record | None:
    """The next record of memvisor's link, or None where the link ends between two records.
    Its lengths are checked before its body is read (at most :data:`wire.MAX_RECORD_PAGES`
    pages, a payload no larger than theirs compressed, or :data:`MAX_RAW` bytes of QEMU's
    stream), then :func:`wire.decode` checks the rest (with ``vm_pages``: its pages are
    distinct pages of the VM)."""
    if r.at_end():
        return None
    head = bytes(r.take(wire.HEADER.size))
    magic, _, name_len, pages, payload_len, _, _ = wire.HEADER.unpack(head)
    # zstd's bound on a frame of n bytes is below n + n / 128 + 1 KiB.
    if magic != wire.MAGIC or name_len > 64 or pages > wire.MAX_RECORD_PAGES or \
            payload_len > MAX_RAW + pages * (S.PAGE_SIZE + S.PAGE_SIZE // 64):
        raise r.error("a record with a bad magic or lengths")
    body = bytes(r.take(name_len + 8 * pages + payload_len))
    try:
        return wire.decode(head + body, vm_pages)
    except (wire.StreamError, wire.StreamViolation) as exc:
        raise r.error(str(exc)) from None


class _Receiver:
    """memvisor's records in, QEMU's stream out (see the module)."""

    def __init__(self, link, to_qemu, src, dst, disk, fail):
        self.to_qemu, self.name, self.disk, self.fail = to_qemu, dst, disk, fail
        self.reader = S.StreamReader(link, f"memvisor's link from {src} to {dst}", sender="memvisor's sending side")
        self.pages_verified = 0

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.fail(exc if isinstance(exc, S.QemuError) or not isinstance(exc, OSError)
                      else S.QemuError(f"{self.name}: connection to QEMU lost ({exc.strerror or exc})"))

    def _run(self) -> None:
        r = self.reader
        first = read_record(r, None)
        if first is None or first.kind != RAW or first.seq != 0 or len(first.gpps):
            raise r.error("the link does not begin with the start of QEMU's stream")
        prelude = S.StreamReader(io.BytesIO(first.payload), f"{r.name}: record 0")
        _, _, ram, blocks = S.read_prelude(prelude, RETURN_PATH_COMMANDS)
        if prelude.position != len(first.payload):
            raise prelude.error("bytes after the RAM setup section")
        index = S.BlockIndex(blocks)
        host, vm = make_host(index.pages, disk=self.disk)
        try:
            dest = Destination(host, vm, compressed=True, opaque=(RAW,))
            self._take(dest, first)
            self.to_qemu.sendall(first.payload)
            self._rounds(r, dest, index, ram, host.backend.memory(vm))
        finally:
            host.stop()
        with contextlib.suppress(OSError):
            self.to_qemu.shutdown(socket.SHUT_WR)

    def _take(self, dest: Destination, record: wire.Record) -> str:
        """The destination's verdict on ``record``; anything but a record taken aborts."""
        try:
            outcome = dest.take(record)
        except wire.StreamViolation as exc:
            raise self.reader.error(str(exc)) from None
        if outcome not in ("ok", "opaque"):
            raise self.reader.error(
                f"record {record.seq} ({record.kind}): " + ("damaged" if outcome == "refused" else
                                                            "no plugin here resolves it, or its disk block changed"))
        return outcome

    def _rounds(self, r: S.StreamReader, dest: Destination, index: S.BlockIndex, ram: S.SectionId,
                memory: np.ndarray) -> None:
        """Every record after the first: each round's pages as a RAM section of their own to QEMU,
        then, once the switch-over is verified, QEMU's device state."""
        end_section = struct.pack(">Q", S.RAM_EOS) + S.footer(ram)
        in_section = False
        tail = 0
        while (record := read_record(r, index.pages)) is not None:
            if self._take(dest, record) == "opaque":
                if not dest.switched:
                    raise r.error(f"record {record.seq}: QEMU's bytes before the switch-over (its device state "
                                  "must wait until every page is there)")
                tail += len(record.payload)
                if tail > S.MAX_DEVICE_STATE:
                    raise r.error(f"more than {S.MAX_DEVICE_STATE} bytes of device state")
                self.to_qemu.sendall(record.payload)
            elif record.kind in (wire.ROUND, wire.SWITCH):
                if dest.switched and dest.missing.any():
                    raise r.error(f"record {record.seq}: a post-copy switch-over, {int(dest.missing.sum())} pages "
                                  "left to pull; this link carries pre-copy only")
                if in_section:
                    self.to_qemu.sendall(end_section)
                in_section = record.kind == wire.ROUND
                self.to_qemu.sendall(S.section_header(S.PART if in_section else S.END, ram)
                                     + (b"" if in_section else end_section))
            else:
                self.to_qemu.sendall(S.ram_records(index, record.gpps, memory)[0])
                self.pages_verified += len(record.gpps)
        if not dest.switched:
            raise r.error("the link ended before the switch-over")
