"""The checkpoint format: writer, reader, eager save/restore of raw images, records, atomicity, MAC."""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor import PAGE_SIZE
from memvisor.builtins.checkpoint import (
    KIND_DATA,
    KIND_FIRST_RECORD,
    KIND_MISSING,
    KIND_ZERO,
    CheckpointError,
    CheckpointReader,
    CheckpointWriter,
    restore_image,
    save_image,
)
from memvisor.builtins.checkpoint import layout as L
from memvisor.errors import UserError

REAL_IMAGE = Path("/work/shared/images/idle-guest-1g.raw.zst")
_WORDS = np.random.default_rng(0).integers(97, 123, (512, 12), dtype=np.uint8)
_WORDS[:, -1] = 32
TEXT = _WORDS[np.random.default_rng(1).integers(0, 512, 1 << 16)].reshape(-1)  # 768 KiB of "words"


def make_image(rng: np.random.Generator, pages: int, zero: float = 0.5, text: float = 0.3) -> np.ndarray:
    """Pages in runs of 1-32: zero, text-like, random, or sparse (one non-zero byte)."""
    img = np.zeros((pages, PAGE_SIZE), np.uint8)
    p = 0
    while p < pages:
        n = min(pages - p, int(rng.integers(1, 33)))
        r = rng.random()
        if r < zero:
            pass
        elif r < zero + text:
            off = int(rng.integers(0, len(TEXT) - n * PAGE_SIZE))
            img[p : p + n] = TEXT[off : off + n * PAGE_SIZE].reshape(n, PAGE_SIZE)
        elif r < zero + text + (1 - zero - text) / 2:
            img[p : p + n] = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
        else:  # nearly zero: one byte at the start or the end of each page
            img[p : p + n, int(rng.choice([0, PAGE_SIZE - 1]))] = 1
        p += n
    return img


def write_image(path: Path, img: np.ndarray) -> Path:
    img.tofile(path)
    return path


def all_pages(reader: CheckpointReader) -> dict[int, bytes]:
    """Every data page of a checkpoint, read through page blocks."""
    out = {}
    for _, gpps, data in reader.iter_page_blocks():
        for g, row in zip(gpps.tolist(), data, strict=True):
            out[g] = row.tobytes()
    return out


@pytest.fixture
def small_ckpt(tmp_path):
    """A 600-page image with a realistic mix, saved with 4 KiB-ish buffers (many storage blocks)."""
    img = make_image(np.random.default_rng(7), 600)
    raw = write_image(tmp_path / "vm.raw", img)
    ckpt = tmp_path / "vm.ckpt"
    stats = save_image(raw, ckpt, block_pages=8, buffer_bytes=64 << 10, threads=2)
    return img, ckpt, stats


# --- round trips ------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pages=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    zero=st.floats(0, 1),
    block_pages=st.integers(1, 80),
    buffer_bytes=st.sampled_from([1, 4096, 50_000, 1 << 20]),
    codec=st.sampled_from(["zstd", "none"]),
    threads=st.sampled_from([1, 2]),
)
def test_round_trip_random_images(tmp_path, pages, seed, zero, block_pages, buffer_bytes, codec, threads):
    """save_image then restore_image gives back the image byte for byte, whatever its size, mix and options."""
    img = make_image(np.random.default_rng(seed), pages, zero=zero, text=(1 - zero) / 2)
    raw = write_image(tmp_path / f"{seed}.raw", img)
    ckpt, out = tmp_path / f"{seed}.ckpt", tmp_path / f"{seed}.out"
    save = save_image(raw, ckpt, block_pages=block_pages, buffer_bytes=buffer_bytes, codec=codec, threads=threads)
    restore = restore_image(ckpt, out)
    assert out.read_bytes() == img.tobytes()
    zero_pages = int((~img.any(axis=1)).sum())
    assert save.pages == restore.pages == pages
    assert save.zero_pages == restore.zero_pages == zero_pages
    assert save.bytes_in == pages * PAGE_SIZE and save.bytes_out == ckpt.stat().st_size
    with CheckpointReader(ckpt) as r:
        r.verify()
        assert r.data_pages == pages - zero_pages


