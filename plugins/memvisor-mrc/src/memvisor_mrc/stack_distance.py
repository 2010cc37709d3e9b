"""Exact LRU stack distances (Mattson et al., 1970) of a whole trace, vectorised in numpy.

Definitions
-----------
The stack distance of access ``i`` to page ``p`` is the number of distinct pages accessed since the
previous access ``j`` to ``p``, counting ``p`` itself: the pages of ``pages[j+1 : i+1]``.  It is
``>= 1``; a first access has no previous access and is *cold* (``COLD == 0`` in the arrays returned
here, read as "infinite").  An LRU cache of ``C`` pages hits access ``i`` iff its distance is in
``1..C``, so one pass of distances gives the miss ratio of every cache size at once.

Method (O(N log N), no Python loop per access)
---------------------------------------------
``prev[i]`` is the index of the previous access to the same page (``-1`` if none), found with one
stable argsort by page.  Between ``j = prev[i]`` and ``i`` there are ``i - j`` accesses; each access
``k`` in ``(j, i)`` that is *not* the first access of its page inside the window, i.e. with
``prev[k] > j``, repeats a page already counted.  Any ``k < i`` with ``prev[k] > j`` lies inside the
window (``prev[k] < k``), so::

    distance(i) = (i - j) - #{k < i : prev[k] > prev[i]}

The subtracted term is an "inversions per element" count, an offline 2-D dominance count.  It is
solved by :func:`count_earlier_greater` as a wavelet tree over the *index* bits: the elements are
put in value order once (here without a sort: ordering by ``prev`` is the inverse of ``prev``), then,
for each index bit from the most significant down, every block of ``2**(b+1)`` consecutive indices
is split stably into its lower and upper half.  An element of an upper half gains the number of
lower-half elements of its block that come after it in value order (i.e. are earlier in the trace
and larger), which is one ``cumsum`` over the array; the stable split itself is pure arithmetic on
that cumsum, one scatter.  Each of the ``ceil(log2 N)`` levels is a handful of whole-array numpy
operations on int32 (int64 for traces longer than 2**31 - 1).
"""

from __future__ import annotations

import numpy as np

from memvisor_mrc.curve import Curve, scaled_distances_to_mrc

__all__ = [
    "COLD",
    "previous_access",
    "count_earlier_greater",
    "stack_distances",
    "distance_histogram",
    "histogram_to_mrc",
    "exact_mrc",
]

#: Distance value marking a cold (first) access in arrays returned by this module.
COLD = 0


def _index_dtype(n: int) -> type[np.signedinteger]:
    return np.int32 if n < 2**31 - 1 else np.int64


def previous_access(pages: np.ndarray) -> np.ndarray:
    """Index of the previous access to the same page for every access, ``-1`` for first accesses.

    Pages and positions are packed into one uint64 key ``(page - min) << bits(N) | i`` whenever the
    page range allows, so that a plain (SIMD) ``np.sort`` orders by page and then by time;
    otherwise a stable argsort by page.  Neighbours in that order with equal pages are
    consecutive accesses to one page.
    """
    pages = np.asarray(pages)
    n = pages.shape[0]
    it = _index_dtype(n)
    prev = np.full(n, -1, dtype=it)
    if n < 2:
        return prev
    nb = int(n - 1).bit_length()
    mn = int(pages.min())
    span = int(pages.max()) - mn
    if mn >= 0 and span < 2 ** (64 - nb):
        key = np.subtract(pages, np.uint64(mn), dtype=np.uint64, casting="unsafe")
        np.left_shift(key, np.uint64(nb), out=key)
        np.bitwise_or(key, np.arange(n, dtype=np.uint64), out=key)
        key.sort()
        order = np.bitwise_and(key, np.uint64((1 << nb) - 1)).astype(it)
        np.right_shift(key, np.uint64(nb), out=key)
        same = key[1:] == key[:-1]
        del key
    else:
        order = np.argsort(pages, kind="stable").astype(it, copy=False)
        sp = pages[order]
        same = sp[1:] == sp[:-1]
        del sp
    prev[order[1:][same]] = order[:-1][same]
    return prev


def _value_order_of_prev(prev: np.ndarray) -> np.ndarray:
    """Indices sorted by ``prev`` value (ties, all ``-1``, in index order) without sorting."""
    n = prev.shape[0]
    it = prev.dtype
    has_prev = prev >= 0
    idx = np.arange(n, dtype=it)
    nxt = np.full(n, -1, dtype=it)
    nxt[prev[has_prev]] = idx[has_prev]
    return np.concatenate([idx[~has_prev], nxt[nxt >= 0]])


