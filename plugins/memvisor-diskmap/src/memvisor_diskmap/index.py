"""Page hashes and the disk index: which 4 KiB disk block holds the same bytes as a page.

Two hashes, both numpy-vectorised over ``(n, 4096)`` uint8 arrays:

- :func:`sample_keys` mixes 16 of a page's 512 eight-byte words: cheap, the disk index's key.
  Blocks that differ only in words it does not sample (records numbered in their first
  bytes, a log, a table of fixed-size rows) share a key, as do equal blocks: the index tells
  those apart by a cryptographic digest of their bytes, so every block with a page's key is
  a candidate (the index once verified only the first, and missed the pages equal to the
  others). A candidate is always verified byte for byte.
- :func:`page_hashes` mixes every word: stored with a mapping (the hash of the page at the time
  it was made) and in disk references, so that a block changed since is recognised when it is
  read back.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import attrs
import numpy as np

PAGE_SIZE = 4096
WORDS = PAGE_SIZE // 8
_SAMPLE = np.linspace(0, WORDS - 1, 16).astype(np.int64)
_K_SAMPLE = (np.arange(1, len(_SAMPLE) + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
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


def sample_keys(pages: np.ndarray) -> np.ndarray:
    """A 64-bit key per page from 16 of its words (uint64 array)."""
    words = _words(pages)[:, _SAMPLE]
    with np.errstate(over="ignore"):
        return _mix((words * _K_SAMPLE).sum(axis=1, dtype=np.uint64))


def page_hashes(pages: np.ndarray) -> np.ndarray:
    """A 64-bit hash per page from every word (uint64 array)."""
    with np.errstate(over="ignore"):
        # einsum sums the products (modulo 2^64) without a temporary of the pages' size: twice
        # as fast as multiplying, then summing.
        return _mix(np.einsum("ij,j->i", _words(pages), _K_FULL))


def nonzero_pages(pages: np.ndarray) -> np.ndarray:
    """Per page, whether any byte is not zero."""
    return _words(pages).any(axis=1)


def _equal_rows(data: np.ndarray, blocks: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """Per ``i``, whether disk block ``blocks[i]`` holds exactly the bytes of ``pages[i]``
    (read a chunk at a time, so that a memory-mapped disk is never read whole)."""
    same = np.empty(len(blocks), dtype=bool)
    for start in range(0, len(blocks), CHUNK_PAGES):
        part = slice(start, start + CHUNK_PAGES)
        same[part] = (np.asarray(data[blocks[part]]) == pages[part]).all(axis=1)
    return same


def _digest(page: np.ndarray) -> bytes:
    """A cryptographic digest of one page: what tells apart blocks that share a sampled key."""
    return hashlib.blake2b(np.ascontiguousarray(page).data, digest_size=16).digest()


class DiskIndex:
    """Sample keys of a disk's non-zero blocks, sorted, for lookups of page contents.

    A key that one block has points at it. The blocks of a key that several share are indexed
    by the digest of their bytes (equal blocks once): a page with such a key is looked up by its
    own digest. A disk made of a real guest's 24,258 non-zero pages has 8,300 blocks that share
    a key (mostly equal pages: 2,947 distinct contents among them); a disk crafted so that all
    its blocks share one costs a digest per block and per page, never a comparison of every
    page with every block.

    :param data: the disk's blocks, ``(blocks, PAGE_SIZE)`` uint8 (a memory map is read in
        chunks).
    """

    def __init__(self, data: np.ndarray):
        self.data = data
        keys, blocks = [], []
        for start in range(0, len(data), CHUNK_PAGES):
            chunk = np.asarray(data[start : start + CHUNK_PAGES])
            nonzero = np.flatnonzero(nonzero_pages(chunk))
            keys.append(sample_keys(chunk[nonzero]))
            blocks.append(nonzero + start)
        keys_all = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        blocks_all = np.concatenate(blocks).astype(np.int64) if blocks else np.zeros(0, np.int64)
        order = np.argsort(keys_all, kind="stable")  # equal keys stay in block order
        self.keys, self.blocks = keys_all[order], blocks_all[order]
        shared = np.zeros(len(self.keys), dtype=bool)
        shared[1:] = self.keys[1:] == self.keys[:-1]
        shared[:-1] |= shared[1:]
        self.shared = shared  # per entry: its key is other blocks' too
        self.by_digest: dict[bytes, int] = {}
        for block in np.sort(self.blocks[shared]).tolist():
            self.by_digest.setdefault(_digest(data[block]), block)

    def __len__(self) -> int:
        """Distinct non-zero blocks indexed."""
        return int(np.count_nonzero(~self.shared)) + len(self.by_digest)

    def lookup(self, pages: np.ndarray) -> np.ndarray:
        """For each (non-zero) page, a disk block with exactly its bytes, or -1."""
        pages = np.asarray(pages, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        out = np.full(len(pages), -1, dtype=np.int64)
        if not len(self.keys) or not len(pages):
            return out
        keys = sample_keys(pages)
        first = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        todo = np.flatnonzero(self.keys[first] == keys)
        candidate = self.blocks[first[todo]]
        shared = self.shared[first[todo]]
        if shared.any():  # the key is several blocks': the page's digest says which, if any
            candidate[shared] = [self.by_digest.get(_digest(pages[i]), -1) for i in todo[shared].tolist()]
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
