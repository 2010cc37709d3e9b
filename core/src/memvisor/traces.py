"""Page-access traces: read them from files, write them back, compact their page numbers.

A trace is a sequence of page numbers in program order, optionally with a write flag per access.
Readers accept:

* ``npy``: a ``.npy`` array of integer page numbers, or the same compressed as ``.npy.zst``. A
  write mask ``NAME.w.npy`` (or ``NAME.w.npy.zst``) beside ``NAME.npy[.zst]`` is read with it.
* ``csv``: one access a line: a page number (or, with ``address=True``, a byte address), decimal
  or ``0x`` hex, and optionally a write flag (``r``/``w``, ``0``/``1``, ``read``/``write``...). An
  optional header line is skipped; a header naming ``obj_id`` (or ``page``/``addr``) and ``op``
  (or ``is_write``) picks those columns out of wider files, as libCacheSim's csv traces have.
* ``oracleGeneral``: libCacheSim's binary format, 24-byte little-endian records
  ``(uint32 clock_time, uint64 obj_id, uint32 obj_size, int64 next_access_vtime)``; ``obj_id``
  is the page number. It carries no write flags.

Any of them may be zstd-compressed (name ending ``.zst``). A file that is not a trace raises
:class:`memvisor.errors.TraceError` with one line naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from typing import IO

import attrs
import numpy as np
import zstandard

from memvisor import PAGE_SIZE
from memvisor.errors import TraceError
from memvisor.files import atomic_write, open_regular
from memvisor.limits import BoundedZstdReader, check_budget, format_bytes, memory_budget

FORMATS = ("npy", "csv", "oracleGeneral")
"""Trace formats that :func:`load_trace` reads (``fmt`` values, case-insensitive)."""

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
"""``address >> PAGE_SHIFT`` is the page number of a byte address."""

ORACLE_GENERAL_DTYPE = np.dtype(
    [("clock_time", "<u4"), ("obj_id", "<u8"), ("obj_size", "<u4"), ("next_access_vtime", "<i8")]
)
"""One libCacheSim oracleGeneral record: packed, 24 bytes, little-endian."""

# python-zstandard refuses frames with windows above 128 MiB unless told.
_ZSTD_MAX_WINDOW = 2**31
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NPY_MAGIC = b"\x93NUMPY"
_INT64_MAX = np.iinfo(np.int64).max


@attrs.frozen(eq=False, slots=False)
class Trace:
    """A page-access trace read from a file.

    :ivar pages: page numbers in program order (int64, non-negative).
    :ivar writes: per access, whether it writes (bool, same length), or None if the file has none.
    :ivar path: the file it was read from.
    :ivar fmt: the format it was read as (one of :data:`FORMATS`).
    """

    pages: np.ndarray
    writes: np.ndarray | None
    path: str
    fmt: str

    def __len__(self) -> int:
        """Number of accesses."""
        return len(self.pages)

    # Not slotted so that cached_property can store its value; distinct sorts the whole trace.
    @functools.cached_property
    def distinct(self) -> int:
        """Number of distinct pages the trace touches."""
        return len(_sorted_unique(_run_starts(self.pages)[0]))


# -- reading ------------------------------------------------------------------------------------


def load_trace(path: str | os.PathLike, *, address: bool = False, fmt: str | None = None) -> Trace:
    """Read a page-access trace.

    :param path: the trace file.
    :param address: the file holds byte addresses rather than page numbers (shifted right by 12).
    :param fmt: ``"npy"``, ``"csv"`` or ``"oracleGeneral"``; None detects it from the name (and,
        for unknown names, from a ``.npy`` magic number).
    :raises TraceError: the file is missing, of an unknown format, or not a valid trace.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise TraceError(f"{name}: no such trace file")
    if os.path.isdir(name):
        raise TraceError(f"{name}: is a directory, not a trace file")
    # By magic number as well as by name: a compressed file named without .zst still reads.
    try:
        compressed = name.endswith(".zst") or _has_zstd_magic(name)
    except OSError as error:
        raise TraceError(f"{name}: cannot read: {_one_line(error)}") from None
    fmt = _resolve_format(name, compressed, fmt)
    try:
        if fmt == "npy":
            pages, writes = _read_npy_trace(name, compressed, address)
        elif fmt == "csv":
            pages, writes = _parse_csv(_read_bytes(name, compressed, CSV_MEMORY_FACTOR), name, address)
        else:
            pages, writes = _parse_oracle_general(_read_bytes(name, compressed, BINARY_MEMORY_FACTOR), name, address)
    except TraceError:
        raise
    except zstandard.ZstdError as error:
        raise TraceError(f"{name}: corrupt zstd data: {_one_line(error)}") from None
    except (OSError, EOFError, ValueError) as error:
        # Unreadable files and malformed .npy headers (numpy raises ValueError for those).
        raise TraceError(f"{name}: cannot read {fmt} trace: {_one_line(error)}") from None
    return Trace(pages=pages, writes=writes, path=name, fmt=fmt)


