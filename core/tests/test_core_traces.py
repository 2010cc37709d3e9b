"""Trace readers and writers: formats round-trip, bad files fail with one line naming the file."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from memvisor.errors import TraceError, UserError
from memvisor.traces import Trace, compact_pages, load_trace, save_trace

SHARED_SQLITE = "/work/shared/traces/sqlite.npy.zst"

page_arrays = hnp.arrays(
    np.int64,
    st.integers(1, 300),
    elements=st.one_of(st.integers(0, 5000), st.integers(0, 2**63 - 1)),
)
flags = st.booleans()


def oracle_general(obj_ids, *, extra: bytes = b"") -> bytes:
    """libCacheSim oracleGeneral records packed independently of the reader's numpy dtype."""
    records = b"".join(struct.pack("<IQIq", t, obj, 4096, -1) for t, obj in enumerate(obj_ids))
    return records + extra


def write(path, data) -> str:
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as fh:
        fh.write(data)
    return str(path)


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


# -- round trips --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pages=page_arrays, with_writes=flags, data=st.data())
@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_save_load_round_trip(tmp_path, suffix, pages, with_writes, data):
    writes = data.draw(hnp.arrays(np.bool_, len(pages))) if with_writes else None
    path = tmp_path / f"t{suffix}"
    save_trace(path, pages, writes)
    trace = load_trace(path)
    assert trace.fmt == suffix[1:]
    assert trace.pages.dtype == np.int64
    np.testing.assert_array_equal(trace.pages, pages)
    if writes is None:
        assert trace.writes is None
    else:
        assert trace.writes.dtype == np.bool_
        np.testing.assert_array_equal(trace.writes, writes)
    assert trace.distinct == len(set(pages.tolist()))
    assert len(trace) == len(pages)


def test_npy_zst_round_trip_with_mask(tmp_path):
    pages = np.array([2**40, 3, 3, 7, 2**40], np.int64)
    writes = np.array([1, 0, 0, 1, 1], bool)
    save_trace(tmp_path / "t.npy.zst", pages, writes)
    assert (tmp_path / "t.w.npy.zst").exists()
    trace = load_trace(tmp_path / "t.npy.zst")
    np.testing.assert_array_equal(trace.pages, pages)
    np.testing.assert_array_equal(trace.writes, writes)
    assert (trace.fmt, trace.distinct) == ("npy", 3)


@pytest.mark.parametrize("dtype", ["<u8", ">u8", "<u4", "<i8", "<i2", "u1"])
def test_npy_accepts_integer_dtypes(tmp_path, dtype):
    np.save(tmp_path / "t.npy", np.array([5, 0, 9], dtype))
    np.testing.assert_array_equal(load_trace(tmp_path / "t.npy").pages, [5, 0, 9])


def test_npy_mask_beside_trace_uint8_or_bool(tmp_path):
    np.save(tmp_path / "a.npy", np.array([1, 2, 3], np.uint64))
    np.save(tmp_path / "a.w.npy", np.array([0, 1, 1], np.uint8))
    np.testing.assert_array_equal(load_trace(tmp_path / "a.npy").writes, [False, True, True])
    np.save(tmp_path / "a.w.npy", np.array([True, False, True]))
    np.testing.assert_array_equal(load_trace(tmp_path / "a.npy").writes, [True, False, True])


def test_npy_addresses_are_shifted_to_pages(tmp_path):
    np.save(tmp_path / "t.npy", np.array([0x7FFF_1234_5678, 4095, 4096], np.uint64))
    trace = load_trace(tmp_path / "t.npy", address=True)
    np.testing.assert_array_equal(trace.pages, [0x7FFF_1234_5678 >> 12, 0, 1])


def test_compressed_file_without_zst_suffix_is_detected(tmp_path):
    buffer = tmp_path / "plain.npy"
    np.save(buffer, np.array([4, 5], np.uint64))
    path = write(tmp_path / "trace.bin", zstd(buffer.read_bytes()))
    trace = load_trace(path)
    assert trace.fmt == "npy"
    np.testing.assert_array_equal(trace.pages, [4, 5])


