"""The byte layout of a checkpoint file (version 1): constants, structures and their encoders.

docs/checkpoint-format.md describes every structure for people; this module is its executable
twin. Everything is little-endian. A file is::

    header (64 bytes) | storage block 0 | storage block 1 | ... | metadata | trailer (96 bytes)

The writer streams the header and the storage blocks and writes the metadata (the index of the
blocks and the page map) and the trailer last, so it never seeks back. Readers start from the
trailer at the end of the file.

Two levels of blocks:

- a **page block** is a group of pages (a list of page ranges, typically 64 consecutive
  non-zero pages) compressed on its own into one *frame*: the unit of decompression, and the
  unit that a lazy restore copies into guest memory on a fault;
- a **storage block** is the concatenation of the frames of several page blocks, about
  ``buffer_bytes`` long: the unit of I/O (the writer writes it with one call, a reader reads it
  with one call) and of integrity (one checksum per storage block).

The parsing and every check of untrusted bytes live in :mod:`memvisor.builtins.checkpoint.reader`; this
module only packs and unpacks.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memvisor.errors import UserError

MAGIC = b"\x89MVCKPT\n"
"""The first 8 bytes of every checkpoint file."""

END_MAGIC = b"MVCKEND\n"
"""The last 8 bytes of every checkpoint file."""

VERSION = 1
"""The format version this module writes and the only one its reader accepts."""

HEADER_SIZE = 64
TRAILER_SIZE = 96
SECTION_HEADER_SIZE = 16

FLAG_MAC = 0x0001
"""Header flag: the trailer holds a keyed BLAKE2b MAC (block checksums are 32 bytes)."""
FLAG_IDENTITY = 0x0002
"""Header flag: a checkpoint of an identity-model VM (:mod:`memvisor.identity`): page blocks of
codec ``identity`` hold pages by identity, and the optional ``mlen`` section gives the bytes the
bytes model would have stored. Readers before this flag refuse the file (unknown flag)."""
KNOWN_FLAGS = FLAG_MAC | FLAG_IDENTITY

CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_IDENTITY = 2
"""A page block of (identity uint64, stamp uint32) per page, zstd-compressed (identity files only)."""
CODECS = {"none": CODEC_NONE, "zstd": CODEC_ZSTD}
"""Codecs a writer is asked for; identity page blocks come with identity contents."""
CODEC_NAMES = {**{v: k for k, v in CODECS.items()}, CODEC_IDENTITY: "identity"}
IDENTITY_BYTES = 12
"""Bytes of one page in an identity page block, before compression."""

CHECKSUM_PLAIN = 16
"""Digest size of a block checksum in a file without MAC: BLAKE2b-128."""
CHECKSUM_KEYED = 32
"""Digest size of a block checksum in a file with MAC: BLAKE2b-256 (collision resistance 2^128)."""
CHECKSUM_FIELD = 32
"""Bytes of the checksum field of a storage-block entry (a 16-byte digest is zero-padded)."""

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
MAX_VM_BYTES = 1 << 50
"""Largest VM a checkpoint may describe (1 PiB): vm_pages * page_size must not exceed it."""
MAX_PAGE_BLOCK_BYTES = 32 << 20
"""Largest page block: its page count * page size (the most a reader ever decompresses at once)."""
MAX_STORAGE_BLOCK_BYTES = 512 << 20
"""Largest storage block (the most a reader ever reads at once)."""
MAX_BUFFER_BYTES = 256 << 20
"""Largest staging buffer a writer accepts."""
MAX_KIND_NAME = 64
MAX_SECTIONS = 1024
"""Most metadata sections a reader accepts (the four tables, one per record kind and optional
ones): parsing a section header is work per section, not per byte."""

MAX_OPTIONAL_SECTION = 256 << 20
"""Largest optional section a writer writes (readers bound the whole metadata)."""
OPTIONAL_TAG_RE = re.compile(rb"[a-z][A-Za-z0-9_]{3}\Z")
"""Tag of an optional section: 4 ASCII characters, the first a lowercase letter."""

RESERVED_KINDS = ("missing", "zero", "data")
"""Page-kind names of the core; record kinds may not use them."""

KIND_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}\Z")
"""A record kind name: 1-64 ASCII letters, digits and ``. _ : / -``, starting alphanumeric."""

# --- fixed structures -------------------------------------------------------------------------

HEADER = struct.Struct("<8sHHIQBbBBI16s16s")
"""magic, version, flags, page_size, vm_pages, codec, level, checksum_size, reserved,
block_pages, file_id, header_check (BLAKE2b-128 of the first 48 bytes)."""
assert HEADER.size == HEADER_SIZE

TRAILER = struct.Struct("<QQ16s16s32s8s8s")
"""meta_offset, meta_length, file_id, meta_check, mac, reserved, end magic."""
assert TRAILER.size == TRAILER_SIZE

SECTION = struct.Struct("<4sIQ")
"""tag, reserved (0), payload length (the payload is zero-padded to a multiple of 8)."""

RECORD_HEAD = struct.Struct("<HHIQQ")
"""name_len, reserved, width (0: variable), record count, blob length."""

SBLOCK_DTYPE = np.dtype(
    [("offset", "<u8"), ("length", "<u8"), ("first_pblock", "<u8"), ("n_pblocks", "<u8"), ("checksum", "V32")]
)
"""An entry of the SBLK section: one storage block (64 bytes)."""
assert SBLOCK_DTYPE.itemsize == 64

PBLOCK_DTYPE = np.dtype(
    [
        ("rel_offset", "<u8"),
        ("stored_length", "<u8"),
        ("first_range", "<u8"),
        ("n_ranges", "<u4"),
        ("n_pages", "<u4"),
        ("codec", "u1"),
        ("reserved", "V7"),
    ]
)
"""An entry of the PBLK section: one page block (40 bytes)."""
assert PBLOCK_DTYPE.itemsize == 40

RANGE_DTYPE = np.dtype([("start", "<u8"), ("count", "<u8")])
"""A page range (RNGS and ZERO sections): ``count`` pages from guest page ``start`` (16 bytes)."""

TAG_SBLOCKS = b"SBLK"
TAG_PBLOCKS = b"PBLK"
TAG_RANGES = b"RNGS"
TAG_ZERO = b"ZERO"
TAG_RECORDS = b"RECS"
REQUIRED_TAGS = (TAG_SBLOCKS, TAG_PBLOCKS, TAG_RANGES, TAG_ZERO)
TAG_MODELLED = b"mlen"
"""Optional section of identity files: per page block (uint64), the bytes its pages take in the
bytes model (its stored length for a block of bytes, the measured size model's estimate for an
identity block): what readers and writers count as bytes read and written."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: corrupt, truncated, forged, or not a checkpoint.

    The message is one line naming the file, the structure (header, trailer, metadata section,
    storage block or page block with its index number) and the byte offset where it applies.

    :ivar path: the file.
    :ivar where: the structure, e.g. ``"storage block 3"``; empty for the whole file.
    :ivar offset: the byte offset in the file, or None.
    :ivar problem: what is wrong.
    """

    def __init__(self, path, problem: str, *, where: str = "", offset: int | None = None):
        self.path, self.where, self.offset, self.problem = path, where, offset, problem
        parts = [str(path)]
        if where:
            parts.append(where if offset is None else f"{where} at offset {offset}")
        elif offset is not None:
            parts.append(f"offset {offset}")
        parts.append(problem)
        super().__init__(": ".join(p.replace("\n", " ").replace("\r", " ") for p in parts))


# --- checksums and keys -----------------------------------------------------------------------

_MAC_PERSON = b"mvckpt-mac-v1"


def block_checksum(data, size: int) -> bytes:
    """The checksum of a storage block's bytes: unkeyed BLAKE2b with ``size``-byte digest."""
    return hashlib.blake2b(data, digest_size=size).digest()


