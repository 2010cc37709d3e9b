"""memvisor selftest --replay: the steps a failing run printed run again, checks included."""

import subprocess
import sys
from pathlib import Path

import pytest

from memvisor.testing import integration

EXAMPLE = Path(__file__).parent / "data" / "selftest-diskmap-swapped-a-balloon-page.txt"


def test_parse_steps_reads_rules_arguments_and_draws():
    steps = integration.parse_steps(EXAMPLE.read_text())
    names = [name for name, _ in steps]
    assert names[0] == "setup" and names[-1] == "teardown"
    assert steps[0][1] == {"large": False, "seed": 33}
    disk_io = next(kwargs for name, kwargs in steps if name == "disk_io")
    assert disk_io["pages"] == [399, 235, 431, 180, 58]
    assert disk_io["data"].draw(None) == [92, 62, 255, 135, 44]


FIXED = {
    # a balloon page swapped out under pressure (diskmap dropped a shared page)
    "selftest-diskmap-swapped-a-balloon-page.txt": 22,
    # diskmap trusted a mapping on a machine page number the balloon's page had reused
    "selftest-diskmap-trusted-a-reused-machine-page.txt": 109,
    # pre-copy did not resend a page the balloon took onto the machine page number it was sent from
    "selftest-migration-missed-a-reused-machine-page.txt": 56,
}


@pytest.mark.parametrize("name, steps", sorted(FIXED.items()))
def test_replay_of_a_fixed_finding_passes_every_check(name, steps):
    """Examples of findings that failed before their fixes replay cleanly now."""
    path = EXAMPLE.parent / name
    proc = subprocess.run([sys.executable, "-m", "memvisor", "selftest", "--replay", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{steps} steps replayed, every check passed" in proc.stdout


def test_replay_reports_a_failure_again(monkeypatch):
    machine = integration.machine_class

    def broken(final_fault_check=True):
        cls = machine(final_fault_check)

        class Broken(cls):
            def machine_pages_exact(self):
                raise AssertionError("VM v0: a balloon page was remapped behind the balloon")
        return Broken

    monkeypatch.setattr(integration, "machine_class", broken)
    try:
        integration.replay(EXAMPLE.read_text())
    except AssertionError as exc:
        assert "remapped behind the balloon" in str(exc)
    else:
        raise AssertionError("the failure was not raised again")


def test_replay_of_a_file_without_an_example_is_one_line(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("nothing to see\n")
    proc = subprocess.run([sys.executable, "-m", "memvisor", "selftest", "--replay", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("no failing example in it (no 'state = ...' line)")
