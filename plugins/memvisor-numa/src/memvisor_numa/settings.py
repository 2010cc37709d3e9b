"""The ``[plugins.numa]`` settings: checked once when the host starts, every mistake one line.

The migration budget defaults to what the interconnect can carry in one tick,
``numa_gib_per_s × tick / 4 KiB`` pages; a budget above that is refused, because the emulator
charges migration as background time and would otherwise let a policy copy faster than the
modelled bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from memvisor import PAGE_SIZE
from memvisor.errors import UserError

HEURISTICS = ("scan", "hinting", "mrc", "touch", "address", "random")
"""Every heuristic, hot-first ones first; ``address`` and ``random`` are the baselines."""

HOT_FIRST = ("scan", "hinting", "mrc", "touch")
"""The heuristics that try to move the most used pages first."""

DEFAULT_NUMA_GIB_PER_S = 4.0
"""Migration bandwidth assumed on a backend that has no cost model (the emulator's default)."""


@attrs.frozen
class NumaSettings:
    """Checked settings of the numa plugin (docs/numa.md describes each).

    :ivar heuristic: which pages to migrate first (one of :data:`HEURISTICS`).
    :ivar pages_per_tick: migration budget of the whole host per tick, in 4 KiB pages.
    :ivar bandwidth_pages_per_tick: the most the interconnect carries per tick.
    :ivar scan_window: accesses per page of the VM between two of its accessed-bit scans
        (``scan`` and ``mrc``; at most one scan per tick, so 0 scans every tick).
    :ivar hint_pages: pages traced per tick by ``hinting``.
    :ivar stop_local: migration of a VM stops once this fraction of its accesses is local ...
    :ivar stop_ticks: ... for this many ticks in a row.
    :ivar resume_local: a stopped VM resumes when its local fraction falls below this.
    :ivar reserve: fraction of a node's memory that migration leaves free.
    :ivar split_large: split 2 MiB pages so their members can move (otherwise they stay).
    :ivar seed: seed of the ``random`` order and of ``hinting``'s samples.
    """

    heuristic: str = "scan"
    pages_per_tick: int = 10485
    bandwidth_pages_per_tick: int = 10485
    scan_window: float = 1.0
    hint_pages: int = 41940
    stop_local: float = 0.99
    stop_ticks: int = 3
    resume_local: float = 0.9
    reserve: float = 0.02
    split_large: bool = True
    seed: int = 0


def bandwidth_pages(gib_per_s: float, tick_seconds: float) -> int:
    """Pages the interconnect carries in one tick: ``gib_per_s × tick / 4 KiB`` (at least 1)."""
    return max(1, math.floor(gib_per_s * 2**30 * tick_seconds / PAGE_SIZE))


def _int(table: Mapping[str, Any], key: str, default: int, low: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"plugins.numa.{key}: must be a whole number of at least {low}, got {value!r}")
    return value


def _fraction(table: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise UserError(f"plugins.numa.{key}: must be a number between {low} and {high}, got {value!r}")
    return float(value)


def parse_settings(table: Mapping[str, Any], *, tick_seconds: float, gib_per_s: float, seed: int,
                   low_watermark: float) -> NumaSettings:
    """Check a ``[plugins.numa]`` table against the host (its tick and migration bandwidth).

    :raises UserError: one line naming ``plugins.numa.KEY`` and what is wrong.
    """
    known = {f.name for f in attrs.fields(NumaSettings)} - {"bandwidth_pages_per_tick"}
    for key in table:
        if key not in known:
            raise UserError(f"plugins.numa.{key}: unknown setting (known: {', '.join(sorted(known))})")
    heuristic = table.get("heuristic", "scan")
    if heuristic not in HEURISTICS:
        raise UserError(f"plugins.numa.heuristic: must be one of {', '.join(HEURISTICS)}, got {heuristic!r}")
    limit = bandwidth_pages(gib_per_s, tick_seconds)
    budget = _int(table, "pages_per_tick", limit, 1)
    if budget > limit:
        raise UserError(f"plugins.numa.pages_per_tick: {budget} pages per tick is more than the "
                        f"{gib_per_s:g} GiB/s migration bandwidth carries in a {tick_seconds * 1e3:g} ms tick "
                        f"({limit} pages)")
    split_large = table.get("split_large", True)
    if not isinstance(split_large, bool):
        raise UserError(f"plugins.numa.split_large: must be true or false, got {split_large!r}")
    return NumaSettings(
        heuristic=heuristic,
        pages_per_tick=budget,
        bandwidth_pages_per_tick=limit,
        scan_window=_fraction(table, "scan_window", 1.0, 0.0, 1000.0),
        hint_pages=_int(table, "hint_pages", 4 * budget, 1),
        stop_local=_fraction(table, "stop_local", 0.99, 0.0, 1.0),
        stop_ticks=_int(table, "stop_ticks", 3, 1),
        resume_local=_fraction(table, "resume_local", 0.9, 0.0, 1.0),
        reserve=_fraction(table, "reserve", low_watermark, 0.0, 0.99),
        split_large=split_large,
        seed=_int(table, "seed", seed, 0) if "seed" in table else seed,
    )
