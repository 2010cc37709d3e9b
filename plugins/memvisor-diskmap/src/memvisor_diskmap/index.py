"""Page hashes and the disk index: which 4 KiB disk block holds the same bytes as a page.

:func:`page_hashes` mixes every 8-byte word of a page (numpy-vectorised over ``(n, 4096)``
uint8 arrays). It keys the disk index, and it is stored with a mapping (the hash of the page
at the time it was made) and in disk references, so that a block changed since is recognised
when it is read back.

The index once keyed blocks by 16 sampled words and verified only the first block whose key
matched: blocks that differ only in words the key does not sample (records numbered in their
first bytes, a log, a table of fixed-size rows) shared a key, and a page equal to any but the
first of them was not found. Keyed by every word, blocks share a key only when they are equal
(indexed once) or when their hashes collide (then a digest tells them apart).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import attrs
import numpy as np

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8
_K_FULL = (np.arange(1, WORDS + 1, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93)) | np.uint64(1)
_C1, _C2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
CHUNK_PAGES = 8192  # 32 MiB of pages at a time


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x = x * _C1
    x = x ^ (x >> np.uint64(33))
    x = x * _C2
    return x ^ (x >> np.uint64(33))


def _words(pages: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pages, dtype=np.uint8).reshape(-1, PAGE_SIZE).view(np.uint64)


def page_hashes(pages: np.ndarray) -> np.ndarray:
    """A 64-bit hash per page from every word (uint64 array)."""
    words = _words(pages)
    out = np.empty(len(words), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(words), 1024):
            part = words[start : start + 1024]
            out[start : start + 1024] = _mix((part * _K_FULL).sum(axis=1, dtype=np.uint64))
    return out


def nonzero_pages(pages: np.ndarray) -> np.ndarray:
    """Per page, whether any byte is not zero."""
    return _words(pages).any(axis=1)


def _equal_rows(data: np.ndarray, blocks: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Per ``i``, whether disk block ``blocks[i]`` holds exactly the bytes of ``pages[i]``
    (``pages``: an array of pages, or of block numbers of ``data``). Read a chunk at a time,
    so that a memory-mapped disk is never read whole."""
    same = np.empty(len(blocks), dtype=bool)
    for start in range(0, len(blocks), CHUNK_PAGES):
        part = slice(start, start + CHUNK_PAGES)
        other = np.asarray(data[pages[part]]) if pages.ndim == 1 else pages[part]
        same[part] = (np.asarray(data[blocks[part]]) == other).all(axis=1)
    return same


def _digest(page: np.ndarray) -> bytes:
    """A cryptographic digest of one page, for the rare keys whose 64-bit hashes collide."""
    return hashlib.blake2b(np.ascontiguousarray(page).data, digest_size=16).digest()


