"""The ``[plugins.numa]`` settings, declared for the core to check (every mistake one line).

The migration budget defaults to what the interconnect can carry in one tick,
``bandwidth × tick / 4 KiB`` pages (the backend's cost of a ``numa_copy``); a budget above that
is refused, because the emulator charges migration as background time and would otherwise let
a policy copy faster than the modelled bandwidth.
"""

from __future__ import annotations

import math

import attrs

from memvisor import PAGE_SIZE
from memvisor.errors import UserError
from memvisor.settings import setting

HEURISTICS = ("scan", "hinting", "mrc", "touch", "address", "random")
"""Every heuristic, hot-first ones first; ``address`` and ``random`` are the baselines."""

HOT_FIRST = ("scan", "hinting", "mrc", "touch")
"""The heuristics that try to move the most used pages first."""

DEFAULT_NUMA_GIB_PER_S = 4.0
"""Migration bandwidth assumed on a backend that has no cost model (the emulator's default)."""


@attrs.frozen
class NumaSettings:
    """``[plugins.numa]`` (docs/numa.md). Four defaults depend on the host and are worked out
    when it starts (:func:`resolve`): the budget, the hinting sample, the reserve and the seed."""

    heuristic: str = setting("scan", choices=HEURISTICS, doc="Which pages to migrate first (docs/numa.md).")
    pages_per_tick: int | None = setting(
        None, low=1, doc="Migration budget of the whole host per tick, in 4 KiB pages.",
        host_dependent="default and most: what the interconnect carries in one tick, "
                       "bandwidth x tick / 4 KiB (10,485 pages at 4 GiB/s and 10 ms).")
    scan_window: float = setting(1.0, low=0.0, high=1000.0,
                                 doc="Accesses per page of the VM between two of its accessed-bit scans "
                                     "(scan, mrc); 0 scans every tick.")
    hint_pages: int | None = setting(None, low=1, doc="Pages traced per tick by hinting.",
                                     host_dependent="default: 4 x pages_per_tick.")
    stop_local: float = setting(0.99, low=0.0, high=1.0,
                                doc="Migration of a VM stops once this fraction of its accesses is local ...")
    stop_ticks: int = setting(3, low=1, high=10**6, doc="... for this many ticks in a row.")
    resume_local: float = setting(0.9, low=0.0, high=1.0,
                                  doc="A stopped VM resumes when its local fraction falls below this (0: never).")
    reserve: float | None = setting(None, low=0.0, high=0.99, doc="Fraction of a node's memory migration leaves free.",
                                    host_dependent="default: the host's low_watermark.")
    split_large: bool = setting(True, doc="Split 2 MiB pages whose members must move (otherwise they stay).")
    seed: int | None = setting(None, low=0, doc="Seed of the random order and of hinting's samples.",
                               host_dependent="default: the scenario's seed.")


def bandwidth_pages(gib_per_s: float, tick_seconds: float) -> int:
    """Pages the interconnect carries in one tick: ``gib_per_s × tick / 4 KiB`` (at least 1)."""
    return max(1, math.floor(gib_per_s * 2**30 * tick_seconds / PAGE_SIZE))


def resolve(settings: NumaSettings, *, limit: int, seed: int, low_watermark: float) -> NumaSettings:
    """The settings with the host's defaults filled in; a budget above ``limit`` (the pages the
    interconnect carries per tick) is refused with one line (:class:`UserError`)."""
    budget = limit if settings.pages_per_tick is None else settings.pages_per_tick
    if budget > limit:
        raise UserError(f"plugins.numa.pages_per_tick: {budget} pages per tick is more than the migration "
                        f"bandwidth carries in one tick ({limit} pages)")
    return attrs.evolve(
        settings, pages_per_tick=budget,
        hint_pages=4 * budget if settings.hint_pages is None else settings.hint_pages,
        reserve=low_watermark if settings.reserve is None else settings.reserve,
        seed=seed if settings.seed is None else settings.seed)
