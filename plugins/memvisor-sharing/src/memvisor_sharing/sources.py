"""Real memory to estimate over: raw memory images and a live process's resident memory.

A source yields its pages in chunks, each with an id per page (to read the page again when a
candidate twin is verified) and the large-page region the page lies in. Both are read-only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from memvisor import PAGE_SIZE
from memvisor.errors import UserError

CHUNK_PAGES = 1024
"""Pages read per chunk (4 MiB): large enough for fast reads, small enough that hashing and the
zero check find the bytes still in cache (measured: 4 MiB reads beat 16 MiB and 256 KiB)."""

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(ids, regions, data)``: a page id per page, its large-page region, ``(n, PAGE_SIZE)`` bytes."""


class ImageSource:
    """A raw memory image (QEMU ``pmemsave``, a Firecracker memory file): guest-physical address
    = file offset. Read in chunks into one reused buffer (faster than a memory map here, whose
    page faults cost more than the copy); page ids are page numbers in the file.

    :raises UserError: the file is missing, unreadable, empty, or not a whole number of pages.
    """

    def __init__(self, path: str | Path, large_page_bytes: int):
        from memvisor.files import image_pages, open_regular

        self.path = Path(path)
        self.name = str(path)
        self.pages = image_pages(self.path)  # a regular file of whole pages, or one line
        self._fd = open_regular(self.path, "memory image")
        self.nbytes = self.pages * PAGE_SIZE
        self.region_pages = max(1, large_page_bytes // PAGE_SIZE)
        self.large_pages = -(-self.pages // self.region_pages)

    def chunks(self) -> Iterator[Chunk]:
        """The image's pages in file order. The bytes of a chunk are valid until the next one
        (one buffer is reused)."""
        buffer = np.empty((CHUNK_PAGES, PAGE_SIZE), dtype=np.uint8)
        view = memoryview(buffer).cast("B")
        for start in range(0, self.pages, CHUNK_PAGES):
            n = min(CHUNK_PAGES, self.pages - start)
            got = os.preadv(self._fd, [view[: n * PAGE_SIZE]], start * PAGE_SIZE)
            if got != n * PAGE_SIZE:
                raise UserError(f"{self.name}: the file shrank while it was read")
            ids = np.arange(start, start + n, dtype=np.int64)
            yield ids, ids // self.region_pages, buffer[:n]

    def reread(self, ids: np.ndarray) -> np.ndarray:
        """The bytes of pages ``ids`` again: one read per run of consecutive pages (only
        candidate twins are read, and in real memory they cluster)."""
        pages, inverse = np.unique(ids, return_inverse=True)
        data = np.empty((len(pages), PAGE_SIZE), dtype=np.uint8)
        view = memoryview(data).cast("B")
        breaks = np.flatnonzero(np.diff(pages) != 1) + 1
        for first, last in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(pages)].tolist()):
            os.preadv(self._fd, [view[first * PAGE_SIZE : last * PAGE_SIZE]], int(pages[first]) * PAGE_SIZE)
        return data[inverse.reshape(-1)]

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


class ProcessSource:
    """The resident memory of a live process, read-only through ``/proc/PID/maps``,
    ``/proc/PID/pagemap`` (which pages are present: only those are read, so nothing is faulted
    in) and ``/proc/PID/mem``. Page ids are virtual addresses; regions are aligned virtual ranges
    of the large-page size. Ranges the kernel refuses to read (``[vvar]``, guard pages) are skipped.

    :raises UserError: no such process, or no permission to read its memory.
    """

    def __init__(self, pid: int, large_page_bytes: int):
        self.pid = pid
        self.name = f"pid {pid}"
        self.large_page_bytes = max(PAGE_SIZE, large_page_bytes)
        proc = Path(f"/proc/{pid}")
        try:
            maps = (proc / "maps").read_text()
            self._mem = os.open(proc / "mem", os.O_RDONLY)
            pagemap = os.open(proc / "pagemap", os.O_RDONLY)
        except FileNotFoundError:
            raise UserError(f"--pid {pid}: no such process") from None
        except PermissionError:
            raise UserError(f"--pid {pid}: no permission to read its memory (ptrace access is needed)") from None
        try:
            self.addresses = self._resident(maps, pagemap)
        finally:
            os.close(pagemap)
        self.pages = len(self.addresses)
        self.nbytes = self.pages * PAGE_SIZE
        self.large_pages = len(np.unique(self.addresses // self.large_page_bytes))

    def _resident(self, maps: str, pagemap: int) -> np.ndarray:
        """Virtual addresses of the readable, present pages, in address order."""
        found = []
        for line in maps.splitlines():
            fields = line.split()
            if len(fields) < 5 or not fields[1].startswith("r") or line.endswith("[vsyscall]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            first, count = start // PAGE_SIZE, (end - start) // PAGE_SIZE
            try:
                raw = os.pread(pagemap, count * 8, first * 8)
            except OSError:
                continue
            entries = np.frombuffer(raw, dtype=np.uint64)
            present = np.flatnonzero((entries >> np.uint64(63)) & np.uint64(1))
            found.append((first + present).astype(np.int64) * PAGE_SIZE)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _read_run(self, address: int, pages: int) -> np.ndarray | None:
        try:
            raw = os.pread(self._mem, pages * PAGE_SIZE, address)
        except OSError:
            return None
        if len(raw) != pages * PAGE_SIZE:
            return None
        return np.frombuffer(raw, dtype=np.uint8).reshape(pages, PAGE_SIZE)

    def chunks(self) -> Iterator[Chunk]:
        """Resident pages in address order, read a run of contiguous pages at a time."""
        addresses = self.addresses
        for start in range(0, len(addresses), CHUNK_PAGES):
            part = addresses[start : start + CHUNK_PAGES]
            breaks = np.flatnonzero(np.diff(part) != PAGE_SIZE) + 1
            for run in np.split(part, breaks):  # one read per contiguous run, not per page
                data = self._read_run(int(run[0]), len(run))
                if data is not None:
                    yield run, run // self.large_page_bytes, data

    def reread(self, ids: np.ndarray) -> np.ndarray:
        """The bytes of the pages at addresses ``ids`` again (zeros where a read fails)."""
        out = np.zeros((len(ids), PAGE_SIZE), dtype=np.uint8)
        for i, address in enumerate(ids.tolist()):  # only candidate twins are read again
            data = self._read_run(address, 1)
            if data is not None:
                out[i] = data[0]
        return out

    def close(self) -> None:
        """Close /proc/PID/mem."""
        os.close(self._mem)