def test_round_trip_real_looking_image(tmp_path):
    """A 24 MiB image shaped like guest memory (zero regions, text, tables, random) round-trips and compresses."""
    rng = np.random.default_rng(3)
    img = make_image(rng, 6144, zero=0.8, text=0.15)
    tables = np.arange(512, dtype=np.uint64) * PAGE_SIZE | 0x63  # page-table-like pages
    img[1000:1016] = np.tile(tables.view(np.uint8), (16, 1))
    raw = write_image(tmp_path / "guest.raw", img)
    ckpt, out = tmp_path / "guest.ckpt", tmp_path / "guest.out"
    save = save_image(raw, ckpt)
    restore_image(ckpt, out)
    assert out.read_bytes() == img.tobytes()
    assert save.bytes_out < save.bytes_in / 5


@pytest.mark.skipif(not REAL_IMAGE.exists(), reason="the real guest image is not on this machine")
def test_round_trip_real_guest_image_prefix(tmp_path):
    """The first 48 MiB of a real guest's memory round-trip byte for byte, as small as zstd -1 of the whole (+5%)."""
    import zstandard

    with open(REAL_IMAGE, "rb") as f:
        prefix = zstandard.ZstdDecompressor().stream_reader(f).read(48 << 20)
    raw = tmp_path / "real.raw"
    raw.write_bytes(prefix)
    ckpt, out = tmp_path / "real.ckpt", tmp_path / "real.out"
    save = save_image(raw, ckpt)
    restore_image(ckpt, out)
    assert out.read_bytes() == prefix
    assert save.bytes_out < 1.05 * len(zstandard.ZstdCompressor(level=1).compress(prefix))


def test_restore_leaves_zero_pages_as_holes(tmp_path):
    """A restored image of mostly zero pages is sparse: zero pages are not written."""
    img = np.zeros((4096, PAGE_SIZE), np.uint8)
    img[5] = 9
    ckpt, out = tmp_path / "z.ckpt", tmp_path / "z.out"
    save_image(write_image(tmp_path / "z.raw", img), ckpt)
    stats = restore_image(ckpt, out)
    assert stats.bytes_out == PAGE_SIZE and stats.write_calls == 1
    assert out.stat().st_size == 4096 * PAGE_SIZE
    assert out.stat().st_blocks * 512 < 1 << 20  # 16 MiB logical, well under 1 MiB allocated
    assert out.read_bytes() == img.tobytes()


def test_stats_to_json_keys(small_ckpt, tmp_path):
    """SaveStats and RestoreStats serialise to the documented JSON keys."""
    _, ckpt, save = small_ckpt
    restore = restore_image(ckpt, tmp_path / "o.raw")
    keys = {"pages", "zero_pages", "bytes_in", "bytes_out", "write_calls", "read_calls", "seconds"}
    assert set(save.to_json()) == keys == set(restore.to_json())
    assert restore.to_json()["bytes_in"] == restore.bytes_in > 0


def test_progress_is_reported(tmp_path):
    """save_image and restore_image call progress(done, total) up to the total."""
    img = make_image(np.random.default_rng(2), 300)
    raw, ckpt = write_image(tmp_path / "p.raw", img), tmp_path / "p.ckpt"
    seen_save, seen_restore = [], []
    save_image(raw, ckpt, chunk_bytes=64 * PAGE_SIZE, progress=lambda d, t: seen_save.append((d, t)))
    restore_image(ckpt, tmp_path / "p.out", progress=lambda d, t: seen_restore.append((d, t)))
    assert seen_save[-1] == (300, 300) and len(seen_save) == 5
    assert seen_restore and seen_restore[-1] == (300, 300)


# --- lazy reads -------------------------------------------------------------------------------


