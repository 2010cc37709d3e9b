"""Machine memory of the emulated host: machine pages split into NUMA nodes, and their contents.

Each node owns a contiguous range of machine page numbers (MPN), cut into 2 MiB frames of 512
pages. Small pages come from a per-node stack of free pages, refilled a whole free frame at a
time; a large page takes a whole free frame. Freed small pages go back to the small stack and
frames are not coalesced again (memory fragments, as it does on a real host; collapse then
needs a free frame).

MPN 0 is the one zero page. It is pinned: never allocated, never freed, not counted as free.

What a machine page holds is kept by a *store*, one of two machine models:

- :class:`ByteStore` (``contents = "bytes"``): 4 KiB of real bytes per page, a numpy pool that
  the kernel commits as it is first written;
- :class:`IdentityStore` (``contents = "identity"``): the page's content identity and write stamp
  (:mod:`memvisor.identity`), 12 bytes per page, so a host far larger than the machine that
  runs the emulator fits in it.

Both answer the same operations on machine page numbers (copy, zero, stamp, store, load,
fingerprint, compare), so the backend above them is one piece of code.
"""

from __future__ import annotations

import numpy as np

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.arrays import unique_counts
from memvisor.errors import BackendError, UserError
from memvisor.identity import (
    LITERALS,
    MAX_STAMP,
    Identities,
    byte_fingerprints,
    identity_fingerprints,
    is_identities,
    materialise,
)

ZERO_MPN = 0


class OutOfMemory(UserError):
    """The emulated host ran out of machine memory (the scenario overcommits with no reclaim)."""


class _Stack:
    """A fixed-capacity stack of page numbers with batch push and pop (``np.empty``: the kernel
    commits only the part that is ever filled)."""

    def __init__(self, capacity: int, dtype):
        self.items = np.empty(capacity, dtype=dtype)
        self.size = 0

    def push(self, values: np.ndarray) -> None:
        n = len(values)
        self.items[self.size : self.size + n] = values
        self.size += n

    def pop(self, n: int) -> np.ndarray:
        out = self.items[self.size - n : self.size].astype(np.int64)
        self.size -= n
        return out


# -- stores: what machine pages hold ----------------------------------------------------------------


