"""Machine memory of the emulated host: a numpy pool of 4 KiB pages split into NUMA nodes.

Each node owns a contiguous range of machine page numbers (MPN), cut into 2 MiB frames of 512
pages. Small pages come from a per-node stack of free pages, refilled a whole free frame at a
time; a large page takes a whole free frame. Freed small pages go back to the small stack and
frames are not coalesced again (memory fragments, as it does on a real host; collapse then
needs a free frame).

MPN 0 is the one zero page. It is pinned: never allocated, never freed, not counted as free.
"""

from __future__ import annotations

import numpy as np

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.arrays import unique_counts
from memvisor.errors import BackendError, UserError

ZERO_MPN = 0


class OutOfMemory(UserError):
    """The emulated host ran out of machine memory (the scenario overcommits with no reclaim)."""


class _Stack:
    """A fixed-capacity stack of int64 values with batch push and pop."""

    def __init__(self, capacity: int):
        self.items = np.empty(capacity, dtype=np.int64)
        self.size = 0

    def push(self, values: np.ndarray) -> None:
        n = len(values)
        self.items[self.size : self.size + n] = values
        self.size += n

    def pop(self, n: int) -> np.ndarray:
        out = self.items[self.size - n : self.size].copy()
        self.size -= n
        return out


class MachineMemory:
    """The host's machine pages: contents, reference counts, NUMA node of each page.

    :param pages_per_node: machine pages on each node (rounded down to whole 2 MiB frames).
    """

    def __init__(self, pages_per_node: list[int]):
        frames = [p // LARGE_PAGE_PAGES for p in pages_per_node]
        if any(f < 1 for f in frames):
            raise UserError("host.memory: each NUMA node needs at least 2 MiB of memory")
        self.nodes = len(frames)
        self.node_pages = [f * LARGE_PAGE_PAGES for f in frames]
        self.total = sum(self.node_pages)
        # np.zeros is lazily committed by the kernel: untouched machine memory costs nothing.
        self.data = np.zeros((self.total, PAGE_SIZE), dtype=np.uint8)
        self.words = self.data.view(np.uint64)
        self.refcount = np.zeros(self.total, dtype=np.int32)
        self.node = np.repeat(np.arange(self.nodes, dtype=np.int8), self.node_pages)
        # "known zero": never handed out since the pool was made, so no memset is needed.
        self.clean = np.ones(self.total, dtype=bool)
        starts = np.concatenate([[0], np.cumsum(self.node_pages)[:-1]]).astype(np.int64)
        self.node_start = starts
        self._frames = []
        self._small = []
        for n in range(self.nodes):
            first_frame = starts[n] // LARGE_PAGE_PAGES
            stack = _Stack(frames[n])
            # pop() takes from the end: push in reverse so low addresses are used first.
            stack.push(np.arange(first_frame + frames[n] - 1, first_frame - 1, -1, dtype=np.int64))
            self._frames.append(stack)
            self._small.append(_Stack(self.node_pages[n]))
        # Reserve the zero page: the first frame of node 0 becomes small pages, minus MPN 0.
        frame = self._frames[0].pop(1)[0]
        pages = np.arange(frame * LARGE_PAGE_PAGES + LARGE_PAGE_PAGES - 1, frame * LARGE_PAGE_PAGES, -1)
        self._small[0].push(pages)
        self.refcount[ZERO_MPN] = 1

    # -- accounting ---------------------------------------------------------------------------

    def free_count(self, node: int | None = None) -> int:
        """Free machine pages on ``node`` (or everywhere)."""
        nodes = range(self.nodes) if node is None else [node]
        return sum(self._small[n].size + self._frames[n].size * LARGE_PAGE_PAGES for n in nodes)

    def free_frames(self, node: int) -> int:
        """Whole free 2 MiB frames on ``node``."""
        return self._frames[node].size

    # -- allocation ---------------------------------------------------------------------------

    def alloc(self, n: int, node: int, *, strict: bool = False, zero: bool = True) -> np.ndarray:
        """Allocate ``n`` small pages, preferring ``node``; other nodes follow unless ``strict``.

        Pages come back with reference count 1 and, when ``zero``, zero-filled.
        """
        order = [node] if strict else [node] + [m for m in range(self.nodes) if m != node]
        if n > sum(self.free_count(m) for m in order):
            where = f"node {node}" if strict else "the host"
            raise OutOfMemory(f"out of machine memory: {n} pages wanted, {self.free_count()} free on {where}")
        parts, left = [], n
        for m in order:
            while left and self._small[m].size < left and self._frames[m].size:
                frame = self._frames[m].pop(1)[0]
                base = frame * LARGE_PAGE_PAGES
                self._small[m].push(np.arange(base + LARGE_PAGE_PAGES - 1, base - 1, -1))
            take = min(left, self._small[m].size)
            if take:
                parts.append(self._small[m].pop(take))
                left -= take
            if not left:
                break
        mpns = np.concatenate(parts) if len(parts) != 1 else parts[0]
        self.refcount[mpns] = 1
        if zero:
            self.zero(mpns)
        return mpns

    def alloc_frame(self, node: int) -> int:
        """Allocate one whole 2 MiB frame on ``node``; returns its first MPN or -1 if none."""
        if not self._frames[node].size:
            return -1
        base = int(self._frames[node].pop(1)[0]) * LARGE_PAGE_PAGES
        mpns = np.arange(base, base + LARGE_PAGE_PAGES)
        self.refcount[mpns] = 1
        return base

    def zero(self, mpns: np.ndarray) -> None:
        """Fill pages with zeros, skipping pages known to be zero already."""
        dirty = mpns[~self.clean[mpns]]
        if len(dirty):
            self.data[dirty] = 0
        self.clean[mpns] = False

    def put(self, mpns: np.ndarray) -> np.ndarray:
        """Drop one reference to each page (a page may appear several times); free pages whose
        count reaches zero and return them."""
        if len(mpns) == 0:
            return mpns
        if np.any(mpns == ZERO_MPN):
            mpns = mpns[mpns != ZERO_MPN]
        pages, counts = unique_counts(mpns)
        self.refcount[pages] -= counts.astype(np.int32)
        if np.any(self.refcount[pages] < 0):
            raise BackendError("machine page reference count went below zero (double free)")
        freed = pages[self.refcount[pages] == 0]
        self._release(freed)
        return freed

    def get(self, mpns: np.ndarray) -> None:
        """Add one reference to each page (a page may appear several times)."""
        pages, counts = unique_counts(mpns[mpns != ZERO_MPN])
        self.refcount[pages] += counts.astype(np.int32)

    def _release(self, mpns: np.ndarray) -> None:
        if not len(mpns):
            return
        self.clean[mpns] = False
        nodes = self.node[mpns]
        for n in range(self.nodes):
            self._small[n].push(mpns[nodes == n])

    def is_free(self) -> np.ndarray:
        """Per machine page, whether it is free (for invariant checks; slow)."""
        free = np.zeros(self.total, dtype=bool)
        for n in range(self.nodes):
            free[self._small[n].items[: self._small[n].size]] = True
            frames = self._frames[n].items[: self._frames[n].size]
            if len(frames):
                free[(frames[:, None] * LARGE_PAGE_PAGES + np.arange(LARGE_PAGE_PAGES)).ravel()] = True
        return free
