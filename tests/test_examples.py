"""Every example scenario loads and checks completely (tests/test_examples_figures.py runs
them and checks their figures, and the budgets example's promise)."""

from pathlib import Path

import pytest

from memvisor.scenario import load_scenario

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


SCENARIOS = sorted(p for p in EXAMPLES.glob("*.toml") if p.name != "sweep.toml")  # tests/test_sweep.py checks it


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_example_loads(path):
    scenario = load_scenario(path)
    assert scenario.vms and scenario.name
