"""``memvisor bench budgets``: what a trap budget buys the VMs beside a guest that traps in a
loop, and what accounting budgets costs.

Every run is the scenario of :mod:`memvisor.testing.hog` (two 64 MiB VMs under dirty logging,
1 s of virtual time): ``web`` writes a few hot pages, ``hog`` all of its memory. Figures in
virtual time are deterministic; only ``accounting-overhead`` is real time.

- ``web-beside-budgeted-hog``: web's accesses per virtual second beside hog under a trap budget
  of 50,000 traps/s (a tenth of the one trap handler); baseline: web alone. Goal: ratio ≥ 0.95.
- ``web-beside-hog``: the same without the budget (for comparison: what the budget prevents).
- ``web-beside-heavy-hog``: hog's traps each write its page out inside the trap (~0.1 ms);
  hog's budget is 10% of the handler's time (``handler_share``). Goal: ratio ≥ 0.95.
- ``web-beside-heavy-hog-counted``: the same hog under a 50,000 traps/s count instead (for
  comparison: a count does not bound heavy traps).
- ``hog-trap-rate``: hog's traps per second under the budget; baseline: the budget. Goal: ratio
  ≤ 1.02 (the budget, its 10 ms of slack and the first batch spread over the second).
- ``accounting-overhead``: real seconds of a 5 s run with a (generous) budget on every VM;
  baseline: no budgets. Goal: ratio ≤ 1.05.
"""

from __future__ import annotations

import time

from memvisor.bench import Baseline, BenchCase

HOG_BUDGET = 50000.0


def _web_rate(hog: bool, budget: dict | None = None, copy_out: bool = False) -> float:
    from memvisor.testing.hog import hog_scenario, run_with_dirty_logging

    report = run_with_dirty_logging(hog_scenario(hog=hog, hog_budget=budget), copy_out=copy_out)
    return report.data["vms"]["web"]["accesses"] / report.data["time"]["virtual_seconds"]


def _hog_trap_rate(_=None) -> float:
    from memvisor.testing.hog import hog_scenario, run_with_dirty_logging

    report = run_with_dirty_logging(hog_scenario(hog_budget={"trap_rate": HOG_BUDGET}))
    budgets = next(s for s in report.sections if s.title == "Budgets").metrics["vms"]
    return budgets["hog"]["guest_traps"] / report.data["time"]["virtual_seconds"]


def _real_seconds(default: dict | None) -> float:
    from memvisor.testing.hog import hog_scenario, run_with_dirty_logging

    started = time.perf_counter()
    run_with_dirty_logging(hog_scenario(default=default, seconds="5s"))
    return time.perf_counter() - started


def cases() -> list[BenchCase]:
    """The budgets' benchmark cases."""
    alone = Baseline("web-alone", lambda _: _web_rate(hog=False))
    return [
        BenchCase("web-beside-budgeted-hog", "accesses_per_virtual_s", "/s",
                  lambda _: _web_rate(True, {"trap_rate": HOG_BUDGET}), baseline=alone, runs=1, warmup=0,
                  goal="ratio >= 0.95 (hog: 50,000 traps/s)"),
        BenchCase("web-beside-hog", "accesses_per_virtual_s", "/s", lambda _: _web_rate(True), baseline=alone,
                  runs=1, warmup=0, goal="for comparison: no budget"),
        BenchCase("web-beside-heavy-hog", "accesses_per_virtual_s", "/s",
                  lambda _: _web_rate(True, {"handler_share": 0.1}, copy_out=True),
                  baseline=Baseline("web-alone", lambda _: _web_rate(False, copy_out=True)), runs=1, warmup=0,
                  goal="ratio >= 0.95 (hog's traps write pages out; hog: 10% of the handler)"),
        BenchCase("web-beside-heavy-hog-counted", "accesses_per_virtual_s", "/s",
                  lambda _: _web_rate(True, {"trap_rate": HOG_BUDGET}, copy_out=True),
                  baseline=Baseline("web-alone", lambda _: _web_rate(False, copy_out=True)), runs=1, warmup=0,
                  goal="for comparison: a trap count does not bound heavy traps"),
        BenchCase("hog-trap-rate", "traps_per_s", "/s", _hog_trap_rate,
                  baseline=Baseline("budget", lambda _: HOG_BUDGET), higher_is_better=False, runs=1, warmup=0,
                  goal="ratio <= 1.02"),
        BenchCase("accounting-overhead", "seconds", "s", lambda _: _real_seconds({"trap_rate": 1e9, "scan_rate": 1e9}),
                  baseline=Baseline("no-budgets", lambda _: _real_seconds(None)), higher_is_better=False,
                  runs=5, warmup=1, goal="ratio <= 1.05"),
    ]
