"""A third-party plugin, built as its own distribution in a temporary folder and installed,
is discovered by memvisor and receives events; a plugin that fails to import is named in one
line while the others still load."""

import json
import os
import subprocess
import sys

import pytest

from memvisor.testing import build_plugin

COUNTER = """
import json, os
import numpy as np
from memvisor import hookimpl
from memvisor.report import ReportSection

class Counter:
    def __init__(self):
        self.ticks = 0
        self.vms = []

    @hookimpl
    def memvisor_vm_created(self, vm):
        self.vms.append(vm.name)

    @hookimpl
    def memvisor_tick(self, tick):
        self.ticks += 1

    @hookimpl
    def memvisor_report(self):
        return ReportSection("counter", "Counter", {"ticks": self.ticks, "vms": self.vms})
"""

BROKEN = """
raise ImportError("this plugin needs libfoo, which is not installed")
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("thirdparty")
    build_plugin(tmp_path, "counter", COUNTER, target="Counter", version="1.2.3")
    return build_plugin(tmp_path, "broken", BROKEN, target="Nothing", version="1.2.3")


def memvisor(site, *args):
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "memvisor", *args], capture_output=True, text=True, env=env)


def test_installed_plugin_is_listed_with_version_and_hooks(site):
    """`memvisor plugins --json` shows the new distribution, its version and its hooks."""
    proc = memvisor(site, "plugins", "--json", "-")
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["counter"]["distribution"] == "memvisor-counter" and rows["counter"]["version"] == "1.2.3"
    assert rows["counter"]["hooks"] == ["memvisor_report", "memvisor_tick", "memvisor_vm_created"]
    assert "libfoo" in rows["broken"]["error"] and "stats" in rows


def test_installed_plugin_receives_events(site, tmp_path):
    """A scenario that enables the plugin delivers VM creation and ticks to it."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('[host]\nmemory = "16MiB"\ntick = "1ms"\nbatch = 1024\n[plugins.counter]\n'
                        '[[vm]]\nmemory = "4MiB"\nworkload = { kind = "uniform" }\n'
                        '[[timeline]]\ndo = "run"\nfor = "2ms"\n')
    proc = memvisor(site, "run", str(scenario), "--out", str(tmp_path / "out"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (section,) = [s for s in report["sections"] if s["plugin"] == "counter"]
    assert section["metrics"]["vms"] == ["vm0"] and section["metrics"]["ticks"] >= 2


def test_broken_plugin_fails_in_one_line_when_asked_for(site, tmp_path):
    """Enabling a plugin that fails to import is one line naming it, exit 2."""
    scenario = tmp_path / "s.toml"
    scenario.write_text('[host]\nmemory = "16MiB"\n[plugins.broken]\n[[vm]]\nmemory = "4MiB"\n')
    proc = memvisor(site, "run", str(scenario), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "plugin 'broken' (memvisor-broken) failed to load" in last and "libfoo" in last
    assert "Traceback" not in proc.stderr
