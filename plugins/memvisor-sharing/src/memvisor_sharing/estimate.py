"""The reclaim estimate over real memory: what ``memvisor sharing estimate`` computes.

Every page is fingerprinted (xxh3, :mod:`memvisor_sharing.fingerprint`); pages whose
fingerprints match are read again and compared byte for byte, so the figures are exact, not
probabilistic: a collision splits into its true contents.

Figures (the JSON of ``--json``):

- ``pages``: pages read; ``zero_pages``: pages of zeros;
- ``duplicate_pages``: non-zero pages with a byte-identical twin (in the same source, or in any
  source with ``across``);
- ``reclaimable_pages``: pages that sharing would free: every copy of a content but one, zero
  pages included (all zero pages of all sources are one content: the zero page is never salted);
- ``large_pages``: large-page regions; ``large_pages_with_opportunity``: regions holding at
  least one zero page or one page with a twin;
- ``seconds``: wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from memvisor_sharing.fingerprint import ZERO_HASH, page_hashes, zero_rows

_VERIFY_CHUNK = 8192  # candidate pages compared at a time (32 MiB of bytes per side)


def estimate(sources: Sequence, *, across: bool = False,
             progress: Callable[[int], None] | None = None) -> dict:
    """Estimate what sharing would reclaim over ``sources`` (see the module doc).

    :param sources: :class:`memvisor_sharing.sources.ImageSource` or ``ProcessSource`` values.
    :param across: share across sources (else each source is its own sharing group, except for
        zero pages).
    :param progress: called with the bytes read since the last call.
    """
    started = time.perf_counter()
    hashes, source_of, ids, regions, zeros = [], [], [], [], []
    for index, source in enumerate(sources):
        for page_ids, page_regions, data in source.chunks():
            # Zero pages are found by a vectorised check of the chunk (in cache), not hashed.
            is_zero = zero_rows(data)
            h = np.full(len(data), ZERO_HASH, dtype=np.uint64)
            h[~is_zero] = page_hashes(data, np.flatnonzero(~is_zero))
            hashes.append(h)
            zeros.append(is_zero)
            ids.append(page_ids)
            regions.append(page_regions)
            source_of.append(np.full(len(h), index, dtype=np.int64))
            if progress:
                progress(data.nbytes)
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)  # noqa: E731
    hashes, zeros = cat(hashes, np.uint64), cat(zeros, bool)
    ids, regions, source_of = cat(ids, np.int64), cat(regions, np.int64), cat(source_of, np.int64)
    group = np.zeros_like(source_of) if across else source_of

    twin = np.zeros(len(hashes), dtype=bool)
    nonzero = np.flatnonzero(~zeros)
    order = nonzero[np.lexsort((hashes[nonzero], group[nonzero]))]
    g, h = group[order], hashes[order]
    starts = np.ones(len(order), dtype=bool)
    starts[1:] = (g[1:] != g[:-1]) | (h[1:] != h[:-1])
    run = np.cumsum(starts) - 1
    sizes = np.bincount(run) if len(run) else np.zeros(0, np.int64)
    candidates = np.flatnonzero(sizes[run] >= 2)  # positions in ``order`` with a matching fingerprint
    first = np.flatnonzero(starts)[run]  # per position, the first position of its run
    mismatched_runs = _verify(sources, source_of, ids, order, candidates, first)
    extra_contents = 0
    twin[order[candidates]] = True
    for r in mismatched_runs:  # a fingerprint collision: split the run into its true contents
        rows = order[run == r]
        data = _gather(sources, source_of, ids, rows)
        _, inverse, counts = np.unique(data, axis=0, return_inverse=True, return_counts=True)
        twin[rows] = counts[inverse.reshape(-1)] >= 2
        extra_contents += len(counts) - 1
    distinct = int(starts.sum()) + extra_contents
    zero_pages = int(zeros.sum())
    duplicate_pages = int(twin.sum())
    shareable = zeros | twin
    opportunity = np.unique(source_of[shareable] * (1 << 44) + regions[shareable])
    return {
        "pages": int(len(hashes)),
        "zero_pages": zero_pages,
        "duplicate_pages": duplicate_pages,
        "reclaimable_pages": max(zero_pages - 1, 0) + (len(nonzero) - distinct),
        "large_pages": int(sum(s.large_pages for s in sources)),
        "large_pages_with_opportunity": int(len(opportunity)),
        "seconds": time.perf_counter() - started,
    }


def _gather(sources, source_of, ids, rows) -> np.ndarray:
    """Bytes of pages at ``rows`` (indices into the per-page arrays), read again from their sources."""
    out = np.empty((len(rows), 4096), dtype=np.uint8)
    for index in np.unique(source_of[rows]):
        at = np.flatnonzero(source_of[rows] == index)
        out[at] = sources[index].reread(ids[rows[at]])
    return out


def _verify(sources, source_of, ids, order, candidates, first) -> set[int]:
    """Compare every candidate with the first page of its fingerprint run; returns the runs
    (as positions of their first page) where some page differs."""
    bad: set[int] = set()
    candidates = candidates[first[candidates] != candidates]  # a run's first page is the reference
    for part in range(0, len(candidates), _VERIFY_CHUNK):
        pos = candidates[part : part + _VERIFY_CHUNK]
        firsts, which = np.unique(first[pos], return_inverse=True)  # read each reference once
        mine = _gather(sources, source_of, ids, order[pos])
        theirs = _gather(sources, source_of, ids, order[firsts])[which.reshape(-1)]
        differ = np.any(mine != theirs, axis=1)
        bad.update(np.unique(first[pos[differ]]).tolist())
    return _runs_of(first, bad)


def _runs_of(first: np.ndarray, positions: set[int]) -> set[int]:
    """Run numbers of the runs starting at ``positions``."""
    if not positions:
        return set()
    starts = np.unique(first)
    return set(np.searchsorted(starts, sorted(positions)).tolist())
