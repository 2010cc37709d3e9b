"""examples/overcommit.toml: four VMs on a host overcommitted 1.5x with every technique on run
to the end with no guest-visible error, and the report shows what each technique reclaimed."""

from pathlib import Path

from memvisor.runner import ScenarioRun
from memvisor.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[2]


def test_integration_overcommit_example_runs_clean():
    """1.5x overcommit, zero guest-visible errors, each technique's reclaim in the report."""
    report = ScenarioRun(load_scenario(ROOT / "examples" / "overcommit.toml")).run().data
    sections = {(s["plugin"], s["title"]): s["metrics"] for s in report["sections"]}
    core = sections[("memvisor", "Memory, reclaim and reliability")]
    assert core["overcommit"] == 1.5 and core["vm_mib"] > core["host_mib"]
    assert core["plugin_failures"] == 0 and core["vms_stopped"] == {}
    assert core["reclaimed_under_pressure_mib"]["balloon"] > 0
    assert set(core["reclaimed_now_mib_by_technique"]) >= {"balloon", "sharing"}
    assert sections[("balloon", "Ballooning")]["guest_visible_errors"] == 0
    errors = sections[("memvisor", "Live migrations and memory errors")]
    assert all(m["verified"] for m in errors["migrations"])
    assert errors["memory_error_repaired"] > 0