def test_lazy_read_one_page_block_with_one_read_call(small_ckpt, monkeypatch):
    """A fault's page block is read with exactly one read call; its neighbour in the same storage block with none."""
    img, ckpt, _ = small_ckpt
    with CheckpointReader(ckpt) as r:
        assert r.storage_blocks > 2
        calls = []
        real_pread = os.pread
        monkeypatch.setattr(os, "pread", lambda fd, n, off: calls.append((n, off)) or real_pread(fd, n, off))
        target = int(np.flatnonzero(img.any(axis=1))[-1])  # a data page in the last storage block
        sblock, pblock = r.locate(target)
        gpps, data = r.read_page_block((sblock, pblock))
        assert len(calls) == 1 and r.read_calls == 4  # 3 reads on open, one for the page block
        assert calls[0][0] == r._sb_length[sblock]  # the whole storage block, nothing more
        assert target in gpps.tolist()
        assert np.array_equal(data, img[gpps])
        same_block = [pb for pb in range(r.page_blocks) if r.storage_block_of(pb) == sblock and pb != pblock]
        if same_block:
            gpps2, data2 = r.read_page_block(same_block[0])
            assert len(calls) == 1 and np.array_equal(data2, img[gpps2])


def test_locate_and_page_kind(small_ckpt):
    """locate finds the page block of data pages only, and page_kind classifies every page."""
    img, ckpt, _ = small_ckpt
    nonzero = img.any(axis=1)
    with CheckpointReader(ckpt) as r:
        kinds = r.page_kind(np.arange(len(img)))
        assert np.array_equal(kinds == KIND_DATA, nonzero)
        assert np.array_equal(kinds == KIND_ZERO, ~nonzero)
        blocks = r.locate_many(np.arange(len(img)))
        assert np.array_equal(blocks >= 0, nonzero)
        zero_gpp = int(np.flatnonzero(~nonzero)[0])
        assert r.locate(zero_gpp) is None
        for g in np.flatnonzero(nonzero)[::37].tolist():
            sb, pb = r.locate(g)
            assert g in r.page_block_pages(pb).tolist() and r.storage_block_of(pb) == sb
        with pytest.raises(ValueError):
            r.page_kind([len(img)])


def test_iter_page_blocks_reads_each_storage_block_once(small_ckpt):
    """Iterating all page blocks costs one read per storage block and yields every data page once."""
    img, ckpt, _ = small_ckpt
    with CheckpointReader(ckpt) as r:
        before = r.read_calls
        pages = all_pages(r)
        assert r.read_calls - before == r.storage_blocks
    nonzero = np.flatnonzero(img.any(axis=1))
    assert sorted(pages) == nonzero.tolist()
    assert all(pages[g] == img[g].tobytes() for g in nonzero.tolist())


# --- zero pages, records ----------------------------------------------------------------------


def test_zero_pages_are_not_stored_as_data(tmp_path):
    """Pages of zeros go to the page map: no page block holds one, and the file stays small."""
    img = np.zeros((2048, PAGE_SIZE), np.uint8)
    img[100:110] = np.random.default_rng(0).integers(0, 256, (10, PAGE_SIZE), dtype=np.uint8)
    img[2047, -1] = 1  # a page that is zero but for its last byte is data
    ckpt = tmp_path / "z.ckpt"
    stats = save_image(write_image(tmp_path / "z.raw", img), ckpt)
    assert stats.zero_pages == 2048 - 11
    assert stats.bytes_out < 12 * PAGE_SIZE + 4096
    with CheckpointReader(ckpt) as r:
        assert r.data_pages == 11 and r.zero_pages == 2037
        for _, _, data in r.iter_page_blocks():
            assert data.any(axis=1).all()
        assert r.page_kind([2047])[0] == KIND_DATA and r.page_kind([0])[0] == KIND_ZERO
        assert r.zero_ranges()["count"].sum() == 2037


