"""The balloon in scenarios: its timeline actions, its report section and plots, the example
file, and its benchmark registration."""

from pathlib import Path

import pytest

from memvisor.errors import UserError
from memvisor.runner import ScenarioRun
from memvisor.scenario import load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[3]


def small_scenario(timeline, balloon=None):
    """Two 8 MiB VMs on an 18 MiB host (below its low watermark from the start)."""
    return parse_scenario({
        "host": {"memory": "18MiB", "tick": "1ms", "batch": 2048, "low_watermark": 0.15, "high_watermark": 0.3},
        "plugins": {"balloon": balloon if balloon is not None else {"reload_delay": "5ms"}},
        "vm": [
            {"name": "busy", "memory": "8MiB", "contents": "random",
             "workload": {"kind": "uniform", "write_fraction": 0.3}},
            {"name": "reboots", "memory": "8MiB", "contents": "text",
             "workload": {"kind": "phased", "footprint": 0.25, "phase_accesses": 2048, "distribution": "uniform",
                          "write_fraction": 0.5}},
        ],
        "timeline": timeline,
    })


def test_a_run_reclaims_under_pressure_and_resets_after_a_reboot():
    """Pressure from the first tick inflates the balloons; a guest reboot's writes reset that
    VM's balloon, its reloaded driver inflates again; the report has metrics and plots."""
    report = ScenarioRun(small_scenario([
        {"do": "run", "for": "20ms"},
        {"do": "balloon_target", "vm": "reboots", "target": "3MiB"},
        {"do": "run", "for": "5ms"},
        {"do": "balloon_reset", "vm": "reboots"},
        {"do": "run", "for": "30ms"},
        {"do": "balloon_target", "vm": "busy", "fraction": 0.0},
        {"do": "run", "for": "10ms"},
    ])).run()
    metric = lambda key: report.metric("balloon", key)  # noqa: E731
    assert metric("pressure_events") >= 1 and metric("pressure_freed_pages") > 0
    assert metric("resets") >= 1 and metric("vms")["reboots"]["resets"] >= 1
    assert metric("guest_visible_errors") == 0
    assert metric("vms")["busy"]["balloon_pages"] == 0
    reboots = metric("vms")["reboots"]
    assert reboots["balloon_pages"] == reboots["target_pages"] >= 768  # back at its target after the reload
    names = {p.name for p in report.plots}
    assert {"balloon-reclaimed", "balloon-size", "balloon-pressure"} <= names
    assert any(e["kind"] == "balloon_reset" for e in report.data["core"]["events"])


def test_balloon_actions_check_their_keys():
    """A target beyond max_fraction, or an action without the plugin, is one line naming the key."""
    with pytest.raises(UserError, match=r"timeline\[0\]\.fraction: the balloon of VM 'busy' can hold at most"):
        ScenarioRun(small_scenario([{"do": "balloon_target", "vm": "busy", "fraction": 0.9}])).run()
    scenario = small_scenario([{"do": "balloon_reset", "vm": "busy"}])
    no_plugin = parse_scenario({"host": {"memory": "18MiB"}, "vm": [{"name": "busy", "memory": "8MiB"}],
                                "timeline": [{"do": "balloon_reset", "vm": "busy"}]})
    with pytest.raises(UserError, match=r"timeline\[0\]\.do: balloon_reset needs the balloon plugin"):
        ScenarioRun(no_plugin).run()
    assert scenario.plugins["balloon"]


def test_bad_settings_in_a_scenario_name_the_file_and_key():
    """A misspelt setting stops the scenario when it is loaded, naming the file and the key."""
    problem = r"<scenario>: plugins\.balloon\.polcy: unknown setting \(did you mean .policy.\?\)"
    with pytest.raises(UserError, match=problem):
        ScenarioRun(small_scenario([{"do": "run", "for": "1ms"}], balloon={"polcy": "mrc"}))


def test_the_example_scenario_is_valid():
    """examples/balloon.toml parses, enables the balloon and uses its actions."""
    scenario = load_scenario(ROOT / "examples" / "balloon.toml")
    assert "balloon" in scenario.plugins
    assert {"balloon_reset", "balloon_target", "pressure"} <= {s["do"] for s in scenario.timeline}
    vm_pages = sum(vm.pages for vm in scenario.vms)
    assert vm_pages > 0.95 * scenario.host.memory_pages  # below the low watermark from the start


def test_benchmarks_are_registered():
    """`memvisor bench balloon` has inflate-1gib and reset-1gib, each with a baseline."""
    from memvisor.plugins import new_plugin_manager
    from memvisor.registry import GroupedRegistry, fill

    pm = new_plugin_manager(["balloon"])  # the installed entry point, without other plugins' cases
    cases = fill(pm.hook.memvisor_register_benchmarks, GroupedRegistry("benchmark"), pm).groups()["balloon"]
    assert [c.name for c in cases] == ["inflate-1gib", "reset-1gib"]
    assert all(c.baseline is not None and c.metric == "seconds" and not c.higher_is_better for c in cases)
