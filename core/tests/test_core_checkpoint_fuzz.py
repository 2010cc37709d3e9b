"""The checkpoint parser under hostile input: mutated bytes, truncation, forged indexes.

Whatever the bytes, reading a checkpoint raises :class:`CheckpointError` or returns the original
pages: never another exception, never wrong data, and never much memory.
"""

from __future__ import annotations

import functools
import struct
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor import PAGE_SIZE
from memvisor.builtins.checkpoint import KIND_ZERO, CheckpointError, CheckpointReader, CheckpointWriter
from memvisor.builtins.checkpoint import layout as L

VM_PAGES = 48
KEY = b"fuzzing-key-0123456789"
MEMORY_LIMIT = 40 << 20  # a page block may decompress to at most 32 MiB; this file needs far less
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _image() -> np.ndarray:
    rng = np.random.default_rng(4)
    img = np.zeros((VM_PAGES, PAGE_SIZE), np.uint8)
    words = rng.integers(97, 123, (64, 8), dtype=np.uint8)
    for p in range(0, 28):
        img[p] = words[rng.integers(0, 64, PAGE_SIZE // 8)].reshape(-1)
    img[28:32] = rng.integers(0, 256, (4, PAGE_SIZE), dtype=np.uint8)  # a page block stored uncompressed
    img[33, 100] = 1
    return img  # 32 and 34..39 zero, 40..47 records


IMAGE = _image()
RECORD_PAGES = list(range(40, 48))


def build(path: Path, key: bytes | None = None) -> Path:
    """A small valid checkpoint: 33 data pages in 9 page blocks over several storage blocks,
    zero pages, two record kinds."""
    with CheckpointWriter(path, VM_PAGES, block_pages=4, buffer_bytes=6000, key=key, threads=1) as w:
        w.add_pages(0, IMAGE[:40])
        w.add_records("disk-ref", RECORD_PAGES[:4], np.arange(4 * 12, dtype=np.uint8).reshape(4, 12))
        w.add_records("note", RECORD_PAGES[4:], [b"a", b"bc", b"", b"defg"])
    return path


@functools.cache
def _valid(keyed: bool) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return build(Path(d) / "valid.ckpt", key=KEY if keyed else None).read_bytes()


@pytest.fixture
def valid() -> bytes:
    """The bytes of a small valid checkpoint (built once; not a hypothesis argument, so never printed)."""
    return _valid(False)


@pytest.fixture
def valid_keyed() -> bytes:
    """The same checkpoint with a MAC made with KEY."""
    return _valid(True)


def read_everything(path: Path, key: bytes | None = None, *, bounded: bool = True) -> None:
    """Open, look up every page, read every page block and record; check what comes back.

    Raises CheckpointError (the only exception allowed); any data returned must be the
    original's, and memory must stay bounded (traced unless ``bounded`` is False: tracing is slow).
    """
    if bounded:
        tracemalloc.start()
    try:
        with CheckpointReader(path, key=key) as r:
            assert r.vm_pages >= VM_PAGES and r.page_size == PAGE_SIZE  # else a range would be outside the VM
            kinds = r.page_kind(np.arange(VM_PAGES))
            for pb in range(r.page_blocks):
                gpps, data = r.read_page_block(pb)
                assert data.shape == (len(gpps), r.page_size)
                assert np.array_equal(data, IMAGE[gpps]), "wrong page data returned"
            for g in np.flatnonzero(kinds == KIND_ZERO):
                assert not IMAGE[g].any(), "a non-zero page reported as zero"
            assert r.record_kinds == ("disk-ref", "note")
            assert r.records("disk-ref").gpps.tolist() == RECORD_PAGES[:4]
            assert r.records("note").payloads() == [b"a", b"bc", b"", b"defg"]
            r.verify()
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        raise
    finally:
        if bounded:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < MEMORY_LIMIT


def only_checkpoint_error(path: Path, key: bytes | None = None, *, bounded: bool = True) -> bool:
    """True if reading raised CheckpointError, False if it succeeded (with the original data)."""
    try:
        read_everything(path, key, bounded=bounded)
    except CheckpointError:
        return True
    return False


def test_valid_file_reads_back(valid, tmp_path):
    """The fuzzing base file is valid and reads back the original pages."""
    path = tmp_path / "ok.ckpt"
    path.write_bytes(valid)
    assert not only_checkpoint_error(path)
    with CheckpointReader(path) as r:
        assert r.storage_blocks >= 3 and r.page_blocks == 9


# --- raw byte mutations -----------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_mutated_bytes_raise_only_checkpoint_error(valid, tmp_path, data):
    """Flipping, overwriting, inserting or deleting bytes anywhere is refused with CheckpointError."""
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "set":
            raw[pos : pos + 8] = data.draw(st.binary(min_size=8, max_size=8))
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del raw[pos : pos + data.draw(st.integers(1, 64))]
    path = tmp_path / "mutated.ckpt"
    path.write_bytes(raw)
    changed = bytes(raw) != valid
    assert only_checkpoint_error(path) or not changed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6))
