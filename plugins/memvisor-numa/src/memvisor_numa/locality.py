"""Locality over time: when a VM's accesses became local again after a move."""

from __future__ import annotations

import numpy as np


def time_to_reach(times: np.ndarray, local: np.ndarray, start: float, level: float,
                  until: float = float("inf")) -> float | None:
    """Seconds from ``start`` to the end of the first tick after it whose local fraction is at
    least ``level`` (ticks with no accesses are skipped); None when none reached it before
    ``until`` (the next move, or the end of the run).

    :param times: end time of each tick.
    :param local: fraction of the tick's accesses that were local (NaN: no accesses).
    """
    times, local = np.asarray(times, dtype=float), np.asarray(local, dtype=float)
    window = (times > start) & (times <= until)
    hit = np.flatnonzero(window & (local >= level))  # NaN compares false: idle ticks never count
    return float(times[hit[0]] - start) if len(hit) else None
