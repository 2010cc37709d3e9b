"""Sampled miss-ratio curves by spatial hashing, after SHARDS (Waldspurger et al., FAST '15).

Sampling
--------
A page is *sampled* iff ``page_hash(page) mod P < T`` with ``P = 2**32`` (:data:`MODULUS`); the
sampling rate is ``R = T / P``.  :func:`page_hash` is the splitmix64 output function applied to
``page + (seed + 1) * 0x9E3779B97F4A7C15`` (mod 2**64): a fixed, documented 64-bit mix, so a page's
membership never depends on time, and every access to a sampled page is seen.  Stack distances
measured among the sampled pages are then mapped to cache sizes with ``1 + (d - 1) / R``: the page
itself is always in its own sample and each of the other ``d - 1`` sampled pages stands for
``1 / R`` pages (the plain SHARDS ``d / R`` pushes every short reuse out to ``1 / R`` pages).

Fixed-rate mode (``rate=R``)
    One vectorised filter, then exact stack distances of the sampled subsequence
    (:func:`memvisor_mrc.stack_distance.stack_distances`).  ``adj=True`` applies the SHARDS_adj
    correction: the histogram is divided by the *expected* number of sampled accesses
    ``E = N * R`` instead of the actual ``N_s``, and ``E - N_s`` is added to the first bucket (a
    sample that holds too many or too few hot pages is off mainly in its shortest reuses).
    ``rate_estimate="pages"`` replaces the nominal ``R`` by the realised share of distinct pages,
    ``D_s / D`` (``D`` counted exactly over the trace): this removes the error of the sample's
    size itself, which is the whole error on loops and scans, where every sampled reuse has the
    same distance (see :func:`sampled_mrc`).

Fixed-size mode (``sample_size=S``, SHARDS with ``s_max``; ``adj`` against the final rate)
    At most ``S`` pages are tracked.  When an access to a new page (hash below the current
    threshold) makes it ``S + 1``, the page with the largest hash is evicted from the sample and
    from the LRU, and ``T`` drops to its hash, so only pages with smaller hashes are sampled from
    then on.  Each access is scaled with the rate in force when it was processed, and, as in
    SHARDS, the counts recorded earlier are rescaled by ``R_new / R_old`` at every drop (here: each
    access gets weight ``R_final / R(t)``).  :func:`sampled_mrc` computes this offline without a
    loop per access: the threshold schedule needs a heap loop over the *distinct* pages that enter
    the sample only, and the distances with evictions are the plain stack distances of the
    processed subsequence minus an offline dominance count of the evicted pages that were last
    touched inside each reuse window (see :func:`_fixed_size`).  :class:`OnlineLRU` with
    :meth:`OnlineLRU.remove` gives the same distances access by access.
"""

from __future__ import annotations

import heapq

import numpy as np

from memvisor_mrc.curve import Curve, scaled_distances_to_mrc
from memvisor_mrc.stack_distance import (
    COLD,
    count_earlier_greater,
    previous_access,
    stack_distances,
)

__all__ = [
    "MODULUS",
    "page_hash",
    "threshold_for_rate",
    "sample_mask",
    "distinct_count",
    "OnlineLRU",
    "scaled_distances_to_mrc",
    "sampled_mrc",
    "OnlineShards",
]

#: ``P``: a page is sampled iff ``page_hash(page) % MODULUS < T``.
MODULUS = 1 << 32

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def page_hash(pages: np.ndarray, seed: int = 0) -> np.ndarray:
    """splitmix64 mix of ``page + (seed + 1) * 0x9E3779B97F4A7C15`` (uint64, wrapping arithmetic).

    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``.
    """
    z = np.array(pages, dtype=np.uint64, copy=True).reshape(-1)
    offset = np.uint64(((seed + 1) * 0x9E3779B97F4A7C15) % (1 << 64))
    with np.errstate(over="ignore"):
        np.add(z, offset, out=z)
        t = np.right_shift(z, np.uint64(30))
        np.bitwise_xor(z, t, out=z)
        np.multiply(z, _M1, out=z)
        np.right_shift(z, np.uint64(27), out=t)
        np.bitwise_xor(z, t, out=z)
        np.multiply(z, _M2, out=z)
        np.right_shift(z, np.uint64(31), out=t)
        np.bitwise_xor(z, t, out=z)
    return z.reshape(np.shape(pages))


