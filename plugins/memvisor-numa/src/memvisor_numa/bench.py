"""``memvisor bench numa``: how soon a hot-first heuristic makes a moved VM's accesses local,
against address order, and what the plugin costs in real time.

Every case runs the scenario of ``memvisor numa compare`` on its defaults
(:func:`memvisor_numa.compare.compare_scenario`): a 4 GiB VM (1,048,576 pages) with zipf(0.99)
accesses on node 1 of a two-node host, the default migration bandwidth (4 GiB/s, 10,485 pages
per 10 ms tick); it runs 3 s (32 scans of history for the aging heuristics), its virtual CPUs
move to node 0, and it runs 1.2 s more, long enough for address order to pass 99% local
accesses.

- ``t90-<heuristic>``: virtual seconds from the move to 90% local accesses; baseline address
  order. Virtual time is deterministic, so one run is exact; the ratio is the figure (below
  1/3 means three times sooner).
- ``overhead-scan``: real seconds the plugin's own code takes (its hooks, without the page
  copies inside ``backend.migrate``, which are the emulator carrying out the modelled
  migration); baseline: real seconds of the same run without the plugin. The ratio is the
  overhead.
- ``wall-scan``: real seconds of the whole run with the plugin (page copies included);
  baseline: without the plugin.
"""

from __future__ import annotations

import functools

from memvisor.bench import Baseline, BenchCase

WORKLOAD = {"kind": "zipf", "alpha": 0.99}
SEED = 1


def _run(heuristic: str | None):
    from memvisor_numa.compare import DEFAULT_VM_GIB, run_heuristic, vm_pages_of

    return run_heuristic(heuristic, vm_pages_of(DEFAULT_VM_GIB * 2**30), WORKLOAD, seed=SEED)


@functools.cache
def t90(heuristic: str) -> float:
    """Virtual seconds from the move to 90% local accesses (deterministic: computed once)."""
    value = _run(heuristic).metric("numa", "t90_s")
    return float("inf") if value is None else value


def _t90_of(heuristic: str):
    def measure(context) -> float:
        return t90(heuristic)

    return measure


def _plugin_seconds(context) -> float:
    report = _run("scan")
    return report.metric("numa", "real_seconds")["plugin"]


def _wall_seconds(context) -> float:
    return _run("scan").data["time"]["real_seconds"]


def _without_plugin(context) -> float:
    return _run(None).data["time"]["real_seconds"]


def cases() -> list[BenchCase]:
    """The numa benchmark cases."""
    address = Baseline("address", _t90_of("address"))
    without = Baseline("no-numa-plugin", _without_plugin)
    t90_cases = [
        BenchCase(f"t90-{name}", "t90_s", "s (virtual)", _t90_of(name), baseline=address, higher_is_better=False,
                  runs=1, warmup=0, goal="ratio <= 0.33 (3x sooner than address order)")
        for name in ("scan", "hinting", "mrc", "touch", "random")
    ]
    return t90_cases + [
        BenchCase("overhead-scan", "plugin_real_s", "s", _plugin_seconds, baseline=without,
                  higher_is_better=False, runs=3, warmup=0, goal="ratio < 0.10"),
        BenchCase("wall-scan", "real_s", "s", _wall_seconds, baseline=without, higher_is_better=False,
                  runs=1, warmup=0, goal="informational: includes the emulator's page copies"),
    ]