# -- csv ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pages", "writes"),
    [
        ("1\n2\n3\n", [1, 2, 3], None),
        ("page\n1\n2\n", [1, 2], None),
        ("1,r\n2,w\n3,W\n4,R\n", [1, 2, 3, 4], [False, True, True, False]),
        ("1,0\n2,1\n", [1, 2], [False, True]),
        ("1 read\n2 write\n", [1, 2], [False, True]),
        ("0x10\n0XfF\n17\n", [16, 255, 17], None),
        ("1\r\n\n  2 \r\n\n", [1, 2], None),
        ("page,op\n9,w\n", [9], [True]),
        ("time,obj_id,obj_size,op\n0,42,4096,get\n1,43,4096,set\n", [42, 43], [False, True]),
        ("obj_id,is_write,other\n5,1,x\n6,0,y\n", [5, 6], [True, False]),
        ("\ufeffpage\n3\n", [3], None),
    ],
)
def test_csv_variants(tmp_path, text, pages, writes):
    trace = load_trace(write(tmp_path / "t.csv", text.encode()))
    assert trace.fmt == "csv"
    np.testing.assert_array_equal(trace.pages, pages)
    if writes is None:
        assert trace.writes is None
    else:
        np.testing.assert_array_equal(trace.writes, writes)


def test_csv_byte_addresses(tmp_path):
    path = write(tmp_path / "t.csv", "0x7fff00001fff\n4096\n4095\n")
    np.testing.assert_array_equal(load_trace(path, address=True).pages, [0x7FFF00001, 1, 0])


def test_csv_compressed_and_explicit_format(tmp_path):
    path = write(tmp_path / "accesses.log", zstd(b"7,w\n8,r\n"))
    trace = load_trace(path, fmt="CSV")
    np.testing.assert_array_equal(trace.pages, [7, 8])
    np.testing.assert_array_equal(trace.writes, [True, False])


def test_csv_large_file_parses_exactly(tmp_path):
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 2**40, 200_000)
    writes = rng.random(len(pages)) < 0.3
    text = "\n".join(f"{p:#x},{'w' if w else 'r'}" for p, w in zip(pages.tolist(), writes.tolist(), strict=True))
    trace = load_trace(write(tmp_path / "big.csv", text))
    np.testing.assert_array_equal(trace.pages, pages)
    np.testing.assert_array_equal(trace.writes, writes)


# -- oracleGeneral ------------------------------------------------------------------------------


def test_oracle_general_reads_obj_ids(tmp_path):
    path = write(tmp_path / "w01.oracleGeneral.bin", oracle_general([10, 2**40, 10]))
    trace = load_trace(path)
    assert trace.fmt == "oracleGeneral"
    assert trace.writes is None
    np.testing.assert_array_equal(trace.pages, [10, 2**40, 10])


def test_oracle_general_addresses_and_zst(tmp_path):
    path = write(tmp_path / "x.oracleGeneral.zst", zstd(oracle_general([8192, 4097])))
    np.testing.assert_array_equal(load_trace(path, address=True).pages, [2, 1])


# -- errors -------------------------------------------------------------------------------------


def npy_bytes(array, **kwargs) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


