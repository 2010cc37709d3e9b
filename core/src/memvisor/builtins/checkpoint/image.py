"""Stop-the-world save and eager restore of raw memory images.

A raw memory image is a file of ``vm_pages * page_size`` bytes whose offset is the
guest-physical address: a Firecracker memory snapshot, a QEMU ``pmemsave`` dump.
:func:`save_image` turns one into a checkpoint (zero pages into the page map, the rest
compressed in page blocks); :func:`restore_image` writes it back byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs
import numpy as np

from memvisor import PAGE_SIZE
from memvisor.builtins.checkpoint.layout import CheckpointError
from memvisor.builtins.checkpoint.reader import CheckpointReader
from memvisor.builtins.checkpoint.writer import (
    DEFAULT_BLOCK_PAGES,
    CheckpointWriter,
    as_pages,
    fsync_dir,
    nonzero_pages,
)
from memvisor.files import open_regular, temp_file
from memvisor.identity import is_identities, materialise

Progress = Callable[[int, int], None]
"""``progress(done_pages, total_pages)``, called after each chunk."""

Resolver = Callable[[str, np.ndarray, list], object]
"""``resolve(kind, gpps, payloads) -> data``: the contents (``len(gpps) * page_size`` bytes, any
buffer) of pages stored as records of ``kind``."""

DEFAULT_CHUNK_BYTES = 16 << 20
RESOLVE_BATCH = 4096
PREFETCH = 2
"""Chunks read ahead of the one being compressed (each by its own thread)."""
RING = PREFETCH + 2


@attrs.frozen
class TransferStats:
    """What :func:`save_image` or :func:`restore_image` did (the same figures either way, as
    ``--json`` on save and restore prints them).

    :ivar pages: pages in the image (every page is described by the checkpoint).
    :ivar zero_pages: pages of zeros (in the page map on save; holes of the image on restore).
    :ivar bytes_in: bytes read (from the image on save, from the checkpoint on restore).
    :ivar bytes_out: bytes written (the checkpoint file on save; the image, holes excluded, on
        restore).
    :ivar write_calls: write calls on the file written.
    :ivar read_calls: read calls on the file read (the three of opening a checkpoint included).
    :ivar seconds: wall-clock time, fsync and rename included.
    """

    pages: int
    zero_pages: int
    bytes_in: int
    bytes_out: int
    write_calls: int
    read_calls: int
    seconds: float

    def to_json(self) -> dict:
        """The figures as a JSON-able dict."""
        return attrs.asdict(self)


SaveStats = TransferStats
"""What :func:`save_image` returns."""

RestoreStats = TransferStats
"""What :func:`restore_image` returns."""


def save_image(
    image_path, out_path, *, progress: Progress | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, **writer_opts
) -> SaveStats:
    """Save a raw memory image as a checkpoint (stop-the-world save).

    The image is read front to back in chunks of ``chunk_bytes`` (one read call each) by two
    prefetch threads into a ring of reused buffers, so that reading overlaps compression; pages of
    zeros go to the page map (found vectorised), the others are compressed in page blocks on the
    writer's threads.

    :param image_path: the raw image; its size must be a whole number of pages.
    :param out_path: the checkpoint to write (atomically: temporary file, fsync, rename).
    :param progress: optional ``progress(done_pages, total_pages)`` after each chunk.
    :param chunk_bytes: bytes read per read call.
    :param writer_opts: options of :class:`CheckpointWriter` (``codec``, ``level``,
        ``block_pages``, ``buffer_bytes``, ``key``, ``threads``, ``page_size``).
    """
    start = time.perf_counter()
    page_size = int(writer_opts.get("page_size", PAGE_SIZE))
    image_path = Path(image_path)
    f = os.fdopen(open_regular(image_path, "memory image", CheckpointError), "rb", buffering=0)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size % page_size or not size:
            raise CheckpointError(image_path, f"image of {size} bytes is not a whole, positive number of "
                                              f"{page_size}-byte pages")
        vm_pages = size // page_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        block_pages = int(writer_opts.get("block_pages", DEFAULT_BLOCK_PAGES))
        detect_zero = bool(writer_opts.get("detect_zero", True))
        chunk_pages = max(1, int(chunk_bytes) // page_size)
        chunk_pages = max(block_pages, chunk_pages - chunk_pages % block_pages)
        rows = min(chunk_pages, max(vm_pages, 1))
        chunks = -(-vm_pages // rows)
        # A ring of chunk buffers. Prefetch threads read chunks ahead (one positional read each)
        # and find their zero pages; page blocks are compressed from views of a chunk, which is
        # read over again only once its page blocks are in the writer's staging buffer.
        ring = [np.empty((rows, page_size), np.uint8) for _ in range(RING)]
        done_seq = [0] * RING
        read_calls = 0
        fd = f.fileno()

        def fill(k: int) -> tuple[int, np.ndarray | None]:
            first = k * rows
            n = min(rows, vm_pages - first)
            view, offset, calls = memoryview(ring[k % RING][:n]).cast("B"), first * page_size, 0
            while len(view):
                try:
                    got = os.preadv(fd, [view], offset)
                except OSError as e:
                    raise CheckpointError(image_path, f"read error: {e.strerror or e}", offset=offset) from e
                calls += 1
                if not got:
                    raise CheckpointError(image_path, f"image shrank while being read (at offset {offset})")
                view, offset = view[got:], offset + got
            return calls, nonzero_pages(ring[k % RING][:n]) if detect_zero else None

        with (
            ThreadPoolExecutor(PREFETCH, thread_name_prefix="ckpt-read") as pool,
            CheckpointWriter(out_path, vm_pages, **writer_opts) as w,
        ):
            pending: deque = deque()

            def prefetch(k: int) -> None:
                w._wait(done_seq[k % RING])  # the slot's previous chunk is compressed
                pending.append(pool.submit(fill, k))

            for k in range(min(PREFETCH, chunks)):
                prefetch(k)
            for k in range(chunks):
                calls, nonzero = pending.popleft().result()
                read_calls += calls
                first = k * rows
                n = min(rows, vm_pages - first)
                done_seq[k % RING] = w._add_pages(first, ring[k % RING][:n], copy=False, nonzero=nonzero)
                if k + PREFETCH < chunks:
                    prefetch(k + PREFETCH)
                if progress is not None:
                    progress(first + n, vm_pages)
            if not chunks and progress is not None:
                progress(0, 0)
    return SaveStats(
        pages=w.pages,
        zero_pages=w.zero_pages,
        bytes_in=w.bytes_in,
        bytes_out=w.bytes_out,
        write_calls=w.write_calls,
        read_calls=read_calls,
        seconds=time.perf_counter() - start,
    )


class _ImageOut:
    """Writes page contents into a raw image file: one ``pwrite`` per run of consecutive pages."""

    def __init__(self, fd: int, page_size: int):
        self.fd, self.page_size = fd, page_size
        self.write_calls = self.bytes_out = 0

    def put(self, gpps: np.ndarray, data: np.ndarray) -> None:
        if len(gpps) == 0:
            return
        cut = np.flatnonzero(np.diff(gpps) != 1) + 1
        starts = np.concatenate(([0], cut)).tolist()
        ends = np.concatenate((cut, [len(gpps)])).tolist()
        for a, b in zip(starts, ends):
            view = memoryview(data[a:b]).cast("B")
            pos = int(gpps[a]) * self.page_size
            while len(view):
                n = os.pwrite(self.fd, view, pos)
                self.write_calls += 1
                self.bytes_out += n
                view, pos = view[n:], pos + n


def restore_image(
    ckpt_path,
    image_out_path,
    *,
    key=None,
    resolve: Resolver | None = None,
    allow_missing: bool = False,
    progress: Progress | None = None,
) -> RestoreStats:
    """Write a checkpoint back as a raw memory image, byte for byte (eager restore). A
    checkpoint of an identity-model VM is written as the bytes its identities name.

    Data pages are written where they belong, one write per run of consecutive pages; zero pages
    are holes of the (sparse) image file. The image is written under a temporary name in its
    directory and renamed when complete and synced.

    :param ckpt_path: the checkpoint.
    :param image_out_path: the raw image to write (replaced atomically if it exists).
    :param key: key material or key-file path: the checkpoint's MAC must check.
    :param resolve: ``resolve(kind, gpps, payloads) -> data`` for pages stored as records
        (called in batches, pages ascending); without it a checkpoint with records is refused
        with a :class:`CheckpointError` naming the kind.
    :param allow_missing: restore pages the checkpoint does not describe as zeros (else refuse).
    :param progress: optional ``progress(done_pages, total_pages)``.
    """
    start = time.perf_counter()
    out_path = Path(image_out_path)
    with CheckpointReader(ckpt_path, key=key) as r:
        ps, vm = r.page_size, r.vm_pages
        if r.record_kinds and resolve is None:
            kind = r.record_kinds[0]
            raise CheckpointError(
                r.path,
                f"{len(r.records(kind))} pages are records of kind {kind!r}, "
                f"which cannot be restored without a resolver for that kind",
            )
        missing = vm - r.data_pages - r.zero_pages - r.record_pages
        if missing and not allow_missing:
            raise CheckpointError(r.path, f"{missing} of {vm} pages are not in the checkpoint")
        _check_room(out_path, vm * ps, (r.data_pages + r.record_pages) * ps)
        try:
            fd, tmp = temp_file(out_path)
        except OSError as e:
            raise CheckpointError(out_path, f"cannot create the image: {e.strerror or e}") from e
        try:
            os.ftruncate(fd, vm * ps)
            out = _ImageOut(fd, ps)
            done = r.zero_pages + missing
            for _, gpps, data in r.iter_page_blocks():
                if is_identities(data):  # a checkpoint of an identity-model VM: its bytes
                    data = materialise(data)
                out.put(gpps, data)
                done += len(gpps)
                if progress is not None:
                    progress(done, vm)
            for kind in r.record_kinds:
                rs = r.records(kind)
                for s in range(0, len(rs), RESOLVE_BATCH):
                    gpps, payloads = rs.select(np.arange(s, min(s + RESOLVE_BATCH, len(rs))))
                    data = as_pages(resolve(kind, gpps, payloads), ps)
                    if len(data) != len(gpps):
                        raise ValueError(f"resolver for {kind!r} returned {len(data)} pages for {len(gpps)}")
                    out.put(gpps, data)
                    done += len(gpps)
                    if progress is not None:
                        progress(done, vm)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, out_path)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):  # the reader's errors are CheckpointErrors: this is the image
                raise CheckpointError(out_path, f"cannot write the image: {e.strerror or e}") from e
            raise
        fsync_dir(out_path.parent)
        return RestoreStats(
            pages=vm,
            zero_pages=r.zero_pages,
            bytes_in=r.bytes_read,
            bytes_out=out.bytes_out,
            write_calls=out.write_calls,
            read_calls=r.read_calls,
            seconds=time.perf_counter() - start,
        )


def _check_room(out_path: Path, image_bytes: int, written_bytes: int) -> None:
    """Refuse, before writing, an image larger than the file system it goes to (a hostile
    checkpoint declaring 2^38 zero pages would make a 1 PiB sparse file), or whose pages that
    are not holes do not fit in its free space."""
    from memvisor.limits import format_bytes

    try:
        fs = os.statvfs(out_path.parent)
    except OSError as e:
        raise CheckpointError(out_path, f"cannot write the image: {e.strerror or e}") from e
    size, free = fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize
    if image_bytes > size:
        raise CheckpointError(out_path, f"an image of {format_bytes(image_bytes)} is larger than its file "
                                        f"system ({format_bytes(size)})")
    if written_bytes > free:
        raise CheckpointError(out_path, f"the image's {format_bytes(written_bytes)} of pages do not fit in the "
                                        f"{format_bytes(free)} free on its file system")


__all__ = ["RestoreStats", "SaveStats", "restore_image", "save_image"]
