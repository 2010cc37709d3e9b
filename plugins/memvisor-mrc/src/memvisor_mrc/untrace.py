"""The untraced period: sampled pages that stay untraced for a while after each trapped access.

What the hypervisor sees
------------------------
The sampled pages (spatial hash, :mod:`memvisor_mrc.shards`) are *traced*: an access to one traps.
After a trap at time ``tau`` (an access-count clock: time = index in the full trace) the page is
left untraced for ``U`` accesses and re-accesses in ``(tau, tau + U)`` are invisible; from
``tau + U`` on the page is traced again and its next access traps.  So a page's traps are the
greedy chain "first access, then the first access at least ``U`` later, ...".
:func:`simulate_traps` produces that chain for every sampled page at once, without a loop per
access: for each sampled access the next access of its page at least ``U`` later is found with
one ``searchsorted``, and the chains are followed by pointer doubling (``log2`` of the longest
chain rounds of whole-array gathers).  ``U <= 1`` traps every sampled access.

The estimator (:func:`untrace_mrc`)
-----------------------------------
Three things go missing with the hidden accesses, and the model restores each:

1. *Their number.*  A hidden access follows another access of the same page within ``U``
   accesses, so its reuse distance is at most ``W(U)``, the number of distinct pages touched in
   ``U`` accesses: it is a hit in any cache larger than that.  Their total is taken as in
   SHARDS_adj: the expected number of sampled accesses is ``E = N * R`` (``N`` from the access
   clock, ``R`` the sampling rate), so ``H = max(0, E - traps)`` accesses were hidden.
2. *Where they fall.*  Each page's accesses are modelled as a Bernoulli process with a per-page
   probability ``q_p`` per global access, estimated from what *is* observed: after each retrace
   the wait until the next trap is geometric(``q_p``), giving the maximum-likelihood
   ``q_p = waits_ended_by_a_trap / (sum of waits + waits_ended_by_a_trap)`` (the wait still open
   at the end of the trace is censored and only adds exposure).  Window ``k`` of page ``p``
   (length ``U_k``: ``U``, cut at the end of the trace) then holds ``q_p * U_k`` hidden accesses
   in expectation; these shares divide ``H``.  A window with ``n`` hidden accesses has
   inter-access gaps of about ``U_k / (n + 1)``, so its hidden hits are placed at
   ``1 + (D_k - 1) / (n + 1)`` pages, where ``D_k`` is the window's own (scaled) distinct-page
   count (concave ``W`` makes this a slight underestimate, and it matters only for caches smaller
   than ``W(U)``).
3. *Recency.*  Because a page keeps being used while untraced, its last real access before the
   next trap is near the *end* of its window, not at the trap.  When a window more likely than not
   contains an access (``q_p * U_k >= ln 2``), a *virtual touch* of the page is inserted at the
   expected time of its last hidden access, ``tau + U_k - 1 - E[gap]`` with
   ``E[gap] = 1/q - U e^{-qU} / (1 - e^{-qU})`` (the mean time from the last event of a Poisson
   process of rate ``q`` to the end of a window of length ``U``, given at least one event).
   Virtual touches carry no weight in the histogram but take part in the LRU order, so (i) the
   next trap of the page measures its distance from the page's last (estimated) access, and
   (ii) a page that stays hot while untraced still counts in the reuse windows of other pages.
   The virtual touch's own distance is ``D_k``.  Measured limitation: on traces whose page sets
   shift in phases, the per-page ``q_p`` (one rate over the whole run) misplaces virtual touches
   and ``virtual_touch=False`` is more accurate for large ``U`` (see the figures in the tests'
   benchmark script).

Every trap then contributes its stack distance in the augmented stream (traps + virtual touches),
scaled ``1 + (d - 1) / R``; first traps are cold misses; the hidden hits add ``H`` in total; the
miss ratio at ``C`` is ``1 - hits(<= C) / E``.  Assumptions, and where they fail: per-page
stationarity over the trace (``q_p`` is one number per page) and ``W(U)`` small against the cache
sizes of interest.  A hidden access whose true distance exceeds ``W(U)`` (e.g. a loop shorter than
``U``) is wrongly made a short hit, so ``U`` must stay well below the reuse times that matter;
:func:`untrace_mrc` is therefore meant for ``U`` chosen so that ``W(U)`` is a small fraction of
the footprint.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from memvisor_mrc.curve import Curve
from memvisor_mrc.shards import (
    MODULUS,
    distinct_count,
    sample_mask,
    scaled_distances_to_mrc,
    threshold_for_rate,
)
from memvisor_mrc.stack_distance import COLD, stack_distances

__all__ = ["TrapTrace", "simulate_traps", "untrace_mrc", "untraced_sampled_mrc"]


@attrs.frozen(eq=False)
class TrapTrace:
    """The trapped accesses of a run: ``times`` (indices into the full trace, ascending) and
    ``pages``; ``accesses`` is the length of the full trace, ``rate`` the sampling rate and
    ``untrace`` the untraced period ``U`` in accesses.  ``sampled_accesses`` counts all accesses
    to sampled pages, trapped or not (known only to the simulator; -1 when unknown).

    ``retrace_times`` (optional, one per trap, same order as ``times``) is when each trapped page
    was traced again, on the same access clock; a page not yet retraced has a time ``>=
    accesses``.  A hypervisor retraces at ticks, not after exactly ``U`` accesses, and a guest
    batch hides every touch after the first, so the online plugin passes the real windows; when
    None every window is ``U`` accesses long."""

    times: np.ndarray
    pages: np.ndarray
    accesses: int
    rate: float
    untrace: int
    sampled_accesses: int
    retrace_times: np.ndarray | None = None

    @property
    def trap_rate(self) -> float:
        """Traps per access of the whole trace."""
        return self.times.shape[0] / max(self.accesses, 1)


def _chain_traps(page_sorted: np.ndarray, t_sorted: np.ndarray, untrace: int) -> np.ndarray:
    """Mask of the trapped accesses, for accesses sorted by (page, time)."""
    m = t_sorted.shape[0]
    if m == 0:
        return np.zeros(0, dtype=bool)
    new_grp = np.concatenate([[True], page_sorted[1:] != page_sorted[:-1]])
    grp = np.cumsum(new_grp) - 1
    big = np.int64(t_sorted.max()) + np.int64(untrace) + 1
    key = grp * big + t_sorted
    nxt = np.searchsorted(key, key + untrace, side="left")
    # past the group's end (or the array's) -> sentinel m
    grp_end = np.concatenate([np.flatnonzero(new_grp)[1:], [m]])[grp]
    nxt = np.where(nxt < grp_end, nxt, m)
    jump = np.concatenate([nxt, [m]]).astype(np.int64)
    on = np.zeros(m + 1, dtype=bool)
    on[np.flatnonzero(new_grp)] = True
    # after s rounds, `on` holds the chain nodes at depth < 2**s; `jump` is the 2**s-step jump
    while True:
        src = np.flatnonzero(on[:m])
        dst = jump[src]
        if np.all(dst == m):
            break
        on[dst] = True
        jump = jump[jump]
    return on[:m]


def simulate_traps(pages: np.ndarray, rate: float, untrace: int, seed: int = 0) -> TrapTrace:
    """The accesses the hypervisor traps, sampling at ``rate`` with untraced period ``untrace``.

    An access to a sampled page at time ``t`` traps iff it is the page's first access or
    ``t >= last_trap + untrace``.  Vectorised; see the module docstring.
    """
    pages = np.asarray(pages).reshape(-1)
    n = int(pages.shape[0])
    untrace = int(untrace)
    idx = np.flatnonzero(sample_mask(pages, rate, seed))
    sp = pages[idx]
    if untrace <= 1 or idx.size == 0:
        trapped = idx
    else:
        order = np.argsort(sp, kind="stable")  # by page, then time
        on = _chain_traps(sp[order], idx[order].astype(np.int64), untrace)
        trapped = np.sort(idx[order][on])
    return TrapTrace(
        times=trapped.astype(np.int64),
        pages=pages[trapped],
        accesses=n,
        rate=threshold_for_rate(rate) / MODULUS,
        untrace=untrace,
        sampled_accesses=int(idx.size),
    )


def untrace_mrc(
    traps: TrapTrace,
    *,
    distinct_pages: int | None = None,
    virtual_touch: bool = True,
    hidden_hits: bool = True,
) -> Curve:
    """Miss-ratio curve estimated from the trapped accesses only (model: module docstring).

    ``distinct_pages`` (the workload's footprint ``D``, if known) calibrates the rate as
    ``D_s / D`` like ``rate_estimate="pages"`` of :func:`memvisor_mrc.shards.sampled_mrc`;
    otherwise the nominal rate is used.  ``virtual_touch`` and ``hidden_hits`` switch parts 3 and
    1-2 of the model off, for ablation.
    """
    t = np.asarray(traps.times, dtype=np.int64)
    p = np.asarray(traps.pages)
    n = int(traps.accesses)
    u = max(int(traps.untrace), 1)
    k = int(t.shape[0])
    if k == 0:
        return Curve(cache_pages=[0], miss_ratio=[1.0], accesses=n, sampled_pages=0, traced_accesses=0)
    # group the traps by page (then time)
    order = np.lexsort((t, p))
    ps, ts = p[order], t[order]
    new_grp = np.concatenate([[True], ps[1:] != ps[:-1]])
    grp = np.cumsum(new_grp) - 1
    n_pages = int(grp[-1]) + 1
    last_in_grp = np.concatenate([new_grp[1:], [True]])
    r = traps.rate
    if distinct_pages is not None and n_pages > 1 and distinct_pages > 1:
        r = (n_pages - 1) / float(distinct_pages - 1)  # as rate_estimate="pages" in shards
    # window of each trap: (tau, retrace), cut at the end of the trace; retrace = tau + U unless
    # the real retrace times are known
    if traps.retrace_times is None:
        end = ts + u
    else:
        end = np.maximum(np.asarray(traps.retrace_times, dtype=np.int64)[order], ts + 1)
    end = np.minimum(end, n)
    win = np.maximum(end - ts, 1)
    # geometric waits after each retrace that ended in a trap, and the censored last wait
    waits = np.where(last_in_grp, 0, np.roll(ts, -1) - end)
    waits = np.maximum(waits, 0)
    censored = np.where(last_in_grp, np.maximum(n - end, 0), 0)
    ended = (~last_in_grp).astype(np.float64)
    s_ended = np.bincount(grp, weights=ended, minlength=n_pages)
    s_wait = np.bincount(grp, weights=(waits + censored).astype(np.float64), minlength=n_pages)
    q = s_ended / np.maximum(s_wait + s_ended, 1.0)
    q = np.where(s_ended > 0, q, 0.0)
    nhat = q[grp] * win  # expected hidden accesses per window
    hot = (nhat >= math.log(2.0)) & (win > 1)
    if not virtual_touch:
        hot = np.zeros_like(hot)
    # augmented stream: traps (key 2t+1) and virtual touches at tau + U_k - 1 (key 2(t)+0)
    # expected gap between the last hidden access and the window's end, given at least one:
    # E[gap] = 1/q - U e^{-qU} / (1 - e^{-qU})  (Poisson approximation of the Bernoulli process)
    qw = np.maximum(q[grp], 1e-300)
    e = np.exp(-qw * win)
    gap = 1.0 / qw - win * e / np.maximum(1.0 - e, 1e-300)
    gap = np.clip(np.rint(gap), 0, win - 1).astype(np.int64)
    vt = (ts + win - 1 - gap)[hot]
    ev_key = np.concatenate([2 * ts + 1, 2 * vt])
    ev_page = np.concatenate([ps, ps[hot]])
    ev_win = np.concatenate([np.full(k, -1, np.int64), np.flatnonzero(hot)])
    eo = np.argsort(ev_key, kind="stable")
    d = stack_distances(ev_page[eo])
    d_ev = np.empty_like(d)
    d_ev[eo] = d
    d_trap = d_ev[:k]
    d_virt = d_ev[k:]
    size_trap = 1.0 + (d_trap - 1.0) / r
    reuse = d_trap != COLD
    sizes = [size_trap[reuse]]
    weights = [np.ones(int(reuse.sum()))]
    expected = n * r
    hidden_total = max(0.0, expected - k)
    if hidden_hits and hidden_total > 0 and nhat.sum() > 0:
        share = nhat * (hidden_total / nhat.sum())
        dk = np.full(k, np.nan)
        if d_virt.size:
            dk[ev_win[k:]] = 1.0 + (d_virt - 1.0) / r
            fill = float(np.mean(dk[hot]))
        else:
            fill = 1.0
        dk = np.where(np.isnan(dk), fill, dk)
        has = share > 0
        sizes.append(1.0 + (dk[has] - 1.0) / (nhat[has] + 1.0))
        weights.append(share[has])
    total = max(expected, float(k)) if hidden_hits else float(k)
    return scaled_distances_to_mrc(
        np.concatenate(sizes),
        np.concatenate(weights),
        float((~reuse).sum()),
        total,
        1.0 / r,
        accesses=n,
        sampled_pages=n_pages,
        traced_accesses=k,
    )


def untraced_sampled_mrc(
    pages: np.ndarray, rate: float, untrace: int, seed: int = 0, *, calibrate: bool = True
) -> tuple[Curve, TrapTrace]:
    """Simulate the traps of a whole trace and estimate its curve from them (offline driver).

    ``calibrate`` passes the exact footprint ``D`` to :func:`untrace_mrc`.
    """
    traps = simulate_traps(pages, rate, untrace, seed)
    d = distinct_count(pages) if calibrate else None
    return untrace_mrc(traps, distinct_pages=d), traps
