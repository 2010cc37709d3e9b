"""The checkpoint reader: validates a file on open, then serves page blocks with one read each.

Opening reads three things (header, trailer, metadata: three reads) and checks every structure
against the file size and the VM size before using it; nothing is allocated from a size in the
file that has not been checked. Page data is read one storage block at a time (one ``pread``),
its checksum is checked, and the last storage block is kept so that the page blocks next to the
one a fault needed cost no further read. Every problem raises
:class:`~memvisor.builtins.checkpoint.layout.CheckpointError` naming the file, the structure and the
offset.
"""

from __future__ import annotations

import hmac
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import zstandard

from memvisor.builtins.checkpoint import layout as L
from memvisor.builtins.checkpoint.layout import CheckpointError
from memvisor.files import open_regular
from memvisor.limits import check_budget, decompress_frame

KIND_MISSING = 0
"""Page kind code: the page is not in the checkpoint."""
KIND_ZERO = 1
"""Page kind code: the page is all zeros (page map)."""
KIND_DATA = 2
"""Page kind code: the page is stored as data in a page block."""
KIND_FIRST_RECORD = 3
"""Page kind code of the first record kind; record kind ``i`` is ``KIND_FIRST_RECORD + i``."""

DEFAULT_MAX_METADATA_BYTES = 1 << 30
"""The most bytes of metadata (page map, records) a reader accepts unless told otherwise."""

META_MEMORY_FACTOR = 8
"""Bytes of memory opening a checkpoint may take per byte of its metadata (the page map and
its checks; measured about 6): the metadata is refused before it is parsed when this much is
more than :func:`memvisor.limits.memory_budget`."""


@attrs.frozen(eq=False)
class RecordSet:
    """The records of one kind: pages and their opaque payloads, sorted by page.

    :ivar kind: the record kind name.
    :ivar gpps: the pages (int64, strictly ascending).
    :ivar width: bytes of every payload, or None when they have different lengths.
    :ivar offsets: payload ``i`` is ``blob[offsets[i]:offsets[i+1]]`` (int64, ``len(gpps)+1``).
    :ivar blob: the payloads, concatenated.
    """

    kind: str
    gpps: np.ndarray
    width: int | None
    offsets: np.ndarray
    blob: bytes

    def __len__(self) -> int:
        return len(self.gpps)

    def __getitem__(self, i: int) -> bytes:
        """The payload of record ``i``."""
        return self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def payloads(self) -> list[bytes]:
        """Every payload, in page order."""
        return [self[i] for i in range(len(self))]

    def as_array(self, dtype=None) -> np.ndarray:
        """Fixed-width payloads as a ``(n, width)`` uint8 array, or as ``n`` items of ``dtype``
        (whose itemsize must be the width), e.g. a structured ``(disk, block)`` dtype."""
        if self.width is None:
            raise ValueError(f"records of kind {self.kind!r} have payloads of different lengths")
        arr = np.frombuffer(self.blob, np.uint8).reshape(len(self.gpps), self.width)
        if dtype is None:
            return arr
        dtype = np.dtype(dtype)
        if dtype.itemsize != self.width:
            raise ValueError(f"dtype of {dtype.itemsize} bytes for payloads of {self.width} bytes")
        return np.frombuffer(self.blob, dtype)

    def select(self, idx) -> tuple[np.ndarray, list[bytes]]:
        """Pages and payloads of the records at positions ``idx``."""
        idx = np.asarray(idx, np.int64)
        return self.gpps[idx], [self[int(i)] for i in idx]


