"""The live-migration stream: a sequence of typed, numbered, checksummed records.

Every record is one message on the link::

    header  "MVR2" | flags u8 | kind length u8 | pages u32 | payload length u32 | sequence u64 | CRC-32 u32
    body    kind name (ASCII) | page numbers (little-endian int64 each) | payload

The CRC-32 covers the header before it and the whole body. The sequence number counts the
records of one migration from 0: the destination takes each number once and in order, so a
record replayed, duplicated or delivered out of order is caught however intact it is. Kinds:

``page``
    Page contents, zstd-compressed together (``level`` of the stream; the frame declares its
    size); raw bytes when compression is off.
``zero``
    All-zero pages: no payload.
``identity``
    Pages by content identity (:mod:`memvisor.identity`), between identity-model hosts only:
    12 bytes a page (uint64 identity, uint32 stamp), zstd-compressed (the frame declares its
    size). The migration counts such a record as the ``page`` records the bytes model would
    send for the same pages (:func:`modelled_page_bytes`), so both models report the same
    stream; it is numbered, owed and checked like a ``page`` record.
``round``
    Control: a round of pre-copy (or stop-and-copy) begins; its payload is the round number
    (u32) and the pages the destination is owed in it, as ``(start, count)`` ranges of u64.
``switch``
    Control: the switch-over; its payload is a flag (u32, 1 for post-copy) and the ranges of
    pages whose copies on the destination are stale (post-copy pulls them again).
other names
    Records that a plugin wrote (:func:`memvisor_describe_pages` with ``purpose="migration"``)
    and that a plugin on the destination resolves (:func:`memvisor_resolve_records`). Their
    payload is ``0x01 | width u32 | n * width bytes`` for fixed-width payloads, or
    ``0x00 | n lengths u32 | the payloads`` for a list of byte strings.

A record whose checksum, magic or lengths are wrong is refused by :func:`decode` with
:class:`StreamError`; the destination then asks for the same record again. An intact record
that breaks the protocol (:class:`StreamViolation`) ends the migration.
"""

from __future__ import annotations

import re
import struct
import zlib

import attrs
import numpy as np

from memvisor import PAGE_SIZE
from memvisor.errors import BackendError
from memvisor.identity import RECORD_DTYPE, Identities, size_model
from memvisor.limits import decompress_frame

MAGIC = b"MVR2"
"""The first bytes of every record."""
HEADER = struct.Struct("<4sBBIIQI")
"""A record's header: magic, flags, kind length, pages, payload length, sequence, CRC-32."""
PAGE, ZERO, IDENTITY, ROUND, SWITCH = "page", "zero", "identity", "round", "switch"
CONTROL = (ROUND, SWITCH)
"""Kinds of the control records (no pages of their own)."""
MAX_RECORD_PAGES = 16384
"""Most pages one record carries (the source sends at most this many at once): what
installing a record may allocate is bounded by it (64 MiB)."""
KIND_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}\Z")
"""What a record kind's name may be: ASCII letters, digits and ``._:/-``, 64 at most."""
RANGE = np.dtype([("start", "<u8"), ("count", "<u8")])
"""A ``(start, count)`` range of pages in a control record's payload."""


class StreamError(BackendError):
    """A record of the migration stream is damaged (checksum, magic or lengths): the
    destination asks for it again."""


class StreamViolation(BackendError):
    """An intact record the destination was not owed: replayed, duplicated, out of order,
    carrying pages outside the VM or not owed in this round, or a round or switch-over that
    leaves pages owed. The migration aborts with the source running."""


@attrs.frozen(eq=False)
class Record:
    """One decoded record: its kind, its pages, its payload bytes and its sequence number."""

    kind: str
    gpps: np.ndarray
    payload: bytes
    seq: int = 0


def encode(kind: str, gpps: np.ndarray, payload: bytes = b"", seq: int = 0) -> bytes:
    """One record as bytes on the wire."""
    name = kind.encode("ascii")
    if not KIND_NAME.match(kind):
        raise ValueError(f"record kind {kind!r} must be 1..64 ASCII letters, digits or ._:/-")
    body = name + np.asarray(gpps, dtype="<i8").tobytes() + payload
    head = HEADER.pack(MAGIC, 0, len(name), len(gpps), len(payload), seq, 0)[:-4]
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


def decode(wire: bytes, vm_pages: int | None = None) -> Record:
    """The record in ``wire``; raises :class:`StreamError` when anything is wrong with it.
    Given ``vm_pages``, its pages must be distinct pages of a VM of that size, at most
    :data:`MAX_RECORD_PAGES` of them (:class:`StreamViolation` otherwise: an intact record that
    no source of this VM sends). Nothing is allocated from a length the wire does not hold."""
    if len(wire) < HEADER.size:
        raise StreamError("record shorter than its header")
    magic, _flags, name_len, pages, payload_len, seq, crc = HEADER.unpack_from(wire)
    body = memoryview(wire)[HEADER.size :]
    if magic != MAGIC or len(body) != name_len + 8 * pages + payload_len:
        raise StreamError("record with a bad magic or bad lengths")
    if zlib.crc32(body, zlib.crc32(memoryview(wire)[: HEADER.size - 4])) != crc:
        raise StreamError("record with a bad checksum")
    try:
        kind = bytes(body[:name_len]).decode("ascii")
    except UnicodeDecodeError:
        raise StreamError("record with a bad kind name") from None
    if not KIND_NAME.match(kind):
        raise StreamError("record with a bad kind name")
    gpps = np.frombuffer(body[name_len : name_len + 8 * pages], dtype="<i8").astype(np.int64)
    if vm_pages is not None:
        if pages > MAX_RECORD_PAGES:
            raise StreamViolation(f"record {seq} carries {pages} pages, more than {MAX_RECORD_PAGES}")
        if pages and (int(gpps.min()) < 0 or int(gpps.max()) >= vm_pages):
            raise StreamViolation(f"record {seq} carries pages outside the VM's {vm_pages}")
        if pages > 1 and len(np.unique(gpps)) != pages:
            raise StreamViolation(f"record {seq} carries a page twice")
    return Record(kind, gpps, bytes(body[name_len + 8 * pages :]), seq)


