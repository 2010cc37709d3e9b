"""The miss-ratio curve type shared by the exact, sampled and untraced-period estimators."""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np

__all__ = ["Curve", "scaled_distances_to_mrc"]


def _as_int64(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError("cache_pages must be one-dimensional")
    out = arr.astype(np.int64)
    if not np.array_equal(out, arr):
        raise ValueError("cache_pages must be integers")
    out.setflags(write=False)
    return out


def _as_float64(value: Any) -> np.ndarray:
    out = np.array(value, dtype=np.float64)
    if out.ndim != 1:
        raise ValueError("miss_ratio must be one-dimensional")
    out.setflags(write=False)
    return out


@attrs.frozen(eq=False)
class Curve:
    """An LRU miss-ratio curve: miss ratio as a function of cache size in pages.

    ``cache_pages`` is strictly ascending int64 starting at 0 (where the miss ratio is 1.0);
    ``miss_ratio`` is float64, non-increasing, in [0, 1].  Between points the curve is linear
    (:meth:`at`); past the last point it stays at the last value.  ``accesses`` is the number of
    accesses of the whole trace, ``sampled_pages`` the number of distinct pages the estimate saw,
    ``traced_accesses`` the number of accesses it processed (all of them for an exact curve).
    """

    cache_pages: np.ndarray = attrs.field(converter=_as_int64)
    miss_ratio: np.ndarray = attrs.field(converter=_as_float64)
    accesses: int = attrs.field(default=0, converter=int)
    sampled_pages: int = attrs.field(default=0, converter=int)
    traced_accesses: int = attrs.field(default=0, converter=int)

    def __attrs_post_init__(self) -> None:
        x, y = self.cache_pages, self.miss_ratio
        if x.shape != y.shape or x.size == 0:
            raise ValueError("cache_pages and miss_ratio must be non-empty and of equal length")
        if x[0] != 0 or y[0] != 1.0:
            raise ValueError("a curve starts at cache_pages 0 with miss ratio 1.0")
        if x.size > 1 and np.any(np.diff(x) <= 0):
            raise ValueError("cache_pages must be strictly ascending")
        if np.any(~np.isfinite(y)) or np.any(y < 0.0) or np.any(y > 1.0):
            raise ValueError("miss ratios must lie in [0, 1]")
        if y.size > 1 and np.any(np.diff(y) > 1e-12):
            raise ValueError("miss_ratio must be non-increasing")

    @property
    def max_pages(self) -> int:
        """The largest cache size with a point of its own."""
        return int(self.cache_pages[-1])

    def at(self, pages: Any) -> Any:
        """Miss ratio at cache size(s) ``pages``, linear between points (a float for a scalar)."""
        p = np.asarray(pages, dtype=np.float64)
        out = np.interp(p, self.cache_pages.astype(np.float64), self.miss_ratio)
        out = np.where(p <= 0, 1.0, out)
        return float(out) if out.ndim == 0 else out

    def mae(self, other: Curve, max_pages: int | None = None) -> float:
        """Mean absolute difference of the miss ratios at cache sizes ``1..max_pages``.

        ``max_pages`` defaults to the larger of the two curves' last sizes.
        """
        if max_pages is None:
            max_pages = max(self.max_pages, other.max_pages)
        if max_pages < 1:
            raise ValueError("max_pages must be >= 1")
        sizes = np.arange(1, int(max_pages) + 1, dtype=np.float64)
        return float(np.mean(np.abs(self.at(sizes) - other.at(sizes))))

    def working_set(self, miss_ratio_target: float) -> int | None:
        """Smallest cache size (pages) whose miss ratio is ``<= miss_ratio_target``, or None."""
        y = self.miss_ratio
        hit = np.flatnonzero(y <= miss_ratio_target)
        if hit.size == 0:
            return None
        i = int(hit[0])
        if i == 0:
            return 0
        x0, x1 = float(self.cache_pages[i - 1]), float(self.cache_pages[i])
        y0, y1 = float(y[i - 1]), float(y[i])
        c = x0 + (y0 - miss_ratio_target) / (y0 - y1) * (x1 - x0)
        c = max(int(math.floor(c)), int(x0) + 1)
        while c < x1 and self.at(c) > miss_ratio_target:
            c += 1
        while c - 1 > x0 and self.at(c - 1) <= miss_ratio_target:
            c -= 1
        return min(c, int(x1))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the points and the counts."""
        return {
            "cache_pages": self.cache_pages.tolist(),
            "miss_ratio": self.miss_ratio.tolist(),
            "accesses": self.accesses,
            "sampled_pages": self.sampled_pages,
            "traced_accesses": self.traced_accesses,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Curve:
        """Inverse of :meth:`to_json`; also reads ``NAME.mrc.json`` files that start at size 1."""
        x = np.asarray(data["cache_pages"], dtype=np.int64)
        y = np.asarray(data["miss_ratio"], dtype=np.float64)
        if x.size == 0 or x[0] != 0:
            x = np.concatenate([[0], x])
            y = np.concatenate([[1.0], y])
        return cls(
            cache_pages=x,
            miss_ratio=y,
            accesses=data.get("accesses", 0),
            sampled_pages=data.get("sampled_pages", 0),
            traced_accesses=data.get("traced_accesses", 0),
        )


def scaled_distances_to_mrc(
    sizes: np.ndarray,
    weights: np.ndarray,
    cold_weight: float,
    total: float,
    spread: float | np.ndarray = 1.0,
    *,
    accesses: int,
    sampled_pages: int,
    traced_accesses: int,
) -> Curve:
    """Curve from hits at (real-valued) cache sizes ``sizes`` with ``weights``.

    Each hit is spread evenly over the sizes ``(x - spread, x]`` (clipped to ``(0, x]``): a sampled
    distance is only known to within one sampled page, i.e. ``spread = 1 / R`` pages, and
    ``spread = 1`` makes a hit at integer size ``x`` count exactly for caches ``>= x``.  The curve
    is piecewise linear with a point at every end of a spread; misses are ``total`` minus the hits
    (``cold_weight`` is only for the record).
    """
    if total <= 0:
        raise ValueError("total must be positive")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    x = np.asarray(sizes, dtype=np.float64).reshape(-1)
    keep = w != 0
    w, x = w[keep], x[keep]
    spread_arr = np.broadcast_to(np.asarray(spread, dtype=np.float64), keep.shape)[keep]
    if x.size == 0:
        return Curve(
            cache_pages=[0],
            miss_ratio=[1.0],
            accesses=accesses,
            sampled_pages=sampled_pages,
            traced_accesses=traced_accesses,
        )
    xr = np.maximum(np.rint(x), 1).astype(np.int64)
    lo = np.clip(np.rint(x - np.maximum(spread_arr, 1.0)), 0, xr - 1).astype(np.int64)
    slope = w / (xr - lo)
    pos = np.concatenate([lo, xr])
    delta = np.concatenate([slope, -slope])
    order = np.argsort(pos, kind="stable")
    pos, delta = pos[order], delta[order]
    first = np.concatenate([[True], pos[1:] != pos[:-1]])
    upos = pos[first]
    udelta = np.add.reduceat(delta, np.flatnonzero(first))
    cur_slope = np.cumsum(udelta)
    hits = np.concatenate([[0.0], np.cumsum(cur_slope[:-1] * np.diff(upos))])
    miss = np.clip(1.0 - hits / float(total), 0.0, 1.0)
    if upos[0] != 0:
        upos = np.concatenate([[0], upos])
        miss = np.concatenate([[1.0], miss])
    miss[0] = 1.0
    miss = np.minimum.accumulate(miss)
    return Curve(
        cache_pages=upos,
        miss_ratio=miss,
        accesses=accesses,
        sampled_pages=sampled_pages,
        traced_accesses=traced_accesses,
    )