def header_check(header48: bytes) -> bytes:
    """The header's own checksum: BLAKE2b-128 of its first 48 bytes."""
    return hashlib.blake2b(header48, digest_size=16).digest()


def meta_check(header: bytes, meta, trailer_head: bytes) -> bytes:
    """BLAKE2b-128 over header, metadata and the first 32 bytes of the trailer."""
    h = hashlib.blake2b(digest_size=16)
    h.update(header)
    h.update(meta)
    h.update(trailer_head)
    return h.digest()


def mac_key(material: bytes) -> bytes:
    """The 64-byte BLAKE2b key derived from key material of any length (at least 16 bytes)."""
    return hashlib.blake2b(bytes(material), digest_size=64, person=_MAC_PERSON).digest()


def compute_mac(key64: bytes, header: bytes, meta, trailer_head: bytes) -> bytes:
    """Keyed BLAKE2b-256 over header, metadata and the first 48 bytes of the trailer.

    The metadata holds every storage block's BLAKE2b-256 checksum, so the MAC covers the blocks
    too: forging a block means finding a second preimage of its checksum.
    """
    h = hashlib.blake2b(key=key64, digest_size=32)
    h.update(header)
    h.update(meta)
    h.update(trailer_head)
    return h.digest()


MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 1 << 16