def _resolve_format(name: str, compressed: bool, fmt: str | None) -> str:
    """The format to read ``name`` as: ``fmt`` checked, or detected from the name or magic."""
    if fmt is not None:
        for known in FORMATS:
            if fmt.lower() == known.lower():
                return known
        raise TraceError(f"{name}: unknown trace format {fmt!r} (known: {', '.join(FORMATS)})")
    base = os.path.basename(name)
    stem = base[: -len(".zst")] if base.endswith(".zst") else base
    lower = stem.lower()
    if lower.endswith(".npy"):
        return "npy"
    if lower.endswith((".csv", ".txt")):
        return "csv"
    if "oraclegeneral" in lower:  # libCacheSim names: x.oracleGeneral, x.oracleGeneral.bin, ...
        return "oracleGeneral"
    if _starts_with_npy_magic(name, compressed):
        return "npy"
    raise TraceError(
        f"{name}: unknown trace format (expected .npy, .npy.zst, .csv or a libCacheSim "
        f"oracleGeneral file; pass the format explicitly for other names)"
    )


def _starts_with_npy_magic(name: str, compressed: bool) -> bool:
    """Whether the (decompressed) file starts like a ``.npy`` file."""
    try:
        with _open(name, compressed, _limit(name, BINARY_MEMORY_FACTOR)) as fh:
            return fh.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    except Exception:  # unreadable or corrupt: the caller reports an unknown format
        return False


def _has_zstd_magic(name: str) -> bool:
    with os.fdopen(open_regular(name, "trace file", lambda path, problem: TraceError(f"{path}: {problem}")),
                   "rb") as fh:
        return fh.read(4) == _ZSTD_MAGIC


CSV_MEMORY_FACTOR = 40
"""Bytes of memory parsing one byte of csv text takes at most (offsets of every field and
line, their values; measured about 35 on one-column traces)."""
BINARY_MEMORY_FACTOR = 3
"""The same for ``.npy`` and oracleGeneral data (the array, its int64 copy)."""


def _limit(name: str, factor: int) -> int:
    """The most (decompressed) bytes of trace ``name`` that fit this machine's memory budget
    once parsed, ``factor`` bytes per byte."""
    return memory_budget() // factor


def _trace_error(name: str):
    return lambda problem: TraceError(f"{name}: {problem}")


@contextlib.contextmanager
def _open(name: str, compressed: bool, limit: int) -> Iterator[IO[bytes] | BoundedZstdReader]:
    """The file for reading, a regular file only; compressed data through a reader that
    refuses to decompress more than ``limit`` bytes (a file of ``limit`` bytes at most)."""
    with os.fdopen(open_regular(name, "trace file", lambda path, problem: TraceError(f"{path}: {problem}")),
                   "rb") as raw:
        if compressed:
            yield BoundedZstdReader(raw, limit, _trace_error(name), max_window=_ZSTD_MAX_WINDOW)
            return
        size = os.fstat(raw.fileno()).st_size
        if size > limit:
            raise TraceError(f"{name}: a trace of {format_bytes(size)} needs more memory to read than this "
                             f"machine can give now ({format_bytes(memory_budget())})")
        yield raw