def threshold_for_rate(rate: float) -> int:
    """``T`` for a sampling rate ``R`` (``round(R * P)``, at least 1)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError("rate must be in (0, 1]")
    return max(1, min(MODULUS, int(round(rate * MODULUS))))


def _hash_mod(pages: np.ndarray, seed: int) -> np.ndarray:
    return np.bitwise_and(page_hash(pages, seed), np.uint64(MODULUS - 1))


def sample_mask(pages: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of the accesses whose page is in the spatial sample at rate ``rate``."""
    return _hash_mod(pages, seed) < np.uint64(threshold_for_rate(rate))


def distinct_count(pages: np.ndarray) -> int:
    """Exact number of distinct pages (one sort)."""
    p = np.sort(np.asarray(pages).reshape(-1))
    if p.size == 0:
        return 0
    return int(np.count_nonzero(p[1:] != p[:-1])) + 1


class OnlineLRU:
    """LRU stack over the traced pages giving each access's stack distance in O(log n).

    Every tracked page holds the timestamp of its last access; a Fenwick tree over timestamps counts
    pages per timestamp, so the distance of an access to ``p`` is ``1 +`` the number of pages whose
    timestamp is greater than ``p``'s.  When the timestamps reach the tree's capacity they are
    renumbered ``0..n-1`` in LRU order and the tree is rebuilt (vectorised).  ``access`` takes a batch:
    small batches run a tight Python loop; a batch at least a quarter the size of the stack is done
    with no per-access loop by computing the exact stack distances of
    ``(tracked pages in LRU order) + batch`` (:func:`stack_distances`).  Distances are ``COLD`` (0)
    for pages not tracked before.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._cap = max(16, int(capacity))
        self._tree = [0] * (self._cap + 1)  # 1-based Fenwick tree over timestamps 0..cap-1
        self._ts: dict[int, int] = {}
        self._clock = 0

    def __len__(self) -> int:
        return len(self._ts)

    def __contains__(self, page: object) -> bool:
        return int(page) in self._ts  # type: ignore[call-overload]

    def pages_lru_order(self) -> np.ndarray:
        """Tracked pages from least to most recently used (uint64)."""
        if not self._ts:
            return np.zeros(0, dtype=np.uint64)
        keys = np.fromiter(self._ts.keys(), dtype=np.uint64, count=len(self._ts))
        ts = np.fromiter(self._ts.values(), dtype=np.int64, count=len(self._ts))
        return keys[np.argsort(ts, kind="stable")]

    def _rebuild(self, pages_in_order: np.ndarray, capacity: int | None = None) -> None:
        n = len(pages_in_order)
        cap = max(16, 2 * n, capacity or 0)
        self._cap = cap
        counts = np.zeros(cap + 1, dtype=np.int64)
        counts[1 : n + 1] = 1
        cs = np.cumsum(counts)
        i = np.arange(cap + 1, dtype=np.int64)
        tree = cs - cs[i - (i & -i)]
        tree[0] = 0
        self._tree = tree.tolist()
        self._ts = dict(zip(pages_in_order.tolist(), range(n)))
        self._clock = n

    def _compact(self) -> None:
        self._rebuild(self.pages_lru_order())

    def remove(self, page: int) -> bool:
        """Stop tracking ``page`` (fixed-size sampling); returns whether it was tracked."""
        t = self._ts.pop(int(page), None)
        if t is None:
            return False
        tree, cap = self._tree, self._cap
        i = t + 1
        while i <= cap:
            tree[i] -= 1
            i += i & -i
        return True

    def access_one(self, page: int) -> int:
        """Record one access; returns its stack distance (``COLD`` for an untracked page)."""
        if self._clock >= self._cap:
            self._compact()
        tree, cap, ts = self._tree, self._cap, self._ts
        page = int(page)
        now = self._clock
        self._clock = now + 1
        old = ts.get(page)
        ts[page] = now
        i = now + 1
        while i <= cap:
            tree[i] += 1
            i += i & -i
        if old is None:
            return COLD
        # pages with timestamp <= old (prefix sum), the page itself included
        s = 0
        i = old + 1
        while i > 0:
            s += tree[i]
            i -= i & -i
        i = old + 1
        while i <= cap:
            tree[i] -= 1
            i += i & -i
        return len(ts) - s + 1

    def access(self, pages: np.ndarray) -> np.ndarray:
        """Record a batch of accesses in order; returns their stack distances (int64)."""
        pages = np.asarray(pages).reshape(-1)
        m = pages.shape[0]
        if m == 0:
            return np.zeros(0, dtype=np.int64)
        if m >= 256 and 4 * m >= len(self._ts):
            state = self.pages_lru_order()
            seq = np.concatenate([state, pages.astype(np.uint64)])
            dist = stack_distances(seq)[state.shape[0] :]
            prev = previous_access(seq)
            is_last = np.ones(seq.shape[0], dtype=bool)
            is_last[prev[prev >= 0]] = False
            self._rebuild(seq[is_last])
            return dist
        out = np.empty(m, dtype=np.int64)
        one = self.access_one
        for k, p in enumerate(pages.tolist()):
            out[k] = one(p)
        return out


def sampled_mrc(
    pages: np.ndarray,
    rate: float | None = None,
    sample_size: int | None = None,
    seed: int = 0,
    *,
    adj: bool = True,
    rate_estimate: str = "pages",
) -> Curve:
    """Sampled LRU miss-ratio curve of a whole trace (SHARDS), vectorised.

    ``rate`` alone: fixed-rate mode.  ``sample_size`` (optionally with ``rate`` as the initial
    rate, default 1.0): fixed-size mode, at most ``sample_size`` pages tracked.  ``adj`` applies the
    SHARDS_adj first-bucket correction (fixed-rate mode only).  ``rate_estimate`` (fixed-rate mode):
    ``"nominal"`` scales by ``R = T / P``; ``"pages"`` by the realised ``D_s / D`` (exact distinct
    counts; costs one sort of the trace).
    """
    pages = np.asarray(pages).reshape(-1)
    n = int(pages.shape[0])
    if n == 0:
        raise ValueError("empty trace")
    if sample_size is not None:
        return _fixed_size(pages, int(sample_size), 1.0 if rate is None else rate, seed, adj)
    if rate is None:
        raise ValueError("give rate, sample_size or both")
    if rate_estimate not in ("nominal", "pages"):
        raise ValueError("rate_estimate must be 'nominal' or 'pages'")
    t = threshold_for_rate(rate)
    mask = _hash_mod(pages, seed) < np.uint64(t)
    sp = pages[mask]
    ns = int(sp.shape[0])
    if ns == 0:
        return Curve(cache_pages=[0], miss_ratio=[1.0], accesses=n, sampled_pages=0, traced_accesses=0)
    d = stack_distances(sp)
    hist = np.bincount(d).astype(np.float64)
    cold = int(hist[0])
    r = t / MODULUS
    if rate_estimate == "pages":
        # the rate of the *other* pages, given the accessed page is sampled: (D_s - 1) / (D - 1),
        # consistent with the 1 + (d - 1) / R mapping (a loop then lands exactly on its length)
        d_all = distinct_count(pages)
        if cold > 1 and d_all > 1:
            r = (cold - 1) / (d_all - 1)
    reuse = np.flatnonzero(hist[1:]) + 1
    w = hist[reuse]
    total = float(ns)
    if adj:
        expected = n * r
        w = w.copy()
        if w.size:
            w[0] += expected - ns  # may be negative; clipped by the curve's [0, 1] range
        total = max(expected, 1e-300)
    return scaled_distances_to_mrc(
        1.0 + (reuse - 1.0) / r,
        w,
        cold,
        total,
        1.0 / r,
        accesses=n,
        sampled_pages=cold,
        traced_accesses=ns,
    )


def _fixed_size_schedule(
    first_hash: np.ndarray, size: int, t0: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Heap loop over the distinct candidate pages in first-access order.

    Returns ``admitted`` (bool per page), ``evicted_by`` (index of the page whose arrival evicted
    it, -1 if never), and the threshold schedule ``(event_page, threshold_after)``.
    """
    m = first_hash.shape[0]
    admitted = np.zeros(m, dtype=bool)
    evicted_by = np.full(m, -1, dtype=np.int64)
    ev_page: list[int] = []
    ev_thr: list[int] = []
    heap: list[tuple[int, int]] = []  # (-hash, page index): max-heap on hash
    thr = t0
    chunk = 4096
    for s in range(0, m, chunk):
        h = first_hash[s : s + chunk]
        cand = np.flatnonzero(h < thr)  # the threshold only falls: a superset of the arrivals
        for k, hk in zip((cand + s).tolist(), h[cand].tolist()):
            if hk >= thr:
                continue
            admitted[k] = True
            if len(heap) < size:
                heapq.heappush(heap, (-hk, k))
                continue
            neg, victim = heapq.heappushpop(heap, (-hk, k))
            # evict every page whose hash equals the new threshold (ties leave together)
            thr = -neg
            evicted_by[victim] = k
            while heap and -heap[0][0] >= thr:
                evicted_by[heapq.heappop(heap)[1]] = k
            ev_page.append(k)
            ev_thr.append(thr)
    return admitted, evicted_by, np.asarray(ev_page, np.int64), np.asarray(ev_thr, np.int64)