def test_truncated_files_are_refused(valid, tmp_path, cut):
    """A file cut short at any point is refused with CheckpointError."""
    path = tmp_path / "cut.ckpt"
    path.write_bytes(valid[: cut % len(valid)])
    assert only_checkpoint_error(path)


def test_every_single_byte_flip_is_detected(valid, tmp_path):
    """Every byte is covered by a checksum: a flipped byte (sampled in every structure) is always detected."""
    path = tmp_path / "flip.ckpt"
    meta_offset = L.unpack_trailer(valid[-L.TRAILER_SIZE :])["meta_offset"]
    positions = [
        *range(0, L.HEADER_SIZE, 3),
        *range(L.HEADER_SIZE, meta_offset, 509),
        *range(meta_offset, len(valid), 11),
    ]
    positions += range(len(valid) - L.TRAILER_SIZE, len(valid), 3)
    for pos in positions:
        raw = bytearray(valid)
        raw[pos] ^= 0x01
        path.write_bytes(raw)
        assert only_checkpoint_error(path, bounded=False), f"flip at {pos} not detected"


# --- forged files: valid checksums around hostile structures -----------------------------------


def split(raw: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """Header, blocks and metadata sections (tag, payload) of a valid file."""
    t = L.unpack_trailer(raw[-L.TRAILER_SIZE :])
    meta = raw[t["meta_offset"] : len(raw) - L.TRAILER_SIZE]
    sections, pos = [], 0
    while pos < len(meta):
        tag, _, length = L.SECTION.unpack_from(meta, pos)
        sections.append((tag, meta[pos + 16 : pos + 16 + length]))
        pos += 16 + length + (-length % 8)
    return raw[: L.HEADER_SIZE], raw[L.HEADER_SIZE : t["meta_offset"]], sections


def seal(header: bytes, body: bytes, meta: bytes, *, meta_offset=None, meta_length=None, key=None) -> bytes:
    """A file with correct header and metadata checksums (and MAC with ``key``) around anything."""
    file_id = header[32:48]
    mo = L.HEADER_SIZE + len(body) if meta_offset is None else meta_offset
    ml = len(meta) if meta_length is None else meta_length
    head32 = struct.pack("<QQ16s", mo, ml, file_id)
    check = L.meta_check(header, meta, head32)
    mac = L.compute_mac(L.mac_key(key), header, meta, head32 + check) if key else bytes(32)
    return header + body + meta + L.TRAILER.pack(mo, ml, file_id, check, mac, bytes(8), L.END_MAGIC)


def reheader(header: bytes, **fields) -> bytes:
    """The header with some fields changed and its own checksum recomputed."""
    h = L.unpack_header(header)
    h.update(fields)
    head = L.HEADER.pack(
        h["magic"],
        h["version"],
        h["flags"],
        h["page_size"],
        h["vm_pages"],
        h["codec"],
        h["level"],
        h["checksum_size"],
        h["reserved"],
        h["block_pages"],
        h["file_id"],
        b"",
    )[:48]
    return head + L.header_check(head)


def join(sections) -> bytes:
    return b"".join(L.pack_section(tag, payload) for tag, payload in sections)


TABLES = {b"SBLK": L.SBLOCK_DTYPE, b"PBLK": L.PBLOCK_DTYPE, b"RNGS": L.RANGE_DTYPE, b"ZERO": L.RANGE_DTYPE}
HOSTILE = [0, 1, 2, 7, 8, 47, 48, 63, 64, 4095, 4096, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def edit_table(sections, tag: bytes, index: int, field: str, value: int):
    out = []
    for t, payload in sections:
        if t == tag:
            table = np.frombuffer(payload, TABLES[tag]).copy()
            kind = table.dtype[field]
            table[field][index % len(table)] = value % (1 << (8 * kind.itemsize))
            payload = table.tobytes()
        out.append((t, payload))
    return out


FIELDS = [(tag, name) for tag, dt in TABLES.items() for name in dt.names if dt[name].kind == "u"]


@FUZZ
@given(
    field=st.sampled_from(FIELDS),
    index=st.integers(0, 100),
    value=st.one_of(st.sampled_from(HOSTILE), st.integers(0, 2**64 - 1), st.integers(0, 70000)),
)
def test_forged_index_fields_raise_only_checkpoint_error(valid, valid_keyed, tmp_path, field, index, value):
    """Any value in any index field, with every checksum made valid, gives CheckpointError or the original pages;
    with a key, a forged index is always refused."""
    tag, name = field
    header, body, sections = split(valid)
    path = tmp_path / "forged.ckpt"
    path.write_bytes(seal(header, body, join(edit_table(sections, tag, index, name, value))))
    only_checkpoint_error(path)
    kheader, kbody, ksections = split(valid_keyed)
    forged = join(edit_table(ksections, tag, index, name, value))
    path.write_bytes(seal(kheader, kbody, forged))  # resealed without the key
    if forged != join(ksections):
        with pytest.raises(CheckpointError, match="MAC mismatch"):
            CheckpointReader(path, key=KEY)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["vm_pages", "page_size", "block_pages", "codec", "level", "flags", "checksum_size"]),
    value=st.one_of(st.sampled_from(HOSTILE), st.integers(0, 300)),
)
def test_forged_header_fields_raise_only_checkpoint_error(valid, tmp_path, field, value):
    """Hostile header values (huge VM, odd page size, unknown codec or flags) with valid checksums are handled."""
    header, body, sections = split(valid)
    sizes = {"vm_pages": 64, "page_size": 32, "block_pages": 32, "flags": 16}
    value %= 1 << sizes.get(field, 8)
    if field == "level":
        value -= 128
    path = tmp_path / "forged.ckpt"
    path.write_bytes(seal(reheader(header, **{field: value}), body, join(sections)))
    only_checkpoint_error(path)