def load_key(path) -> bytes:
    """Read key material from a key file: its raw bytes (at least 16, at most 64 KiB).

    A key file is made with e.g. ``head -c 32 /dev/urandom > checkpoint.key``. The bytes are
    used as they are (a trailing newline is part of the key).
    """
    from memvisor.files import open_regular

    path = Path(path)
    try:
        with os.fdopen(open_regular(path, "key file", CheckpointError), "rb") as f:
            material = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise CheckpointError(path, f"cannot read key file: {e.strerror or e}") from e
    if len(material) > MAX_KEY_FILE_BYTES:
        raise CheckpointError(path, f"key file is longer than {MAX_KEY_FILE_BYTES} bytes")
    if len(material) < MIN_KEY_BYTES:
        raise CheckpointError(path, f"key file holds {len(material)} bytes, at least {MIN_KEY_BYTES} are needed")
    return material


def resolve_key(key) -> bytes | None:
    """Key material from ``key``: bytes as they are, a path (str or PathLike) read as a key file."""
    if key is None:
        return None
    if isinstance(key, (bytes, bytearray, memoryview)):
        material = bytes(key)
        if len(material) < MIN_KEY_BYTES:
            raise ValueError(f"a checkpoint key needs at least {MIN_KEY_BYTES} bytes, got {len(material)}")
        return material
    if isinstance(key, (str, os.PathLike)):
        return load_key(key)
    raise TypeError(f"key must be bytes, a key-file path or None, not {type(key).__name__}")


# --- encoders ---------------------------------------------------------------------------------


def pack_header(
    *,
    flags: int,
    page_size: int,
    vm_pages: int,
    codec: int,
    level: int,
    checksum_size: int,
    block_pages: int,
    file_id: bytes,
) -> bytes:
    """The 64-byte header."""
    head = HEADER.pack(
        MAGIC, VERSION, flags, page_size, vm_pages, codec, level, checksum_size, 0, block_pages, file_id, b""
    )[:48]
    return head + header_check(head)


def unpack_header(raw: bytes) -> dict:
    """The header's fields by name (no checks)."""
    (magic, version, flags, page_size, vm_pages, codec, level, checksum_size, reserved, block_pages, file_id, check) = (
        HEADER.unpack(raw)
    )
    return dict(
        magic=magic,
        version=version,
        flags=flags,
        page_size=page_size,
        vm_pages=vm_pages,
        codec=codec,
        level=level,
        checksum_size=checksum_size,
        reserved=reserved,
        block_pages=block_pages,
        file_id=file_id,
        check=check,
    )