def count_earlier_greater(
    values: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    value_order: np.ndarray | None = None,
) -> np.ndarray:
    """For every ``i``: the sum of ``weights[k]`` over ``k < i`` with ``values[k] > values[i]``.

    ``weights`` default to 1 (a plain per-element inversion count).  ``value_order``, if given, must
    be ``np.argsort(values, kind="stable")`` (callers that know it cheaply pass it).  O(N log N) in
    ``ceil(log2 N)`` vectorised passes; see the module docstring.  Returns int64.
    """
    values = np.asarray(values)
    n = values.shape[0]
    out = np.zeros(n, dtype=np.int64)
    if n < 2:
        return out
    if value_order is None:
        value_order = np.argsort(values, kind="stable")
    if weights is None and n < 2**31 - 1:
        return _count_earlier_greater_packed(np.asarray(value_order), n)
    it = _index_dtype(n)
    idx = np.asarray(value_order, dtype=it).copy()
    nbits = int(n - 1).bit_length()
    pos = np.arange(n, dtype=it)
    w_cur = np.ones(n, dtype=np.int64) if weights is None else np.asarray(weights, np.int64)[idx]
    acc = np.zeros(n, dtype=np.int64)
    idx_new = np.empty_like(idx)
    acc_new = np.empty_like(acc)
    w_new = np.empty_like(w_cur)
    for b in range(nbits - 1, -1, -1):
        half = it(1 << b)
        upper = ((idx >> b) & 1).astype(bool)
        cz = np.cumsum(~upper, dtype=it)  # inclusive count of lower-half elements
        base = (pos >> (b + 1)) << b  # g * 2**b
        # weighted lower-half elements of the block after each upper-half element
        czw = np.concatenate([[0], np.cumsum(np.where(upper, 0, w_cur))])
        block_end = np.minimum(((pos >> (b + 1)) + 1) << (b + 1), n)
        acc[upper] += czw[block_end[upper]] - czw[pos[upper] + 1]
        # stable split: lower half first (g*2**b + cz - 1), then upper (g*2**b + 2**b + p - cz)
        newp = np.where(upper, half + pos - cz, cz - 1) + base
        idx_new[newp] = idx
        acc_new[newp] = acc
        w_new[newp] = w_cur
        idx, idx_new = idx_new, idx
        acc, acc_new = acc_new, acc
        w_cur, w_new = w_new, w_cur
    # after the last level every block is one index, so position == original index
    out[:] = acc
    return out