@FUZZ
@given(
    meta_offset=st.one_of(st.sampled_from(HOSTILE), st.integers(0, 40000)),
    meta_length=st.one_of(st.sampled_from(HOSTILE), st.integers(0, 40000)),
)
def test_forged_trailer_pointers_raise_only_checkpoint_error(valid, tmp_path, meta_offset, meta_length):
    """A trailer pointing anywhere (outside the file, into the blocks, huge lengths) is refused."""
    header, body, sections = split(valid)
    path = tmp_path / "forged.ckpt"
    raw = seal(header, body, join(sections), meta_offset=meta_offset, meta_length=meta_length)
    path.write_bytes(raw)
    real = L.HEADER_SIZE + len(body)
    if (meta_offset, meta_length) != (real, len(join(sections))):
        with pytest.raises(CheckpointError):
            read_everything(path)


def forge(valid: bytes, tmp_path: Path, change) -> Path:
    """Apply ``change(sections) -> sections`` and seal the result with valid checksums."""
    header, body, sections = split(valid)
    path = tmp_path / "forged.ckpt"
    path.write_bytes(seal(header, body, join(change(list(sections)))))
    return path


def _set(table_tag, index, **values):
    def change(sections):
        for name, value in values.items():
            sections = edit_table(sections, table_tag, index, name, value)
        return sections

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(b"SBLK", 0, offset=10**9), r"storage block 0 at offset .*overlaps, leaves a gap or lies outside"),
        (_set(b"SBLK", 1, offset=L.HEADER_SIZE + 10), r"storage block 1 at offset .*overlaps"),
        (_set(b"SBLK", 0, length=2**63), r"storage block 0 at offset 64: bad stored length"),
        (_set(b"PBLK", 0, n_pages=2**32 - 1), r"page block 0 at offset \d+: bad page count 4294967295"),
        (_set(b"PBLK", 1, rel_offset=0), r"page block 1 at offset \d+: frame at 0 .*overlap"),
        (_set(b"RNGS", 0, start=2**64 - 5), r"data range 0 at offset \d+: pages .* outside the VM"),
        (_set(b"RNGS", 0, count=2**63), r"data range 0 .* outside the VM"),
        (_set(b"ZERO", 0, start=0), r"page ranges overlap: data pages 0\.\.\d+ and zero pages"),
        (lambda s: [x for x in s if x[0] != b"ZERO"], r"missing section ZERO"),
        (lambda s: s + [(b"ZERO", b"")], r"duplicate section"),
        (lambda s: s + [(b"XTRA", b"?")], r"unknown section"),
        (lambda s: [s[1], s[0], *s[2:]], r"out of order"),
        (lambda s: s[:4] + [s[4], s[4]], r"duplicate record kind 'disk-ref'"),
    ],
)
def test_hostile_indexes_are_named_precisely(valid, tmp_path, change, message):
    """Hostile indexes with valid checksums (outside the file, overlapping, huge sizes) get a precise one-line error."""
    path = forge(valid, tmp_path, change)
    with pytest.raises(CheckpointError, match=message) as e:
        read_everything(path)
    assert str(e.value).startswith(f"{path}: ")