def pack_trailer(*, header: bytes, meta, meta_offset: int, file_id: bytes, key64: bytes | None) -> bytes:
    """The 96-byte trailer sealing ``header`` and ``meta`` (metadata at ``meta_offset``)."""
    head32 = struct.pack("<QQ16s", meta_offset, len(meta), file_id)
    check = meta_check(header, meta, head32)
    mac = compute_mac(key64, header, meta, head32 + check) if key64 is not None else bytes(32)
    return TRAILER.pack(meta_offset, len(meta), file_id, check, mac, bytes(8), END_MAGIC)


def unpack_trailer(raw: bytes) -> dict:
    """The trailer's fields by name (no checks)."""
    meta_offset, meta_length, file_id, check, mac, reserved, end = TRAILER.unpack(raw)
    return dict(
        meta_offset=meta_offset,
        meta_length=meta_length,
        file_id=file_id,
        check=check,
        mac=mac,
        reserved=reserved,
        end=end,
    )


def _pad8(n: int) -> int:
    return -n % 8


def pack_section(tag: bytes, payload) -> bytes:
    """One metadata section: 16-byte section header, payload, zero padding to a multiple of 8."""
    payload = bytes(payload)
    return SECTION.pack(tag, 0, len(payload)) + payload + bytes(_pad8(len(payload)))


def pack_records(name: str, gpps: np.ndarray, width: int, offsets: np.ndarray | None, blob: bytes) -> bytes:
    """The payload of a RECS section (one record kind)."""
    raw_name = name.encode("ascii")
    parts = [
        RECORD_HEAD.pack(len(raw_name), 0, width, len(gpps), len(blob)),
        raw_name,
        bytes(_pad8(len(raw_name))),
        np.asarray(gpps, "<u8").tobytes(),
    ]
    if width == 0:
        parts.append(np.asarray(offsets, "<u8").tobytes())
    parts.append(blob)
    return b"".join(parts)


def pack_metadata(
    sblocks: np.ndarray,
    pblocks: np.ndarray,
    ranges: np.ndarray,
    zero: np.ndarray,
    records: Sequence[tuple[str, np.ndarray, int, np.ndarray | None, bytes]] = (),
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """The metadata: SBLK, PBLK, RNGS and ZERO sections, one RECS section per record kind, then
    ``extra`` sections (tag, payload) as given (tests use it for unknown sections)."""
    parts = [
        pack_section(TAG_SBLOCKS, np.asarray(sblocks, SBLOCK_DTYPE).tobytes()),
        pack_section(TAG_PBLOCKS, np.asarray(pblocks, PBLOCK_DTYPE).tobytes()),
        pack_section(TAG_RANGES, np.asarray(ranges, RANGE_DTYPE).tobytes()),
        pack_section(TAG_ZERO, np.asarray(zero, RANGE_DTYPE).tobytes()),
    ]
    parts += [pack_section(TAG_RECORDS, pack_records(*r)) for r in records]
    parts += [pack_section(tag, payload) for tag, payload in extra]
    return b"".join(parts)


def ranges_of(gpps: np.ndarray) -> np.ndarray:
    """Runs of consecutive page numbers in ``gpps`` (in the given order) as a RANGE_DTYPE array."""
    gpps = np.asarray(gpps, np.int64)
    out = np.empty(0, RANGE_DTYPE)
    if len(gpps) == 0:
        return out
    cut = np.flatnonzero(np.diff(gpps) != 1) + 1
    starts = np.concatenate(([0], cut))
    ends = np.concatenate((cut, [len(gpps)]))
    out = np.empty(len(starts), RANGE_DTYPE)
    out["start"] = gpps[starts]
    out["count"] = ends - starts
    return out


def pages_of(ranges: np.ndarray) -> np.ndarray:
    """The page numbers of a RANGE_DTYPE array, range after range (int64)."""
    starts = ranges["start"].astype(np.int64)
    counts = ranges["count"].astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, np.int64)
    # each page = its range's start + its position within the range
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return offsets + np.arange(total, dtype=np.int64)