def _read_bytes(name: str, compressed: bool, factor: int) -> bytes:
    """The whole (decompressed) file, refused when parsing it would not fit in memory."""
    with _open(name, compressed, _limit(name, factor)) as fh:
        return fh.read()


def _read_exactly(fh: IO[bytes], buffer: memoryview) -> int:
    """Fill ``buffer`` from ``fh``; returns the bytes read (fewer only at end of file)."""
    done = 0
    readinto = getattr(fh, "readinto", None)
    while done < len(buffer):
        if readinto is not None:
            got = readinto(buffer[done:])
        else:  # pragma: no cover - every reader used here has readinto
            chunk = fh.read(len(buffer) - done)
            got = len(chunk)
            buffer[done : done + got] = chunk
        if not got:
            break
        done += got
    return done


def _read_npy(name: str, compressed: bool, what: str) -> np.ndarray:
    """Read a 1-d integer ``.npy`` array, streaming it (decompressed) straight into its buffer."""
    with _open(name, compressed, _limit(name, BINARY_MEMORY_FACTOR)) as fh:
        magic = fh.read(len(_NPY_MAGIC))
        if not magic:
            raise TraceError(f"{name}: empty file")
        if magic != _NPY_MAGIC:
            raise TraceError(f"{name}: not a .npy file (bad magic number)")
        version = (ord(fh.read(1) or b"\0"), ord(fh.read(1) or b"\0"))
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise TraceError(f"{name}: unsupported .npy version {version[0]}.{version[1]}")
        _check_npy_header(name, what, shape, dtype)
        try:  # the header's size is checked before anything is allocated on its word
            check_budget(BINARY_MEMORY_FACTOR * shape[0] * dtype.itemsize, f"{shape[0]:,} {what}")
        except ValueError as exc:
            raise TraceError(f"{name}: {exc}") from None
        array = np.empty(shape, dtype)
        got = _read_exactly(fh, memoryview(array).cast("B"))
        if got != array.nbytes:
            raise TraceError(
                f"{name}: truncated: the header promises {shape[0]} {what} "
                f"({array.nbytes} bytes) but only {got} bytes follow"
            )
    return array


def _check_npy_header(name: str, what: str, shape: tuple, dtype: np.dtype) -> None:
    """Reject arrays that cannot be a trace before reading their data."""
    if dtype.fields is not None or dtype.hasobject:
        raise TraceError(f"{name}: {what} have dtype {dtype}; expected integers")
    if what == "page numbers" and dtype.kind not in "iu":
        raise TraceError(f"{name}: page numbers have dtype {dtype}; expected integers")
    if what == "write flags" and not (dtype.kind == "b" or dtype == np.uint8):
        raise TraceError(f"{name}: write flags have dtype {dtype}; expected bool or uint8")
    if len(shape) != 1:
        raise TraceError(f"{name}: a {len(shape)}-d array of shape {shape}; expected 1-d")
    if shape[0] == 0:
        raise TraceError(f"{name}: empty: no accesses")