class ByteStore:
    """Real bytes: a ``(pages, 4096)`` uint8 pool, lazily committed by the kernel."""

    model = "bytes"

    def __init__(self, pages: int):
        self.data = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
        self.words = self.data.view(np.uint64)
        # "known zero": never handed out since the pool was made, so no memset is needed.
        self.clean = np.ones(pages, dtype=bool)

    bytes_per_page = PAGE_SIZE + 1

    def zero(self, mpns: np.ndarray) -> None:
        dirty = mpns[~self.clean[mpns]]
        if len(dirty):
            self.data[dirty] = 0
        self.clean[mpns] = False

    def used(self, mpns: np.ndarray) -> None:
        """``mpns`` get contents other than by :meth:`zero` (no longer known zero)."""
        self.clean[mpns] = False

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        self.data[dst] = self.data[src]
        self.clean[dst] = False

    def stamp(self, mpns: np.ndarray, value: int) -> None:
        self.words[mpns, 0] = np.uint64(value)

    def store(self, mpns: np.ndarray, contents) -> None:
        if is_identities(contents):
            raise BackendError("identity contents given to a bytes-model host")
        self.data[mpns] = np.asarray(contents, dtype=np.uint8).reshape(len(mpns), PAGE_SIZE)
        self.clean[mpns] = False

    def load(self, mpns: np.ndarray) -> np.ndarray:
        return self.data[mpns]

    def load_bytes(self, mpns: np.ndarray) -> np.ndarray:
        return self.data[mpns]

    def fingerprint(self, mpns: np.ndarray) -> np.ndarray:
        out = np.empty(len(mpns), np.uint64)
        for start in range(0, len(mpns), 8192):
            out[start : start + 8192] = byte_fingerprints(self.data[mpns[start : start + 8192]])
        return out

    def is_zero(self, mpns: np.ndarray) -> np.ndarray:
        out = np.empty(len(mpns), bool)
        for start in range(0, len(mpns), 8192):
            out[start : start + 8192] = self.words[mpns[start : start + 8192]].max(axis=1) == 0
        return out

    def equal(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty(len(a), bool)
        for start in range(0, len(a), 4096):
            part = slice(start, start + 4096)
            out[part] = ~np.any(self.words[a[part]] != self.words[b[part]], axis=1)
        return out


class IdentityStore:
    """Content identities: per page a uint64 identity and a uint32 write stamp (12 bytes), and
    the bytes of the few literal pages written from outside (in the process's
    :data:`memvisor.identity.LITERALS`)."""

    model = "identity"
    bytes_per_page = 12

    def __init__(self, pages: int):
        # np.zeros: committed only where written, and zeros are the zero page's identity.
        self.ids = np.zeros(pages, dtype=np.uint64)
        self.stamps = np.zeros(pages, dtype=np.uint32)
        self.literals = LITERALS

    def zero(self, mpns: np.ndarray) -> None:
        self.ids[mpns] = 0
        self.stamps[mpns] = 0

    def used(self, mpns: np.ndarray) -> None:
        """Nothing to note: a page's identity already says whether it is the zero page (0),
        where the byte pool keeps a separate ``clean`` flag."""

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        self.ids[dst] = self.ids[src]
        self.stamps[dst] = self.stamps[src]

    def stamp(self, mpns: np.ndarray, value: int) -> None:
        if not 1 <= value <= MAX_STAMP:
            raise BackendError(f"write stamp {value} outside [1, {MAX_STAMP}] of the identity model")
        self.stamps[mpns] = value

    def store(self, mpns: np.ndarray, contents) -> None:
        if not is_identities(contents):
            contents = self.literals.intern(contents)
        if len(contents) != len(mpns):
            raise BackendError(f"contents of {len(contents)} pages for {len(mpns)} machine pages")
        self.ids[mpns] = contents.ids
        self.stamps[mpns] = contents.stamps

    def load(self, mpns: np.ndarray) -> Identities:
        return Identities(self.ids[mpns], self.stamps[mpns])

    def load_bytes(self, mpns: np.ndarray) -> np.ndarray:
        return materialise(self.load(mpns), self.literals)

    def fingerprint(self, mpns: np.ndarray) -> np.ndarray:
        return identity_fingerprints(self.ids[mpns], self.stamps[mpns])

    def is_zero(self, mpns: np.ndarray) -> np.ndarray:
        return (self.ids[mpns] == 0) & (self.stamps[mpns] == 0)

    def equal(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (self.ids[a] == self.ids[b]) & (self.stamps[a] == self.stamps[b])


STORES = {"bytes": ByteStore, "identity": IdentityStore}


class MachineMemory:
    """The host's machine pages: contents, reference counts, NUMA node of each page.

    :param pages_per_node: machine pages on each node (rounded down to whole 2 MiB frames).
    :param contents: the machine model, ``"bytes"`` or ``"identity"``.
    """

    def __init__(self, pages_per_node: list[int], contents: str = "bytes"):
        frames = [p // LARGE_PAGE_PAGES for p in pages_per_node]
        if any(f < 1 for f in frames):
            raise UserError("host.memory: each NUMA node needs at least 2 MiB of memory")
        self.nodes = len(frames)
        self.node_pages = [f * LARGE_PAGE_PAGES for f in frames]
        self.total = sum(self.node_pages)
        # Machine page numbers fit 32 bits up to 8 TiB: page tables and free stacks use them.
        self.index_dtype = np.dtype(np.int32 if self.total < 2**31 else np.int64)
        self.store = STORES[contents](self.total)
        self.refcount = np.zeros(self.total, dtype=np.int32)
        starts = np.concatenate([[0], np.cumsum(self.node_pages)[:-1]]).astype(np.int64)
        self.node_start = starts
        self._equal_nodes = len(set(self.node_pages)) == 1
        self._frames = []
        self._small = []
        for n in range(self.nodes):
            first_frame = starts[n] // LARGE_PAGE_PAGES
            stack = _Stack(frames[n], self.index_dtype)
            # pop() takes from the end: push in reverse so low addresses are used first.
            stack.push(np.arange(first_frame + frames[n] - 1, first_frame - 1, -1, dtype=np.int64))
            self._frames.append(stack)
            self._small.append(_Stack(self.node_pages[n], self.index_dtype))
        # Reserve the zero page: the first frame of node 0 becomes small pages, minus MPN 0.
        frame = self._frames[0].pop(1)[0]
        pages = np.arange(frame * LARGE_PAGE_PAGES + LARGE_PAGE_PAGES - 1, frame * LARGE_PAGE_PAGES, -1)
        self._small[0].push(pages)
        self.refcount[ZERO_MPN] = 1

    # -- accounting ---------------------------------------------------------------------------

    def node_of(self, mpns: np.ndarray) -> np.ndarray:
        """NUMA node of each machine page (int8; arithmetic, not a table: no byte per page)."""
        mpns = np.asarray(mpns)
        if self.nodes == 1:
            return np.zeros(mpns.shape, np.int8)
        if self._equal_nodes:
            return (mpns // self.node_pages[0]).astype(np.int8)
        return (np.searchsorted(self.node_start, mpns, "right") - 1).astype(np.int8)

    def free_count(self, node: int | None = None) -> int:
        """Free machine pages on ``node`` (or everywhere)."""
        nodes = range(self.nodes) if node is None else [node]
        return sum(self._small[n].size + self._frames[n].size * LARGE_PAGE_PAGES for n in nodes)

    def free_frames(self, node: int) -> int:
        """Whole free 2 MiB frames on ``node``."""
        return self._frames[node].size

    def nbytes(self) -> dict[str, int]:
        """Bytes of this machine's per-page arrays as allocated (committed or not), by array."""
        pages = self.total
        return {
            "contents": pages * self.store.bytes_per_page,
            "refcount": self.refcount.nbytes,
            "free_stacks": sum(s.items.nbytes for s in self._small),
        }

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
            if left and self._small[m].size < left and self._frames[m].size:
                # Refill the small stack with as many whole frames as it needs, in one go.
                frames = self._frames[m].pop(min(self._frames[m].size,
                                                 -(-(left - self._small[m].size) // LARGE_PAGE_PAGES)))[::-1]
                pages = (frames[:, None] * LARGE_PAGE_PAGES + np.arange(LARGE_PAGE_PAGES - 1, -1, -1)).ravel()
                self._small[m].push(pages)
            take = min(left, self._small[m].size)
            if take:
                parts.append(self._small[m].pop(take))
                left -= take
            if not left:
                break
        mpns = np.concatenate(parts) if len(parts) != 1 else parts[0]
        self.refcount[mpns] = 1
        if zero:
            self.store.zero(mpns)
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
        """Fill pages with zeros."""
        self.store.zero(mpns)

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

    def put_one(self, mpn: int) -> bool:
        """:meth:`put` of one page without the array work (a plugin's hold, released per
        content); returns whether the page was freed."""
        if mpn == ZERO_MPN:
            return False
        count = int(self.refcount[mpn]) - 1
        if count < 0:
            raise BackendError("machine page reference count went below zero (double free)")
        self.refcount[mpn] = count
        if count == 0:
            self._release(np.array([mpn], dtype=np.int64))
        return count == 0

    def get(self, mpns: np.ndarray) -> None:
        """Add one reference to each page (a page may appear several times)."""
        pages, counts = unique_counts(mpns[mpns != ZERO_MPN])
        self.refcount[pages] += counts.astype(np.int32)

    def _release(self, mpns: np.ndarray) -> None:
        if not len(mpns):
            return
        self.store.used(mpns)
        if self.nodes == 1:
            self._small[0].push(mpns)
            return
        nodes = self.node_of(mpns)
        for n in range(self.nodes):
            self._small[n].push(mpns[nodes == n])

    def is_free(self) -> np.ndarray:
        """Per machine page, whether it is free (for invariant checks; slow)."""
        free = np.zeros(self.total, dtype=bool)
        for n in range(self.nodes):
            free[self._small[n].items[: self._small[n].size]] = True
            frames = self._frames[n].items[: self._frames[n].size].astype(np.int64)
            if len(frames):
                free[(frames[:, None] * LARGE_PAGE_PAGES + np.arange(LARGE_PAGE_PAGES)).ravel()] = True
        return free
