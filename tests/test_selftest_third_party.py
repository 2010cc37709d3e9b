"""`memvisor selftest` exercises a plugin that is not in this repository: built as its own
distribution and installed beside the in-repo plugins, it takes part as they do (its settings
on the machine's host, its steps drawn among the core's, its check after every step), and the
machine catches it when its step changes what a guest reads."""

import json
import subprocess
import sys

import pytest

from memvisor.testing import build_plugin, plugins_at

pytest.importorskip("hypothesis")

LEDGER = '''
import attrs
import numpy as np

from memvisor import hookimpl
from memvisor.settings import setting


@attrs.frozen
class LedgerSettings:
    most: int = setting(16, low=1, high=1024, doc="Most pages one trace step traces.")


def trace_pages(plugin, host, vm, count):
    """Trace ``count`` pages (at most the setting) of the VM from its first one."""
    count = min(count, plugin.settings.most)
    host.backend.trace(vm, np.arange(count, dtype=np.int64))


def agrees_with_the_core(plugin, host):
    """The traced accesses the plugin was told of are the core's count of them."""
    core = sum(host.counters(vm)["traced"] for vm in host.vms.values())
    assert sum(plugin.traced.values()) == core, f"ledger counted {sum(plugin.traced.values())}, core {core}"


class Ledger:
    def __init__(self):
        self.traced = {}

    @hookimpl
    def memvisor_register_settings(self, register):
        register("ledger", LedgerSettings)

    @hookimpl
    def memvisor_host_started(self, host):
        self.settings = host.plugin_settings("ledger")

    @hookimpl
    def memvisor_traced_access(self, vm, access):
        self.traced[vm.name] = self.traced.get(vm.name, 0) + len(access.gpps)

    @hookimpl
    def memvisor_selftest(self, selftest):
        selftest.settings({"most": 8})
        selftest.step("ledger_trace", trace_pages, count=(1, 64))
        selftest.check(agrees_with_the_core)
'''

SCRIBBLE = '''
import numpy as np

from memvisor import hookimpl


def scribble(plugin, host, vm, page):
    """A bug: write into a present guest page behind the guest's back."""
    gpps = np.array([page], dtype=np.int64)
    if host.backend.present(vm, gpps)[0]:
        data = host.backend.read(vm, gpps)
        data[0, 100] ^= 0xFF
        host.backend.write(vm, gpps, data)


class Scribble:
    @hookimpl
    def memvisor_selftest(self, selftest):
        selftest.step("scribble_page", scribble, page=(0, 1023))
'''


def selftest(site, tmp_path, *args):
    with plugins_at(site):
        return subprocess.run([sys.executable, "-m", "memvisor", "selftest", "--no-fuzz", "--steps", "20",
                               "--seed", "1", *args], capture_output=True, text=True, cwd=tmp_path, timeout=900)


def test_a_third_party_plugin_takes_part_in_the_selftest(tmp_path):
    """Its name is among the machine's plugins, its step ran, and its check (its count of
    traced accesses against the core's counters) passed after every step."""
    from memvisor.testing.integration import machine_plugins

    site = build_plugin(tmp_path / "build", "ledger", LEDGER, target="Ledger")
    proc = selftest(site, tmp_path, "--examples", "4", "--json", str(tmp_path / "figures.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())["integration"]
    with plugins_at(site):
        installed = sorted(machine_plugins())
    assert "ledger" in installed and figures["plugins"] == installed  # beside every other installed plugin
    assert figures["plugin_steps"].get("ledger.ledger_trace", 0) > 0


@pytest.mark.parametrize(("name", "source", "target", "said"), [
    ("scribble", SCRIBBLE, "Scribble", ("state.scribble_page(", "pages differ from the model")),
    ("ledger", LEDGER.replace("+ len(access.gpps)", "+ len(access.gpps) + 1"), "Ledger", ("ledger counted",)),
], ids=["a step that writes into guest pages", "a plugin whose own check fails"])
def test_the_selftest_catches_a_third_party_plugin_that_is_wrong(tmp_path, name, source, target, said):
    """A plugin whose step writes into guest pages fails the machine's check of every guest
    page against the model, with the failing example naming the step; a plugin whose
    bookkeeping is wrong fails its own check, run after every step."""
    site = build_plugin(tmp_path / "build", name, source, target=target)
    proc = selftest(site, tmp_path, "--examples", "10")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert all(text in output for text in said), output[-3000:]
