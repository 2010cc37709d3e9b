"""How many pages each VM gives up when the host needs memory: two policies.

Both are pure functions over one array entry per VM (never per page), so they are cheap and
unit-testable.

**Proportional share with an idle-memory tax** (Waldspurger, "Memory Resource Management in
VMware ESX Server", OSDI 2002, section 5). VM *i* holds ``S_i`` shares and ``P_i`` pages, a
fraction ``f_i`` of which it actively uses. Its shares-per-page ratio is::

    rho_i = S_i / (P_i * (f_i + k * (1 - f_i))),   k = 1 / (1 - tax_rate)

so an idle page costs ``k`` times an active one. Memory is taken from the VM with the lowest
``rho`` first; taking pages raises its ``rho``, so the reclaim fills "water levels": the
allocation of every VM that gives pages falls to ``S_i / (c_i * lambda)`` for one common
``lambda``, found by bisection, and never below its floor (``1 - max_fraction`` of its memory).

**MRC-guided**: when a plugin answers :func:`memvisor_giveable_pages` (it knows each VM's
miss-rate curve), take memory where the miss ratio rises least: find the smallest miss-ratio
increase ``x`` at which the VMs together can give the deficit, and take from each what it can
give at ``x``. Every VM then pays the same rise of its miss ratio, the lowest that covers it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _distribute(continuous: np.ndarray, capacity: np.ndarray, deficit: int) -> np.ndarray:
    """Round a continuous split to whole pages that sum to ``min(deficit, capacity.sum())``,
    giving the leftover pages to the largest fractional parts (ties: first VM)."""
    want = min(int(deficit), int(capacity.sum()))
    pages = np.minimum(np.floor(continuous).astype(np.int64), capacity)
    left = want - int(pages.sum())
    while left > 0:
        room = capacity - pages
        order = np.argsort(-(continuous - pages), kind="stable")
        order = order[room[order] > 0]
        if not len(order):
            break
        step = order[:left]
        pages[step] += 1
        left -= len(step)
    while left < 0:  # flooring cannot overshoot, but a capped continuous split can be rounded up
        i = int(np.argmax(pages))
        pages[i] -= 1
        left += 1
    return pages


def idle_tax_reclaim(shares: np.ndarray, allocated: np.ndarray, active: np.ndarray, floor: np.ndarray,
                     tax_rate: float, deficit: int) -> np.ndarray:
    """Pages each VM gives up to cover ``deficit`` under the idle-memory tax.

    :param shares: shares of each VM (> 0).
    :param allocated: pages each VM holds now (its memory minus its balloon).
    :param active: fraction of each VM's pages in active use (0..1).
    :param floor: the fewest pages each VM keeps.
    :param tax_rate: idle-memory tax, 0 <= tax_rate < 1.
    :param deficit: pages wanted in total.
    :returns: int64 pages per VM; they sum to ``deficit`` unless the floors leave less.
    """
    shares = np.asarray(shares, dtype=float)
    allocated = np.asarray(allocated, dtype=float)
    floor = np.minimum(np.asarray(floor, dtype=float), allocated)
    capacity = (allocated - floor).astype(np.int64)
    if deficit <= 0 or not len(shares) or capacity.sum() <= 0:
        return np.zeros(len(shares), dtype=np.int64)
    if deficit >= capacity.sum():
        return capacity
    k = 1.0 / (1.0 - tax_rate)
    cost = np.clip(active, 0.0, 1.0) + k * (1.0 - np.clip(active, 0.0, 1.0))

    def reclaim(level: float) -> np.ndarray:
        # The allocation at which a VM's rho reaches ``level``, clamped between floor and now.
        keep = np.clip(shares / (cost * level), floor, allocated)
        return allocated - keep

    # rho of a VM at its current allocation: below every VM's rho nothing is taken; at the
    # level where every VM sits on its floor everything is.
    low = float(np.min(shares / (cost * np.maximum(allocated, 1.0)))) * 0.5
    high = float(np.max(shares / (cost * np.maximum(floor, 1.0)))) * 2.0
    for _ in range(100):  # bisection in log space: rho spans orders of magnitude
        mid = float(np.sqrt(low * high))
        if reclaim(mid).sum() >= deficit:
            high = mid
        else:
            low = mid
        if high / low < 1 + 1e-12:
            break
    return _distribute(reclaim(high) * deficit / max(reclaim(high).sum(), 1e-300), capacity, deficit)


def mrc_reclaim(giveable: Callable[[float], np.ndarray], ballooned: np.ndarray, cap: np.ndarray,
                deficit: int) -> tuple[np.ndarray, float]:
    """Pages each VM gives up to cover ``deficit`` at the lowest common miss-ratio increase.

    :param giveable: ``giveable(x)`` -> pages each VM could give up in total (from its whole
        memory) for at most ``x`` more misses; non-decreasing in ``x``.
    :param ballooned: pages each VM's balloon holds already.
    :param cap: the largest balloon of each VM.
    :param deficit: pages wanted in total.
    :returns: (int64 pages per VM, the miss-ratio increase they cost).
    """
    ballooned = np.asarray(ballooned, dtype=np.int64)
    cap = np.asarray(cap, dtype=np.int64)

    def more(x: float) -> np.ndarray:
        return np.maximum(0, np.minimum(np.asarray(giveable(x), dtype=np.int64), cap) - ballooned)

    if deficit <= 0 or not len(ballooned):
        return np.zeros(len(ballooned), dtype=np.int64), 0.0
    top = more(1.0)
    if top.sum() <= deficit:
        return top, 1.0
    low, high = 0.0, 1.0
    at_low = more(0.0)
    if at_low.sum() >= deficit:
        high = 0.0
    else:
        for _ in range(30):  # ~1e-9 resolution of the miss-ratio increase
            mid = (low + high) / 2
            at_mid = more(mid)
            if at_mid.sum() >= deficit:
                high = mid
            else:
                low, at_low = mid, at_mid
    at_high = more(high)
    if high == 0.0:
        return _distribute(at_high * deficit / at_high.sum(), at_high, deficit), 0.0
    # Everything that is giveable below ``high`` is taken; the rest comes from what becomes
    # giveable at ``high``, in proportion.
    step = at_high - at_low
    rest = deficit - int(at_low.sum())
    extra = _distribute(step * rest / max(step.sum(), 1), step, rest)
    return at_low + extra, high
