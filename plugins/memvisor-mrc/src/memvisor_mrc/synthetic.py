"""Synthetic page traces with large footprints, for judging sampled curves (numpy only).

Page numbers are distinct random 40-bit values (so that nothing about a page's number correlates
with its role), drawn once per trace from ``seed``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["page_ids", "zipf_trace", "loop_trace", "scan_polluted_zipf", "phased_zipf"]


def page_ids(n_pages: int, rng: np.random.Generator) -> np.ndarray:
    """``n_pages`` distinct random page numbers below 2**40 (uint64)."""
    ids = np.unique(rng.integers(0, 2**40, int(n_pages * 1.1) + 16, dtype=np.uint64))
    while ids.size < n_pages:
        ids = np.unique(np.concatenate([ids, rng.integers(0, 2**40, n_pages, dtype=np.uint64)]))
    return rng.permutation(ids)[:n_pages]


def _zipf_ranks(n_pages: int, alpha: float, n: int, rng: np.random.Generator) -> np.ndarray:
    w = np.arange(1, n_pages + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(n)), n_pages - 1)


def zipf_trace(n_pages: int, n: int, alpha: float = 0.99, seed: int = 0) -> np.ndarray:
    """Independent references with Zipf(``alpha``) popularity over ``n_pages`` pages."""
    rng = np.random.default_rng(seed)
    ids = page_ids(n_pages, rng)
    return ids[_zipf_ranks(n_pages, alpha, n, rng)]


def loop_trace(n_pages: int, n: int, seed: int = 0) -> np.ndarray:
    """A cyclic sweep over ``n_pages`` pages: LRU misses every access below ``n_pages``."""
    rng = np.random.default_rng(seed)
    ids = page_ids(n_pages, rng)
    return ids[np.arange(n, dtype=np.int64) % n_pages]


def scan_polluted_zipf(
    n_pages: int,
    n: int,
    scan_fraction: float = 0.2,
    scan_pages: int = 1_000_000,
    alpha: float = 0.99,
    seed: int = 0,
) -> np.ndarray:
    """Zipf references with a share ``scan_fraction`` of sequential sweeps over a large region.

    The scan walks ``scan_pages`` pages in order (cyclically), in runs of 1,000 accesses placed at
    random points, so scanned pages are reused only after a whole sweep, if at all.
    """
    rng = np.random.default_rng(seed)
    ids = page_ids(n_pages + scan_pages, rng)
    out = ids[_zipf_ranks(n_pages, alpha, n, rng)]
    run = 1000
    n_runs = int(n * scan_fraction) // run
    starts = np.sort(rng.choice(n // run, n_runs, replace=False)) * run
    pos = (starts[:, None] + np.arange(run)[None, :]).ravel()
    scan_seq = n_pages + (np.arange(pos.size, dtype=np.int64) % scan_pages)
    out[pos] = ids[scan_seq]
    return out


def phased_zipf(
    n_pages: int, n: int, phases: int = 4, overlap: float = 0.5, alpha: float = 0.99, seed: int = 0
) -> np.ndarray:
    """Zipf references whose page set shifts ``phases`` times; consecutive sets share ``overlap``."""
    rng = np.random.default_rng(seed)
    shift = int(n_pages * (1 - overlap))
    ids = page_ids(n_pages + shift * (phases - 1), rng)
    out = np.empty(n, dtype=np.uint64)
    bounds = np.linspace(0, n, phases + 1).astype(np.int64)
    for ph in range(phases):
        a, b = bounds[ph], bounds[ph + 1]
        ranks = _zipf_ranks(n_pages, alpha, b - a, rng)
        # a fresh popularity order per phase over the phase's page window
        perm = rng.permutation(n_pages)
        out[a:b] = ids[ph * shift + perm[ranks]]
    return out
