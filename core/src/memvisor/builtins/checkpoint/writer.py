"""The staged block writer: pages in, one checkpoint file out, written front to back.

Pages arrive in calls of :meth:`CheckpointWriter.add_pages` (data), :meth:`add_zero_pages` and
:meth:`add_records`. Data pages are split into *page blocks* of at most ``block_pages`` pages;
each page block is compressed on its own (on a pool of threads: zstandard releases the GIL) into
a frame and appended, in call order, to the staging buffer. When the buffer holds at least
``buffer_bytes`` it is sealed as one *storage block* (its checksum is taken) and written with
one write call. :meth:`close` writes the metadata (index and page map) and the trailer, syncs
the file and renames it from its temporary name to the final one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zstandard

from memvisor import PAGE_SIZE
from memvisor.builtins.checkpoint import layout as L
from memvisor.files import temp_file
from memvisor.identity import Identities, is_identities, materialise, size_model

DEFAULT_LEVEL = 1
"""zstd level of a new checkpoint (measured: level 3 gains about 3% of size for 10-30% more time)."""
DEFAULT_BLOCK_PAGES = 64
"""Pages per page block unless told otherwise (the unit of compression and of lazy restore)."""
MIN_LEVEL = -7
"""Fastest zstd level accepted (negative levels trade ratio for speed)."""
DEFAULT_BUFFER_BYTES = 4 << 20
"""The staging buffer unless told otherwise: one storage block is written per full buffer."""
INFLIGHT_BYTES = 32 << 20
"""Page-block bytes queued for compression at most (more: add_pages waits)."""


def default_threads() -> int:
    """Compression threads by default: the CPUs this process may run on, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def as_gpps(gpps, n: int | None = None) -> np.ndarray:
    """Page numbers as an int64 array from an array, a sequence, a ``range``, or an int.

    An int is the first of ``n`` consecutive pages (``n`` is required then).
    """
    if isinstance(gpps, (int, np.integer)) and not isinstance(gpps, bool):
        if n is None:
            raise TypeError("a first page number needs a page count")
        return np.arange(int(gpps), int(gpps) + n, dtype=np.int64)
    if isinstance(gpps, range):
        return np.arange(gpps.start, gpps.stop, gpps.step, dtype=np.int64)
    arr = np.asarray(gpps)
    if arr.ndim != 1:
        raise ValueError(f"page numbers must be one-dimensional, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"page numbers must be integers, got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("page number out of range")
    return arr.astype(np.int64, copy=False)


def as_pages(data, page_size: int) -> np.ndarray:
    """Page contents as a ``(n, page_size)`` uint8 array viewing ``data`` (no copy)."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        raw = data.reshape(-1).view(np.uint8)
    else:
        raw = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    if raw.size % page_size:
        raise ValueError(f"page data of {raw.size} bytes is not a whole number of {page_size}-byte pages")
    return raw.reshape(-1, page_size)


def nonzero_pages(pages: np.ndarray) -> np.ndarray:
    """Which pages of a ``(n, page_size)`` uint8 array are not all zeros (vectorised)."""
    return pages.view(np.uint64).any(axis=1)


def _discard(fd: int, tmp: str) -> None:
    """Close and remove a temporary file (the finalizer of an unfinished writer)."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


class CheckpointWriter:
    """Write a checkpoint file: a context manager that streams storage blocks and never seeks.

    Usage::

        with CheckpointWriter("vm.ckpt", vm_pages) as w:
            w.add_pages(range(0, 64), data)            # 64 pages of bytes (any buffer)
            w.add_zero_pages(np.arange(64, 1024))
            w.add_records("disk-ref", gpps, payloads)  # another plugin's cheaper description

    The file is written under a temporary name in the destination directory (mode 0600: guest
    memory is private) and renamed to ``path`` by :meth:`close` once complete and synced, so
    ``path`` never holds a partial file. On an exception inside the ``with`` block (or after
    :meth:`abort`) the temporary file is removed and ``path`` is left as it was.

    Every page may be added once. Writing is not thread-safe: one thread adds pages.

    :param path: the final checkpoint file.
    :param vm_pages: pages in the VM (guest-physical pages ``0 .. vm_pages-1``).
    :param codec: ``"zstd"`` (default) or ``"none"``. A page block that zstd does not shrink is
        stored uncompressed whatever the codec.
    :param level: zstd level (default 1).
    :param block_pages: pages per page block, the unit of decompression and of lazy restore.
    :param buffer_bytes: staging buffer size: a storage block is written once it holds at least
        this many bytes (it then holds at most one page block more).
    :param key: key material (bytes) or a key-file path: the file gets a keyed BLAKE2b MAC and
        readers given the key refuse a forged file.
    :param threads: compression threads (default: the CPUs available, at most 8; 1 compresses
        in the calling thread).
    :param page_size: bytes per page (default :data:`memvisor.PAGE_SIZE`).
    :param detect_zero: store pages of zeros given to :meth:`add_pages` in the page map rather
        than as data (default True).
    :param contents: ``"identity"`` for a checkpoint of an identity-model VM
        (:mod:`memvisor.identity`): :meth:`add_pages` takes :class:`~memvisor.identity.Identities`,
        stores them as identity page blocks (literal pages as bytes), and the file says so.

    Counters (read them any time, final after :meth:`close`): ``write_calls``, ``bytes_in``
    (bytes of pages given to :meth:`add_pages`), ``bytes_out`` (bytes written to the file; for
    an identity checkpoint, what the bytes model would have written: identity page blocks count
    with their modelled compressed size), ``file_bytes_out`` (bytes written to the file, always),
    ``pages`` (every page described), ``data_pages``, ``zero_pages``, ``record_pages``,
    ``page_blocks``, ``storage_blocks``. A storage block is sealed once its frames reach
    ``buffer_bytes`` counted as ``bytes_out`` counts them, so an identity checkpoint makes the
    write calls of the bytes one.
    """

    def __init__(
        self,
        path,
        vm_pages: int,
        *,
        codec: str = "zstd",
        level: int = DEFAULT_LEVEL,
        block_pages: int = DEFAULT_BLOCK_PAGES,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        key=None,
        threads: int | None = None,
        page_size: int = PAGE_SIZE,
        detect_zero: bool = True,
        contents: str = "bytes",
    ):
        page_size = int(page_size)
        if page_size < L.MIN_PAGE_SIZE or page_size > L.MAX_PAGE_SIZE or page_size & (page_size - 1):
            raise ValueError(
                f"page_size must be a power of two in [{L.MIN_PAGE_SIZE}, {L.MAX_PAGE_SIZE}], got {page_size}"
            )
        vm_pages = int(vm_pages)
        if vm_pages < 0 or vm_pages * page_size > L.MAX_VM_BYTES:
            raise ValueError(f"vm_pages must be in [0, {L.MAX_VM_BYTES // page_size}], got {vm_pages}")
        if codec not in L.CODECS:
            raise ValueError(f"unknown codec {codec!r}; known: {', '.join(L.CODECS)}")
        level = int(level)
        if not MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level {level} out of range")
        block_pages = int(block_pages)
        if block_pages < 1 or block_pages * page_size > L.MAX_PAGE_BLOCK_BYTES:
            raise ValueError(f"block_pages must be in [1, {L.MAX_PAGE_BLOCK_BYTES // page_size}], got {block_pages}")
        buffer_bytes = int(buffer_bytes)
        if not 1 <= buffer_bytes <= L.MAX_BUFFER_BYTES:
            raise ValueError(f"buffer_bytes must be in [1, {L.MAX_BUFFER_BYTES}], got {buffer_bytes}")
        if contents not in ("bytes", "identity"):
            raise ValueError(f"contents must be 'bytes' or 'identity', got {contents!r}")
        if contents == "identity" and page_size != PAGE_SIZE:
            raise ValueError(f"identity checkpoints have {PAGE_SIZE}-byte pages")
        threads = default_threads() if threads is None else int(threads)
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        material = L.resolve_key(key)

        self.path = Path(path)
        self.vm_pages, self.page_size, self.block_pages = vm_pages, page_size, block_pages
        self.codec, self.level, self.buffer_bytes, self.threads = codec, level, buffer_bytes, threads
        self.detect_zero = bool(detect_zero)
        self.contents = contents
        self.keyed = material is not None
        self._key64 = L.mac_key(material) if material is not None else None
        self._checksum_size = L.CHECKSUM_KEYED if self.keyed else L.CHECKSUM_PLAIN
        self._codec_id = L.CODECS[codec]
        self._file_id = os.urandom(16)
        self._header = L.pack_header(
            flags=(L.FLAG_MAC if self.keyed else 0) | (L.FLAG_IDENTITY if contents == "identity" else 0),
            page_size=page_size,
            vm_pages=vm_pages,
            codec=self._codec_id,
            level=level,
            checksum_size=self._checksum_size,
            block_pages=block_pages,
            file_id=self._file_id,
        )

        self.write_calls = self.bytes_in = self.file_bytes_out = 0
        self._modelled_extra = self._pending_extra = 0  # bytes_out - file_bytes_out: flushed, in the buffer
        self._mfill = 0  # bytes of the storage block being filled, counted as bytes_out counts them
        self.pages = self.data_pages = self.zero_pages = self.record_pages = 0
        self.page_blocks = self.storage_blocks = 0

        # Staging buffer: header (first write only) + the storage block being filled. A block is
        # sealed when it reaches buffer_bytes, so it never exceeds buffer_bytes + one frame.
        max_frame = block_pages * page_size
        self._buffer = bytearray(L.HEADER_SIZE + buffer_bytes + max_frame)
        self._view = memoryview(self._buffer)
        self._view[: L.HEADER_SIZE] = self._header
        self._fill = self._block_start = L.HEADER_SIZE
        self._file_pos = 0  # bytes already in the file

        self._sblocks: list[tuple] = []
        self._pblocks: list[tuple] = []
        self._ranges: list[np.ndarray] = []
        self._n_ranges = 0
        self._sb_first_pblock = 0
        self._zero: list[np.ndarray] = []
        self._records: dict[str, list[tuple]] = {}
        self._sections: dict[bytes, bytes] = {}  # optional metadata sections, by tag
        self._seen = np.zeros((vm_pages + 7) // 8, np.uint8)

        self._local = threading.local()
        self._inflight: deque = deque()
        self._max_inflight = max(4 * threads, INFLIGHT_BYTES // max_frame)
        self._submitted = self._appended = 0
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="ckpt-zstd") if threads > 1 else None

        directory = self.path.parent
        try:
            fd, tmp = temp_file(self.path)
        except OSError as e:
            self._shutdown()
            raise L.CheckpointError(self.path, f"cannot create a file in {directory}: {e.strerror or e}") from e
        self._fd, self._tmp = fd, Path(tmp)
        self._finalizer = weakref.finalize(self, _discard, fd, tmp)
        self._state = "open"

    # --- context manager ----------------------------------------------------------------------

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def bytes_out(self) -> int:
        """Bytes written so far (modelled ones for identity page blocks: see the class doc)."""
        return self.file_bytes_out + self._modelled_extra

    @property
    def temp_path(self) -> Path:
        """The temporary file being written (renamed to :attr:`path` by :meth:`close`)."""
        return self._tmp

    # --- adding pages -------------------------------------------------------------------------

    def add_pages(self, gpps, data) -> None:
        """Add pages stored as data.

        :param gpps: the pages: the first page number (int) of consecutive pages, a ``range``
            or an array of strictly ascending page numbers.
        :param data: their contents, ``len(gpps) * page_size`` bytes: any buffer (bytes,
            memoryview, numpy array of any shape). It is copied before the call returns, so the
            caller may reuse it.

        The pages are split, in order, into page blocks of at most ``block_pages`` pages (pages
        of zeros first go to the page map when ``detect_zero``); each page block is compressed
        on its own.

        On an identity checkpoint ``data`` may be :class:`~memvisor.identity.Identities`: their
        pages go to identity page blocks (literal pages, whose bytes only this process holds, to
        page blocks of bytes).
        """
        if is_identities(data):
            self._add_identities(gpps, data)
            return
        self._add_pages(gpps, data, copy=True)

    def _add_identities(self, gpps, contents: Identities) -> None:
        self._check_open()
        if self.contents != "identity":
            raise ValueError("identity contents given to a checkpoint of bytes (contents='bytes')")
        n = len(contents)
        g = as_gpps(gpps, n)
        if len(g) != n:
            raise ValueError(f"{len(g)} page numbers for {n} pages of contents")
        if n == 0:
            return
        if n > 1 and not bool((np.diff(g) > 0).all()):
            raise ValueError("the page numbers of one add_pages call must be strictly ascending")
        self._claim(g, ascending=True)
        self.bytes_in += n * self.page_size
        self.pages += n
        keep = np.arange(n)
        if self.detect_zero:
            zero = contents.is_zero()
            if zero.any():
                self._add_zero_ranges(L.ranges_of(g[zero]), int(zero.sum()))
            keep = np.flatnonzero(~zero)
        self.data_pages += len(keep)
        literal = contents.literal()[keep]
        bp = self.block_pages
        rows = keep[literal]  # bytes only this process holds: stored as bytes
        for s in range(0, len(rows), bp):
            idx = rows[s : s + bp]
            self._submit(materialise(contents[idx]), L.ranges_of(g[idx]))
        rows = keep[~literal]
        if len(rows):
            self._submit_identities(g[rows], contents[rows])

    def _submit_identities(self, gpps: np.ndarray, contents: Identities) -> None:
        """Identity page blocks of ``block_pages`` pages each: compressed here (12 bytes a page)
        and appended in order; their modelled sizes come from one vectorised pass."""
        self._drain(0)  # frames of bytes submitted before them go first
        bp, n = self.block_pages, len(contents)
        starts = np.arange(0, n, bp)
        if self._codec_id == L.CODEC_NONE:
            modelled = np.diff(np.append(starts, n)) * self.page_size
        else:
            modelled = size_model(self.level, bp).blocks_bytes(contents, starts)
        records = memoryview(contents.to_records())
        width = L.IDENTITY_BYTES
        # Runs of consecutive pages, cut at block boundaries too: each block's ranges, no loop.
        cut = np.flatnonzero((np.diff(gpps) != 1) | (np.arange(1, n) % bp == 0)) + 1
        heads = np.concatenate(([0], cut))
        runs = np.empty(len(heads), L.RANGE_DTYPE)
        runs["start"] = gpps[heads]
        runs["count"] = np.diff(np.append(heads, n))
        by_block = np.split(runs, np.searchsorted(heads, starts[1:]))
        compress = self._compressor().compress
        for i, s in enumerate(starts.tolist()):
            e = min(n, s + bp)
            self._submitted += 1
            self._append(compress(records[s * width : e * width]), L.CODEC_IDENTITY, by_block[i], e - s,
                         int(modelled[i]))

    def _add_pages(self, gpps, data, *, copy: bool, nonzero: np.ndarray | None = None) -> int:
        """:meth:`add_pages`; with ``copy=False`` page blocks may be views of ``data``, which
        must then stay unchanged until :meth:`_wait` for the returned sequence number.
        ``nonzero``: the pages that are not all zeros, when the caller already knows them."""
        self._check_open()
        pages = as_pages(data, self.page_size)
        n = len(pages)
        g = as_gpps(gpps, n)
        if len(g) != n:
            raise ValueError(f"{len(g)} page numbers for {n} pages of data")
        if n == 0:
            return self._submitted
        if n > 1 and not bool((np.diff(g) > 0).all()):
            raise ValueError("the page numbers of one add_pages call must be strictly ascending")
        self._claim(g, ascending=True)
        self.bytes_in += n * self.page_size
        self.pages += n
        if self.detect_zero:
            if nonzero is None:
                nonzero = nonzero_pages(pages)
            keep = np.flatnonzero(nonzero)
            if len(keep) < n:
                self._add_zero_ranges(L.ranges_of(g[~nonzero]), n - len(keep))
        else:
            keep = np.arange(n)
        self.data_pages += len(keep)
        bp = self.block_pages
        for s in range(0, len(keep), bp):
            idx = keep[s : s + bp]
            a, b = int(idx[0]), int(idx[-1]) + 1
            if b - a == len(idx):  # consecutive pages: a slice
                block = pages[a:b].copy() if copy else pages[a:b]
            else:
                block = pages[idx]
            self._submit(block, L.ranges_of(g[idx]))
        return self._submitted

    def add_zero_pages(self, gpps) -> None:
        """Add pages of zeros: they go to the page map, not to the data.

        :param gpps: page numbers (array, sequence or ``range``), each not added before.
        """
        self._check_open()
        g = as_gpps(gpps)
        if len(g) == 0:
            return
        g = self._claim(g, ascending=False)
        self.pages += len(g)
        self._add_zero_ranges(L.ranges_of(g), len(g))

    def add_records(self, kind: str, gpps, payloads) -> None:
        """Add pages that a plugin describes more cheaply than by their contents.

        The core stores the kind name and an opaque payload per page, and never interprets them;
        restoring such pages needs a resolver for the kind (see :func:`restore_image`).

        :param kind: the record kind, 1-64 characters of ``A-Z a-z 0-9 . _ : / -`` starting with a
            letter or digit, not ``missing``, ``zero`` or ``data`` (e.g. ``"disk-ref"``).
        :param gpps: page numbers (array, sequence or ``range``), each not added before.
        :param payloads: one payload per page, at most ``page_size`` bytes each: a sequence of
            bytes-like values, a ``(n, width)`` uint8 array, or a 1-D numpy array whose items are
            the payloads (e.g. a structured array of ``(disk, block)`` pairs).
        """
        self._check_open()
        if not isinstance(kind, str) or not L.KIND_NAME_RE.match(kind) or kind in L.RESERVED_KINDS:
            raise ValueError(f"bad record kind name {kind!r}")
        g = as_gpps(gpps)
        width, lengths, blob = _payloads(payloads, len(g), self.page_size)
        if len(g) == 0:
            return
        self._claim(g, ascending=False)
        self._records.setdefault(kind, []).append((g, width, lengths, blob))
        self.pages += len(g)
        self.record_pages += len(g)

    def add_section(self, tag: str, payload) -> None:
        """Add an optional metadata section: data about the checkpoint that is not page
        contents (a hypervisor's device state, say), covered by the metadata checksum and the
        MAC like the page map. Readers that do not know ``tag`` skip it
        (:meth:`CheckpointReader.section` returns it to those that do).

        :param tag: 4 ASCII characters, the first a lowercase letter (an optional section),
            each tag once per file.
        :param payload: bytes-like, at most :data:`~memvisor.builtins.checkpoint.layout.MAX_OPTIONAL_SECTION` bytes.
        """
        self._check_open()
        raw = tag.encode("ascii") if isinstance(tag, str) else bytes(tag)
        if not L.OPTIONAL_TAG_RE.match(raw) or raw in self._sections or raw == L.TAG_MODELLED:
            raise ValueError(f"bad, repeated or reserved optional section tag {tag!r}")
        payload = bytes(payload)
        if len(payload) > L.MAX_OPTIONAL_SECTION:
            raise ValueError(f"optional section {tag!r} of {len(payload)} bytes exceeds {L.MAX_OPTIONAL_SECTION}")
        self._sections[raw] = payload

    # --- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"checkpoint writer for {self.path} is {self._state}")

    def _claim(self, g: np.ndarray, ascending: bool) -> np.ndarray:
        """Check that the pages are in the VM and new, and mark them; return them sorted."""
        if not ascending:
            g = np.sort(g)
            if len(g) > 1 and not bool((np.diff(g) > 0).all()):
                raise ValueError("duplicate page numbers in one call")
        if g[0] < 0 or g[-1] >= self.vm_pages:
            raise ValueError(f"page numbers must be in [0, {self.vm_pages}), got {g[0]}..{g[-1]}")
        byte, bit = g >> 3, (np.uint8(1) << (g & 7).astype(np.uint8))
        if bool((self._seen[byte] & bit).any()):
            dup = g[(self._seen[byte] & bit) != 0][0]
            raise ValueError(f"page {dup} was already added to the checkpoint")
        np.bitwise_or.at(self._seen, byte, bit)
        return g

    def _add_zero_ranges(self, ranges: np.ndarray, n: int) -> None:
        self._zero.append(ranges)
        self.zero_pages += n

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(
                level=self.level, write_checksum=False, write_content_size=True
            )
        return c

    def _compress(self, block: np.ndarray) -> tuple[memoryview | bytes, int]:
        """One page block to one frame (run on a pool thread)."""
        raw = memoryview(block).cast("B")
        if self._codec_id == L.CODEC_NONE:
            return raw, L.CODEC_NONE
        frame = self._compressor().compress(raw)
        if len(frame) >= len(raw):
            return raw, L.CODEC_NONE
        return frame, L.CODEC_ZSTD

    def _submit(self, block: np.ndarray, ranges: np.ndarray) -> None:
        n = len(block)
        self._submitted += 1
        if self._executor is None:
            frame, codec = self._compress(block)
            self._append(frame, codec, ranges, n)
            return
        self._inflight.append((self._executor.submit(self._compress, block), ranges, n))
        self._drain(self._max_inflight)

    def _wait(self, seq: int) -> None:
        """Wait until the first ``seq`` submitted page blocks are in the staging buffer."""
        q = self._inflight
        while self._appended < seq and q:
            future, ranges, n = q.popleft()
            frame, codec = future.result()
            self._append(frame, codec, ranges, n)

    def _drain(self, keep: int) -> None:
        """Append finished frames in order; wait until at most ``keep`` are in flight."""
        q = self._inflight
        while q and (len(q) > keep or q[0][0].done()):
            future, ranges, n = q.popleft()
            frame, codec = future.result()
            self._append(frame, codec, ranges, n)

    def _append(self, frame, codec: int, ranges: np.ndarray, n: int, modelled: int | None = None) -> None:
        size = len(frame)
        modelled = size if modelled is None else int(modelled)
        self._view[self._fill : self._fill + size] = frame
        self._pblocks.append((self._fill - self._block_start, size, self._n_ranges, len(ranges), n, codec, modelled))
        self._ranges.append(ranges)
        self._n_ranges += len(ranges)
        self._fill += size
        self._mfill += modelled
        self._pending_extra += modelled - size
        self.page_blocks += 1
        self._appended += 1
        if self._fill - self._block_start >= self.buffer_bytes or self._mfill >= self.buffer_bytes:
            self._seal()
            self._flush()

    def _seal(self) -> None:
        """End the storage block being filled: record its index entry and checksum."""
        length = self._fill - self._block_start
        if length == 0:
            return
        digest = L.block_checksum(self._view[self._block_start : self._fill], self._checksum_size)
        self._sblocks.append(
            (
                self._file_pos + self._block_start,
                length,
                self._sb_first_pblock,
                len(self._pblocks) - self._sb_first_pblock,
                digest.ljust(L.CHECKSUM_FIELD, b"\0"),
            )
        )
        self._sb_first_pblock = len(self._pblocks)
        self._block_start = self._fill
        self._mfill = 0
        self.storage_blocks += 1

    def _flush(self, *more) -> None:
        self._write_all([self._view[: self._fill], *more])
        self._file_pos += self._fill
        self._fill = self._block_start = 0
        self._modelled_extra += self._pending_extra
        self._pending_extra = 0

    def _write_all(self, parts) -> None:
        """Write buffers in order, one system call for all (more only after a short write)."""
        parts = [memoryview(p).cast("B") for p in parts if len(p)]
        while parts:
            try:
                n = os.writev(self._fd, parts) if len(parts) > 1 else os.write(self._fd, parts[0])
            except OSError as e:
                raise L.CheckpointError(self.path, f"cannot write: {e.strerror or e}",
                                        offset=self.file_bytes_out) from e
            self.write_calls += 1
            self.file_bytes_out += n
            while parts and n >= len(parts[0]):
                n -= len(parts[0])
                parts.pop(0)
            if n:
                parts[0] = parts[0][n:]

    def _metadata(self) -> bytes:
        sblocks = np.array(self._sblocks, L.SBLOCK_DTYPE) if self._sblocks else np.empty(0, L.SBLOCK_DTYPE)
        pblocks = np.zeros(len(self._pblocks), L.PBLOCK_DTYPE)
        modelled = np.zeros(len(self._pblocks), "<u8")
        if self._pblocks:
            cols = np.array(self._pblocks, np.uint64).T
            for name, col in zip(("rel_offset", "stored_length", "first_range", "n_ranges", "n_pages", "codec"), cols):
                pblocks[name] = col
            modelled[:] = cols[6]
        ranges = np.concatenate(self._ranges) if self._ranges else np.empty(0, L.RANGE_DTYPE)
        zero = _merge_ranges(np.concatenate(self._zero) if self._zero else np.empty(0, L.RANGE_DTYPE))
        records = [_pack_kind(kind, chunks) for kind, chunks in self._records.items()]
        extra = [(L.TAG_MODELLED, modelled.tobytes())] if self.contents == "identity" else []
        return L.pack_metadata(sblocks, pblocks, ranges, zero, records, extra + list(self._sections.items()))

    # --- finishing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Finish the file: last storage block, metadata, trailer, fsync, rename, fsync dir.

        Idempotent. On failure the temporary file is removed, the final path is left as it was,
        and the error is raised (a failed write, fsync or rename as :class:`CheckpointError`).
        """
        if self._state != "open":
            if self._state == "closed":
                return
            raise ValueError(f"checkpoint writer for {self.path} was aborted")
        try:
            self._drain(0)
            self._seal()
            meta = self._metadata()
            meta_offset = self._file_pos + self._fill
            trailer = L.pack_trailer(
                header=self._header, meta=meta, meta_offset=meta_offset, file_id=self._file_id, key64=self._key64
            )
            self._flush(meta, trailer)
            os.fsync(self._fd)
            os.close(self._fd)
            self._finalizer.detach()
            try:
                os.replace(self._tmp, self.path)
            except BaseException:
                _discard(-1, str(self._tmp))
                raise
            fsync_dir(self.path.parent)
            self._state = "closed"
        except OSError as e:
            self.abort()
            raise L.CheckpointError(self.path, f"cannot finish the file: {e.strerror or e}") from e
        except BaseException:
            self.abort()
            raise
        finally:
            self._shutdown()

    def abort(self) -> None:
        """Give up: remove the temporary file; the final path is left untouched. Idempotent."""
        if self._state == "closed":
            return
        self._state = "aborted"
        for future, _, _ in self._inflight:
            future.cancel()
        self._inflight.clear()
        self._shutdown()
        self._finalizer()

    def _shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (fsync the directory; no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _merge_ranges(r: np.ndarray) -> np.ndarray:
    """Sort ranges and merge the adjacent ones (they never overlap: pages are claimed once)."""
    if len(r) <= 1:
        return r
    r = r[np.argsort(r["start"], kind="stable")]
    ends = r["start"] + r["count"]
    new = np.concatenate(([True], r["start"][1:] != ends[:-1]))
    heads = np.flatnonzero(new)
    out = np.empty(len(heads), L.RANGE_DTYPE)
    out["start"] = r["start"][heads]
    out["count"] = np.add.reduceat(r["count"], heads)
    return out


def _payloads(payloads, n: int, page_size: int) -> tuple[int, np.ndarray, bytes]:
    """Normalise payloads to (width or 0 for variable, lengths, concatenated bytes)."""
    if isinstance(payloads, np.ndarray) and payloads.dtype != object:
        arr = np.ascontiguousarray(payloads)
        if arr.ndim == 2 and arr.dtype == np.uint8:
            width = arr.shape[1]
        elif arr.ndim == 1:
            width = arr.dtype.itemsize
        else:
            raise ValueError("a payload array must be (n, width) uint8 or one-dimensional")
        if len(arr) != n:
            raise ValueError(f"{len(arr)} payloads for {n} pages")
        if width > page_size:
            raise ValueError(f"record payloads of {width} bytes exceed the page size {page_size}")
        return width, np.full(n, width, np.int64), arr.tobytes()
    items = [bytes(memoryview(p).cast("B")) for p in payloads]
    if len(items) != n:
        raise ValueError(f"{len(items)} payloads for {n} pages")
    lengths = np.array([len(p) for p in items], np.int64)
    if n and int(lengths.max()) > page_size:
        raise ValueError(f"a record payload of {int(lengths.max())} bytes exceeds the page size {page_size}")
    width = int(lengths[0]) if n and bool((lengths == lengths[0]).all()) and lengths[0] > 0 else 0
    return width, lengths, b"".join(items)


def _pack_kind(kind: str, chunks: list[tuple]) -> tuple:
    """One kind's records, sorted by page: (name, gpps, width, offsets or None, blob)."""
    gpps = np.concatenate([c[0] for c in chunks])
    lengths = np.concatenate([c[2] for c in chunks])
    blob = np.frombuffer(b"".join(c[3] for c in chunks), np.uint8)
    order = np.argsort(gpps, kind="stable")
    widths = {c[1] for c in chunks}
    if len(widths) == 1 and 0 not in widths:
        width = widths.pop()
        data = blob.reshape(-1, width)[order].tobytes()
        return kind, gpps[order], width, None, data
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    r = np.empty(len(order), L.RANGE_DTYPE)
    r["start"], r["count"] = starts[order], lengths[order]
    data = blob[L.pages_of(r)].tobytes()
    offsets = np.concatenate(([0], np.cumsum(lengths[order]))).astype(np.uint64)
    return kind, gpps[order], 0, offsets, data