class DiskIndex:
    """Hashes of a disk's distinct non-zero blocks, sorted, for lookups of page contents.

    Equal blocks are indexed once (a lookup needs one block with the bytes, not all), so a key
    is shared by several blocks only where the 64-bit hashes of different bytes collide. The
    hash is not cryptographic, and a disk can be made of thousands of blocks that collide:
    the blocks of such a key are also indexed by a cryptographic digest, so that every
    candidate is tried at the cost of one digest per block and per page, never of a
    comparison of every page with every block.

    :param data: the disk's blocks, ``(blocks, PAGE_SIZE)`` uint8 (a memory map is read in
        chunks).
    """

    def __init__(self, data: np.ndarray):
        self.data = data
        keys, blocks = [], []
        for start in range(0, len(data), CHUNK_PAGES):
            chunk = np.asarray(data[start : start + CHUNK_PAGES])
            nonzero = np.flatnonzero(nonzero_pages(chunk))
            keys.append(page_hashes(chunk[nonzero]))
            blocks.append(nonzero + start)
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        blocks_all = np.concatenate(blocks).astype(np.int64) if blocks else np.zeros(0, np.int64)
        order = np.argsort(keys_all, kind="stable")  # equal keys stay in block order
        keys_all, blocks_all = keys_all[order], blocks_all[order]
        # Equal blocks: one vectorised comparison of each block with the first of its key.
        head = np.ones(len(keys_all), dtype=bool)
        head[1:] = keys_all[1:] != keys_all[:-1]
        first = np.flatnonzero(head)[np.cumsum(head) - 1]
        rest = np.flatnonzero(~head)
        keep = head.copy()
        keep[rest] = ~_equal_rows(data, blocks_all[rest], blocks_all[first[rest]])
        self.keys, self.blocks = keys_all[keep], blocks_all[keep]
        # What is left sharing a key differs from the first block of its key: collisions.
        shared = np.zeros(len(self.keys), dtype=bool)
        shared[1:] = self.keys[1:] == self.keys[:-1]
        shared[:-1] |= shared[1:]
        self.by_digest: dict[bytes, int] = {}
        for block in self.blocks[shared].tolist():
            self.by_digest.setdefault(_digest(data[block]), block)
        if self.by_digest:  # equal blocks that are not the first of their key: indexed once
            unique = np.ones(len(self.keys), dtype=bool)
            unique[shared] = np.isin(self.blocks[shared], np.fromiter(self.by_digest.values(), np.int64))
            self.keys, self.blocks = self.keys[unique], self.blocks[unique]

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, pages: np.ndarray) -> np.ndarray:
        """For each (non-zero) page, a disk block with exactly its bytes, or -1.

        Every block whose key matches is a candidate: the one block of a key directly, the
        blocks of a colliding key through their digests; the answer is verified byte for byte.
        """
        pages = np.asarray(pages, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        out = np.full(len(pages), -1, dtype=np.int64)
        if not len(self.keys) or not len(pages):
            return out
        keys = page_hashes(pages)
        low = np.searchsorted(self.keys, keys, side="left")
        count = np.searchsorted(self.keys, keys, side="right") - low
        todo = np.flatnonzero(count >= 1)
        candidate = self.blocks[np.minimum(low[todo], len(self.blocks) - 1)]
        colliding = count[todo] > 1
        if colliding.any():
            candidate[colliding] = [self.by_digest.get(_digest(pages[i]), -1) for i in todo[colliding].tolist()]
            todo, candidate = todo[candidate >= 0], candidate[candidate >= 0]
        same = _equal_rows(self.data, candidate, pages[todo])
        out[todo[same]] = candidate[same]
        return out


@attrs.frozen
class ScanResult:
    """What :func:`scan_image` found.

    :ivar pages: pages in the memory image.
    :ivar disk_blocks: 4 KiB blocks of the disk image.
    :ivar pages_on_disk: non-zero pages identical to some block of the disk.
    :ivar zero_pages: all-zero pages (counted apart, never as disk pages).
    :ivar seconds: wall-clock seconds of the scan (index build excluded).
    :ivar index_seconds: wall-clock seconds to build the disk index.
    """

    pages: int
    disk_blocks: int
    pages_on_disk: int
    zero_pages: int
    seconds: float
    index_seconds: float

    def to_json(self) -> dict:
        """The figures of ``memvisor diskmap scan --json``."""
        return {"pages": self.pages, "disk_blocks": self.disk_blocks, "pages_on_disk": self.pages_on_disk,
                "zero_pages": self.zero_pages, "seconds": self.seconds, "index_seconds": self.index_seconds}


def _map(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        from memvisor.errors import UserError

        raise UserError(f"{path}: no such file")
    pages = path.stat().st_size // PAGE_SIZE
    if pages == 0:
        return np.zeros((0, PAGE_SIZE), np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(pages, PAGE_SIZE))


def scan_image(image: str | Path, disk: str | Path, index: DiskIndex | None = None) -> ScanResult:
    """Count the pages of a raw memory image identical to a 4 KiB-aligned block of a raw disk
    image (zero pages apart)."""
    started = time.perf_counter()
    if index is None:
        index = DiskIndex(_map(disk))
    index_seconds = time.perf_counter() - started
    memory = _map(image)
    started = time.perf_counter()
    on_disk = zero = 0
    for start in range(0, len(memory), CHUNK_PAGES):
        chunk = np.asarray(memory[start : start + CHUNK_PAGES])
        nonzero = nonzero_pages(chunk)
        zero += int(len(chunk) - nonzero.sum())
        on_disk += int(np.count_nonzero(index.lookup(chunk[nonzero]) >= 0))
    return ScanResult(len(memory), len(index.data), on_disk, zero, time.perf_counter() - started, index_seconds)