def test_optional_unknown_sections_are_skipped(valid, tmp_path):
    """A section whose tag starts with a lowercase letter is optional: readers that do not know it skip it."""
    path = forge(valid, tmp_path, lambda s: s + [(b"xtra", b"future data")])
    assert not only_checkpoint_error(path)


def test_hostile_records_are_refused(valid, tmp_path):
    """Record sections with huge counts, bad offsets, pages outside the VM or overlapping data are refused."""
    gpps = np.array([40, 41], np.uint64)
    cases = {
        "bad record count": L.RECORD_HEAD.pack(1, 0, 4, 2**62, 8) + b"x" + bytes(7) + gpps.tobytes() + bytes(8),
        "bad payload offsets": L.pack_records("x", gpps, 0, np.array([0, 9, 4], np.uint64), b"abcd"),
        "outside the VM": L.pack_records("x", np.array([40, 4000], np.uint64), 1, None, b"ab"),
        "not strictly ascending": L.pack_records("x", np.array([41, 40], np.uint64), 1, None, b"ab"),
        "bad kind name": L.pack_records("zero", gpps, 1, None, b"ab"),
        "payload width": L.pack_records("x", gpps, PAGE_SIZE + 1, None, bytes(2 * PAGE_SIZE + 2)),
        "page ranges overlap": L.pack_records("x", np.array([0, 1], np.uint64), 1, None, b"ab"),
    }
    for problem, payload in cases.items():
        path = forge(valid, tmp_path, lambda s, p=payload: s[:4] + [(b"RECS", p)])
        with pytest.raises(CheckpointError, match=problem):
            read_everything(path)


def zstd_rle_frame(declared: int, block: int) -> bytes:
    """A hand-made zstd frame: header declaring ``declared`` bytes, then one RLE block of ``block`` bytes."""
    header = struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", declared)  # single segment, 8-byte size
    return header + (1 | (1 << 1) | (block << 3)).to_bytes(3, "little") + b"\x00"


@pytest.mark.parametrize(
    ("declared", "block", "message"),
    [
        (1 << 40, 1 << 17, "declares 1099511627776 bytes, expected 16384 bytes"),
        (4 * PAGE_SIZE, 1 << 17, "zstd: "),  # declares the right size, holds more
        (4 * PAGE_SIZE, 100, "zstd: "),  # declares the right size, holds less
    ],
)
def test_decompression_bomb_is_refused_without_allocating(tmp_path, declared, block, message):
    """A zstd frame that would decompress to more (or less) than its page block's pages is refused, with
    no allocation beyond the block's declared size."""
    path = tmp_path / "bomb.ckpt"
    with CheckpointWriter(path, 4, block_pages=4, threads=1) as w:
        w.add_pages(0, np.full((4, PAGE_SIZE), 65, np.uint8))
    header, body, sections = split(path.read_bytes())
    bomb = zstd_rle_frame(declared, block)
    assert zstandard.frame_content_size(bomb) == declared
    sb = np.frombuffer(sections[0][1], L.SBLOCK_DTYPE).copy()
    pb = np.frombuffer(sections[1][1], L.PBLOCK_DTYPE).copy()
    sb["length"], pb["stored_length"] = len(bomb), len(bomb)
    sb["checksum"] = np.void(L.block_checksum(bomb, 16).ljust(32, b"\0"))
    sections[0], sections[1] = (b"SBLK", sb.tobytes()), (b"PBLK", pb.tobytes())
    path.write_bytes(seal(header, bomb, join(sections)))
    tracemalloc.start()
    try:
        with CheckpointReader(path) as r, pytest.raises(CheckpointError, match=message) as e:
            r.read_page_block(0)
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()
    assert "page block 0 at offset 64" in str(e.value)


