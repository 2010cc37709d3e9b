"""One VM's miss-rate-curve state while it runs: the sample, the online LRU, the trap log and
the pages waiting to be retraced. Plain numpy, no host: :mod:`memvisor_mrc.plugin` drives it
from the hooks, and the tests drive it directly.

Clock
-----
Everything here is on the VM's *access clock*: the number of guest accesses the VM made before
an access. A trap at position ``k`` of a guest batch that started at access ``N`` happened at
``N + k``. The untraced period is set in seconds of (virtual) time, because pages are retraced
from ticks; the estimator only needs the access-clock time at which each page was traced again,
which the tracker records when it retraces (:meth:`VMTracker.due_for_retrace`).

Sample
------
Page ``g`` of the VM is in the spatial sample iff ``page_hash(g) mod 2**32 < T``
(:mod:`memvisor_mrc.shards`). Fixed rate: ``T`` never moves. Fixed size: the
:class:`~memvisor_mrc.shards.OnlineShards` sampler lowers ``T`` whenever more than ``S`` touched
pages are in the sample, and the pages whose hash is now too large stop being traced. The rate
the curve is scaled with is the *realised* share of the VM's page space that is sampled
(``#{g : hash(g) < T} / vm_pages``), known exactly because the hypervisor knows every page
number; this removes the error of the sample's size over the page space (the footprint's share
still varies).

Estimate
--------
Each trap is fed to the online LRU at once (O(log n) per trap, batched). A snapshot of the
curve is computed from the trap log with the untraced-period model
(:func:`memvisor_mrc.untrace.untrace_mrc`, real retrace times), which restores the accesses the
untraced windows and the batches hid; ``estimator="shards"`` uses the online histogram alone
(plain SHARDS_adj over the traps, the ablation).
"""

from __future__ import annotations

import numpy as np

from memvisor_mrc.curve import Curve
from memvisor_mrc.shards import MODULUS, OnlineShards, _hash_mod
from memvisor_mrc.untrace import TrapTrace, untrace_mrc

__all__ = ["ESTIMATORS", "NOT_YET", "VMTracker"]

ESTIMATORS = ("model", "shards")
"""``model``: the untraced-period model over the trap log; ``shards``: the online histogram."""

NOT_YET = np.iinfo(np.int64).max
"""Retrace time of a trap whose page has not been traced again yet."""

_HASH_CHUNK = 1 << 20  # pages hashed at a time when the sample is chosen


class _Growable:
    """An int64 array that grows by doubling (the trap log), so appends are amortised O(1)."""

    def __init__(self) -> None:
        self.data = np.zeros(1024, dtype=np.int64)
        self.size = 0

    def extend(self, values: np.ndarray) -> np.ndarray:
        """Append ``values``; returns their indices."""
        need = self.size + len(values)
        if need > len(self.data):
            grown = np.zeros(max(need, 2 * len(self.data)), dtype=np.int64)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size : need] = values
        start, self.size = self.size, need
        return np.arange(start, need, dtype=np.int64)

    def view(self) -> np.ndarray:
        """The filled part (a view: copy before keeping it)."""
        return self.data[: self.size]


