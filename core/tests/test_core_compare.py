"""`memvisor compare`: two runs side by side, every headline figure with its difference and
whether it is better or worse, the settings that differ, the plots overlaid; reports read as
hostile input."""

import json

import pytest
from click.testing import CliRunner

from memvisor import hookimpl
from memvisor.cli import _register_commands, cli
from memvisor.compare import load_report
from memvisor.errors import UserError
from memvisor.report import Figure, Headline, Plot, ReportSection
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing.report_checks import page_problems


class Policy:
    """A stand-in technique whose figures the test chooses: a saved size (higher is better), a
    delay (lower is better) and its name."""

    def __init__(self, name, saved_pages, delay_s):
        self.name, self.saved, self.delay = name, saved_pages, delay_s

    @hookimpl
    def memvisor_report(self, host):
        metrics = {"policy": self.name, "vms": {"web": {"saved_pages": self.saved, "delay_s": self.delay}}}
        return ReportSection(
            "policy", "Policy", metrics,
            plots=[Plot("policy-saved", "Saved over time", "time (s)", "pages", {"web": ([0, 1], [0, self.saved])},
                        ends_at={"web": ("vms", "web", "saved_pages")})],
            headlines=[Headline("{name} saved {saved} after {delay}",
                                {"name": Figure(("policy",), "text"),
                                 "saved": Figure(("vms", "web", "saved_pages"), "pages", "higher"),
                                 "delay": Figure(("vms", "web", "delay_s"), "s", "lower")}, vm="web")])


def _run(folder, policy, seed=1):
    scenario = parse_scenario({"name": "t", "seed": seed, "host": {"memory": "32MiB", "tick": "1ms", "batch": 4096},
                               "vm": [{"name": "web", "memory": "4MiB", "workload": {"kind": "uniform"}}],
                               "timeline": [{"do": "run", "for": "2ms"}]})
    ScenarioRun(scenario, extra_plugins=[policy]).run().write(folder)
    return folder


def _compare(*args):
    _register_commands()
    return CliRunner().invoke(cli, ["compare", *map(str, args)])


def test_compare_puts_every_figure_beside_the_first_runs(tmp_path):
    """Each headline figure of each run, its difference from the first run and whether that is
    better or worse as the figure counts it; the settings that differ; a page with the
    figures, links to both reports and the plots overlaid."""
    a = _run(tmp_path / "slow", Policy("slow", saved_pages=25600, delay_s=0.004))
    b = _run(tmp_path / "fast", Policy("fast", saved_pages=12800, delay_s=0.001), seed=2)
    done = _compare(a, b, "--out", tmp_path / "cmp", "--json", tmp_path / "cmp.json")
    assert done.exit_code == 0, done.output
    figures = json.loads((tmp_path / "cmp.json").read_text())
    assert [r["label"] for r in figures["runs"]] == ["slow", "fast"]
    assert {"setting": "seed", "values": [1, 2]} in figures["differences"]
    rows = {(r["section"], r["figure"]): r for r in figures["figures"]}
    saved, delay, name = rows["Policy", "saved pages"], rows["Policy", "delay"], rows["Policy", "policy"]
    assert saved["values"] == [25600, 12800] and saved["shown"] == ["100 MiB", "50 MiB"]
    assert saved["changes"] == [{"difference": -12800, "ratio": 0.5, "direction": "worse"}]
    assert delay["changes"][0]["direction"] == "better"
    assert delay["changes"][0]["difference"] == pytest.approx(-0.003)
    assert name["values"] == ["slow", "fast"] and name["changes"][0]["direction"] == "changed"
    assert "-50 MiB (-50 %) worse" in done.output and "-3 ms (-75 %) better" in done.output
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "<a href='../slow/report.html'>" in page and "<a href='../fast/report.html'>" in page
    assert "class='n worse'>-50 MiB (-50 %) worse</td>" in page
    assert "class='n changed'>changed</td>" in page  # words differ: said, not an empty cell
    plot = json.loads((tmp_path / "cmp" / "compare.json").read_text())["plots"]
    assert "policy-saved" in plot and (tmp_path / "cmp" / "policy-saved.png").read_bytes()[:4] == b"\x89PNG"
    assert not page_problems(tmp_path / "cmp" / "compare.html")


def test_compare_to_standard_output_is_the_json_alone(tmp_path):
    """`--json -` leaves standard output to the JSON."""
    a = _run(tmp_path / "a", Policy("p", 1, 0.5))
    b = _run(tmp_path / "b", Policy("p", 2, 0.5))
    done = _compare(a / "report.json", b, "--json", "-")
    assert done.exit_code == 0, done.output
    rows = json.loads(done.stdout)["figures"]
    assert any(r["figure"] == "saved pages" and r["changes"][0]["direction"] == "better" for r in rows)


@pytest.mark.parametrize("content, problem", [
    ("{", "not a memvisor report: line 1"),
    ('{"scenario": {"name": "t"}, "vms": {}, "sections": [], "time": NaN}', "NaN is not JSON"),
    ('[1, 2]', "the file: expected a table"),
    ('{"scenario": {"name": 3}}', "scenario.name: expected text"),
    ('{"scenario": {"name": "t"}, "vms": {}, "host": {"backend": {"name": "e"}}, "time": {"clock": "virtual", '
     '"real_seconds": 1, "virtual_seconds": 1}, "sections": [{"title": "T", "plugin": "p", "headlines": [{"key": "h", '
     '"text": "x", "figures": {"n": {"value": 1, "unit": "furlongs"}}}]}]}', "no unit 'furlongs'"),
    ('{"scenario": {"name": "t"}, "vms": {}, "host": {"backend": {"name": "e"}}, "time": {"clock": "real", '
     '"real_seconds": 1}, "sections": [], "plots": {"p": {"title": "", "xlabel": "", "ylabel": "", '
     '"series": {"a": {"x": [1, 2], "y": [1]}}}}}', "x and y of different lengths"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
])
def test_a_report_that_is_not_one_is_refused_in_one_line(tmp_path, content, problem):
    """A report.json from outside is checked before it is used: one line naming the file."""
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(UserError, match=problem):
        load_report(tmp_path)
    other = _run(tmp_path / "good", Policy("p", 1, 0.5))
    done = _compare(tmp_path, other)
    assert done.exit_code == 2 and len(done.stderr.splitlines()) == 1 and str(tmp_path / "report.json") in done.stderr


def test_compare_needs_two_runs_with_headlines(tmp_path):
    """One run, or runs without a headline (reports of memvisor before them), is one line."""
    a = _run(tmp_path / "a", Policy("p", 1, 0.5))
    assert _compare(a).exit_code == 2
    data = json.loads((a / "report.json").read_text())
    for section in data["sections"]:
        section["headlines"] = []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "report.json").write_text(json.dumps(data))
    done = _compare(tmp_path / "old", tmp_path / "old" / "report.json")
    assert done.exit_code == 2 and "no headline figures to compare" in done.stderr