def test_detect_zero_off_stores_zero_pages_as_data(tmp_path):
    """With detect_zero=False every page given to add_pages is stored as data."""
    path = tmp_path / "d.ckpt"
    with CheckpointWriter(path, 8, detect_zero=False) as w:
        w.add_pages(0, bytes(8 * PAGE_SIZE))
    with CheckpointReader(path) as r:
        assert r.data_pages == 8 and r.zero_pages == 0
        assert not r.read_page_block(0)[1].any()


RECORD = np.dtype([("disk", "<u4"), ("block", "<u8")])


def test_records_round_trip(tmp_path):
    """Records of several kinds (fixed and variable width) come back sorted by page with their payloads."""
    path = tmp_path / "r.ckpt"
    refs = np.zeros(3, RECORD)
    refs["disk"], refs["block"] = [1, 1, 2], [70, 10, 99]
    with CheckpointWriter(path, 100) as w:
        w.add_pages(0, np.full((4, PAGE_SIZE), 5, np.uint8))
        w.add_records("disk-ref", [50, 20, 30], refs)
        w.add_records("disk-ref", [40], np.array([(3, 4)], RECORD))
        w.add_records("note", np.array([90, 60]), [b"sixty?", b""])
        w.add_zero_pages(range(4, 10))
        assert w.record_pages == 6 and w.pages == 16
    with CheckpointReader(path) as r:
        assert r.record_kinds == ("disk-ref", "note")
        refs_back = r.records("disk-ref")
        assert refs_back.gpps.tolist() == [20, 30, 40, 50]
        assert refs_back.width == RECORD.itemsize
        got = refs_back.as_array(RECORD)
        assert got["disk"].tolist() == [1, 2, 3, 1] and got["block"].tolist() == [10, 99, 4, 70]
        notes = r.records("note")
        assert notes.width is None and notes.gpps.tolist() == [60, 90] and notes.payloads() == [b"", b"sixty?"]
        kinds = r.page_kind([0, 5, 20, 60, 99])
        assert kinds.tolist() == [KIND_DATA, KIND_ZERO, KIND_FIRST_RECORD, KIND_FIRST_RECORD + 1, KIND_MISSING]
        assert [r.kind_names[k] for k in kinds] == ["data", "zero", "disk-ref", "note", "missing"]
        with pytest.raises(KeyError):
            r.records("other")


def test_optional_sections_round_trip_and_are_sealed(tmp_path):
    """Optional sections come back verbatim; a flipped byte in one is refused by the metadata checksum, and
    with a key by the MAC, before any caller sees it."""
    path = tmp_path / "o.ckpt"
    key = b"k" * 32
    state = bytes(range(256)) * 9 + b"tail"
    with CheckpointWriter(path, 8, key=key) as w:
        w.add_pages(0, np.full((8, PAGE_SIZE), 3, np.uint8))
        w.add_section("qemu", state)
        w.add_section("qdsc", b"{}")
        with pytest.raises(ValueError, match="repeated"):
            w.add_section("qemu", b"again")
        with pytest.raises(ValueError, match="bad"):
            w.add_section("QEMU", b"required tags are the format's")
    with CheckpointReader(path, key=key) as r:
        assert r.section("qemu") == state and r.section("qdsc") == b"{}" and r.section("none") is None
        assert r.optional_sections == ("qemu", "qdsc")
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"tail")] ^= 1
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="metadata checksum mismatch"):
        CheckpointReader(path)