def pack_ranges(gpps: np.ndarray, head: int = 0) -> bytes:
    """A control payload: ``head`` (u32), then the runs of consecutive pages of the sorted,
    distinct ``gpps`` as ``(start, count)`` u64 pairs."""
    gpps = np.asarray(gpps, dtype=np.int64)
    cut = np.flatnonzero(np.diff(gpps) != 1) + 1
    starts, ends = np.concatenate(([0], cut)), np.concatenate((cut, [len(gpps)]))
    ranges = np.empty(len(gpps) and len(starts), RANGE)
    if len(gpps):
        ranges["start"], ranges["count"] = gpps[starts], ends - starts
    return struct.pack("<I", head) + ranges.tobytes()


def unpack_ranges(payload: bytes, vm_pages: int) -> tuple[int, np.ndarray]:
    """``(head, mask)`` of a control payload: the mask of the pages it names in a VM of
    ``vm_pages``; :class:`StreamViolation` for ranges outside the VM, empty or overlapping."""
    if len(payload) < 4 or (len(payload) - 4) % RANGE.itemsize:
        raise StreamViolation("control record of a bad length")
    (head,) = struct.unpack_from("<I", payload)
    ranges = np.frombuffer(payload, RANGE, offset=4)
    start, count = ranges["start"], ranges["count"]
    vm = np.uint64(vm_pages)
    if len(ranges) and ((count == 0) | (start >= vm) | (count > vm - np.minimum(start, vm))).any():
        raise StreamViolation("control record names pages outside the VM")
    mask = np.zeros(vm_pages, dtype=bool)
    if len(ranges):
        # Each range marks its pages: +1 at its start, -1 past its end; a page covered twice
        # counts 2 and means overlapping ranges.
        edges = np.zeros(vm_pages + 1, dtype=np.int64)
        np.add.at(edges, start.astype(np.int64), 1)
        np.add.at(edges, (start + count).astype(np.int64), -1)
        cover = np.cumsum(edges[:-1])
        if cover.max() > 1:
            raise StreamViolation("control record names a page twice")
        mask = cover == 1
    return head, mask


def pack_payloads(payloads) -> bytes:
    """A plugin record's payloads (an ``(n, width)`` array or a list of bytes) as bytes."""
    if isinstance(payloads, np.ndarray):
        array = np.ascontiguousarray(payloads, dtype=np.uint8)
        array = array.reshape(len(array), -1)
        return b"\x01" + struct.pack("<I", array.shape[1]) + array.tobytes()
    items = [bytes(p) for p in payloads]
    return b"\x00" + np.asarray([len(p) for p in items], dtype="<u4").tobytes() + b"".join(items)


def unpack_payloads(data: bytes, count: int):
    """Inverse of :func:`pack_payloads` for ``count`` pages; :class:`StreamError` for a
    payload of another shape (every length is checked against the bytes there are)."""
    if data[:1] == b"\x01" and len(data) >= 5:
        (width,) = struct.unpack_from("<I", data, 1)
        if width > PAGE_SIZE or len(data) != 5 + count * width:
            raise StreamError("record payload of a bad length")
        return np.frombuffer(data, dtype=np.uint8, offset=5).reshape(count, width).copy()
    if data[:1] == b"\x00" and len(data) >= 1 + 4 * count:
        lengths = np.frombuffer(data, dtype="<u4", count=count, offset=1).astype(np.int64)
        ends = 1 + 4 * count + np.cumsum(lengths)
        if (count and ends[-1] != len(data)) or (not count and len(data) != 1):
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
    """The identities of ``count`` pages from an ``identity`` record's payload: a compressed one
    must declare exactly that many records before it is decompressed, as a ``page`` record."""
    return Identities.from_records(_payload_bytes(IDENTITY, payload, count * RECORD_DTYPE.itemsize, decompressor))


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
    """Bytes of ``count`` pages from a ``page`` record's payload: a compressed one must declare
    exactly that many bytes before it is decompressed (:func:`memvisor.limits.decompress_frame`)."""
    raw = _payload_bytes(PAGE, payload, count * PAGE_SIZE, decompressor)
    return np.frombuffer(raw, dtype=np.uint8).reshape(count, PAGE_SIZE)


def _payload_bytes(kind: str, payload: bytes, expected: int, decompressor) -> bytes:
    """Exactly ``expected`` bytes of a ``kind`` record's payload, raw or (with a decompressor)
    from a zstd frame that declares that size (:class:`StreamError` otherwise)."""
    if decompressor is None:
        raw = payload
    else:
        raw = decompress_frame(payload, expected, lambda problem: StreamError(f"{kind} record: {problem}"),
                               decompressor)
    if len(raw) != expected:
        raise StreamError(f"{kind} record of a bad length")
    return raw