def test_forged_block_is_caught_only_by_the_mac(valid_keyed, tmp_path):
    """A block changed with its checksum and the metadata checksum recomputed passes without a key and is
    refused with the key."""
    header, body, sections = split(valid_keyed)
    body = bytearray(body)
    sb = np.frombuffer(sections[0][1], L.SBLOCK_DTYPE).copy()
    pb = np.frombuffer(sections[1][1], L.PBLOCK_DTYPE).copy()
    first = int(np.flatnonzero(pb["codec"] == L.CODEC_NONE)[0])  # an uncompressed page block: easy to forge
    sblock = int(np.searchsorted(sb["first_pblock"].astype(np.int64), first, side="right") - 1)
    at = int(sb["offset"][sblock]) - L.HEADER_SIZE + int(pb["rel_offset"][first])
    body[at : at + 8] = b"FORGED!!"
    start = int(sb["offset"][sblock]) - L.HEADER_SIZE
    block = bytes(body[start : start + int(sb["length"][sblock])])
    sb["checksum"][sblock] = np.void(L.block_checksum(block, L.CHECKSUM_KEYED))
    sections[0] = (b"SBLK", sb.tobytes())
    path = tmp_path / "forged.ckpt"
    path.write_bytes(seal(header, bytes(body), join(sections)))
    with CheckpointReader(path) as r:  # no key: the forgery is self-consistent
        _, data = r.read_page_block(first)
        assert data[0, :8].tobytes() == b"FORGED!!"
    with pytest.raises(CheckpointError, match="MAC mismatch"):
        CheckpointReader(path, key=KEY)


def _empty_sections(n: int) -> bytes:
    """``n`` empty optional sections of distinct tags (``x`` and a 3-byte number): a tag twice
    is refused as a duplicate at once."""
    sections = np.zeros(n, np.dtype([("tag", "S4"), ("reserved", "<u4"), ("length", "<u8")]))
    numbers = np.arange(n, dtype=">u4").view("u1").reshape(n, 4)
    numbers[:, 0] = ord("x")
    sections["tag"] = numbers.copy().view("S4").ravel()
    return sections.tobytes()


def _metadata_only(path, vm_pages, zero=None, extra_sections=0):
    """A checkpoint of no data: ``zero`` ranges, ``extra_sections`` empty optional sections (or
    these bytes of sections)."""
    import os

    file_id = os.urandom(16)
    header = L.pack_header(flags=0, page_size=PAGE_SIZE, vm_pages=vm_pages, codec=1, level=1, checksum_size=16,
                           block_pages=64, file_id=file_id)
    empty = np.empty(0, L.RANGE_DTYPE)
    meta = L.pack_metadata(np.empty(0, L.SBLOCK_DTYPE), np.empty(0, L.PBLOCK_DTYPE), empty,
                           empty if zero is None else zero) + (
        extra_sections if isinstance(extra_sections, bytes) else _empty_sections(extra_sections))
    trailer = L.pack_trailer(header=header, meta=meta, meta_offset=L.HEADER_SIZE, file_id=file_id, key64=None)
    path.write_bytes(header + meta + trailer)
    return path


def test_many_empty_sections_are_refused_without_walking_them(tmp_path):
    """Sections cost work each, not per byte: more than MAX_SECTIONS is refused (4 million took
    15 s to walk before)."""
    path = _metadata_only(tmp_path / "sections.ckpt", 16, extra_sections=400_000)
    with pytest.raises(CheckpointError, match=f"more than {L.MAX_SECTIONS} sections"):
        CheckpointReader(path)
    assert CheckpointReader(_metadata_only(tmp_path / "few.ckpt", 16, extra_sections=8)).vm_pages == 16
    with pytest.raises(CheckpointError, match="duplicate section"):
        CheckpointReader(_metadata_only(tmp_path / "twice.ckpt", 16, extra_sections=_empty_sections(1) * 2))


def test_a_restore_larger_than_its_file_system_is_refused(tmp_path):
    """A checkpoint that declares 2^38 zero pages (1 PiB) is refused before the image is made."""
    from memvisor.builtins.checkpoint import restore_image

    zero = np.array([(0, 1 << 38)], L.RANGE_DTYPE)
    path = _metadata_only(tmp_path / "huge.ckpt", 1 << 38, zero=zero)
    with pytest.raises(CheckpointError, match="is larger than its file system"):
        restore_image(path, tmp_path / "huge.raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.ckpt"]


def test_a_short_key_file_is_one_line_and_nothing_else(tmp_path):
    """A key file that is too short: the one line, and no 'Exception ignored' traceback from
    the reader's clean-up."""
    import subprocess
    import sys

    ckpt = _metadata_only(tmp_path / "c.ckpt", 16)
    (tmp_path / "short.key").write_bytes(b"12345")
    proc = subprocess.run([sys.executable, "-m", "memvisor", "checkpoint", "verify", str(ckpt), "--key-file",
                           str(tmp_path / "short.key")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "holds 5 bytes" in proc.stderr, proc.stderr