def test_restore_needs_a_resolver_for_records(tmp_path):
    """restore_image refuses records it cannot resolve, naming the kind, and uses a resolver when given."""
    path, out = tmp_path / "r.ckpt", tmp_path / "r.raw"
    disk = np.random.default_rng(1).integers(0, 256, (16, PAGE_SIZE), dtype=np.uint8)  # a fake "disk"
    with CheckpointWriter(path, 8) as w:
        w.add_pages(0, np.full((4, PAGE_SIZE), 1, np.uint8))
        w.add_records("disk-ref", [6, 4, 5, 7], np.array([[3], [9], [0], [15]], np.uint8))
    with pytest.raises(CheckpointError, match="disk-ref") as err:
        restore_image(path, out)
    assert str(path) in str(err.value) and not out.exists()
    calls = []

    def resolve(kind, gpps, payloads):
        calls.append((kind, gpps.tolist()))
        return disk[[p[0] for p in payloads]]

    restore_image(path, out, resolve=resolve)
    assert calls == [("disk-ref", [4, 5, 6, 7])]
    expected = np.concatenate([np.full((4, PAGE_SIZE), 1, np.uint8), disk[[9, 0, 3, 15]]])
    assert out.read_bytes() == expected.tobytes()


def test_missing_pages_are_refused_unless_allowed(tmp_path):
    """A checkpoint that does not describe every page restores only with allow_missing (as zeros)."""
    path, out = tmp_path / "m.ckpt", tmp_path / "m.raw"
    with CheckpointWriter(path, 10) as w:
        w.add_pages(3, np.full((2, PAGE_SIZE), 7, np.uint8))
    with pytest.raises(CheckpointError, match="8 of 10 pages"):
        restore_image(path, out)
    restore_image(path, out, allow_missing=True)
    expected = np.zeros((10, PAGE_SIZE), np.uint8)
    expected[3:5] = 7
    assert out.read_bytes() == expected.tobytes()


def test_writer_refuses_bad_pages(tmp_path):
    """Pages outside the VM, added twice, or out of order are refused when added."""
    with CheckpointWriter(tmp_path / "b.ckpt", 16) as w:
        w.add_pages(0, np.ones((2, PAGE_SIZE), np.uint8))
        with pytest.raises(ValueError, match="already added"):
            w.add_zero_pages([1])
        with pytest.raises(ValueError, match="already added"):
            w.add_records("x", [0], [b"1"])
        with pytest.raises(ValueError, match=r"\[0, 16\)"):
            w.add_pages(16, np.ones((1, PAGE_SIZE), np.uint8))
        with pytest.raises(ValueError, match="ascending"):
            w.add_pages([5, 4], np.ones((2, PAGE_SIZE), np.uint8))
        with pytest.raises(ValueError, match="whole number"):
            w.add_pages(5, b"x" * 100)
        with pytest.raises(ValueError, match="kind"):
            w.add_records("zero", [9], [b"1"])
        with pytest.raises(ValueError, match="exceeds the page size"):
            w.add_records("big", [9], [bytes(PAGE_SIZE + 1)])
        w.add_zero_pages([2, 3])


# --- atomicity --------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_exception_mid_write_keeps_previous_checkpoint(tmp_path, threads):
    """An exception inside the writer's with block leaves the previous file intact and no temporary file."""
    path = tmp_path / "vm.ckpt"
    with CheckpointWriter(path, 64) as w:
        w.add_pages(0, np.full((64, PAGE_SIZE), 3, np.uint8))
    before = path.read_bytes()
    with pytest.raises(RuntimeError), CheckpointWriter(path, 4096, buffer_bytes=4096, threads=threads) as w:
        w.add_pages(0, np.random.default_rng(0).integers(1, 256, (512, PAGE_SIZE), dtype=np.uint8))
        assert w.temp_path.exists() and w.temp_path.parent == tmp_path
        assert w.write_calls == 8 or threads > 1  # with one thread every block is written at once
        raise RuntimeError("crash in the middle")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.ckpt"]


def test_final_path_appears_only_when_complete(tmp_path):
    """Only a temporary file exists until close renames it; an abandoned writer leaves nothing behind."""
    path = tmp_path / "new.ckpt"
    w = CheckpointWriter(path, 8)
    w.add_pages(0, np.ones((8, PAGE_SIZE), np.uint8))
    assert not path.exists() and w.temp_path.exists()
    w.close()
    assert path.exists() and not w.temp_path.exists()
    w.close()  # idempotent
    abandoned = CheckpointWriter(tmp_path / "gone.ckpt", 8)
    temp = abandoned.temp_path
    del abandoned
    gc.collect()
    assert not temp.exists() and not (tmp_path / "gone.ckpt").exists()


