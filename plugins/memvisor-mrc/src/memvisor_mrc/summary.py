"""What a curve tells an operator or a policy: points to report, working-set sizes, a
recommended memory size and how many pages a VM can give up. Pure functions of a
:class:`~memvisor_mrc.curve.Curve`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memvisor_mrc.curve import Curve

__all__ = ["PAGE_SIZE", "curve_points", "describe", "giveable_pages", "log_error", "recommended_pages", "working_sets"]

PAGE_SIZE = 4096
"""Bytes per page (the machine model's small page)."""


def curve_points(curve: Curve, max_pages: int | None = None, points: int = 200) -> dict[str, list]:
    """The curve at up to ``points`` cache sizes, for report.json and plots.

    Sizes are the curve's own points when there are few, otherwise a grid that is linear over the
    first quarter of the points and geometric beyond (an MRC's detail is at small sizes), always including 0 and
    ``max_pages`` (default: the curve's last point). Miss ratios are read with :meth:`Curve.at`.
    """
    top = int(curve.max_pages if max_pages is None else max_pages)
    if top < 1:
        sizes = np.zeros(1, dtype=np.int64)
    elif len(curve.cache_pages) <= points and curve.max_pages <= top:
        sizes = np.append(curve.cache_pages, top) if curve.max_pages < top else curve.cache_pages
    else:
        head = min(top, max(points // 4, 2))
        linear = np.arange(0, head + 1)
        geometric = np.geomspace(max(head, 1), top, max(points - len(linear), 2))
        sizes = np.unique(np.concatenate([linear, np.rint(geometric).astype(np.int64), [top]]))
    ratio = np.minimum.accumulate(np.asarray(curve.at(sizes), dtype=float))
    return {"cache_pages": sizes.astype(int).tolist(), "cache_bytes": (sizes * PAGE_SIZE).astype(int).tolist(),
            "miss_ratio": ratio.tolist()}


def working_sets(curve: Curve, miss_ratios: Sequence[float], max_pages: int | None = None) -> dict[str, int | None]:
    """Smallest memory (pages) reaching each miss ratio, keyed ``"0.05"``; None when the curve
    never gets that low (cold misses set its floor) or only beyond ``max_pages``."""
    out: dict[str, int | None] = {}
    for target in miss_ratios:
        size = curve.working_set(float(target))
        out[f"{float(target):g}"] = None if size is None or (max_pages is not None and size > max_pages) else size
    return out


def recommended_pages(curve: Curve, tolerance: float = 0.01, max_pages: int | None = None) -> int:
    """A memory size for the VM: the smallest whose miss ratio is within ``tolerance`` of the
    curve's floor (the lowest miss ratio any size reaches, at most ``max_pages``), i.e. the
    point past which more memory buys less than ``tolerance`` of the accesses."""
    top = curve.max_pages if max_pages is None else min(int(max_pages), curve.max_pages)
    floor = float(curve.at(top))
    size = curve.working_set(floor + tolerance)
    return int(min(size if size is not None else top, top))


def giveable_pages(curve: Curve, allocation: int, vm_pages: int, miss_ratio_increase: float) -> int:
    """Pages of a VM's memory it can be without for at most ``miss_ratio_increase`` more misses.

    The baseline is the VM's miss ratio at its current ``allocation`` (pages it holds now): the
    VM can shrink to the smallest size ``c`` with ``mr(c) <= mr(allocation) + increase``. The
    answer counts from the VM's whole memory, ``vm_pages - c``, so pages a balloon already holds
    are part of it (the balloon policy subtracts what it holds); it is never below
    ``vm_pages - allocation``.
    """
    allocation = int(max(0, min(allocation, vm_pages)))
    if allocation == 0:
        return int(vm_pages)
    target = float(curve.at(allocation)) + max(0.0, float(miss_ratio_increase))
    size = curve.working_set(target + 1e-12)  # a hair of slack: `at` interpolates in floats
    size = allocation if size is None else min(int(size), allocation)
    return int(vm_pages - size)


def log_error(curve: Curve, exact: Curve, max_pages: int, floor: float = 1e-6) -> float:
    """Mean absolute difference of ``log10`` miss ratios at sizes ``1..max_pages`` (miss ratios
    below ``floor`` count as ``floor``): the comparison for curves that fall below 1%."""
    sizes = np.arange(1, int(max_pages) + 1)
    a = np.log10(np.maximum(curve.at(sizes), floor))
    b = np.log10(np.maximum(exact.at(sizes), floor))
    return float(np.mean(np.abs(a - b)))


def describe(curve: Curve, miss_ratios: Sequence[float], tolerance: float, max_pages: int) -> dict[str, Any]:
    """The report's figures for one curve: points, working sets and the recommended size."""
    rec = recommended_pages(curve, tolerance, max_pages)
    return {
        **curve_points(curve, max_pages),
        "working_set_pages": working_sets(curve, miss_ratios, max_pages),
        "recommended_pages": rec,
        "recommended_bytes": rec * PAGE_SIZE,
        "recommended_miss_ratio": float(curve.at(rec)),
        "miss_ratio_floor": float(curve.at(max_pages)) if max_pages >= 1 else 1.0,
    }