def _fixed_size(pages: np.ndarray, size: int, rate0: float, seed: int, adj: bool = True) -> Curve:
    """Fixed-size SHARDS (see the module docstring), offline and vectorised."""
    if size < 1:
        raise ValueError("sample_size must be >= 1")
    n = int(pages.shape[0])
    t0 = threshold_for_rate(rate0)
    h = _hash_mod(pages, seed)
    cand_t = np.flatnonzero(h < np.uint64(t0))
    if cand_t.size == 0:
        return Curve(cache_pages=[0], miss_ratio=[1.0], accesses=n, sampled_pages=0, traced_accesses=0)
    cp = pages[cand_t]
    ch = h[cand_t].astype(np.int64)
    # dense page ids in first-access order
    prev = previous_access(cp)
    first = np.flatnonzero(prev < 0)
    pid_of_first = np.arange(first.size, dtype=np.int64)
    pid = np.empty(cp.size, dtype=np.int64)
    pid[first] = pid_of_first
    rest = np.flatnonzero(prev >= 0)
    # propagate ids along the chain of previous accesses (prev points backwards, so in order)
    if rest.size:
        order = np.argsort(cp, kind="stable")
        sp = cp[order]
        grp = np.concatenate([[0], np.cumsum(sp[1:] != sp[:-1])])
        first_in_grp = np.flatnonzero(np.concatenate([[True], sp[1:] != sp[:-1]]))
        pid[order] = pid[order[first_in_grp]][grp]
    admitted, evicted_by, ev_page, ev_thr = _fixed_size_schedule(ch[first], size, t0)
    # event times in candidate-stream coordinates: the first access of the evicting page
    ev_time = first[ev_page] if ev_page.size else np.zeros(0, dtype=np.int64)
    drop_time = np.full(first.size, np.iinfo(np.int64).max, dtype=np.int64)
    has_drop = evicted_by >= 0
    drop_time[has_drop] = first[evicted_by[has_drop]]
    k = np.arange(cp.size, dtype=np.int64)
    valid = admitted[pid] & (k <= drop_time[pid])  # a page evicting itself is processed first
    vk = k[valid]  # candidate-stream index of every processed access
    vp = cp[valid]
    vpid = pid[valid]
    nv = int(vk.size)
    # threshold in force when each processed access is handled (events strictly before it)
    nev = np.searchsorted(ev_time, vk, side="left")
    thr_sched = np.concatenate([[t0], ev_thr]).astype(np.float64)
    thr_at = thr_sched[nev]
    r_at = thr_at / MODULUS
    r_final = (ev_thr[-1] if ev_thr.size else t0) / MODULUS
    # plain stack distances on the processed subsequence ...
    vprev = previous_access(vp).astype(np.int64)
    dist = stack_distances(vp)
    # ... minus evicted pages last touched inside the reuse window (prev, i] and evicted before i:
    # a point (L_q, e_q) per evicted page (its last processed access and the processed index of
    # the access that evicted it) counts for query (j, i) iff L_q > j and e_q < i.
    dropped = np.flatnonzero(has_drop & admitted)
    if dropped.size and nv:
        # last processed access of each dropped page
        last_v = np.full(first.size, -1, dtype=np.int64)
        last_v[vpid] = np.arange(nv, dtype=np.int64)  # later writes win: the last access
        lq = last_v[dropped]
        # q is gone for every processed access after its drop time: e_q = processed accesses at
        # or before the drop; q counts for query i iff i >= e_q (times 2e-1 < 2i keep it strict)
        eq = np.searchsorted(vk, drop_time[dropped], side="right")
        ok = lq >= 0
        lq, eq = lq[ok], eq[ok]
        queries = np.flatnonzero(vprev >= 0)
        # one sequence ordered by time (points before queries), values L_q or j
        times = np.concatenate([2 * eq - 1, 2 * queries])
        vals = np.concatenate([lq, vprev[queries]])
        wts = np.concatenate([np.ones(eq.size, np.int64), np.zeros(queries.size, np.int64)])
        o = np.argsort(times, kind="stable")
        cnt = count_earlier_greater(vals[o], wts[o])
        corr = np.empty_like(cnt)
        corr[o] = cnt
        dist[queries] -= corr[eq.size :]
    weight = r_final / r_at
    reuse = dist != COLD
    sizes = 1.0 + (dist[reuse] - 1.0) / r_at[reuse]
    w = weight[reuse]
    spread = 1.0 / r_at[reuse]
    total = float(weight.sum())
    if adj and sizes.size:
        # SHARDS_adj against the final rate: every weight is already rescaled to it
        first = int(np.lexsort((spread, sizes))[0])  # smallest size (then spread)
        expected = n * r_final
        sizes = np.append(sizes, sizes[first])
        w = np.append(w, expected - total)
        spread = np.append(spread, spread[first])
        total = max(expected, 1e-300)
    return scaled_distances_to_mrc(
        sizes,
        w,
        float(weight[~reuse].sum()),
        total,
        spread,
        accesses=n,
        sampled_pages=int(admitted.sum() - has_drop.sum()),
        traced_accesses=nv,
    )


