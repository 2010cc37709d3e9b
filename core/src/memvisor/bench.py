"""Benchmarks: cases that the core and plugins register, each with a baseline measured in the
same run, reported as the median of several runs.

A case measures one figure (``metric`` in ``unit``). Its baseline, when it has one, is measured
right after it in the same process, so the ratio between them holds on a noisy machine where
absolute figures do not.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class Baseline:
    """What a case is compared with: a name and a function measuring the same metric."""

    name: str
    measure: Callable[[Any], float]


@attrs.frozen
class BenchCase:
    """One benchmark case.

    :ivar name: the case's name within its group, e.g. ``zipf-untraced``.
    :ivar metric: what is measured, e.g. ``accesses_per_s``.
    :ivar unit: unit of the metric, for the table.
    :ivar measure: ``measure(context) -> value``; one run.
    :ivar setup: ``setup() -> context``, run once before the runs and not timed (None: no context).
    :ivar baseline: the baseline measured in the same run, or None.
    :ivar higher_is_better: whether a larger value is better (ratio is value / baseline either way).
    :ivar runs: how many runs the median is taken over.
    :ivar warmup: runs made first and not counted (the first run pays one-time costs such as
        the kernel committing fresh memory).
    :ivar goal: a short statement of the goal, for the table (informational only).
    """

    name: str
    metric: str
    unit: str
    measure: Callable[[Any], float]
    setup: Callable[[], Any] | None = None
    baseline: Baseline | None = None
    higher_is_better: bool = True
    runs: int = 5
    warmup: int = 1
    goal: str = ""


def run_case(case: BenchCase, runs: int | None = None) -> dict[str, Any]:
    """Run a case (and its baseline) ``runs`` times; the JSON row of ``memvisor bench --json``."""
    n = runs or case.runs
    context = case.setup() if case.setup else None
    values, base_values = [], []
    for _ in range(case.warmup):
        case.measure(context)
        if case.baseline:
            case.baseline.measure(context)
    for _ in range(n):  # interleave case and baseline so drifts of the machine hit both
        values.append(case.measure(context))
        if case.baseline:
            base_values.append(case.baseline.measure(context))
    value = statistics.median(values)
    baseline = None
    ratio = None
    if case.baseline:
        base = statistics.median(base_values)
        baseline = {"name": case.baseline.name, "value": base}
        ratio = value / base if base else None
    return {"name": case.name, "metric": case.metric, "value": value, "unit": case.unit,
            "baseline": baseline, "ratio": ratio, "runs": n, "goal": case.goal}