BAD_FILES = {
    "float dtype": ("t.npy", npy_bytes(np.array([1.0, 2.0])), "float64"),
    "object dtype": ("t.npy", npy_bytes(np.array([1, None]), allow_pickle=True), "object"),
    "bool dtype": ("t.npy", npy_bytes(np.array([True])), "bool"),
    "structured dtype": ("t.npy", npy_bytes(np.zeros(2, [("a", "<u8")])), "dtype"),
    "2-d": ("t.npy", npy_bytes(np.zeros((2, 3), np.uint64)), "2-d"),
    "0-d": ("t.npy", npy_bytes(np.uint64(3)), "0-d"),
    "empty npy": ("t.npy", npy_bytes(np.zeros(0, np.uint64)), "empty"),
    "negative": ("t.npy", npy_bytes(np.array([1, -2])), "negative"),
    "truncated npy": ("t.npy", npy_bytes(np.arange(100, dtype=np.uint64))[:-10], "truncated"),
    "not npy": ("t.npy", b"hello world", "not a .npy"),
    "truncated zst": ("t.npy.zst", zstd(npy_bytes(np.arange(1000, dtype=np.uint64)))[:-20], "zstd"),
    "unknown extension": ("t.parquet", b"PAR1", "unknown trace format"),
    "csv bad number": ("t.csv", b"1\n2\nabc3\n4\n", "line 3"),
    "csv float": ("t.csv", b"page\n1\n2.5\n", "line 3"),
    "csv negative": ("t.csv", b"1\n-4\n", "line 2"),
    "csv ragged": ("t.csv", b"1,r\n2,w\n3\n", "line 3"),
    "csv bad flag": ("t.csv", b"1,r\n2,maybe\n", "line 2"),
    "csv three columns no header": ("t.csv", b"1,2,3\n", "no header"),
    "csv header only": ("t.csv", b"obj_id,op\n", "empty"),
    "csv too large": ("t.csv", b"99999999999999999999999\n", "line 1"),
    "oracle truncated": ("t.oracleGeneral", oracle_general([1, 2], extra=b"\0" * 7), "55 bytes"),
    "oracle empty": ("t.oracleGeneral", b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_one_line_trace_error(tmp_path, case):
    name, data, expected = BAD_FILES[case]
    path = write(tmp_path / name, data)
    with pytest.raises(TraceError) as caught:
        load_trace(path)
    message = str(caught.value)
    assert message.startswith(path)
    assert expected in message
    assert "\n" not in message
    assert isinstance(caught.value, UserError)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__ or caught.value.__context__ is None


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (np.array([1, 0], np.uint8), "2 write flags for 3 accesses"),
        (np.array([1, 0, 1], np.int64), "bool or uint8"),
        (np.array([1, 0, 2], np.uint8), "0 or 1"),
    ],
)
def test_bad_write_mask_names_the_mask_file(tmp_path, mask, expected):
    np.save(tmp_path / "t.npy", np.array([1, 2, 3], np.uint64))
    np.save(tmp_path / "t.w.npy", mask)
    with pytest.raises(TraceError, match=expected) as caught:
        load_trace(tmp_path / "t.npy")
    assert str(caught.value).startswith(str(tmp_path / "t.w.npy"))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "missing.npy")
    with pytest.raises(TraceError, match="unknown trace format 'parquet'"):
        load_trace(write(tmp_path / "t.csv", "1\n"), fmt="parquet")
    with pytest.raises(TraceError, match="is a directory"):
        load_trace(tmp_path)


def test_save_trace_rejects_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        save_trace(tmp_path / "t.npy", np.array([-1]))
    with pytest.raises(ValueError, match="shape"):
        save_trace(tmp_path / "t.npy", np.array([1, 2]), np.array([True]))
    with pytest.raises(ValueError, match=r"\.npy"):
        save_trace(tmp_path / "t.parquet", np.array([1]))


# -- compaction ---------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(pages=page_arrays)
def test_compact_pages_is_a_dense_renumbering(pages):
    dense, originals = compact_pages(pages)
    np.testing.assert_array_equal(originals[dense], pages)
    assert len(originals) == len(set(pages.tolist()))
    # First-touch order: the first access is page 0 and new pages appear as 0, 1, 2, ...
    first_seen = np.maximum.accumulate(dense)
    assert dense[0] == 0
    assert np.all(np.diff(first_seen) <= 1)
    by_address, sorted_originals = compact_pages(pages, "address")
    np.testing.assert_array_equal(sorted_originals, np.unique(pages))
    np.testing.assert_array_equal(sorted_originals[by_address], pages)


def test_compact_pages_example():
    dense, originals = compact_pages(np.array([1000, 5, 1000, 7, 5]))
    np.testing.assert_array_equal(dense, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(originals, [1000, 5, 7])


# -- the shared real trace ----------------------------------------------------------------------


def test_real_sqlite_trace():
    if not os.path.exists(SHARED_SQLITE):
        pytest.skip(f"{SHARED_SQLITE} is not on this machine")
    trace = load_trace(SHARED_SQLITE)
    assert isinstance(trace, Trace)
    assert len(trace.pages) == 47_937_391
    assert trace.distinct == 448
    assert trace.writes is not None and len(trace.writes) == len(trace.pages)
    assert 0.32 < trace.writes.mean() < 0.34  # the README's 0.331