class OnlineShards:
    """Online SHARDS over a stream of accesses: the structure a hypervisor keeps while running.

    ``process(pages)`` takes the next accesses (all of them, or only those a trap delivered, since
    unsampled pages are dropped by the hash test first); ``curve(accesses)`` returns the current
    estimate.  Fixed-rate when ``sample_size`` is None, else fixed-size with ``rate`` as the
    initial rate.  Distances are scaled as in :func:`sampled_mrc` (nominal rate; SHARDS_adj when
    ``adj`` and fixed-rate).  The reference for the vectorised :func:`sampled_mrc`.
    """

    def __init__(
        self, rate: float | None = None, sample_size: int | None = None, seed: int = 0, adj: bool = True
    ) -> None:
        if rate is None and sample_size is None:
            raise ValueError("give rate, sample_size or both")
        self.seed = seed
        self.adj = adj
        self.sample_size = sample_size
        self.threshold = threshold_for_rate(1.0 if rate is None else rate)
        self.lru = OnlineLRU()
        self._heap: list[tuple[int, int]] = []
        self._hist: dict[tuple[float, float], float] = {}  # (size, spread) -> weight
        self._cold = 0.0
        self._processed = 0
        self._seen = 0

    @property
    def rate(self) -> float:
        return self.threshold / MODULUS

    def process(self, pages: np.ndarray) -> np.ndarray:
        """Feed accesses in order; returns the sampled distances (0 = cold) of the processed ones."""
        pages = np.asarray(pages).reshape(-1)
        self._seen += int(pages.shape[0])
        h = _hash_mod(pages, self.seed)
        keep = np.flatnonzero(h < np.uint64(self.threshold))
        if self.sample_size is None:
            d = self.lru.access(pages[keep])
            self._record(d, self.rate)
            return d
        out = []
        for p, hp in zip(pages[keep].tolist(), h[keep].tolist()):
            if hp >= self.threshold:
                continue
            r = self.rate
            if p in self.lru:
                d = self.lru.access_one(p)
                self._record(np.array([d]), r)
                out.append(d)
                continue
            self.lru.access_one(p)
            self._record(np.array([COLD]), r)
            out.append(COLD)
            heapq.heappush(self._heap, (-hp, p))
            if len(self._heap) > self.sample_size:
                neg, victim = heapq.heappop(self._heap)
                new_thr = -neg
                self.lru.remove(victim)
                while self._heap and -self._heap[0][0] >= new_thr:
                    self.lru.remove(heapq.heappop(self._heap)[1])
                scale = new_thr / self.threshold  # SHARDS: rescale recorded counts
                self._hist = {x: c * scale for x, c in self._hist.items()}
                self._cold *= scale
                self.threshold = new_thr
        return np.asarray(out, dtype=np.int64)

    def _record(self, d: np.ndarray, r: float) -> None:
        self._processed += int(d.shape[0])
        reuse = d[d != COLD]
        self._cold += float(d.shape[0] - reuse.shape[0])
        if reuse.size:
            vals, cnt = np.unique(reuse, return_counts=True)
            for v, c in zip(vals.tolist(), cnt.tolist()):
                key = (1.0 + (v - 1.0) / r, 1.0 / r)
                self._hist[key] = self._hist.get(key, 0.0) + float(c)

    def curve(self, accesses: int | None = None) -> Curve:
        """The current estimate; ``accesses`` (default: all accesses fed) for SHARDS_adj."""
        n = self._seen if accesses is None else int(accesses)
        keys = list(self._hist.keys())
        xs = np.asarray([k[0] for k in keys], dtype=np.float64)
        sp = np.asarray([k[1] for k in keys], dtype=np.float64)
        ws = np.asarray(list(self._hist.values()), dtype=np.float64)
        total = float(ws.sum() + self._cold)
        if self.adj and xs.size:
            first = int(np.lexsort((sp, xs))[0])
            expected = n * self.rate
            xs = np.append(xs, xs[first])
            sp = np.append(sp, sp[first])
            ws = np.append(ws, expected - total)
            total = expected
        return scaled_distances_to_mrc(
            xs,
            ws,
            self._cold,
            max(total, 1e-300),
            sp,
            accesses=n,
            sampled_pages=len(self.lru),
            traced_accesses=self._processed,
        )
