"""Every example scenario loads and checks completely, and the budgets example keeps its
promise end to end."""

from pathlib import Path

import pytest

from memvisor.runner import ScenarioRun
from memvisor.scenario import load_scenario

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


SCENARIOS = sorted(p for p in EXAMPLES.glob("*.toml") if p.name != "sweep.toml")  # tests/test_sweep.py checks it


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_example_loads(path):
    scenario = load_scenario(path)
    assert scenario.vms and scenario.name


def test_budgets_example_keeps_the_hog_within_its_budget():
    """examples/budgets.toml: hog takes no more traps than its budget allows, web's traps
    hardly ever wait for the handler, the scanner keeps to each VM's scan rate and the
    migration to its bandwidth."""
    report = ScenarioRun(load_scenario(EXAMPLES / "budgets.toml")).run()
    seconds = report.data["time"]["virtual_seconds"]
    vms = next(s for s in report.sections if s.title == "Budgets").metrics["vms"]
    hog, web = vms["hog"], vms["web"]
    assert hog["traps"] <= 50000 * seconds + 500 + 16384
    assert hog["waited_s"] > 0.5 and web["waited_s"] == 0
    assert web["handler_wait_s"] < 0.01
    for use in vms.values():
        assert use["scan_pages"] <= 100000 * seconds + 10000
    migration = next(s for s in report.sections if s.title.startswith("Live")).metrics["migrations"][0]
    assert migration["bytes_sent"] / migration["total_s"] <= 64 * 2**20 * 1.001
    assert hog["migration_limited_s"] > 0
