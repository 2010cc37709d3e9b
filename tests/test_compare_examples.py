"""`memvisor compare` on what a person compares after changing a policy: two runs of
examples/numa.toml with different heuristics (shortened as tests/test_examples_figures.py
shortens the examples)."""

import json
import os
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from memvisor.cli import _register_commands, cli
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing.report_checks import page_problems
from memvisor.testing.scaled import scaled

pytest.importorskip("memvisor_numa")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCALE = float(os.environ.get("MEMVISOR_EXAMPLE_SCALE", "0.25"))


def _numa_run(folder, heuristic: str):
    path = EXAMPLES / "numa.toml"
    data = scaled(tomllib.loads(path.read_text(encoding="utf-8")), SCALE)
    data["plugins"]["numa"]["heuristic"] = heuristic
    ScenarioRun(parse_scenario(data, path)).run().write(folder)
    return json.loads((folder / "report.json").read_text())


def test_compare_two_numa_heuristics(tmp_path):
    """scan against random on examples/numa.toml: the heuristics differ, each t90 is its run's
    (the first move's, in its NUMA section), the difference is theirs and lower is better; the
    page overlays both runs' local fraction and links both reports."""
    scan, random = _numa_run(tmp_path / "scan", "scan"), _numa_run(tmp_path / "random", "random")
    _register_commands()
    done = CliRunner().invoke(cli, ["compare", str(tmp_path / "scan"), str(tmp_path / "random"),
                                    "--out", str(tmp_path / "cmp"), "--json", str(tmp_path / "cmp.json")])
    assert done.exit_code == 0, done.output
    figures = json.loads((tmp_path / "cmp.json").read_text())
    assert {"setting": "[plugins.numa] heuristic", "values": ["scan", "random"]} in figures["differences"]
    rows = {(r["section"], r["vm"], r["figure"]): r for r in figures["figures"]}
    t90 = rows["NUMA migration", "db", "90 % local after"]
    expected = [run["sections"][i]["metrics"]["vms"]["db"]["moves"][0]["t90_s"]
                for run in (scan, random) for i, s in enumerate(run["sections"]) if s["plugin"] == "numa"]
    assert t90["values"] == expected and None not in expected
    change = t90["changes"][0]
    assert change["difference"] == pytest.approx(expected[1] - expected[0])
    assert change["direction"] == ("better" if expected[1] < expected[0] else "worse" if expected[1] > expected[0]
                                   else "same")
    assert rows["NUMA migration", "db", "heuristic"]["changes"][0]["direction"] == "changed"
    assert "numa-local-fraction" in json.loads((tmp_path / "cmp" / "compare.json").read_text())["plots"]
    assert not page_problems(tmp_path / "cmp" / "compare.html")
    assert "90 % local after" in done.stdout and "[plugins.numa] heuristic: scan scan, random random" in done.stdout