class CheckpointReader:
    """Read a checkpoint file; validates header, trailer and metadata on open.

    Lazy restore::

        with CheckpointReader("vm.ckpt") as r:
            loc = r.locate(faulting_gpp)          # (storage block, page block) or None
            if loc is not None:
                gpps, data = r.read_page_block(loc)  # one read; data[i] is page gpps[i]

    :param path: the checkpoint file.
    :param key: key material (bytes) or a key-file path. Given a key, the file must carry a MAC
        made with it (else the file is refused); without one, a MAC in the file is not checked
        (the checksums still are).
    :param max_metadata_bytes: refuse files whose metadata is larger (default 1 GiB).
    :param cache_blocks: storage blocks kept in memory after they are read (default 8).

    Attributes: ``path``, ``version``, ``page_size``, ``vm_pages``, ``codec`` (default codec
    name), ``level``, ``block_pages``, ``file_id``, ``keyed`` (the file has a MAC),
    ``authenticated`` (its MAC was checked with a key), ``storage_blocks``, ``page_blocks``,
    ``data_pages``, ``zero_pages``, ``record_pages``, ``record_kinds`` (names in code order),
    ``kind_names`` (name of every kind code), ``contents_model`` (``"identity"`` for a
    checkpoint of an identity-model VM: :meth:`read_page_block` then gives
    :class:`~memvisor.identity.Identities` for its identity page blocks), and the counters
    ``read_calls`` and ``bytes_read`` (every ``pread``, the three of :meth:`__init__` included;
    a storage block of an identity checkpoint counts the bytes the bytes model would have
    stored, ``file_bytes_read`` what was read from the file).

    A reader is not thread-safe: use one per thread.
    """

    def __init__(self, path, *, key=None, max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
                 cache_blocks: int = 8):
        self.path = Path(path)
        self.read_calls = self.bytes_read = self.file_bytes_read = 0
        self._fd = -1
        # The last few storage blocks read, most recent last: a lazy restore's faults jump
        # between blocks, and re-reading a 4 MiB block for each of its 64-page blocks costs
        # more than keeping a few (8 blocks = 32 MiB by default).
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        material = L.resolve_key(key)
        self.cache_blocks = max(1, int(cache_blocks))
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=L.MAX_PAGE_BLOCK_BYTES)
        self._fd = open_regular(self.path, "checkpoint", CheckpointError)
        try:
            self.file_size = os.fstat(self._fd).st_size
            self._open(material, int(max_metadata_bytes))
        except BaseException:
            self.close()
            raise

    # --- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent; safe on a reader whose opening failed)."""
        fd, self._fd = getattr(self, "_fd", -1), -1
        cache = getattr(self, "_cache", None)
        if cache is not None:
            cache.clear()
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    # --- raw I/O ------------------------------------------------------------------------------

    def _error(self, problem: str, where: str = "", offset: int | None = None) -> CheckpointError:
        return CheckpointError(self.path, problem, where=where, offset=offset)

    def _pread(self, length: int, offset: int, where: str) -> bytes:
        """Exactly ``length`` bytes at ``offset`` with one read call (a short read: truncated)."""
        if self._fd < 0:
            raise ValueError(f"checkpoint reader for {self.path} is closed")
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise self._error(f"read error: {e.strerror or e}", where, offset) from e
        self.read_calls += 1
        self.bytes_read += len(data)
        self.file_bytes_read += len(data)
        if len(data) != length:
            raise self._error(f"truncated: {len(data)} of {length} bytes", where, offset)
        return data

    # --- validation ---------------------------------------------------------------------------

    def _open(self, material: bytes | None, max_meta: int) -> None:
        size = self.file_size
        if size < L.HEADER_SIZE + L.TRAILER_SIZE:
            if size >= len(L.MAGIC) and self._pread(len(L.MAGIC), 0, "header") != L.MAGIC:
                raise self._error("not a checkpoint file (bad magic)", "header", 0)
            raise self._error(f"truncated: {size} bytes, a checkpoint has at least {L.HEADER_SIZE + L.TRAILER_SIZE}")
        header = self._pread(L.HEADER_SIZE, 0, "header")
        h = L.unpack_header(header)
        if h["magic"] != L.MAGIC:
            raise self._error("not a checkpoint file (bad magic)", "header", 0)
        if h["version"] != L.VERSION:
            raise self._error(f"unsupported format version {h['version']} (this reader reads {L.VERSION})", "header", 8)
        if L.header_check(header[:48]) != h["check"]:
            raise self._error("header checksum mismatch", "header", 48)
        ps = h["page_size"]
        if ps < L.MIN_PAGE_SIZE or ps > L.MAX_PAGE_SIZE or ps & (ps - 1):
            raise self._error(f"bad page size {ps}", "header", 12)
        if h["vm_pages"] * ps > L.MAX_VM_BYTES:
            raise self._error(f"VM of {h['vm_pages']} pages exceeds {L.MAX_VM_BYTES} bytes", "header", 16)
        if h["flags"] & ~L.KNOWN_FLAGS:
            raise self._error(f"unknown flags {h['flags']:#x}", "header", 10)
        if h["codec"] not in L.CODEC_NAMES:
            raise self._error(f"unknown default codec {h['codec']}", "header", 24)
        keyed = bool(h["flags"] & L.FLAG_MAC)
        want = L.CHECKSUM_KEYED if keyed else L.CHECKSUM_PLAIN
        if h["checksum_size"] != want:
            raise self._error(f"checksum size {h['checksum_size']}, expected {want}", "header", 26)
        if h["reserved"] != 0:
            raise self._error("reserved byte is not zero", "header", 27)
        if h["block_pages"] < 1 or h["block_pages"] * ps > L.MAX_PAGE_BLOCK_BYTES:
            raise self._error(f"bad block_pages {h['block_pages']}", "header", 28)

        tpos = size - L.TRAILER_SIZE
        traw = self._pread(L.TRAILER_SIZE, tpos, "trailer")
        t = L.unpack_trailer(traw)
        if t["end"] != L.END_MAGIC:
            raise self._error("bad end magic (truncated or not a checkpoint)", "trailer", tpos + 88)
        if t["reserved"] != bytes(8):
            raise self._error("reserved bytes are not zero", "trailer", tpos + 80)
        if t["file_id"] != h["file_id"]:
            raise self._error("file id differs from the header's (trailer of another checkpoint)", "trailer", tpos + 16)
        mo, ml = t["meta_offset"], t["meta_length"]
        if mo < L.HEADER_SIZE or mo > tpos or ml != tpos - mo:
            raise self._error(f"metadata at {mo} of {ml} bytes does not end at the trailer ({tpos})", "trailer", tpos)
        if ml > max_meta:
            raise self._error(f"metadata of {ml} bytes exceeds the limit of {max_meta}", "trailer", tpos)
        try:  # checking the page map costs a few bytes per byte of metadata: is there room?
            check_budget(META_MEMORY_FACTOR * ml, f"checking metadata of {ml} bytes")
        except ValueError as exc:
            raise self._error(str(exc), "trailer", tpos) from None
        meta = self._pread(ml, mo, "metadata")
        if not hmac.compare_digest(L.meta_check(header, meta, traw[:32]), t["check"]):
            raise self._error("metadata checksum mismatch", "trailer", tpos + 32)
        authenticated = False
        if material is not None:
            if not keyed:
                raise self._error("a key was given but the file has no MAC")
            mac = L.compute_mac(L.mac_key(material), header, meta, traw[:48])
            if not hmac.compare_digest(mac, t["mac"]):
                raise self._error("MAC mismatch: wrong key or forged file", "trailer", tpos + 48)
            authenticated = True
        elif not keyed and t["mac"] != bytes(32):
            raise self._error("MAC field set in a file without MAC flag", "trailer", tpos + 48)

        self.version, self.page_size, self.vm_pages = h["version"], ps, h["vm_pages"]
        self.codec, self.level, self.block_pages = L.CODEC_NAMES[h["codec"]], h["level"], h["block_pages"]
        self.file_id, self.keyed, self.authenticated = h["file_id"], keyed, authenticated
        self.contents_model = "identity" if h["flags"] & L.FLAG_IDENTITY else "bytes"
        self._checksum_size = want
        self._meta_offset = mo
        self._parse_metadata(meta, mo)

    def _parse_metadata(self, meta: bytes, base: int) -> None:
        """Split the metadata into sections and check every one (vectorised)."""
        sections: dict[bytes, tuple[int, memoryview]] = {}
        records: list[tuple[int, memoryview]] = []
        optional: dict[bytes, bytes] = {}
        order: list[bytes] = []
        mv = memoryview(meta)
        pos = 0
        while pos < len(meta):
            off = base + pos
            if len(meta) - pos < L.SECTION_HEADER_SIZE:
                raise self._error("truncated section header", "metadata", off)
            tag, reserved, length = L.SECTION.unpack_from(meta, pos)
            name = f"metadata section {tag.decode('latin-1')!r}"
            if reserved != 0:
                raise self._error("reserved field is not zero", name, off)
            body = pos + L.SECTION_HEADER_SIZE
            padded = length + (-length % 8)
            if padded > len(meta) - body:
                raise self._error(f"section of {length} bytes overruns the metadata", name, off)
            payload = mv[body : body + length]
            if any(mv[body + length : body + padded]):
                raise self._error("padding is not zero", name, base + body + length)
            if len(order) >= L.MAX_SECTIONS:
                raise self._error(f"more than {L.MAX_SECTIONS} sections", "metadata", off)
            if tag == L.TAG_RECORDS:
                records.append((base + body, payload))
            elif tag in L.REQUIRED_TAGS or tag == L.TAG_MODELLED:
                if tag in sections:
                    raise self._error("duplicate section", name, off)
                sections[tag] = (base + body, payload)
            elif not (tag[:1].isalpha() and tag[:1].islower()):
                raise self._error("unknown section", name, off)
            elif tag in optional:
                raise self._error("duplicate section", name, off)
            else:  # optional: kept for callers that know it (section())
                optional[tag] = bytes(payload)
            order.append(tag)
            pos = body + padded
        for tag in L.REQUIRED_TAGS:
            if tag not in sections:
                raise self._error(f"missing section {tag.decode()}", "metadata", base)
        known = [t for t in order if t in L.REQUIRED_TAGS or t == L.TAG_RECORDS]
        if known[:4] != list(L.REQUIRED_TAGS):
            raise self._error("sections out of order", "metadata", base)

        self._check_blocks(sections)
        self._check_modelled(sections.get(L.TAG_MODELLED))
        data_ranges = self._ranges
        zero = self._table(sections[L.TAG_ZERO], L.RANGE_DTYPE, "ZERO")
        self._check_ranges(zero, sections[L.TAG_ZERO][0], "zero range")
        self._zero_ranges = zero
        self._records: dict[str, RecordSet] = {}
        for off, payload in records:
            rs = self._parse_records(off, payload)
            if rs.kind in self._records:
                raise self._error(f"duplicate record kind {rs.kind!r}", "metadata section RECS", off)
            self._records[rs.kind] = rs
        self._optional = optional
        self.record_kinds = tuple(self._records)
        self.kind_names = ("missing", "zero", "data", *self.record_kinds)
        self._build_map(data_ranges, zero)

    def _table(self, section: tuple[int, memoryview], dtype: np.dtype, tag: str) -> np.ndarray:
        off, payload = section
        if len(payload) % dtype.itemsize:
            raise self._error(
                f"length {len(payload)} is not a multiple of {dtype.itemsize}", f"metadata section {tag}", off
            )
        return np.frombuffer(payload, dtype)

    def _first(self, bad: np.ndarray) -> int:
        return int(np.flatnonzero(bad)[0])

    def _check_ranges(self, r: np.ndarray, off: int, what: str) -> None:
        """Every range non-empty and inside the VM (no overflow)."""
        if len(r) == 0:
            return
        vm = np.uint64(self.vm_pages)
        start, count = r["start"], r["count"]
        bad = (count == 0) | (start >= vm) | (count > vm - np.minimum(start, vm))
        if bad.any():
            i = self._first(bad)
            raise self._error(
                f"pages {int(start[i])}+{int(count[i])} outside the VM of {self.vm_pages} pages",
                f"{what} {i}",
                off + i * 16,
            )

    def _check_blocks(self, sections) -> None:
        sb = self._table(sections[L.TAG_SBLOCKS], L.SBLOCK_DTYPE, "SBLK")
        pb = self._table(sections[L.TAG_PBLOCKS], L.PBLOCK_DTYPE, "PBLK")
        rg = self._table(sections[L.TAG_RANGES], L.RANGE_DTYPE, "RNGS")
        sb_off, pb_off, rg_off = sections[L.TAG_SBLOCKS][0], sections[L.TAG_PBLOCKS][0], sections[L.TAG_RANGES][0]
        ps = self.page_size
        ns, npb, nr = len(sb), len(pb), len(rg)

        # storage blocks tile [HEADER_SIZE, meta_offset) exactly, in order
        offset, length = sb["offset"].astype(np.uint64), sb["length"].astype(np.uint64)
        if ns == 0:
            if self._meta_offset != L.HEADER_SIZE:
                raise self._error("no storage blocks but data before the metadata", "metadata", self._meta_offset)
        else:
            bad = (length == 0) | (length > L.MAX_STORAGE_BLOCK_BYTES)
            if bad.any():
                i = self._first(bad)
                raise self._error(f"bad stored length {int(length[i])}", f"storage block {i}", int(offset[i]))
            ends = np.cumsum(length)  # lengths are bounded, so no overflow for any sane count
            expect = np.concatenate(([L.HEADER_SIZE], ends[:-1] + L.HEADER_SIZE)).astype(np.uint64)
            bad = offset != expect
            if bad.any():
                i = self._first(bad)
                raise self._error(
                    f"block at {int(offset[i])} overlaps, leaves a gap or lies outside the "
                    f"file (expected at {int(expect[i])})",
                    f"storage block {i}",
                    sb_off + i * 64,
                )
            if int(ends[-1]) + L.HEADER_SIZE != self._meta_offset:
                raise self._error(
                    f"blocks end at {int(ends[-1]) + L.HEADER_SIZE}, the metadata starts at {self._meta_offset}",
                    f"storage block {ns - 1}",
                    int(offset[-1]),
                )
            if self._checksum_size < L.CHECKSUM_FIELD:
                pad = np.frombuffer(sb["checksum"].tobytes(), np.uint8).reshape(ns, L.CHECKSUM_FIELD)
                bad = pad[:, self._checksum_size :].any(axis=1)
                if bad.any():
                    i = self._first(bad)
                    raise self._error("checksum padding is not zero", f"storage block {i}", sb_off + i * 64 + 32)
        # page blocks of each storage block: counted, then tiling the storage block
        first, count = sb["first_pblock"].astype(np.uint64), sb["n_pblocks"].astype(np.uint64)
        if ns:
            bad = (count == 0) | (count > npb)
            if bad.any():
                i = self._first(bad)
                raise self._error(f"bad page block count {int(count[i])}", f"storage block {i}", int(offset[i]))
            expect = np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.uint64)
            bad = first != expect
            if bad.any():
                i = self._first(bad)
                raise self._error(
                    f"first page block {int(first[i])}, expected {int(expect[i])}", f"storage block {i}", int(offset[i])
                )
        if int(count.sum()) != npb:
            raise self._error(
                f"storage blocks hold {int(count.sum())} page blocks, the index lists {npb}",
                "metadata section PBLK",
                pb_off,
            )
        pb_sblock = np.repeat(np.arange(ns, dtype=np.int64), count.astype(np.int64))
        rel, stored = pb["rel_offset"].astype(np.uint64), pb["stored_length"].astype(np.uint64)
        n_pages, n_ranges = pb["n_pages"].astype(np.int64), pb["n_ranges"].astype(np.int64)
        codec = pb["codec"]
        pb_file = np.zeros(npb, np.int64)
        if npb:
            bad = (n_pages == 0) | (n_pages * ps > L.MAX_PAGE_BLOCK_BYTES)
            if bad.any():
                i = self._first(bad)
                raise self._error(f"bad page count {int(n_pages[i])}", f"page block {i}", pb_off + i * 40)
            reserved = np.frombuffer(pb["reserved"].tobytes(), np.uint8).reshape(npb, 7)
            top = L.CODEC_IDENTITY if self.contents_model == "identity" else L.CODEC_ZSTD
            bad = (codec > top) | reserved.any(axis=1)
            if bad.any():
                i = self._first(bad)
                raise self._error(
                    f"unknown codec {int(codec[i])} or reserved bytes set", f"page block {i}", pb_off + i * 40
                )
            raw = (n_pages * ps).astype(np.uint64)
            bad = (stored == 0) | (stored > raw) | ((codec == L.CODEC_NONE) & (stored != raw))
            if bad.any():
                i = self._first(bad)
                raise self._error(
                    f"stored length {int(stored[i])} for {int(n_pages[i])} pages "
                    f"({L.CODEC_NAMES.get(int(codec[i]), '?')})",
                    f"page block {i}",
                    pb_off + i * 40,
                )
            # within its storage block, page block k starts where k-1 ended; the last ends at its end
            cum = np.cumsum(stored)  # stored <= 32 MiB each: no overflow
            block_base = np.concatenate(([0], cum))[first.astype(np.int64)][pb_sblock] if ns else cum
            expect_rel = (np.concatenate(([0], cum[:-1])) - block_base).astype(np.uint64)
            bad = rel != expect_rel
            if bad.any():
                i = self._first(bad)
                raise self._error(
                    f"frame at {int(rel[i])} within its storage block, expected {int(expect_rel[i])}"
                    f" (frames overlap or leave gaps)",
                    f"page block {i}",
                    pb_off + i * 40,
                )
            last = (first + count - 1).astype(np.int64)
            bad = (rel[last] + stored[last]) != length
            if bad.any():
                i = self._first(bad)
                raise self._error("frames do not fill the storage block", f"storage block {i}", int(offset[i]))
            pb_file = (offset[pb_sblock] + rel).astype(np.int64)
            # ranges of each page block: counted, contiguous in RNGS, adding up to n_pages
            bad = (n_ranges == 0) | (n_ranges > n_pages)
            if bad.any():
                i = self._first(bad)
                raise self._error(f"bad range count {int(n_ranges[i])}", f"page block {i}", pb_off + i * 40)
            first_range = np.concatenate(([0], np.cumsum(n_ranges)[:-1]))
            bad = pb["first_range"].astype(np.uint64) != first_range.astype(np.uint64)
            if bad.any():
                i = self._first(bad)
                raise self._error(
                    f"first range {int(pb['first_range'][i])}, expected {int(first_range[i])}",
                    f"page block {i}",
                    pb_off + i * 40,
                )
        if int(n_ranges.sum()) != nr:
            raise self._error(
                f"page blocks hold {int(n_ranges.sum())} ranges, the index lists {nr}", "metadata section RNGS", rg_off
            )
        self._check_ranges(rg, rg_off, "data range")
        rg_pblock = np.repeat(np.arange(npb, dtype=np.int64), n_ranges)
        if nr:
            # counts are checked to be <= vm_pages <= 2^41 and a block has <= 2^16 ranges: no overflow
            sums = np.add.reduceat(rg["count"].astype(np.int64), first_range)
            bad = sums != n_pages
            if bad.any():
                i = self._first(bad)
                raise self._error(
                    f"ranges hold {int(sums[i])} pages, the block {int(n_pages[i])}", f"page block {i}", pb_off + i * 40
                )
        self._sb_offset, self._sb_length = offset.astype(np.int64), length.astype(np.int64)
        self._sb_checksum = sb["checksum"]
        self._pb_sblock, self._pb_rel, self._pb_stored = pb_sblock, rel.astype(np.int64), stored.astype(np.int64)
        self._pb_pages, self._pb_codec, self._pb_file = n_pages, codec.astype(np.int64), pb_file
        self._pb_first_range = np.concatenate(([0], np.cumsum(n_ranges))).astype(np.int64)
        self._ranges = rg
        self._rg_pblock = rg_pblock
        self.storage_blocks, self.page_blocks = ns, npb
        self.data_pages = int(n_pages.sum())

    def _check_modelled(self, section) -> None:
        """The ``mlen`` section: in an identity checkpoint, one length per page block (a block
        of bytes counts its stored length, an identity block at most its raw size); absent
        elsewhere (then every block counts its stored length)."""
        stored = self._pb_stored
        if self.contents_model != "identity":
            if section is not None:
                raise self._error("modelled lengths in a checkpoint of bytes", "metadata section mlen", section[0])
            modelled = stored
        else:
            if section is None:
                raise self._error("missing section mlen", "metadata", self._meta_offset)
            off, payload = section
            modelled = self._table(section, np.dtype("<u8"), "mlen").astype(np.int64)
            if len(modelled) != self.page_blocks:
                raise self._error(f"{len(modelled)} lengths for {self.page_blocks} page blocks",
                                  "metadata section mlen", off)
            identity = self._pb_codec == L.CODEC_IDENTITY
            bad = np.where(identity, (modelled < 1) | (modelled > self._pb_pages * self.page_size), modelled != stored)
            if bad.any():
                i = self._first(bad)
                raise self._error(f"modelled length {int(modelled[i])} for {int(self._pb_pages[i])} pages",
                                  f"page block {i}", off + 8 * i)
        self._pb_modelled = modelled
        # What reading each storage block counts as bytes read.
        extra = np.bincount(self._pb_sblock, weights=modelled - stored, minlength=self.storage_blocks)
        self._sb_counted = self._sb_length + extra.astype(np.int64)

    def _parse_records(self, off: int, p: memoryview) -> RecordSet:
        where = "metadata section RECS"
        if len(p) < L.RECORD_HEAD.size:
            raise self._error("truncated record header", where, off)
        name_len, reserved, width, n, blob_len = L.RECORD_HEAD.unpack_from(p, 0)
        if reserved:
            raise self._error("reserved field is not zero", where, off)
        pos = L.RECORD_HEAD.size
        name_end = pos + name_len
        if name_len > L.MAX_KIND_NAME or name_end > len(p):
            raise self._error(f"bad kind name length {name_len}", where, off)
        raw_name = bytes(p[pos:name_end])
        try:
            kind = raw_name.decode("ascii")
        except UnicodeDecodeError:
            kind = ""
        if not L.KIND_NAME_RE.match(kind) or kind in L.RESERVED_KINDS:
            raise self._error(f"bad kind name {raw_name!r}", where, off)
        where = f"records of kind {kind!r}"
        pos = name_end + (-name_len % 8)
        if width > self.page_size:
            raise self._error(f"payload width {width} exceeds the page size", where, off)
        if n > self.vm_pages or n == 0:
            raise self._error(f"bad record count {n}", where, off)
        need = pos + 8 * n + (8 * (n + 1) if width == 0 else 0) + blob_len
        if need != len(p) or (width and blob_len != n * width):
            raise self._error(
                f"section of {len(p)} bytes does not hold {n} records ({blob_len} payload bytes)", where, off
            )
        gpps = np.frombuffer(p, "<u8", n, pos)
        pos += 8 * n
        bad = gpps >= np.uint64(self.vm_pages)
        if bad.any():
            i = self._first(bad)
            raise self._error(f"page {int(gpps[i])} outside the VM", f"{where} record {i}", off + pos - 8 * n + 8 * i)
        if n > 1 and not (gpps[1:] > gpps[:-1]).all():
            raise self._error("pages are not strictly ascending", where, off)
        if width == 0:
            offsets = np.frombuffer(p, "<u8", n + 1, pos)
            pos += 8 * (n + 1)
            sizes = offsets[1:].astype(np.int64) - offsets[:-1].astype(np.int64)
            if (
                offsets[0] != 0
                or offsets[-1] != blob_len
                or (offsets[1:] < offsets[:-1]).any()
                or (sizes > self.page_size).any()
            ):
                raise self._error("bad payload offsets", where, off)
            offsets = offsets.astype(np.int64)
            out_width = None
        else:
            offsets = np.arange(n + 1, dtype=np.int64) * width
            out_width = width
        blob = bytes(p[pos : pos + blob_len])
        return RecordSet(kind, gpps.astype(np.int64), out_width, offsets, blob)

    def _build_map(self, data: np.ndarray, zero: np.ndarray) -> None:
        """One sorted table of page runs (data, zero, record runs); overlaps are refused."""
        parts_start, parts_count, parts_code, parts_aux = [], [], [], []
        parts_start.append(data["start"].astype(np.int64))
        parts_count.append(data["count"].astype(np.int64))
        parts_code.append(np.full(len(data), KIND_DATA, np.int16))
        parts_aux.append(np.arange(len(data), dtype=np.int64))
        parts_start.append(zero["start"].astype(np.int64))
        parts_count.append(zero["count"].astype(np.int64))
        parts_code.append(np.full(len(zero), KIND_ZERO, np.int16))
        parts_aux.append(np.arange(len(zero), dtype=np.int64))
        for k, rs in enumerate(self._records.values()):
            r = L.ranges_of(rs.gpps)
            firsts = np.concatenate(([0], np.cumsum(r["count"].astype(np.int64))[:-1]))
            parts_start.append(r["start"].astype(np.int64))
            parts_count.append(r["count"].astype(np.int64))
            parts_code.append(np.full(len(r), KIND_FIRST_RECORD + k, np.int16))
            parts_aux.append(firsts)
        start = np.concatenate(parts_start)
        count = np.concatenate(parts_count)
        code, aux = np.concatenate(parts_code), np.concatenate(parts_aux)
        if len(start) > 1 and (start[1:] < start[:-1]).any():  # a writer's one kind is in order already
            order = np.argsort(start, kind="stable")
            start, count, code, aux = start[order], count[order], code[order], aux[order]
            del order
        end = start + count
        if len(start) > 1:
            bad = start[1:] < end[:-1]
            if bad.any():
                i = self._first(bad)
                a, b = self.kind_names[code[i]], self.kind_names[code[i + 1]]
                raise self._error(
                    f"page ranges overlap: {a} pages {start[i]}..{end[i] - 1} and {b} pages "
                    f"{start[i + 1]}..{end[i + 1] - 1}",
                    "metadata",
                    self._meta_offset,
                )
        self._map_start, self._map_end, self._map_code, self._map_aux = start, end, code, aux
        self.zero_pages = int(zero["count"].astype(np.int64).sum())
        self.record_pages = sum(len(r) for r in self._records.values())

    # --- page lookups -------------------------------------------------------------------------

    def _lookup(self, gpps) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = np.asarray(gpps, np.int64).reshape(-1)
        if g.size and (int(g.min()) < 0 or int(g.max()) >= self.vm_pages):
            raise ValueError(f"page numbers must be in [0, {self.vm_pages})")
        i = np.searchsorted(self._map_start, g, side="right") - 1
        ok = i >= 0
        ok[ok] = g[ok] < self._map_end[i[ok]]
        return g, i, ok

    def page_kind(self, gpps) -> np.ndarray:
        """Kind code of each page (int16): :data:`KIND_MISSING`, :data:`KIND_ZERO`,
        :data:`KIND_DATA` or ``KIND_FIRST_RECORD + i`` for record kind ``record_kinds[i]``;
        ``kind_names[code]`` names it. Vectorised."""
        g, i, ok = self._lookup(gpps)
        out = np.zeros(len(g), np.int16)
        out[ok] = self._map_code[i[ok]]
        return out

    def locate_many(self, gpps) -> np.ndarray:
        """Page block holding each page (int64), -1 for pages not stored as data. Vectorised."""
        g, i, ok = self._lookup(gpps)
        ok[ok] = self._map_code[i[ok]] == KIND_DATA
        out = np.full(len(g), -1, np.int64)
        out[ok] = self._rg_pblock[self._map_aux[i[ok]]]
        return out

    def locate(self, gpp: int) -> tuple[int, int] | None:
        """``(storage block, page block)`` holding page ``gpp``, or None if it is not stored as
        data (see :meth:`page_kind`). Page block numbers are global, in file order."""
        pb = int(self.locate_many([gpp])[0])
        if pb < 0:
            return None
        return int(self._pb_sblock[pb]), pb

    def page_block_pages(self, pblock: int) -> np.ndarray:
        """The pages of a page block, in stored order (no read)."""
        pblock = self._pblock_index(pblock)
        a, b = self._pb_first_range[pblock], self._pb_first_range[pblock + 1]
        return L.pages_of(self._ranges[a:b])

    def storage_block_of(self, pblock: int) -> int:
        """The storage block holding a page block."""
        return int(self._pb_sblock[self._pblock_index(pblock)])

    def _pblock_index(self, pblock) -> int:
        if isinstance(pblock, tuple):
            pblock = pblock[1]
        pblock = int(pblock)
        if not 0 <= pblock < self.page_blocks:
            raise IndexError(f"page block {pblock} out of range (the file has {self.page_blocks})")
        return pblock

    def storage_block_table(self) -> dict[str, np.ndarray]:
        """Every storage block in file order: its ``offset`` and ``stored_bytes`` in the file,
        the ``page_blocks`` it holds and their ``pages`` (no read)."""
        n = self.storage_blocks
        page_blocks = np.bincount(self._pb_sblock, minlength=n)[:n] if self.page_blocks else np.zeros(n, np.int64)
        pages = np.bincount(self._pb_sblock, weights=self._pb_pages, minlength=n)[:n] if self.page_blocks \
            else np.zeros(n)
        return {"offset": self._sb_offset.copy(), "stored_bytes": self._sb_length.copy(),
                "page_blocks": page_blocks.astype(np.int64), "pages": pages.astype(np.int64)}

    def page_map(self) -> dict[str, np.ndarray]:
        """The page map as runs of pages in page order: ``start`` and ``end`` (exclusive), the
        ``kind`` code (:attr:`kind_names` names it) and, for data, the ``storage_block`` holding
        them (-1 otherwise). Runs of one kind in one storage block are merged; pages in no run
        are missing from the checkpoint (no read)."""
        start, end, code = self._map_start, self._map_end, self._map_code
        block = np.full(len(start), -1, np.int64)
        data = code == KIND_DATA
        block[data] = self._pb_sblock[self._rg_pblock[self._map_aux[data]]]
        if len(start) > 1:
            joined = (start[1:] == end[:-1]) & (code[1:] == code[:-1]) & (block[1:] == block[:-1])
            first = np.concatenate(([True], ~joined))
            last = np.concatenate((~joined, [True]))
            start, code, block, end = start[first], code[first], block[first], end[last]
        return {"start": start.copy(), "end": end.copy(), "kind": code.astype(np.int64), "storage_block": block}

    def zero_ranges(self) -> np.ndarray:
        """The zero pages as a sorted array of ``(start, count)`` ranges."""
        return self._zero_ranges.copy()

    def records(self, kind: str) -> RecordSet:
        """The records of one kind (KeyError if the file has none of that kind)."""
        return self._records[kind]

    # --- reading data -------------------------------------------------------------------------

    def section(self, tag: str) -> bytes | None:
        """The payload of optional metadata section ``tag`` (see
        :meth:`CheckpointWriter.add_section`), or None when the file has none. Its bytes were
        checked with the metadata (checksum, and MAC with a key) when the file was opened."""
        return self._optional.get(tag.encode("ascii"))

    @property
    def optional_sections(self) -> tuple[str, ...]:
        """Tags of the optional sections in the file, in file order."""
        return tuple(t.decode("ascii", "replace") for t in self._optional)

    def is_cached(self, sblock: int) -> bool:
        """Whether storage block ``sblock`` would be read without a read call now."""
        return int(sblock) in self._cache

    def read_storage_block(self, sblock: int) -> bytes:
        """A storage block's bytes with its checksum checked: one read, or none if it is one of
        the ``cache_blocks`` read last."""
        sblock = int(sblock)
        if not 0 <= sblock < self.storage_blocks:
            raise IndexError(f"storage block {sblock} out of range (the file has {self.storage_blocks})")
        cached = self._cache.get(sblock)
        if cached is not None:
            self._cache.move_to_end(sblock)
            return cached
        where = f"storage block {sblock}"
        offset, length = int(self._sb_offset[sblock]), int(self._sb_length[sblock])
        data = self._pread(length, offset, where)
        self.bytes_read += int(self._sb_counted[sblock]) - length
        want = self._sb_checksum[sblock].tobytes()[: self._checksum_size]
        if not hmac.compare_digest(L.block_checksum(data, self._checksum_size), want):
            raise self._error("checksum mismatch", where, offset)
        self._cache[sblock] = data
        if len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return data

    def read_page_block(self, pblock) -> tuple[np.ndarray, np.ndarray]:
        """A page block's pages and contents: ``(gpps, data)`` with ``data[i]`` (a read-only
        ``(n, page_size)`` uint8 array, or :class:`~memvisor.identity.Identities` for an
        identity page block) the contents of page ``gpps[i]``.

        :param pblock: a page block number or the tuple from :meth:`locate`.

        Reads its storage block with one read call unless it is cached; never
        decompresses more than the block's declared pages.
        """
        pblock = self._pblock_index(pblock)
        sblock = int(self._pb_sblock[pblock])
        buf = self.read_storage_block(sblock)
        return self.page_block_pages(pblock), self._decode(pblock, buf)

    def _decode(self, pblock: int, buf: bytes):
        rel, stored = int(self._pb_rel[pblock]), int(self._pb_stored[pblock])
        n = int(self._pb_pages[pblock])
        identity = self._pb_codec[pblock] == L.CODEC_IDENTITY
        expect = n * (L.IDENTITY_BYTES if identity else self.page_size)
        frame = memoryview(buf)[rel : rel + stored]
        where = f"page block {pblock}"
        offset = int(self._pb_file[pblock])
        if self._pb_codec[pblock] == L.CODEC_NONE:
            raw = frame
        else:
            raw = decompress_frame(frame, expect, lambda problem: self._error(problem, where, offset),
                                   self._decompressor)
        if identity:
            from memvisor.identity import Identities

            return Identities.from_records(raw)
        return np.frombuffer(raw, np.uint8).reshape(n, self.page_size)

    def iter_page_blocks(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Every page block in file order as ``(pblock, gpps, data)``: one read per storage block."""
        for pb in range(self.page_blocks):
            gpps, data = self.read_page_block(pb)
            yield pb, gpps, data

    def verify(self) -> None:
        """Check everything: read every storage block (checksums) and decode every page block.

        The structure (and the MAC, given a key) was checked on open. Raises
        :class:`CheckpointError` on the first problem.
        """
        for _ in self.iter_page_blocks():
            pass

    def __repr__(self) -> str:
        return (
            f"CheckpointReader({str(self.path)!r}, vm_pages={self.vm_pages}, page_blocks={self.page_blocks}, "
            f"storage_blocks={self.storage_blocks}, keyed={self.keyed})"
        )
