"""QEMU's migration stream, as QEMU 7.2 writes and reads it (stream version 3).

The specification is QEMU's own source at 7.2 (migration/savevm.c, migration/ram.c,
migration/migration.c, migration/qemu-file.c); this module is written from it, not copied.
All integers are big-endian. A stream is::

    magic "QEVM" u32 | version 3 u32 | 0x07 configuration (machine type, subsections)
    then sections and commands, each opening with one byte:
      0x01 START / 0x04 FULL   section id u32, idstr (u8 length + bytes), instance u32, version u32,
                               the handler's data, footer 0x7e + section id u32
      0x02 PART / 0x03 END     section id u32, the handler's data, footer
      0x08 COMMAND             command u16, length u16, data (open return path, ping, postcopy
                               advise / listen / run, packaged: a length u32 and a whole stream
                               of sections inside)
      0x00 EOF                 then 0x06 and the JSON description (u32 length + bytes), unless
                               the stream is in post-copy

The RAM handler's data is a sequence of records, each ``offset | flags`` as u64 (the offset of
a page within its RAM block, the flags in the low bits), the block's name (u8 length + bytes)
unless the CONTINUE flag says "same block as before", then one byte for a ZERO page (its fill
byte) or 4096 bytes for a PAGE; ``EOS`` ends the section's data. In the START section, the
first record is ``MEM_SIZE`` (total bytes) followed by every RAM block's name and length.

The return path (destination to source, on the same socket) carries messages ``type u16 |
length u16 | data``: SHUT (u32 error, 0 = fine), PONG, and the post-copy page requests
REQ_PAGES_ID (offset u64, length u32, block name) and REQ_PAGES (offset, length: same block).

Device sections (FULL) have no length: they can only be skipped by parsing every device's
state. memvisor keeps them verbatim instead: on a save, everything between the end of the last
RAM section and the EOF byte is the device state (QEMU writes every iterative section, RAM,
before any device section), replayed byte for byte on a restore.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import attrs
import numpy as np

from memvisor.errors import UserError

PAGE_SIZE = 4096

FILE_MAGIC = 0x5145564D  # "QEVM"
FILE_VERSION = 3

EOF, START, PART, END, FULL, SUBSECTION, VMDESCRIPTION, CONFIGURATION, COMMAND = range(9)
FOOTER = 0x7E

RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_FLAG_NAMES = {0x01: "FULL", 0x40: "XBZRLE (xbzrle capability)", 0x80: "HOOK (rdma)",
                  0x100: "COMPRESS_PAGE (compress capability)", 0x200: "MULTIFD_FLUSH (QEMU 8)"}

CMD_OPEN_RETURN_PATH, CMD_PING, CMD_POSTCOPY_ADVISE, CMD_POSTCOPY_LISTEN, CMD_POSTCOPY_RUN = 1, 2, 3, 4, 5
CMD_POSTCOPY_RAM_DISCARD, CMD_PACKAGED = 6, 7
COMMAND_NAMES = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN",
                 5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "PACKAGED", 8: "ENABLE_COLO",
                 9: "POSTCOPY_RESUME", 10: "RECV_BITMAP"}

RP_SHUT, RP_PONG, RP_REQ_PAGES_ID, RP_REQ_PAGES = 1, 2, 3, 4
RP_NAMES = {1: "SHUT", 2: "PONG", 3: "REQ_PAGES_ID", 4: "REQ_PAGES", 5: "RECV_BITMAP", 6: "RESUME_ACK"}

MAX_PACKAGE = 1 << 24
"""QEMU's limit on a packaged command (MAX_VM_CMD_PACKAGED_SIZE): the device state of a
post-copy restore must fit in it."""
MAX_DEVICE_STATE = 256 << 20
"""The most device state (and JSON description) memvisor accepts from a stream."""
MAX_BLOCKS = 1024
MAX_RAM_BYTES = 1 << 40

MAX_CONFIG_CAPABILITIES = 64
"""The most capabilities a configuration section may name (QEMU 7.2 knows one)."""
MAX_COMMANDS = 8
"""The most commands a stream may send before its RAM section (QEMU sends two at most)."""
CONFIG_SUBSECTIONS = {"configuration/target-page-bits", "configuration/capabilities", "configuration/uuid"}


class QemuError(UserError):
    """A QEMU migration stream, monitor or checkpoint that memvisor cannot use: one line naming
    it and what is wrong (the CLI prints it and exits with status 2)."""


@attrs.frozen
class RamBlock:
    """One RAM block of the VM (QEMU's RAMBlock, by its name) and where its pages are in the
    checkpoint's page numbering (blocks one after the other, in stream order).

    :ivar name: QEMU's idstr, e.g. ``pc.ram``.
    :ivar length: bytes in use (a multiple of 4096).
    :ivar first_page: its first page in the checkpoint's numbering.
    """

    name: str
    length: int
    first_page: int

    @property
    def pages(self) -> int:
        """Pages of the block."""
        return self.length // PAGE_SIZE


@attrs.frozen
class SectionId:
    """How a stream names a handler's section: id (stream-local), idstr, instance, version."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


def block_layout(blocks: list[tuple[str, int]]) -> list[RamBlock]:
    """RAM blocks in the checkpoint's page numbering: one after the other, in stream order."""
    out, first = [], 0
    for name, length in blocks:
        out.append(RamBlock(name, length, first))
        first += length // PAGE_SIZE
    return out


class BlockIndex:
    """Page numbers of the checkpoint from (block name, offset) and back, vectorised."""

    def __init__(self, blocks: list[RamBlock]):
        self.blocks = blocks
        self.by_name = {b.name: b for b in blocks}
        self.firsts = np.array([b.first_page for b in blocks] + [sum(b.pages for b in blocks)], dtype=np.int64)
        self.pages = int(self.firsts[-1])

    def block_of(self, gpps: np.ndarray) -> np.ndarray:
        """Index of the block each page is in."""
        return np.searchsorted(self.firsts, gpps, side="right") - 1


# -- reading ------------------------------------------------------------------------------------


class StreamReader:
    """Buffered reading of a stream from a socket or a file, counting bytes.

    :param source: a connected socket, or a binary file object.
    :param name: how errors name the stream.
    :param sender: who closes it early, for that error (``QEMU``).
    """

    def __init__(self, source, name: str, sender: str = "QEMU"):
        self.source, self.name, self.sender = source, name, sender
        self.buf = bytearray()
        self.pos = 0
        self.offset = 0  # stream offset of buf[0]
        self.capture: bytearray | None = None  # when set, every byte consumed is copied here

    @property
    def position(self) -> int:
        """Bytes consumed so far."""
        return self.offset + self.pos

    def error(self, problem: str) -> QemuError:
        return QemuError(f"{self.name}: offset {self.position}: {problem}")

    def _read(self, want: int) -> bytes:
        try:
            return self.source.recv(want) if isinstance(self.source, socket.socket) else self.source.read(want)
        except OSError as exc:
            raise self.error(f"connection lost ({exc.strerror or exc})") from None

    def _fill(self, need: int) -> None:
        """Make ``need`` bytes available after ``pos``."""
        while len(self.buf) - self.pos < need:
            if self.pos > (1 << 20):
                self.offset += self.pos
                del self.buf[: self.pos]
                self.pos = 0
            chunk = self._read(max(need - (len(self.buf) - self.pos), 1 << 20))
            if not chunk:
                raise self.error(f"the stream ended early ({self.sender} closed it or was stopped)")
            self.buf += chunk

    def at_end(self) -> bool:
        """Whether the stream ends here: nothing is buffered and the other side closed it."""
        if self.pos < len(self.buf):
            return False
        chunk = self._read(1 << 20)
        self.buf += chunk
        return not chunk

    def take(self, n: int) -> memoryview:
        """The next ``n`` bytes (valid until the next call)."""
        self._fill(n)
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        if self.capture is not None:
            self.capture += view
        return view

    def peek_byte(self) -> int:
        self._fill(1)
        return self.buf[self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def idstr(self) -> str:
        n = self.u8()
        raw = bytes(self.take(n))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"name {raw!r} is not ASCII") from None

    def rest_chunk(self) -> bytes:
        """The bytes buffered, or else the next bytes that arrive (empty once the other side
        closed): for passing the rest of a stream on as it comes."""
        out = bytes(self.buf[self.pos :]) if self.pos < len(self.buf) else self._read(1 << 20)
        self.offset += self.pos + len(out) if self.pos < len(self.buf) else len(out)
        self.buf, self.pos = bytearray(), 0
        return out

    def rest(self, limit: int) -> bytes:
        """Every byte until the other side closes (at most ``limit``)."""
        out = bytearray(self.buf[self.pos :])
        self.offset += len(self.buf)
        self.buf, self.pos = bytearray(), 0
        while True:
            chunk = self._read(1 << 20)
            if not chunk:
                return bytes(out)
            out += chunk
            self.offset += len(chunk)
            if len(out) > limit:
                raise self.error(f"more than {limit} bytes of device state")


def read_header(r: StreamReader) -> tuple[bytes, str]:
    """The stream's magic, version and configuration section: (their bytes verbatim, machine type)."""
    outer, r.capture = r.capture, bytearray()
    magic, version = r.u32(), r.u32()
    if magic != FILE_MAGIC:
        raise r.error(f"not a QEMU migration stream (magic {magic:#x})")
    if version != FILE_VERSION:
        raise r.error(f"migration stream version {version}, memvisor reads version {FILE_VERSION} (QEMU 7.2)")
    if r.u8() != CONFIGURATION:
        raise r.error("the stream has no configuration section (machine types that suppress it are not supported)")
    length = r.u32()
    if not 0 < length < 256:
        raise r.error(f"machine type name of {length} bytes")
    machine = bytes(r.take(length)).decode("ascii", "replace")
    seen = set()
    while r.peek_byte() == SUBSECTION:
        r.u8()
        name = r.idstr()
        if name not in CONFIG_SUBSECTIONS or name in seen:
            raise r.error(f"unknown or repeated configuration subsection {name!r}")
        seen.add(name)
        r.u32()  # version
        if name == "configuration/target-page-bits":
            if r.u32() != 12:
                raise r.error("target page size is not 4096 bytes")
        elif name == "configuration/uuid":
            r.take(16)
        else:  # capabilities: count, then names
            count = r.u32()
            if count > MAX_CONFIG_CAPABILITIES:
                raise r.error(f"{count} capabilities in the configuration section")
            for _ in range(count):
                r.idstr()
    header = bytes(r.capture)
    if outer is not None:  # a caller capturing more than the header
        outer += header
    r.capture = outer
    return header, machine


def read_prelude(r: StreamReader, commands: tuple[int, ...] = ()) -> tuple[bytes, str, SectionId, list[RamBlock]]:
    """A stream's start, up to the end of its RAM setup section: the header (see
    :func:`read_header`), the commands allowed by ``commands`` (others are refused), and the RAM
    START section. Returns the header's bytes, the machine type, the RAM section's id and the
    RAM blocks."""
    header, machine = read_header(r)
    count = 0
    while (kind := r.u8()) == COMMAND:
        cmd, length = r.u16(), r.u16()
        if cmd not in commands:
            raise r.error(f"command {COMMAND_NAMES.get(cmd, cmd)} before the RAM section: not supported here "
                          "(post-copy, COLO)")
        count += 1
        if count > MAX_COMMANDS:
            raise r.error(f"more than {MAX_COMMANDS} commands before the RAM section")
        r.take(length)
    if kind != START:
        raise r.error(f"section type {kind:#x} where the RAM section should start")
    ram = read_section_id(r, kind)
    if ram.idstr != "ram":
        raise r.error(f"iterative section {ram.idstr!r}: only RAM is supported (no block migration, no dirty bitmaps)")
    blocks = block_layout(read_ram_setup(r))
    read_footer(r, ram.section_id)
    return header, machine, ram, blocks


def ram_sections(r: StreamReader, ram: SectionId, receiver: RamReceiver):
    """The RAM sections after the setup, up to and including the END section: yields the pages
    of each (in stream order) once it is read whole."""
    while True:
        kind = r.u8()
        if kind == COMMAND:
            cmd = r.u16()
            raise r.error(f"command {COMMAND_NAMES.get(cmd, cmd)} during the RAM rounds: not supported here")
        if kind not in (PART, END):
            raise r.error(f"section type {kind:#x} before the RAM section ended")
        sid = read_section_id(r, kind)
        if sid.section_id != ram.section_id:
            raise r.error(f"section {sid.section_id} continues before it started")
        pages = receiver.read_section(r)
        read_footer(r, sid.section_id)
        yield pages
        if kind == END:
            return


def read_section_id(r: StreamReader, kind: int) -> SectionId:
    """A section header after its type byte (START/FULL carry idstr, instance and version)."""
    section_id = r.u32()
    if kind in (START, FULL):
        return SectionId(section_id, r.idstr(), r.u32(), r.u32())
    return SectionId(section_id, "", 0, 0)


def read_footer(r: StreamReader, section_id: int) -> None:
    if r.u8() != FOOTER or r.u32() != section_id:
        raise r.error(f"section {section_id}: bad or missing section footer")


def read_ram_setup(r: StreamReader) -> list[tuple[str, int]]:
    """The RAM section's setup data: total size and every block's name and length, then EOS."""
    head = r.u64()
    if head & (PAGE_SIZE - 1) != RAM_MEM_SIZE:
        raise r.error(f"RAM setup starts with flags {head & (PAGE_SIZE - 1):#x}, not MEM_SIZE")
    total = head & ~(PAGE_SIZE - 1)
    if total > MAX_RAM_BYTES:
        raise r.error(f"{total} bytes of RAM exceed the limit")
    blocks, seen = [], 0
    while seen < total:
        name, length = r.idstr(), r.u64()
        if length % PAGE_SIZE or length == 0 or seen + length > total:
            raise r.error(f"RAM block {name!r} of {length} bytes")
        if len(blocks) >= MAX_BLOCKS or name in dict(blocks):
            raise r.error(f"RAM block {name!r} repeated or too many blocks")
        blocks.append((name, length))
        seen += length
    if r.u64() != RAM_EOS:
        raise r.error("RAM setup does not end with EOS (postcopy with huge pages and x-ignore-shared "
                      "are not supported)")
    return blocks


class RamReceiver:
    """Reads the page records of RAM sections into a VM's memory. The block a CONTINUE record
    refers to is the last one named, in this or an earlier section.

    :param index: the RAM blocks.
    :param memory: ``(pages, 4096)`` uint8, written in place.
    :param received: per page, how many times it was received (incremented).
    """

    def __init__(self, index: BlockIndex, memory: np.ndarray, received: np.ndarray):
        self.index, self.flat, self.received = index, memory.reshape(-1), received
        self.block: RamBlock | None = None

    def read_section(self, r: StreamReader) -> np.ndarray:
        """The records of one section until EOS; returns the pages read, in stream order. A
        section may name each page a few times at most (QEMU names it once per pass over its
        dirty pages), so what it costs to read is bounded by the VM's size."""
        pages: list[int] = []
        limit = 4 * self.index.pages + 1024
        while True:
            head = r.u64()
            flags, offset = head & (PAGE_SIZE - 1), head & ~(PAGE_SIZE - 1)
            if flags == RAM_EOS:
                return np.array(pages, dtype=np.int64)
            if len(pages) >= limit:
                raise r.error(f"a RAM section of more than {limit} pages, in a VM of {self.index.pages}")
            if flags & ~(RAM_ZERO | RAM_PAGE | RAM_CONTINUE) or not flags & (RAM_ZERO | RAM_PAGE):
                bad = [name for bit, name in RAM_FLAG_NAMES.items() if flags & bit]
                raise r.error(f"RAM record with flags {flags:#x}"
                              + (f" ({', '.join(bad)}: not supported)" if bad else ""))
            if not flags & RAM_CONTINUE:
                name = r.idstr()
                self.block = self.index.by_name.get(name)
                if self.block is None:
                    raise r.error(f"page of unknown RAM block {name!r}")
            elif self.block is None:
                raise r.error("CONTINUE record before any block was named")
            block = self.block
            if offset >= block.length:
                raise r.error(f"page at {offset:#x} beyond RAM block {block.name!r} ({block.length:#x} bytes)")
            gpp = block.first_page + offset // PAGE_SIZE
            start = gpp * PAGE_SIZE
            if flags & RAM_PAGE:
                self.flat[start : start + PAGE_SIZE] = np.frombuffer(r.take(PAGE_SIZE), dtype=np.uint8)
            else:
                self.flat[start : start + PAGE_SIZE] = r.u8()
            self.received[gpp] += 1
            pages.append(gpp)


def split_tail(tail: bytes, name: str) -> tuple[bytes, bytes]:
    """Device state and JSON description from everything after the last RAM section:
    ``devices | EOF | VMDESCRIPTION | length u32 | JSON``."""
    if len(tail) < 6:
        raise QemuError(f"{name}: the stream ends without its EOF mark and description")
    # The JSON description is the last thing in the stream; find where it starts.
    for start in range(len(tail) - 1, 5, -1):
        if tail[start - 6] == EOF and tail[start - 5] == VMDESCRIPTION and \
                struct.unpack(">I", tail[start - 4 : start])[0] == len(tail) - start:
            description = tail[start:]
            try:
                json.loads(description)
            except ValueError:
                continue
            return tail[: start - 6], description
        if len(tail) - start > MAX_DEVICE_STATE:
            break
    raise QemuError(f"{name}: the stream does not end with EOF and a JSON description "
                    "(machine types with suppress-vmdesc are not supported)")


# -- writing ------------------------------------------------------------------------------------


def command(cmd: int, data: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND record."""
    return struct.pack(">BHH", COMMAND, cmd, len(data)) + data


def section_header(kind: int, sid: SectionId) -> bytes:
    out = struct.pack(">BI", kind, sid.section_id)
    if kind in (START, FULL):
        name = sid.idstr.encode("ascii")
        out += struct.pack(">B", len(name)) + name + struct.pack(">II", sid.instance_id, sid.version_id)
    return out


def footer(sid: SectionId) -> bytes:
    return struct.pack(">BI", FOOTER, sid.section_id)


def ram_setup_section(sid: SectionId, blocks: list[RamBlock]) -> bytes:
    """The RAM START section: total size, every block's name and length, EOS, footer."""
    total = sum(b.length for b in blocks)
    parts = [section_header(START, sid), struct.pack(">Q", total | RAM_MEM_SIZE)]
    for b in blocks:
        name = b.name.encode("ascii")
        parts += [struct.pack(">B", len(name)), name, struct.pack(">Q", b.length)]
    parts += [struct.pack(">Q", RAM_EOS), footer(sid)]
    return b"".join(parts)


def ram_records(index: BlockIndex, gpps: np.ndarray, memory: np.ndarray) -> tuple[bytes, int]:
    """Page records for ``gpps`` (sent in the order given): a zero page as a ZERO record (one
    byte), any other as a PAGE record; the first page of each run in one block names the block,
    the others CONTINUE. Returns the bytes and how many were zero pages."""
    gpps = np.asarray(gpps, dtype=np.int64)
    if not len(gpps):
        return b"", 0
    data = memory[gpps]
    zero = ~data.view(np.uint64).any(axis=1)
    bidx = index.block_of(gpps)
    named = np.ones(len(gpps), dtype=bool)
    named[1:] = bidx[1:] != bidx[:-1]
    offsets = (gpps - index.firsts[bidx]).astype(np.uint64) * np.uint64(PAGE_SIZE)
    flags = np.where(zero, RAM_ZERO, RAM_PAGE) | np.where(named, 0, RAM_CONTINUE)
    heads = (offsets | flags.astype(np.uint64)).astype(">u8")
    parts: list[bytes] = []
    # Segments of records alike (named, or unnamed zero, or unnamed data) are packed at once.
    kinds = np.where(named, 2, zero.astype(np.int8))
    cuts = np.flatnonzero(np.diff(kinds)) + 1
    for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(gpps)]))):
        if named[lo]:
            for i in range(lo, hi):
                name = index.blocks[bidx[i]].name.encode("ascii")
                parts += [heads[i : i + 1].tobytes(), bytes([len(name)]), name,
                          b"\0" if zero[i] else data[i].tobytes()]
        elif zero[lo]:
            rec = np.zeros(hi - lo, dtype=[("h", ">u8"), ("b", "u1")])
            rec["h"] = heads[lo:hi]
            parts.append(rec.tobytes())
        else:
            rec = np.empty(hi - lo, dtype=[("h", ">u8"), ("d", "u1", PAGE_SIZE)])
            rec["h"], rec["d"] = heads[lo:hi], data[lo:hi]
            parts.append(rec.tobytes())
    return b"".join(parts), int(np.count_nonzero(zero))


