"""docs/writing-a-plugin.md works as written: its plugin is built from the page's code blocks
(a block whose first line is ``# PATH`` is that file; ``# PATH (continued)`` adds to it),
installed as its own distribution beside the installed ones, and then its tests pass, its
scenario runs on the emulator (and on the Linux backend where it can) with figures that agree
with the core's, its settings show in `memvisor plugins --settings`, a bad setting is the one
line the page shows, and `memvisor selftest` runs with it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "writing-a-plugin.md"
BLOCK = re.compile(r"^```(\w+)\n# (\S+)( \(continued\))?\n(.*?)^```$", re.S | re.M)


def files_of_the_page() -> dict[str, str]:
    """The files the page's code blocks make, by path."""
    files: dict[str, str] = {}
    for _lang, path, continued, body in BLOCK.findall(DOC.read_text()):
        if continued:
            assert path in files, f"{path} is continued before it starts"
            files[path] += "\n\n" + body
        else:
            assert path not in files, f"{path} starts twice"
            files[path] = body
    return files


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plugin written out and pip-installed (without dependencies: memvisor is installed)
    into a folder of its own; ``(source folder, environment that sees the install)``."""
    tmp = tmp_path_factory.mktemp("writing-a-plugin")
    for path, text in files_of_the_page().items():
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_text(text)
    source, site = tmp / "memvisor-zeroreclaim", tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(source)], check=True, capture_output=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p))
    return source, env


def memvisor(env, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memvisor", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_the_page_makes_a_whole_distribution():
    """The page's blocks give the layout it shows, and nothing else."""
    assert sorted(files_of_the_page()) == [
        "memvisor-zeroreclaim/pyproject.toml",
        "memvisor-zeroreclaim/src/memvisor_zeroreclaim/__init__.py",
        "memvisor-zeroreclaim/src/memvisor_zeroreclaim/plugin.py",
        "memvisor-zeroreclaim/tests/test_zeroreclaim.py",
        "memvisor-zeroreclaim/zero-reclaim.toml",
    ]


def test_the_plugins_own_tests_pass(plugin):
    source, env = plugin
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                          capture_output=True, text=True, env=env, cwd=source, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\b6 passed\b", proc.stdout), proc.stdout[-500:]


def _check_report(report: dict) -> int:
    """The plugin's figures agree with the core's: what it says it freed is what the core counted
    it reclaiming under pressure, the sum of the pressure events' reclaim, and where its plot ends."""
    section = next(s for s in report["sections"] if s["plugin"] == "zeroreclaim")
    freed = section["metrics"]["freed_pages"]
    memory = next(s for s in report["sections"] if s["title"].startswith("Memory"))
    assert memory["metrics"]["reclaimed_under_pressure_mib"]["zeroreclaim"] * 256 == freed
    events = [e for e in report["core"]["events"] if e["kind"] == "memory_pressure"]
    assert len(events) == 2 and sum(e["reclaimed_pages"] for e in events) == freed
    assert report["plots"]["zeroreclaim-freed"]["series"]["freed"]["y"][-1] == freed
    assert 0 < section["metrics"]["vms"]["web"]["on_zero_page"] <= freed
    assert [h.get("vm") for h in section["headlines"]] == [None, "web"]
    return freed


def test_the_scenario_runs_on_the_emulator(plugin, tmp_path):
    """Both pressures free pages (the restore brought zero pages back as private ones), and the
    emulator's identity model gives the same figures as its bytes model."""
    source, env = plugin
    proc = memvisor(env, "run", str(source / "zero-reclaim.toml"), "--out", str(tmp_path / "report"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    _check_report(report)
    from memvisor.testing.report_checks import headline_problems, page_problems

    assert not headline_problems(report) and not page_problems(tmp_path / "report" / "report.html")
    assert all(e["reclaimed_pages"] > 0 for e in report["core"]["events"] if e["kind"] == "memory_pressure")
    assert (tmp_path / "report" / "zeroreclaim-freed.png").stat().st_size > 0
    # The emulator's other machine model (pages by content identity) frees the same pages.
    identity = tmp_path / "identity.toml"
    scenario = (source / "zero-reclaim.toml").read_text()
    identity.write_text(scenario.replace("[host]\n", '[host]\ncontents = "identity"\n'))
    proc = memvisor(env, "run", str(identity), "--out", str(tmp_path / "identity"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_identity = json.loads((tmp_path / "identity" / "report.json").read_text())
    assert by_identity["host"]["backend"]["contents"] == "identity" and report["host"]["backend"]["contents"] == "bytes"
    mine = [next(s["metrics"] for s in r["sections"] if s["plugin"] == "zeroreclaim") for r in (report, by_identity)]
    assert mine[0] == mine[1] and _check_report(by_identity) == _check_report(report)


def test_the_scenario_runs_on_the_linux_backend(plugin, tmp_path):
    from memvisor.backend import Capability

    source, env = plugin
    reason = _linux_reason()
    if reason is not None:
        pytest.skip(f"the Linux backend cannot run here: {reason}")
    proc = memvisor(env, "run", str(source / "zero-reclaim.toml"), "--backend", "linux", "--out",
                    str(tmp_path / "report"), "--quiet")
    if proc.returncode == 2 and f"needs {Capability.ZERO_PAGE}" in proc.stderr:  # the page says so
        assert proc.stderr.count("\n") == 1
        pytest.skip(proc.stderr.strip())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["time"]["clock"] == "real" and _check_report(report) > 0


def _linux_reason():
    try:
        from memvisor_backend_linux.backend import unavailable_reason
    except ImportError:
        return "memvisor-backend-linux is not installed"
    return unavailable_reason()


def test_settings_are_declared_and_bad_ones_are_the_line_the_page_shows(plugin, tmp_path):
    source, env = plugin
    rows = json.loads(memvisor(env, "plugins", "--settings", "zeroreclaim", "--json", "-").stdout)
    assert [(r["name"], r["default"]) for r in rows] == [("pages_per_scan", 16384), ("during_migration", False)]
    shown = re.search(r"^\$ memvisor run bad.toml .*\n(memvisor: error: .*)$", DOC.read_text(), re.M)
    bad = tmp_path / "bad.toml"
    bad.write_text((source / "zero-reclaim.toml").read_text().replace("pages_per_scan = 16384", "pages_per_scan = 0"))
    proc = memvisor(env, "run", "bad.toml", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == shown.group(1) + "\n"
    assert not (tmp_path / "out").exists()


def test_memvisor_selftest_runs_with_the_plugin(plugin, tmp_path):
    """The plugin takes part (with the settings its memvisor_selftest gives) and its check passes."""
    pytest.importorskip("hypothesis")
    _source, env = plugin
    proc = memvisor(env, "selftest", "--no-fuzz", "--examples", "4", "--steps", "20", "--seed", "0", "--json",
                    str(tmp_path / "selftest.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "zeroreclaim" in json.loads((tmp_path / "selftest.json").read_text())["integration"]["plugins"]