def test_failed_close_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A failure while finishing (fsync) removes the temporary file and leaves the previous file."""
    path = tmp_path / "vm.ckpt"
    path.write_bytes(b"previous")
    w = CheckpointWriter(path, 8)
    w.add_pages(0, np.ones((8, PAGE_SIZE), np.uint8))

    def broken_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(CheckpointError, match="cannot finish the file: I/O error"):
        w.close()
    assert path.read_bytes() == b"previous" and not w.temp_path.exists()


# --- MAC --------------------------------------------------------------------------------------

KEY = b"0123456789abcdef-secret"


@pytest.fixture
def keyed_ckpt(tmp_path):
    img = make_image(np.random.default_rng(11), 64)
    path = tmp_path / "k.ckpt"
    save_image(write_image(tmp_path / "k.raw", img), path, key=KEY, block_pages=4, buffer_bytes=8192)
    return img, path


def test_mac_with_right_key_reads(keyed_ckpt, tmp_path):
    """A keyed checkpoint opens and restores with its key (also from a key file) and without a key."""
    img, path = keyed_ckpt
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY)
    with CheckpointReader(path, key=keyfile) as r:
        assert r.keyed and r.authenticated
        r.verify()
    with CheckpointReader(path) as r:
        assert r.keyed and not r.authenticated
    restore_image(path, tmp_path / "k.out", key=KEY)
    assert (tmp_path / "k.out").read_bytes() == img.tobytes()


def test_mac_wrong_key_is_refused(keyed_ckpt):
    """A keyed checkpoint is refused with a wrong key."""
    _, path = keyed_ckpt
    with pytest.raises(CheckpointError, match="MAC mismatch"):
        CheckpointReader(path, key=b"another key of 16+ bytes")


def test_key_on_unkeyed_file_is_refused(small_ckpt):
    """Given a key, a file without MAC is refused (a forger could strip the MAC)."""
    _, ckpt, _ = small_ckpt
    with pytest.raises(CheckpointError, match="no MAC"):
        CheckpointReader(ckpt, key=KEY)


def test_mac_tampered_byte_is_refused(keyed_ckpt, tmp_path):
    """With the key, changing any one byte of a keyed file is refused on open or on reading."""
    _, path = keyed_ckpt
    raw = path.read_bytes()
    bad = tmp_path / "bad.ckpt"
    for pos in sorted(set(range(0, len(raw), 97)) | {0, 9, 63, 64, len(raw) - 97, len(raw) - 50, len(raw) - 1}):
        forged = bytearray(raw)
        forged[pos] ^= 0x40
        bad.write_bytes(forged)
        with pytest.raises(CheckpointError), CheckpointReader(bad, key=KEY) as r:
            r.verify()


def test_short_key_file_is_refused(tmp_path):
    """A key file with fewer than 16 bytes is refused naming the file."""
    keyfile = tmp_path / "short.key"
    keyfile.write_bytes(b"short")
    with pytest.raises(CheckpointError, match="short.key"):
        CheckpointWriter(tmp_path / "x.ckpt", 8, key=keyfile)
    assert list(tmp_path.iterdir()) == [keyfile]


# --- I/O counts, errors -----------------------------------------------------------------------


def test_write_calls_bounded_by_buffer_count(tmp_path, monkeypatch):
    """Saving writes at most ceil(bytes_out / buffer_bytes) + 10 times, counted at the system call."""
    img = make_image(np.random.default_rng(5), 4096, zero=0.3, text=0.4)
    raw = write_image(tmp_path / "w.raw", img)
    calls = []
    real_write, real_writev = os.write, os.writev
    monkeypatch.setattr(os, "write", lambda fd, b: calls.append(fd) or real_write(fd, b))
    monkeypatch.setattr(os, "writev", lambda fd, bufs: calls.append(fd) or real_writev(fd, bufs))
    buffer = 128 << 10
    stats = save_image(raw, tmp_path / "w.ckpt", buffer_bytes=buffer, block_pages=16)
    monkeypatch.undo()
    assert stats.write_calls == len(calls)
    assert stats.bytes_out > 20 * buffer
    assert stats.write_calls <= math.ceil(stats.bytes_out / buffer) + 10
    assert stats.read_calls == math.ceil(len(img) * PAGE_SIZE / (16 << 20))


def test_checkpoint_error_is_a_one_line_user_error(tmp_path):
    """CheckpointError is a UserError whose one-line message names the file, the block and the offset."""
    assert issubclass(CheckpointError, UserError)
    err = CheckpointError(tmp_path / "f.ckpt", "checksum mismatch", where="storage block 3", offset=4160)
    assert str(err) == f"{tmp_path / 'f.ckpt'}: storage block 3 at offset 4160: checksum mismatch"
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_bytes(b"hello\n" * 100)
    with pytest.raises(CheckpointError, match="bad magic") as e:
        CheckpointReader(not_ckpt)
    assert "\n" not in str(e.value) and str(not_ckpt) in str(e.value)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        CheckpointReader(tmp_path / "absent.ckpt")


def test_corrupt_storage_block_names_block_and_offset(small_ckpt, tmp_path):
    """A flipped byte in a storage block is reported with the block's number and offset."""
    _, ckpt, _ = small_ckpt
    with CheckpointReader(ckpt) as r:
        sb = 2
        offset = int(r._sb_offset[sb])
    raw = bytearray(ckpt.read_bytes())
    raw[offset + 5] ^= 1
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(raw)
    with CheckpointReader(bad) as r, pytest.raises(CheckpointError) as e:
        r.verify()
    assert str(e.value) == f"{bad}: storage block {sb} at offset {offset}: checksum mismatch"