def ram_section(kind: int, sid: SectionId, records: bytes) -> bytes:
    """A RAM PART or END section holding ``records``."""
    return section_header(kind, sid) + records + struct.pack(">Q", RAM_EOS) + footer(sid)


def discard_command(block: RamBlock, offset: int, length: int) -> bytes:
    """POSTCOPY_RAM_DISCARD of one range of ``block``: version 0, the block's name (counted and
    NUL-terminated), then (start, length) pairs."""
    name = block.name.encode("ascii")
    return command(CMD_POSTCOPY_RAM_DISCARD,
                   bytes([0, len(name)]) + name + b"\0" + struct.pack(">QQ", offset, length))


def advise_data() -> bytes:
    """POSTCOPY_ADVISE's data: the page sizes of the RAM blocks (all 4 KiB), the target page size."""
    return struct.pack(">QQ", PAGE_SIZE, PAGE_SIZE)


# -- the return path ------------------------------------------------------------------------------


@attrs.frozen
class PageRequest:
    """A destination's post-copy request: ``length`` bytes from ``offset`` of a RAM block."""

    block: str
    offset: int
    length: int
    time: float


class ReturnPath:
    """Messages from a destination QEMU, read without blocking from the migration socket."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        self.buf = bytearray()
        self.last_block: str | None = None
        self.shut: int | None = None
        self.closed = False

    def poll(self, timeout: float) -> list[PageRequest]:
        """Page requests that arrived within ``timeout`` seconds (SHUT and PONG are noted)."""
        import select

        ready, _, _ = select.select([self.sock], [], [], timeout)
        if ready:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError as exc:
                raise QemuError(f"{self.name}: connection lost ({exc.strerror or exc})") from None
            if not chunk:
                self.closed = True
            self.buf += chunk
        return self._parse(time.perf_counter())

    def _parse(self, now: float) -> list[PageRequest]:
        out = []
        while len(self.buf) >= 4:
            kind, length = struct.unpack_from(">HH", self.buf)
            if len(self.buf) < 4 + length:
                break
            data = bytes(self.buf[4 : 4 + length])
            del self.buf[: 4 + length]
            if kind == RP_SHUT and length == 4:
                self.shut = struct.unpack(">I", data)[0]
            elif kind == RP_PONG:
                continue
            elif kind in (RP_REQ_PAGES, RP_REQ_PAGES_ID) and length >= 12:
                offset, size = struct.unpack_from(">QI", data)
                if kind == RP_REQ_PAGES_ID:
                    n = data[12] if length > 12 else 0
                    if length != 13 + n:
                        raise QemuError(f"{self.name}: malformed page request")
                    self.last_block = data[13 : 13 + n].decode("ascii", "replace")
                if self.last_block is None:
                    raise QemuError(f"{self.name}: page request before any block was named")
                out.append(PageRequest(self.last_block, offset, size, now))
            else:
                raise QemuError(f"{self.name}: unexpected return-path message "
                                f"{RP_NAMES.get(kind, kind)} of {length} bytes")
        return out