def _count_earlier_greater_packed(value_order: np.ndarray, n: int, tail_bits: int = 3) -> np.ndarray:
    """Unweighted :func:`count_earlier_greater` for ``n < 2**31``.

    Each element is one int64 holding ``original_index`` (low int32) and its running count (high
    int32), so a level moves both with a single scatter; the arithmetic runs on int32 views.  The
    last ``tail_bits`` levels (blocks of ``2**tail_bits`` indices) are finished at once by comparing
    all pairs inside each block.
    """
    it = np.int32
    nbits = int(n - 1).bit_length()
    tail_bits = min(tail_bits, nbits)
    comb = np.zeros(n, dtype=np.int64)
    comb_new = np.empty_like(comb)
    comb.view(it)[0::2] = value_order
    pos = np.arange(n, dtype=it)
    hpos = pos >> 1
    bit = np.empty(n, dtype=it)
    co = np.empty(n, dtype=it)
    up = np.empty(n, dtype=it)
    lo = np.empty(n, dtype=it)
    tmp = np.empty(n, dtype=it)
    for b in range(nbits - 1, tail_bits - 1, -1):
        view = comb.view(it)
        idx, acc = view[0::2], view[1::2]
        low = it((1 << b) - 1)
        np.right_shift(idx, b, out=bit)
        np.bitwise_and(bit, 1, out=bit)  # 1 = upper half of its block of 2**(b+1) indices
        np.cumsum(bit, out=co)  # inclusive count of upper-half elements
        # with g the block and base = g * 2**b (hpos with the low b bits cleared):
        #   new position of an upper-half element = base + 2**b - 1 + co
        #   new position of a lower-half element  = base - co + p
        #   gain of an upper-half element = lower-half elements of the block after it
        #                                 = base + 2**b - 1 + co - p
        np.bitwise_or(hpos, low, out=up)
        np.add(up, co, out=up)
        np.bitwise_and(hpos, ~low, out=lo)
        np.subtract(lo, co, out=lo)
        np.add(lo, pos, out=lo)
        np.subtract(up, pos, out=tmp)
        np.multiply(tmp, bit, out=tmp)
        np.add(acc, tmp, out=acc)
        np.subtract(up, lo, out=tmp)  # new position, branch-free: lo + bit * (up - lo)
        np.multiply(tmp, bit, out=tmp)
        np.add(lo, tmp, out=lo)
        comb_new[lo] = comb
        comb, comb_new = comb_new, comb
    del comb_new, bit, co, up, lo, tmp, pos, hpos
    view = comb.view(it)
    idx = np.ascontiguousarray(view[0::2])
    acc = np.ascontiguousarray(view[1::2])
    del comb, view
    out = np.empty(n, dtype=np.int64)
    width = 1 << tail_bits
    full = (n // width) * width
    later = np.triu(np.ones((width, width), dtype=bool), 1)
    step = width * 65536
    for s in range(0, full, step):
        e = min(full, s + step)
        blk = idx[s:e].reshape(-1, width)
        # gain[a] = #{a' > a in value order: index[a'] < index[a]}
        cmp = blk[:, None, :] < blk[:, :, None]
        cmp &= later
        out[idx[s:e]] = acc[s:e] + cmp.sum(axis=2, dtype=it).ravel()
    if full < n:
        blk = idx[full:]
        m = n - full
        cmp = (blk[None, :] < blk[:, None]) & np.triu(np.ones((m, m), dtype=bool), 1)
        out[blk] = acc[full:] + cmp.sum(axis=1)
    return out


def stack_distances(pages: np.ndarray) -> np.ndarray:
    """Exact LRU stack distance of every access (int64; ``COLD`` (0) for first accesses)."""
    pages = np.asarray(pages)
    n = pages.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    prev = previous_access(pages)
    inv = count_earlier_greater(prev, value_order=_value_order_of_prev(prev))
    i = np.arange(n, dtype=np.int64)
    dist = i - prev - inv
    dist[prev < 0] = COLD
    return dist


def distance_histogram(distances: np.ndarray) -> tuple[np.ndarray, int]:
    """``(hist, cold)``: ``hist[d]`` = number of accesses at distance ``d`` (``hist[0] == 0``)."""
    d = np.asarray(distances, dtype=np.int64)
    hist = np.bincount(d)
    if hist.shape[0] == 0:
        hist = np.zeros(1, dtype=np.int64)
    cold = int(hist[0])
    hist = hist.astype(np.float64)
    hist[0] = 0.0
    return hist, cold


def histogram_to_mrc(
    hist: np.ndarray,
    cold: float,
    total: float,
    scale: float = 1.0,
    *,
    accesses: int | None = None,
    sampled_pages: int | None = None,
    traced_accesses: int | None = None,
) -> Curve:
    """Miss-ratio curve from a stack-distance histogram.

    ``hist[d]`` is the (possibly weighted) count of accesses at distance ``d >= 1`` (``hist[0]``
    is ignored), ``cold`` the count of cold accesses and ``total`` the count that miss ratios are
    divided by (``hist.sum() + cold`` for an unadjusted histogram).  ``scale`` maps a distance
    measured in a sample to a cache size: distance ``d`` becomes ``1 + (d - 1) * scale`` — the
    accessed page itself is always counted once and each of the other ``d - 1`` pages stands for
    ``scale`` pages (``scale = 1/R`` for a spatial sample at rate ``R``), so the mapping is unbiased
    and ``d = 1`` stays a cache of one page.  Each bucket's hits are spread over the ``scale``
    sizes below its scaled distance (see :func:`memvisor_mrc.shards.scaled_distances_to_mrc`); at
    ``scale = 1`` the curve is exact at every integer size.
    """
    h = np.asarray(hist, dtype=np.float64).reshape(-1)
    d = np.flatnonzero(h[1:]) + 1
    n = int(round(total)) if accesses is None else accesses
    return scaled_distances_to_mrc(
        1.0 + (d - 1.0) * float(scale),
        h[d],
        float(cold),
        float(total),
        max(float(scale), 1.0),
        accesses=n,
        sampled_pages=int(round(cold)) if sampled_pages is None else sampled_pages,
        traced_accesses=n if traced_accesses is None else traced_accesses,
    )


def exact_mrc(pages: np.ndarray) -> Curve:
    """Exact LRU miss ratio of every cache size ``0..D`` (``D`` = distinct pages) of a trace.

    Cold misses count as misses, so the miss ratio at ``C = D`` is ``D / N``.
    """
    pages = np.asarray(pages)
    n = int(pages.shape[0])
    if n == 0:
        raise ValueError("empty trace")
    hist = np.bincount(stack_distances(pages))
    d = int(hist[0])  # one cold access per distinct page
    hits = np.zeros(d + 1)
    hits[1 : hist.shape[0]] = hist[1:]
    miss = (n - np.cumsum(hits)) / n  # misses over accesses: 1 - hits / n is 0.05000000000000004 for 5 %
    miss[0] = 1.0
    return Curve(
        cache_pages=np.arange(d + 1, dtype=np.int64),
        miss_ratio=np.minimum.accumulate(np.clip(miss, 0.0, 1.0)),
        accesses=n,
        sampled_pages=d,
        traced_accesses=n,
    )