def test_unsupported_version_is_refused(small_ckpt, tmp_path):
    """A file of another format version is refused naming the version."""
    _, ckpt, _ = small_ckpt
    raw = bytearray(ckpt.read_bytes())
    raw[8:10] = (2).to_bytes(2, "little")
    bad = tmp_path / "v2.ckpt"
    bad.write_bytes(raw)
    with pytest.raises(CheckpointError, match="unsupported format version 2"):
        CheckpointReader(bad)


def test_empty_checkpoint(tmp_path):
    """A checkpoint with no pages is valid: header, metadata and trailer only."""
    path = tmp_path / "e.ckpt"
    with CheckpointWriter(path, 0) as w:
        pass
    assert w.write_calls == 1
    with CheckpointReader(path) as r:
        assert r.vm_pages == 0 and r.page_blocks == r.storage_blocks == 0
        r.verify()
    assert path.stat().st_size > L.HEADER_SIZE + L.TRAILER_SIZE


def test_file_shrinking_after_open_is_reported(small_ckpt, tmp_path):
    """A checkpoint truncated while a reader has it open gives a 'truncated' error naming the block, not short data."""
    _, ckpt, _ = small_ckpt
    copy = tmp_path / "shrinking.ckpt"
    copy.write_bytes(ckpt.read_bytes())
    with CheckpointReader(copy) as r:
        last = r.storage_blocks - 1
        os.truncate(copy, int(r._sb_offset[last]) + 10)
        with pytest.raises(CheckpointError, match=rf"storage block {last} at offset \d+: truncated: 10 of"):
            r.read_storage_block(last)


def test_metadata_size_limit(small_ckpt):
    """A reader refuses metadata larger than its limit before reading it."""
    _, ckpt, _ = small_ckpt
    with pytest.raises(CheckpointError, match="exceeds the limit of 100"):
        CheckpointReader(ckpt, max_metadata_bytes=100)