def _read_npy_trace(name: str, compressed: bool, address: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Pages from a ``.npy[.zst]`` file and the write mask beside it, if there is one."""
    pages = _to_pages(_read_npy(name, compressed, "page numbers"), name, address)
    mask_name = _mask_path(name)
    if mask_name is None:
        return pages, None
    raw = _read_npy(mask_name, _has_zstd_magic(mask_name), "write flags")
    if len(raw) != len(pages):
        raise TraceError(f"{mask_name}: {len(raw)} write flags for {len(pages)} accesses in {name}")
    if raw.dtype == np.uint8:
        if raw.max() > 1:
            raise TraceError(f"{mask_name}: write flags must be 0 or 1 (found {int(raw.max())})")
        raw = raw.view(np.bool_)
    return pages, raw


def _mask_path(name: str) -> str | None:
    """``NAME.w.npy[.zst]`` for ``NAME.npy[.zst]``, if it exists (same compression first)."""
    compressed = name.endswith(".zst")
    stem = name[: -len(".zst")] if compressed else name
    if not stem.endswith(".npy"):
        return None
    base = stem[: -len(".npy")] + ".w.npy"
    candidates = (base + ".zst", base) if compressed else (base, base + ".zst")
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    return None


def _to_pages(values: np.ndarray, name: str, address: bool) -> np.ndarray:
    """Integer values (page numbers or byte addresses) as non-negative int64 page numbers."""
    values = values.astype(values.dtype.newbyteorder("="), copy=False)
    if values.dtype.kind == "i":
        lowest = values.min()
        if lowest < 0:
            where = int(np.argmax(values < 0))
            raise TraceError(f"{name}: negative page number {int(lowest)} at access {where}")
    if address:
        values = values >> PAGE_SHIFT
    if values.dtype == np.uint64:
        highest = values.max()
        if highest > _INT64_MAX:
            raise TraceError(f"{name}: page number {int(highest)} is too large (limit 2**63 - 1)")
        return values.view(np.int64)  # no copy: 400 MB traces stay 400 MB
    return values.astype(np.int64, copy=False)


def _parse_oracle_general(data: bytes, name: str, address: bool) -> tuple[np.ndarray, None]:
    """Pages from libCacheSim oracleGeneral records (no write flags in that format)."""
    size = ORACLE_GENERAL_DTYPE.itemsize
    if len(data) == 0:
        raise TraceError(f"{name}: empty: no accesses")
    if len(data) % size:
        raise TraceError(
            f"{name}: truncated: {len(data)} bytes is not a whole number of {size}-byte oracleGeneral records"
        )
    records = np.frombuffer(data, ORACLE_GENERAL_DTYPE)
    return _to_pages(np.ascontiguousarray(records["obj_id"]), name, address), None


# -- csv ----------------------------------------------------------------------------------------

_PAGE_COLUMNS = ("obj_id", "page", "addr", "address")
_WRITE_COLUMNS = ("op", "is_write", "write", "rw")
_WRITE_WORDS = ("w", "1", "write", "set", "s", "store", "m", "modify", "true")
_READ_WORDS = ("r", "0", "read", "get", "l", "load", "false")
_SEPARATORS = b", \t\r\n;"
_DECIMAL_DIGITS, _HEX_DIGITS = 19, 16  # most that fit in a uint64 without overflow
_PAD = 32  # more than the widest field parsed
_CHUNK = 1 << 18  # fields parsed at once: bounds the float64 scratch matrix to ~40 MB

# Byte lookup tables: the value of a (hex) digit or 255, lowercase letters, token characters.
_DIGIT = np.full(256, 255, np.uint8)
_DIGIT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_DIGIT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_DIGIT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_LOWER = np.arange(256, dtype=np.uint8)
_LOWER[65:91] += 32
_IS_TOKEN = np.ones(256, np.bool_)
_IS_TOKEN[np.frombuffer(_SEPARATORS, np.uint8)] = False


def _word_key(word: str) -> int:
    """A word of up to 8 bytes packed big-end-first into an integer, as :func:`_token_keys` does."""
    return int.from_bytes(word.encode(), "big")


_WRITE_KEYS = np.array([_word_key(w) for w in _WRITE_WORDS], np.uint64)
_READ_KEYS = np.array([_word_key(w) for w in _READ_WORDS], np.uint64)
_INT_LITERAL = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)")


def _parse_csv(data: bytes, name: str, address: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Pages and write flags from a text trace, parsed with array operations (no per-line loop)."""
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark from spreadsheet exports
        data = b"   " + data[3:]
    header, body_start, body_line = _split_header(data)
    text = np.frombuffer(data, np.uint8)[body_start:]
    starts, ends, line_of = _tokenize(text)
    if len(starts) == 0:
        raise TraceError(f"{name}: empty: no accesses")
    per_line = np.bincount(line_of)
    columns = int(per_line[line_of[0]])
    ragged = np.flatnonzero((per_line != 0) & (per_line != columns))
    if len(ragged):
        line = int(ragged[0])
        found = int(per_line[line])
        raise TraceError(
            f"{name}: line {body_line + line}: {found} field{'s' if found != 1 else ''} where "
            f"the first line has {columns}"
        )
    page_col, write_col = _pick_columns(name, header, columns)

    def line_number(column: int, index: int) -> int:
        return body_line + int(line_of[index * columns + column])

    def token(column: int, index: int) -> str:
        i = index * columns + column
        raw = bytes(text[starts[i] : ends[i]][:40])
        return raw.decode("utf-8", "replace")

    values, bad = _parse_integers(text, starts[page_col::columns], ends[page_col::columns])
    if bad is not None:
        raise TraceError(
            f"{name}: line {line_number(page_col, bad)}: {token(page_col, bad)!r} is not a "
            f"{'byte address' if address else 'page number'}"
        )
    pages = _to_pages(values, name, address)
    if write_col is None:
        return pages, None
    keys, too_long = _token_keys(text, starts[write_col::columns], ends[write_col::columns])
    writes = np.isin(keys, _WRITE_KEYS)
    unknown = ~(writes | np.isin(keys, _READ_KEYS)) | too_long
    if unknown.any():
        bad = int(np.argmax(unknown))
        raise TraceError(
            f"{name}: line {line_number(write_col, bad)}: write flag {token(write_col, bad)!r} "
            f"is not one of r/w, 0/1, read/write"
        )
    return pages, writes


def _split_header(data: bytes) -> tuple[list[str] | None, int, int]:
    """The header's column names (None if the first line is data), where the data starts, and
    the 1-based number of the first data line."""
    position, line = 0, 1
    while position < len(data):
        end = data.find(b"\n", position)
        end = len(data) if end < 0 else end
        fields = [f for f in re.split(r"[,;\s]+", data[position:end].decode("utf-8", "replace")) if f]
        if fields:
            # A header names columns: it has letters and no numbers. Anything else is data, so
            # a malformed first line is reported rather than skipped.
            is_header = any(re.search("[A-Za-z]", f) for f in fields) and not any(
                _INT_LITERAL.fullmatch(f) for f in fields
            )
            if not is_header:
                return None, position, line
            return [f.strip("\"'").lower() for f in fields], end + 1, line + 1
        position, line = end + 1, line + 1
    return None, len(data), line


def _tokenize(text: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end offsets of every field, and the 0-based line each is on."""
    is_token = _IS_TOKEN[text]
    begins = np.empty(len(text), np.bool_)
    begins[:1] = is_token[:1]
    np.greater(is_token[1:], is_token[:-1], out=begins[1:])  # token byte after a separator
    starts = np.flatnonzero(begins)
    finishes = begins  # reuse the buffer: a separator (or the end) after a token byte
    finishes[-1:] = is_token[-1:]
    np.greater(is_token[:-1], is_token[1:], out=finishes[:-1])
    ends = np.flatnonzero(finishes) + 1
    newlines = np.flatnonzero(text == ord("\n"))
    # Tokens come in order, so searchsorted walks the newline offsets with hot caches.
    return starts, ends, np.searchsorted(newlines, starts)


def _pick_columns(name: str, header: list[str] | None, columns: int) -> tuple[int, int | None]:
    """The page column and the write-flag column (or None) of a csv trace."""
    if header is not None:
        if len(header) != columns:
            raise TraceError(f"{name}: the header names {len(header)} columns but lines have {columns}")
        page = next((header.index(c) for c in _PAGE_COLUMNS if c in header), None)
        write = next((header.index(c) for c in _WRITE_COLUMNS if c in header), None)
        if page is not None:
            return page, write
    if columns == 1:
        return 0, None
    if columns == 2:
        return 0, 1
    raise TraceError(
        f"{name}: {columns} columns and no header naming them (expected a header with "
        f"{' or '.join(_PAGE_COLUMNS)}, and optionally {' or '.join(_WRITE_COLUMNS)})"
    )


def _parse_integers(text: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Decimal or ``0x`` hex fields as uint64, and the index of the first bad field (or None)."""
    lengths = ends - starts
    second = _LOWER[text[np.minimum(starts + 1, len(text) - 1)]]
    is_hex = (lengths > 2) & (text[starts] == ord("0")) & (second == ord("x"))
    digit_counts = lengths - 2 * is_hex
    values = np.zeros(len(starts), np.uint64)
    bad = np.zeros(len(starts), np.bool_)
    # Separators in front of the text so that a window ending at any field's end fits.
    padded = np.concatenate([np.full(_PAD, ord(","), np.uint8), text])
    for base, most, group in ((10, _DECIMAL_DIGITS, ~is_hex), (16, _HEX_DIGITS, is_hex)):
        members = np.flatnonzero(group)
        if len(members) == 0:
            continue
        width = min(int(digit_counts[members].max()), most)
        windows = np.lib.stride_tricks.sliding_window_view(padded, width)
        for first in range(0, len(members), _CHUNK):
            chunk = members[first : first + _CHUNK]
            counts = digit_counts[chunk]
            rows = windows[ends[chunk] + (_PAD - width)]
            values[chunk], bad[chunk] = _digits_value(rows, counts, base, most)
    if bad.any():
        return values, int(np.argmax(bad))
    return values, None


def _digits_value(rows: np.ndarray, counts: np.ndarray, base: int, most: int) -> tuple[np.ndarray, np.ndarray]:
    """Values of right-aligned digit rows (``counts[i]`` digits end row i), and which are bad.

    The sum of digits times powers is a float64 matrix-vector product (BLAS), done in two halves
    of at most 10 digits so that every partial sum is exact below 2**53.
    """
    width = rows.shape[1]
    digits = _DIGIT[rows]
    inside = np.arange(width) >= (width - counts)[:, None]
    digits *= inside  # bytes before the field (its "0x", separators, other fields) count as 0
    bad = (digits >= base).any(axis=1) | (counts > most) | (counts <= 0)
    split = 9 if base == 10 else 8
    low_width = min(width, split)
    as_float = digits.astype(np.float64)
    powers = float(base) ** np.arange(low_width - 1, -1, -1)
    values = (as_float[:, width - low_width :] @ powers).astype(np.uint64)
    if width > low_width:
        high_powers = float(base) ** np.arange(width - low_width - 1, -1, -1)
        high = (as_float[:, : width - low_width] @ high_powers).astype(np.uint64)
        values += high * np.uint64(base**split)
    return values, bad


def _token_keys(text: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields of up to 8 bytes lowercased and packed into integers (see :func:`_word_key`), and
    which fields were longer than that."""
    last = len(text) - 1
    lengths = ends - starts
    keys = np.zeros(len(starts), np.uint64)
    for i in range(min(int(lengths.max()), 8)):
        live = lengths > i
        byte = _LOWER[text[np.minimum(starts + i, last)]].astype(np.uint64)
        keys = np.where(live, (keys << np.uint64(8)) | byte, keys)
    return keys, lengths > 8


# -- writing ------------------------------------------------------------------------------------


def save_trace(path: str | os.PathLike, pages: np.ndarray, writes: np.ndarray | None = None) -> None:
    """Write a trace that :func:`load_trace` reads back unchanged.

    ``NAME.npy`` (uint64 page numbers, as the shared traces are) and, with ``writes``, the mask
    ``NAME.w.npy`` (uint8) beside it, replacing (or, without ``writes``, removing) any mask
    there; ``NAME.npy.zst`` writes both compressed; ``NAME.csv`` writes ``page,op`` lines
    (``op`` is ``r`` or ``w``) under a header.

    :raises ValueError: negative pages, a mask of another length, or an unsupported name.
    """
    name = os.fspath(path)
    pages = np.asarray(pages)
    if pages.ndim != 1 or pages.dtype.kind not in "iu":
        raise ValueError(f"pages must be a 1-d integer array, not {pages.dtype} of shape {pages.shape}")
    if pages.dtype.kind == "i" and len(pages) and pages.min() < 0:
        raise ValueError("pages must be non-negative")
    if writes is not None:
        writes = np.asarray(writes)
        if writes.shape != pages.shape:
            raise ValueError(f"writes has shape {writes.shape}, pages {pages.shape}")
        writes = writes.astype(np.bool_, copy=False)
    if name.endswith((".npy", ".npy.zst")):
        compressed = name.endswith(".zst")
        _write_npy(name, pages.astype(np.uint64, copy=False), compressed)
        mask = _mask_name_for(name)
        # A mask left from an earlier trace of this name would be read back with this one.
        for stale in (mask, mask[: -len(".zst")] if compressed else mask + ".zst"):
            if os.path.exists(stale):
                os.remove(stale)
        if writes is not None:
            _write_npy(mask, writes.view(np.uint8), compressed)
    elif name.endswith(".csv"):
        _write_csv(name, pages, writes)
    else:
        raise ValueError(f"{name}: save_trace writes .npy, .npy.zst or .csv files")


def _mask_name_for(name: str) -> str:
    compressed = name.endswith(".zst")
    stem = name[: -len(".zst")] if compressed else name
    return stem[: -len(".npy")] + ".w.npy" + (".zst" if compressed else "")


def _write_npy(name: str, array: np.ndarray, compressed: bool) -> None:
    def write(raw) -> None:
        if not compressed:
            np.save(raw, array, allow_pickle=False)
            return
        with zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as fh:
            np.lib.format.write_array(fh, array, allow_pickle=False)

    atomic_write(name, write)  # whole or not at all: a killed write leaves no half trace


def _write_csv(name: str, pages: np.ndarray, writes: np.ndarray | None) -> None:
    # One str() per page: writing is not on any hot path, reading is.
    lines = map(str, pages.tolist())
    header = "page"
    if writes is not None:
        lines = map("{},{}".format, pages.tolist(), np.where(writes, "w", "r").tolist())
        header = "page,op"
    atomic_write(name, header + "\n" + "\n".join(lines) + "\n")


# -- page-number helpers ------------------------------------------------------------------------


def compact_pages(pages: np.ndarray, order: str = "first_touch") -> tuple[np.ndarray, np.ndarray]:
    """Renumber pages densely: ``(dense, originals)`` with ``originals[dense] == pages``.

    :param pages: page numbers (int64), possibly sparse (virtual addresses >> 12 are huge).
    :param order: ``"first_touch"`` numbers pages 0, 1, ... in the order the trace first touches
        them; ``"address"`` numbers them in increasing page order, which keeps neighbours
        neighbours (what large pages and sequential prefetching see).
    :returns: ``dense`` (int32 when it fits, else int64) and ``originals`` (int64, one per
        distinct page).
    """
    if order not in ("first_touch", "address"):
        raise ValueError(f"order must be 'first_touch' or 'address', not {order!r}")
    pages = np.asarray(pages, np.int64)
    if len(pages) == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    # Work on runs of repeated pages: real traces touch the same page many times in a row, and
    # the sort and the searchsorted below are the expensive steps.
    run_values, run_starts = _run_starts(pages)
    originals = _sorted_unique(run_values)
    index_type = np.int32 if len(originals) <= np.iinfo(np.int32).max else np.int64
    run_ids = np.searchsorted(originals, run_values).astype(index_type)
    if order == "first_touch":
        first = np.full(len(originals), len(run_values), np.int64)
        np.minimum.at(first, run_ids, np.arange(len(run_values)))
        by_first = np.argsort(first)
        rank = np.empty(len(originals), index_type)
        rank[by_first] = np.arange(len(originals), dtype=index_type)
        run_ids = rank[run_ids]
        originals = originals[by_first]
    run_lengths = np.diff(np.append(run_starts, len(pages)))
    return np.repeat(run_ids, run_lengths), originals


def _run_starts(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The page of each run of equal consecutive pages, and where each run starts."""
    starts = np.empty(len(pages), np.bool_)
    starts[:1] = True
    np.not_equal(pages[1:], pages[:-1], out=starts[1:])
    where = np.flatnonzero(starts)
    return pages[where], where


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` without its overhead: np.unique is several times slower than sort + diff on
    tens of millions of int64 here."""
    ordered = np.sort(values)
    keep = np.empty(len(ordered), np.bool_)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
