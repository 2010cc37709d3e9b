"""A tiny test guest for real QEMU: a boot sector assembled here, byte by byte.

In the manner of QEMU's own migration tests, the guest switches to 32-bit protected mode and
then loops for ever: it increments one byte at the start of every page of a range of its
memory, and after each pass writes a marker (``B``) to the first serial port. After any save,
restore or migration the guest must go on where it stopped: its markers continue, and the
counters of all pages of the range are within one pass of each other.

Optionally the guest first copies blocks of its disk into memory (IDE PIO reads, the way a
page cache fills): those pages then equal 4 KiB blocks of the disk image, which is what disk
references are for.

Nothing here is a binary kept in the repository: :func:`boot_sector` assembles the code each
time from the instruction table below, so it can always be rebuilt and read.
"""

from __future__ import annotations

import struct

import attrs

PAGE = 4096
SECTOR = 512
MARKER_START = b"A"
MARKER_PASS = b"B"
COM1 = 0x3F8
LOAD_ADDRESS = 0x7C00


@attrs.frozen
class GuestLayout:
    """What the guest does.

    :ivar loop_start: first byte address of the counted range (page aligned).
    :ivar loop_end: end of the counted range (exclusive, page aligned).
    :ivar disk_lba: first disk sector the guest copies into memory (a multiple of 8, so that
        its pages are 4 KiB blocks of the image), or 0 for no copy.
    :ivar disk_sectors: sectors copied (a multiple of 256).
    :ivar disk_dest: memory address the copy goes to (page aligned, outside the counted range).
    :ivar fill_start: first byte of a range the guest fills with pseudo-random words (xorshift32)
        before it starts counting: data that does not compress, without the time a disk read
        takes under TCG; 0 for none.
    :ivar fill_end: end of that range (exclusive).
    """

    loop_start: int = 1 << 20
    loop_end: int = 8 << 20
    disk_lba: int = 0
    disk_sectors: int = 0
    disk_dest: int = 0
    fill_start: int = 0
    fill_end: int = 0

    @property
    def pages(self) -> range:
        """The guest-physical page numbers the guest counts in."""
        return range(self.loop_start // PAGE, self.loop_end // PAGE)


class _Asm:
    """The few x86 instructions the guest needs, with labels (jumps are always rel32 in 32-bit
    code, so every instruction has its final size in the first pass)."""

    def __init__(self, origin: int):
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []

    @property
    def here(self) -> int:
        return self.origin + len(self.code)

    def label(self, name: str) -> None:
        self.labels[name] = self.here

    def emit(self, *parts: bytes | int) -> None:
        for p in parts:
            self.code += bytes([p]) if isinstance(p, int) else p

    def rel32(self, opcode: bytes, target: str) -> None:
        """A jump with a 32-bit displacement to ``target`` (resolved at the end)."""
        self.emit(opcode)
        self.fixups.append((len(self.code), target))
        self.emit(bytes(4))

    def finish(self) -> bytes:
        for pos, target in self.fixups:
            disp = self.labels[target] - (self.origin + pos + 4)
            self.code[pos : pos + 4] = struct.pack("<i", disp)
        return bytes(self.code)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _u16(v: int) -> bytes:
    return struct.pack("<H", v)


def boot_sector(layout: GuestLayout = GuestLayout()) -> bytes:
    """The 512-byte boot sector of the guest (BIOS loads it at 0x7c00 in real mode)."""
    for name in ("loop_start", "loop_end", "disk_dest"):
        if getattr(layout, name) % PAGE:
            raise ValueError(f"{name} must be page aligned")
    if not 0x100000 <= layout.loop_start < layout.loop_end:
        raise ValueError("the counted range must start at 1 MiB or above and not be empty")
    if layout.disk_sectors % 256 or layout.disk_lba % 8:
        raise ValueError("disk_sectors must be a multiple of 256 and disk_lba of 8")
    a = _Asm(LOAD_ADDRESS)
    # -- 16-bit real mode: stack, A20, GDT, protected mode ---------------------------------
    a.emit(0xFA)  # cli
    a.emit(b"\x31\xc0", b"\x8e\xd8", b"\x8e\xd0", b"\xbc", _u16(LOAD_ADDRESS))  # xor ax,ax; ds=ss=0; sp
    a.emit(b"\xe4\x92", b"\x0c\x02", b"\xe6\x92")  # fast A20: port 0x92 |= 2
    gdt_desc_at = len(a.code) + 3
    a.emit(b"\x0f\x01\x16", _u16(0))  # lgdt [gdt_desc] (patched below)
    a.emit(b"\x0f\x20\xc0", b"\x66\x83\xc8\x01", b"\x0f\x22\xc0")  # cr0 |= PE
    far_at = len(a.code) + 1
    a.emit(b"\xea", _u16(0), _u16(0x08))  # jmp 0x08:pm (patched below)
    # -- 32-bit protected mode ---------------------------------------------------------------
    pm = a.here
    a.emit(b"\x66\xb8", _u16(0x10), b"\x8e\xd8", b"\x8e\xc0", b"\x8e\xd0")  # ds = es = ss = 0x10
    a.emit(b"\xbc", _u32(LOAD_ADDRESS))  # mov esp, 0x7c00
    if layout.disk_sectors:
        _disk_copy(a, layout)
    if layout.fill_end > layout.fill_start:
        _fill(a, layout)
    a.emit(b"\x66\xba", _u16(COM1), b"\xb0", MARKER_START, 0xEE)  # mov dx, COM1; mov al,'A'; out dx, al
    a.label("outer")
    a.emit(b"\xb8", _u32(layout.loop_start))  # mov eax, start
    a.label("inner")
    a.emit(b"\xfe\x00")  # inc byte [eax]
    a.emit(b"\x05", _u32(PAGE))  # add eax, 4096
    a.emit(b"\x3d", _u32(layout.loop_end))  # cmp eax, end
    a.rel32(b"\x0f\x82", "inner")  # jb inner
    a.emit(b"\xb0", MARKER_PASS, 0xEE)  # mov al, 'B'; out dx, al
    a.rel32(b"\xe9", "outer")  # jmp outer
    # -- GDT: null, flat code 0x08, flat data 0x10 --------------------------------------------
    while a.here % 8:
        a.emit(0x90)
    gdt = a.here
    a.emit(bytes(8), bytes.fromhex("ffff0000009acf00"), bytes.fromhex("ffff00000092cf00"))
    desc = a.here
    a.emit(_u16(23), _u32(gdt))
    code = bytearray(a.finish())
    code[gdt_desc_at : gdt_desc_at + 2] = _u16(desc)
    code[far_at : far_at + 2] = _u16(pm)
    if len(code) > 510:
        raise ValueError(f"the guest's code is {len(code)} bytes, a boot sector holds 510")
    return bytes(code) + bytes(510 - len(code)) + b"\x55\xaa"


def _disk_copy(a: _Asm, layout: GuestLayout) -> None:
    """Read ``disk_sectors`` from ``disk_lba`` of the primary IDE disk into ``disk_dest``:
    LBA28 PIO, 256 sectors per command, 32-bit data reads."""
    a.emit(b"\xbf", _u32(layout.disk_dest))  # mov edi, dest
    a.emit(b"\xbb", _u32(layout.disk_lba))  # mov ebx, lba
    a.label("command")
    a.emit(b"\x66\xba", _u16(0x1F7))
    a.label("idle")
    a.emit(0xEC, b"\xa8\x80")  # in al,dx; test al, BSY
    a.rel32(b"\x0f\x85", "idle")
    a.emit(b"\x66\xba", _u16(0x1F6), b"\x89\xd8", b"\xc1\xe8\x18", b"\x0c\xe0", 0xEE)  # drive/head: 0xE0 | lba>>24
    a.emit(b"\x66\xba", _u16(0x1F2), b"\xb0\x00", 0xEE)  # 256 sectors
    a.emit(b"\x66\xba", _u16(0x1F3), b"\x89\xd8", 0xEE)  # lba bits 0-7
    a.emit(b"\x66\xba", _u16(0x1F4), b"\xc1\xe8\x08", 0xEE)  # bits 8-15
    a.emit(b"\x66\xba", _u16(0x1F5), b"\xc1\xe8\x08", 0xEE)  # bits 16-23
    a.emit(b"\x66\xba", _u16(0x1F7), b"\xb0\x20", 0xEE)  # READ SECTORS
    a.emit(b"\xbe", _u32(256))  # mov esi, 256
    a.label("sector")
    a.emit(b"\x66\xba", _u16(0x1F7))
    a.label("ready")
    a.emit(0xEC, b"\xa8\x80")  # BSY?
    a.rel32(b"\x0f\x85", "ready")
    a.emit(b"\xa8\x08")  # DRQ?
    a.rel32(b"\x0f\x84", "ready")
    a.emit(b"\x66\xba", _u16(0x1F0), b"\xb9", _u32(SECTOR // 4), b"\xf3\x6d")  # rep insd
    a.emit(0x4E)  # dec esi
    a.rel32(b"\x0f\x85", "sector")
    a.emit(b"\x81\xc3", _u32(256))  # add ebx, 256
    a.emit(b"\x81\xfb", _u32(layout.disk_lba + layout.disk_sectors))  # cmp ebx, end
    a.rel32(b"\x0f\x82", "command")


def _fill(a: _Asm, layout: GuestLayout) -> None:
    """Fill ``[fill_start, fill_end)`` with xorshift32 words (eax the state, edx scratch)."""
    a.emit(0xFC, b"\xbf", _u32(layout.fill_start), b"\xb8", _u32(0x2545F491))  # cld; edi; eax = seed
    a.label("fill")
    a.emit(b"\x89\xc2", b"\xc1\xe2\x0d", b"\x31\xd0")  # x ^= x << 13
    a.emit(b"\x89\xc2", b"\xc1\xea\x11", b"\x31\xd0")  # x ^= x >> 17
    a.emit(b"\x89\xc2", b"\xc1\xe2\x05", b"\x31\xd0")  # x ^= x << 5
    a.emit(0xAB)  # stosd
    a.emit(b"\x81\xff", _u32(layout.fill_end))  # cmp edi, end
    a.rel32(b"\x0f\x82", "fill")


def disk_image(layout: GuestLayout, data: bytes = b"", size: int | None = None) -> bytes:
    """A raw disk image: the boot sector, zeros up to ``disk_lba``, then ``data`` (padded to
    ``size`` bytes when given)."""
    image = bytearray(boot_sector(layout))
    if data:
        image += bytes(layout.disk_lba * SECTOR - len(image))
        image += data
    if size is not None:
        image += bytes(max(0, size - len(image)))
    image += bytes(-len(image) % PAGE)
    return bytes(image)
