"""The fleet host (examples/fleet-host.toml) as packaged and scaled (its runs, which need every
technique plugin, are in tests/integration/test_integration_fleet.py)."""

from pathlib import Path

import pytest

from memvisor_backend_emulator.fleet import fleet_scenario, fleet_text, guest_gib

ROOT = Path(__file__).resolve().parents[3]


def test_the_example_is_the_packaged_fleet():
    """examples/fleet-host.toml is the scenario the benchmarks scale: the same text."""
    assert (ROOT / "examples" / "fleet-host.toml").read_text() == fleet_text()


def test_scaling_keeps_the_fleet_overcommitted():
    """Scaled to any size, the fleet keeps its 48 VMs and its 1.25x overcommit."""
    for gib in (2, 64, 1024):
        scenario = fleet_scenario(gib)
        assert len(scenario["vm"]) + sum(s["do"] == "create_vm" for s in scenario["timeline"]) == 48
        assert guest_gib(scenario) / gib == pytest.approx(1.25, rel=0.01)