class VMTracker:
    """The MRC state of one VM.

    :param vm_pages: the VM's size in pages (its page numbers are ``0 .. vm_pages - 1``).
    :param rate: the sampling rate (fixed-rate mode), or the initial rate with ``sample_size``.
    :param sample_size: at most this many touched pages in the sample (fixed-size mode), or None.
    :param seed: seed of the page hash.
    """

    def __init__(self, vm_pages: int, rate: float | None, sample_size: int | None, seed: int = 0):
        self.vm_pages = int(vm_pages)
        self.seed = seed
        self.shards = OnlineShards(rate=rate, sample_size=sample_size, seed=seed)
        # The pages that can ever be in the sample (the threshold only goes down) and their
        # hashes, sorted by page: state is kept for them only, so a VM costs its sample's size
        # (a rate of 0.01 keeps 1% of the pages), not a word per page.
        members, hashes = [], []
        for start in range(0, self.vm_pages, _HASH_CHUNK):
            pages = np.arange(start, min(self.vm_pages, start + _HASH_CHUNK), dtype=np.uint64)
            h = _hash_mod(pages, seed)
            keep = h < np.uint64(self.threshold)
            members.append(pages[keep].astype(np.int64))
            hashes.append(h[keep])
        self._members = np.concatenate(members) if members else np.zeros(0, np.int64)
        self._member_hash = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        self._times = _Growable()  # access-clock time of each trap
        self._pages = _Growable()  # the trapped page
        self._retrace = _Growable()  # access-clock time the page was traced again (NOT_YET)
        # Per member page: the log index of its open untraced window (-1: none) and when it ends.
        self._open = np.full(len(self._members), -1, dtype=np.int64)
        self._due = np.full(len(self._members), np.inf)
        self.traps = 0

    def _positions(self, gpps: np.ndarray) -> np.ndarray:
        """Positions of sampled pages among the members (every sampled page is a member)."""
        return np.searchsorted(self._members, gpps)

    # -- the sample ----------------------------------------------------------------------------

    @property
    def threshold(self) -> int:
        """``T``: page ``g`` is sampled iff its hash is below it."""
        return self.shards.threshold

    def in_sample(self, gpps: np.ndarray) -> np.ndarray:
        """Per page, whether it is in the sample now."""
        return _hash_mod(np.asarray(gpps).astype(np.uint64), self.seed) < np.uint64(self.threshold)

    def sample(self) -> np.ndarray:
        """Every page of the VM that is in the sample now (the pages to trace)."""
        return self._members[self._member_hash < np.uint64(self.threshold)]

    @property
    def rate(self) -> float:
        """The realised sampling rate: the sampled share of the VM's page space."""
        count = int(np.count_nonzero(self._member_hash < np.uint64(self.threshold)))
        return max(count, 1) / self.vm_pages if self.vm_pages else self.threshold / MODULUS

    @property
    def sampled_pages(self) -> int:
        """Touched pages the online LRU tracks."""
        return len(self.shards.lru)

    # -- events --------------------------------------------------------------------------------

    def on_traps(self, gpps: np.ndarray, times: np.ndarray, deadline: float) -> np.ndarray:
        """Feed one batch of traps (pages in first-touch order, access-clock times).

        Pages that are not in the sample (another plugin traced them) are ignored. Each sampled
        page stays untraced until ``deadline`` (seconds). Returns the pages that just left the
        sample (fixed-size mode lowered the threshold): the caller stops tracing them.
        """
        gpps = np.asarray(gpps, dtype=np.int64)
        keep = self.in_sample(gpps)
        g, t = gpps[keep], np.asarray(times, dtype=np.int64)[keep]
        if not len(g):
            return np.zeros(0, dtype=np.int64)
        # A page that traps while we thought it untraced was retraced by someone else: its
        # window ended with this trap.
        at = self._positions(g)
        open_windows = self._open[at]
        again = open_windows >= 0
        if again.any():
            self._retrace.view()[open_windows[again]] = t[again]
        before = self.threshold
        self.shards.process(g.astype(np.uint64))
        index = self._times.extend(t)
        self._pages.extend(g)
        self._retrace.extend(np.full(len(g), NOT_YET, dtype=np.int64))
        self._open[at] = index
        self._due[at] = deadline
        self.traps += len(g)
        if self.threshold == before:
            return np.zeros(0, dtype=np.int64)
        h = self._member_hash
        left = np.flatnonzero((h >= np.uint64(self.threshold)) & (h < np.uint64(before)))
        self._open[left] = -1
        self._due[left] = np.inf
        return self._members[left]

    def due_for_retrace(self, now: float, accesses: int) -> np.ndarray:
        """Pages whose untraced period ended by ``now``; records ``accesses`` (the VM's access
        clock) as their retrace time. The caller traces them again."""
        due = np.flatnonzero(self._due <= now)
        if len(due):
            self._retrace.view()[self._open[due]] = accesses
            self._open[due] = -1
            self._due[due] = np.inf
        return self._members[due]

    # -- answers -------------------------------------------------------------------------------

    def curve(self, accesses: int, estimator: str = "model") -> Curve:
        """The current estimate of the VM's LRU miss-ratio curve after ``accesses`` accesses."""
        if estimator == "shards":
            return self.shards.curve(accesses)
        times, pages = self._times.view(), self._pages.view()
        # Fixed size: pages evicted from the sample leave the log too, so the log is exactly the
        # traps a fixed-rate sample at the final rate would have taken.
        keep = self.in_sample(pages) & (times < accesses)
        traps = TrapTrace(times=times[keep], pages=pages[keep], accesses=max(int(accesses), 1), rate=self.rate,
                          untrace=1, sampled_accesses=-1, retrace_times=self._retrace.view()[keep])
        return untrace_mrc(traps)

    def heat(self, gpps: np.ndarray) -> np.ndarray:
        """Recency of each page in the online LRU: ``rank / n`` from 1/n (least recently
        trapped) to 1.0 (most recent); 0.0 for pages outside the sample or never touched."""
        order = self.shards.lru.pages_lru_order().astype(np.int64)
        gpps = np.asarray(gpps, dtype=np.int64)
        out = np.zeros(len(gpps))
        if not len(order):
            return out
        sorter = np.argsort(order, kind="stable")  # the sample's pages, not a word per VM page
        at = np.minimum(np.searchsorted(order, gpps, sorter=sorter), len(order) - 1)
        found = order[sorter[at]] == gpps
        out[found] = (sorter[at[found]] + 1) / len(order)
        return out
