"""The live-migration stream: a sequence of typed, checksummed records.

Every record is one message on the link::

    header  "MVR1" | flags u8 | kind length u8 | pages u32 | payload length u32 | CRC-32 u32
    body    kind name (ASCII) | page numbers (little-endian int64 each) | payload

The CRC-32 covers the whole body. Kinds:

``page``
    Page contents, zstd-compressed together (``level`` of the stream); raw bytes when
    compression is off.
``zero``
    All-zero pages: no payload.
``identity``
    Pages by content identity (:mod:`memvisor.identity`), between identity-model hosts only:
    12 bytes a page (uint64 identity, uint32 stamp), zstd-compressed. The migration counts
    such a record as the ``page`` records the bytes model would send for the same pages
    (:func:`modelled_page_bytes`), so both models report the same stream.
other names
    Records that a plugin wrote (:func:`memvisor_describe_pages` with ``purpose="migration"``)
    and that a plugin on the destination resolves (:func:`memvisor_resolve_records`). Their
    payload is ``0x01 | width u32 | n * width bytes`` for fixed-width payloads, or
    ``0x00 | n lengths u32 | the payloads`` for a list of byte strings.

A record whose checksum, magic or lengths are wrong is refused by :func:`decode` with
:class:`StreamError`; the destination then asks for the same pages again.
"""

from __future__ import annotations

import struct
import zlib

import attrs
import numpy as np

from memvisor import PAGE_SIZE
from memvisor.errors import BackendError
from memvisor.identity import RECORD_DTYPE, Identities, size_model

MAGIC = b"MVR1"
HEADER = struct.Struct("<4sBBIII")
PAGE, ZERO, IDENTITY = "page", "zero", "identity"


class StreamError(BackendError):
    """A record of the migration stream is damaged (checksum, magic or lengths)."""


@attrs.frozen(eq=False)
class Record:
    """One decoded record: its kind, its pages and its payload bytes."""

    kind: str
    gpps: np.ndarray
    payload: bytes


def encode(kind: str, gpps: np.ndarray, payload: bytes = b"") -> bytes:
    """One record as bytes on the wire."""
    name = kind.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError(f"record kind {kind!r} must be 1..255 ASCII characters")
    body = name + np.asarray(gpps, dtype="<i8").tobytes() + payload
    return HEADER.pack(MAGIC, 0, len(name), len(gpps), len(payload), zlib.crc32(body)) + body


def decode(wire: bytes) -> Record:
    """The record in ``wire``; raises :class:`StreamError` when anything is wrong with it."""
    if len(wire) < HEADER.size:
        raise StreamError("record shorter than its header")
    magic, _flags, name_len, pages, payload_len, crc = HEADER.unpack_from(wire)
    body = memoryview(wire)[HEADER.size :]
    if magic != MAGIC or len(body) != name_len + 8 * pages + payload_len:
        raise StreamError("record with a bad magic or bad lengths")
    if zlib.crc32(body) != crc:
        raise StreamError("record with a bad checksum")
    try:
        kind = bytes(body[:name_len]).decode("ascii")
    except UnicodeDecodeError:
        raise StreamError("record with a bad kind name") from None
    gpps = np.frombuffer(body[name_len : name_len + 8 * pages], dtype="<i8").astype(np.int64)
    return Record(kind, gpps, bytes(body[name_len + 8 * pages :]))


def pack_payloads(payloads) -> bytes:
    """A plugin record's payloads (an ``(n, width)`` array or a list of bytes) as bytes."""
    if isinstance(payloads, np.ndarray):
        array = np.ascontiguousarray(payloads, dtype=np.uint8)
        array = array.reshape(len(array), -1)
        return b"\x01" + struct.pack("<I", array.shape[1]) + array.tobytes()
    items = [bytes(p) for p in payloads]
    return b"\x00" + np.asarray([len(p) for p in items], dtype="<u4").tobytes() + b"".join(items)


def unpack_payloads(data: bytes, count: int):
    """Inverse of :func:`pack_payloads` for ``count`` pages."""
    if data[:1] == b"\x01":
        (width,) = struct.unpack_from("<I", data, 1)
        if len(data) != 5 + count * width:
            raise StreamError("record payload of a bad length")
        return np.frombuffer(data, dtype=np.uint8, offset=5).reshape(count, width).copy()
    if data[:1] == b"\x00" and len(data) >= 1 + 4 * count:
        lengths = np.frombuffer(data, dtype="<u4", count=count, offset=1).astype(np.int64)
        ends = 1 + 4 * count + np.cumsum(lengths)
        if count and ends[-1] != len(data):
            raise StreamError("record payload of a bad length")
        starts = ends - lengths
        return [data[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]
    raise StreamError("record payload of an unknown form")


def page_payload(data: np.ndarray, compressor) -> bytes:
    """Payload of a ``page`` record: the pages' bytes, zstd-compressed when ``compressor``."""
    raw = np.ascontiguousarray(data, dtype=np.uint8).tobytes()
    return compressor.compress(raw) if compressor is not None else raw


def identity_payload(contents: Identities, compressor) -> bytes:
    """Payload of an ``identity`` record: 12 bytes a page, zstd-compressed when ``compressor``."""
    raw = contents.to_records()
    return compressor.compress(raw) if compressor is not None else raw


def identity_data(payload: bytes, count: int, decompressor) -> Identities:
    """The identities of ``count`` pages from an ``identity`` record's payload."""
    expect = count * RECORD_DTYPE.itemsize
    try:
        raw = decompressor.decompress(payload, max_output_size=expect) if decompressor else payload
    except Exception as exc:  # zstd reports damage as its own error
        raise StreamError(f"identity record does not decompress: {exc}") from None
    if len(raw) != expect:
        raise StreamError("identity record of a bad length")
    return Identities.from_records(raw)


def modelled_page_bytes(contents: Identities, chunk_pages: int, level: int | None) -> int:
    """Bytes on the link of the ``page`` records that would carry these pages in the bytes
    model: one record per ``chunk_pages`` pages, each a header, the kind name, 8 bytes a page
    number and the pages compressed together (the measured size model) or raw."""
    n = len(contents)
    if not n:
        return 0
    starts = np.arange(0, n, chunk_pages)
    overhead = len(starts) * (HEADER.size + len(PAGE)) + 8 * n
    if level is None:
        return overhead + n * PAGE_SIZE
    return overhead + int(size_model(level, chunk_pages).blocks_bytes(contents, starts).sum())


def page_data(payload: bytes, count: int, decompressor) -> np.ndarray:
    """Bytes of ``count`` pages from a ``page`` record's payload."""
    try:
        raw = decompressor.decompress(payload, max_output_size=count * PAGE_SIZE) if decompressor else payload
    except Exception as exc:  # zstd reports damage as its own error
        raise StreamError(f"page record does not decompress: {exc}") from None
    if len(raw) != count * PAGE_SIZE:
        raise StreamError("page record of a bad length")
    return np.frombuffer(raw, dtype=np.uint8).reshape(count, PAGE_SIZE)
