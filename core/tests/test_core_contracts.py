"""Hook contracts without workarounds: the restore observer, what a fault hook returns, which
hooks are isolated, actions handed their plugin, and the renamed hooks' old names (one release,
with pluggy's deprecation warning)."""

import warnings

import numpy as np
import pytest

from memvisor import hookimpl, hookspec
from memvisor.errors import PluginError, UserError, VMStoppedError
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import small_host


def test_hook_memvisor_restore_starting(tmp_path):
    """The observer fires once a restore passed its checks, before any page changes, with the
    request; a refused restore does not fire it and changes nothing."""
    seen = []

    class Watcher:
        @hookimpl
        def memvisor_restore_starting(self, host, vm, restore):
            seen.append((vm.name, restore.request.path, int(host.backend.read(vm, np.array([3]))[0, 0])))

    host = small_host(extra_plugins=[Watcher()])
    vm = host.create_vm("a", 64)
    host.backend.write(vm, np.array([3]), np.full((1, 4096), 7, np.uint8))
    path = str(tmp_path / "a.ckpt")
    host.save_checkpoint(vm, SaveRequest(path))
    host.backend.write(vm, np.array([3]), np.full((1, 4096), 9, np.uint8))
    host.restore_checkpoint(vm, RestoreRequest(path))
    assert seen == [("a", path, 9)]  # before the page changed back to 7
    assert host.backend.read(vm, np.array([3]))[0, 0] == 7
    other = host.create_vm("b", 32)
    with pytest.raises(UserError, match="checkpoint of 64 pages"):
        host.restore_checkpoint(other, RestoreRequest(path))
    assert len(seen) == 1


def test_a_save_still_running_is_flushed_before_a_restore_of_its_vm(tmp_path):
    """A save job with a flush (a lazy save) is finished before the VM's memory is replaced."""
    flushed = []

    class Slow:
        @hookimpl(tryfirst=True)
        def memvisor_checkpoint_save(self, host, vm, request):
            from memvisor.builtins.checkpoint.vm import SaveJob, stop_the_world_save

            job = SaveJob(vm.name, request.path, "slow", host.now)

            def flush():
                done = stop_the_world_save(host, vm, request)
                job.finished = done.finished
                flushed.append(vm.name)

            job.flush = flush
            return job

    host = small_host(extra_plugins=[Slow()])
    vm = host.create_vm("a", 32)
    path = str(tmp_path / "a.ckpt")
    job = host.save_checkpoint(vm, SaveRequest(path))
    assert not job.done
    host.restore_checkpoint(vm, RestoreRequest(path))
    assert flushed == ["a"] and job.done


def test_fault_hook_results_are_counted_per_plugin_and_checked():
    """What each fault hook returns is counted (the zero-fill default too) and adds up to the
    faults; a plugin returning a page it did not make present stops the VM in one line."""

    class Server:
        @hookimpl
        def memvisor_page_fault(self, host, vm, fault):
            mine = fault.gpps[fault.gpps < 8]
            host.backend.populate(vm, mine)
            return mine

    host = small_host(extra_plugins=[Server()])
    vm = host.create_vm("a", 32)
    host.backend.unmap(vm, np.arange(16))
    result = host.access(vm, np.arange(16), np.zeros(16, bool))
    assert result.faults == 16
    assert host.faults_served_by == {"Server": 8, "zero-fill": 8}
    assert sum(host.faults_served_by.values()) == host.metrics.counters["a"]["faults"]

    class Liar:
        @hookimpl(tryfirst=True)
        def memvisor_page_fault(self, host, vm, fault):
            return fault.gpps  # claims them, serves none

    host = small_host(extra_plugins=[Liar()])
    vm = host.create_vm("a", 32)
    host.backend.unmap(vm, np.arange(4))
    with pytest.raises(Exception, match="did not make present"):
        host.access(vm, np.arange(4), np.zeros(4, bool))
    with pytest.raises(VMStoppedError, match="plugin 'Liar' failed serving a page fault: BackendError: returned 4"):
        host.access(vm, np.arange(4), np.zeros(4, bool))


class Broken:
    """Raises in every hook the docs say is isolated."""

    def _fail(self, *args):
        raise RuntimeError("broken plugin")

    memvisor_vm_created = hookimpl(_fail)
    memvisor_vm_destroyed = hookimpl(_fail)
    memvisor_host_stopping = hookimpl(_fail)
    memvisor_restore_starting = hookimpl(_fail)


def test_vm_lifecycle_restore_and_stopping_hooks_are_isolated(tmp_path):
    """A plugin raising in vm_created, vm_destroyed, restore_starting or host_stopping is
    recorded by name; the host and its VMs go on."""
    host = small_host(extra_plugins=[Broken()])
    vm = host.create_vm("a", 16)
    path = str(tmp_path / "a.ckpt")
    host.save_checkpoint(vm, SaveRequest(path))
    host.restore_checkpoint(vm, RestoreRequest(path))
    host.destroy_vm(vm)
    host.stop()
    assert [f["hook"] for f in host.plugin_failures] == [
        "memvisor_vm_created", "memvisor_restore_starting", "memvisor_vm_destroyed", "memvisor_host_stopping"]
    assert {f["plugin"] for f in host.plugin_failures} == {"Broken"}


def test_a_failing_report_hook_costs_its_section_only():
    """A plugin whose report hook raises contributes no section; the run's report is written
    with the failure named in the core's memory section."""

    class BadReport:
        @hookimpl
        def memvisor_report(self, host):
            raise ValueError("cannot add up")

    scenario = parse_scenario({"host": {"memory": "16MiB", "tick": "1ms"},
                               "vm": [{"memory": "4MiB", "workload": {"kind": "uniform"}}],
                               "timeline": [{"do": "run", "for": "2ms"}]})
    report = ScenarioRun(scenario, extra_plugins=[BadReport()]).run()
    failures = report.metric("memvisor", "plugin_failures_by_plugin")
    assert failures == {"BadReport:memvisor_report": 1}
    assert all(s["plugin"] != "BadReport" for s in report.data["sections"])


def test_a_plugin_that_fails_to_start_is_one_line_naming_it():
    """A plugin raising a plain exception in memvisor_host_started (a ValueError of a settings
    check written before settings were declared) refuses the run in one line naming it."""

    class Fussy:
        @hookimpl
        def memvisor_host_started(self, host):
            raise ValueError("every must be positive")

    with pytest.raises(PluginError, match=r"^plugin 'Fussy' failed to start: ValueError: every must be positive$"):
        small_host(extra_plugins=[Fussy()])


def test_an_action_gets_the_plugin_that_registered_it():
    """An action taking ``plugin`` gets the running host's instance of its plugin."""
    seen = []

    class WithAction:
        @hookimpl
        def memvisor_register_actions(self, register):
            register("poke", poke)

    def poke(run, step, plugin):
        seen.append(plugin)

    plugin = WithAction()
    scenario = parse_scenario({"host": {"memory": "16MiB"}, "vm": [{"memory": "4MiB"}],
                               "timeline": [{"do": "poke"}]})
    ScenarioRun(scenario, extra_plugins=[plugin]).run()
    assert seen == [plugin]


def test_hook_memvisor_page_accessed():
    """The old name of memvisor_traced_access still receives the traps, with pluggy's
    DeprecationWarning naming the new name when the plugin is registered."""
    seen = []

    class Old:
        @hookimpl
        def memvisor_page_accessed(self, vm, access):
            seen.append(access.gpps.tolist())

    with pytest.warns(DeprecationWarning, match="memvisor_page_accessed is renamed memvisor_traced_access"):
        host = small_host(extra_plugins=[Old()])
    vm = host.create_vm("a", 16)
    host.backend.trace(vm, np.array([2, 5]))
    host.access(vm, np.array([5, 1, 2]), np.zeros(3, bool))
    assert seen == [[5, 2]]


def test_hook_memvisor_page_write():
    """The old name of memvisor_write_trap still sees write traps before the write lands."""
    seen = []

    class Old:
        @hookimpl
        def memvisor_page_write(self, host, vm, write):
            seen.append((write.gpps.tolist(), int(host.backend.read(vm, write.gpps)[0, 0])))

    with pytest.warns(DeprecationWarning, match="memvisor_page_write is renamed memvisor_write_trap"):
        host = small_host(extra_plugins=[Old()])
    vm = host.create_vm("a", 16)
    host.backend.protect(vm, np.array([4]))
    host.access(vm, np.array([4]), np.ones(1, bool))
    assert seen == [([4], 0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small_host()  # the new names warn nothing


class HeatSpecs:
    """A hook a plugin offers others: how hot pages are."""

    @hookspec(firstresult=True)
    def memvisor_example_heat(self, host, vm, gpps):
        """Decision. A float per page."""


class Asking:
    """Declares the hook it asks, and asks it."""

    @hookimpl
    def memvisor_register_hookspecs(self, register):
        register(HeatSpecs)


class AlsoAsking(Asking):
    """A second asker declares the same hook alike (plugins never import each other)."""


class Answering:
    """Answers where an asker declares the hook; loads where none does."""

    @hookimpl(optionalhook=True)
    def memvisor_example_heat(self, vm, gpps):
        return np.full(len(gpps), 2.0)


def test_hook_memvisor_register_hookspecs():
    """A plugin declares a hook it offers; answerers implement it as optional; two askers may
    declare it alike; declaring it otherwise, or a core hook's name, is one line naming both."""
    host = small_host(extra_plugins=[Asking(), AlsoAsking(), Answering()])
    vm = host.create_vm("a", 8)
    assert host.hook.memvisor_example_heat(host=host, vm=vm, gpps=np.arange(3)).tolist() == [2.0, 2.0, 2.0]
    small_host(extra_plugins=[Answering()])  # no asker: the answer is not called, and it loads

    class Otherwise:
        @hookspec
        def memvisor_example_heat(self, host, vm):
            """Collector, other arguments."""

    class Conflicting:
        @hookimpl
        def memvisor_register_hookspecs(self, register):
            register(Otherwise)

    with pytest.raises(PluginError, match="declares memvisor_example_heat otherwise than plugin"):
        small_host(extra_plugins=[Asking(), Conflicting()])

    class CoreName:
        @hookspec
        def memvisor_tick(self, host, tick):
            """Not yours."""

    class Usurper:
        @hookimpl
        def memvisor_register_hookspecs(self, register):
            register(CoreName)

    with pytest.raises(PluginError, match="declares memvisor_tick, which is a hook of the core"):
        small_host(extra_plugins=[Usurper()])


def test_an_answer_to_a_formerly_core_hook_still_loads_with_a_warning():
    """memvisor_page_heat was the core's: an implementation written for it (not optional)
    loads where no plugin declares it, with a deprecation warning saying what to change."""

    class OldHeat:
        @hookimpl
        def memvisor_page_heat(self, vm, gpps):
            return None

    with pytest.warns(DeprecationWarning, match=r"mark it @hookimpl\(optionalhook=True\)"):
        small_host(extra_plugins=[OldHeat()])


def test_hook_memvisor_selftest():
    """A plugin's contributions to the all-techniques machine are collected under its name;
    a step may not take a core step's name or another plugin's."""
    from memvisor.plugins import new_plugin_manager
    from memvisor.testing.integration import contributions

    def poke(plugin, host, vm, count):
        plugin.poked += count

    class Contributor:
        poked = 0

        @hookimpl
        def memvisor_selftest(self, selftest):
            selftest.settings({"every": 8})
            selftest.step("poke", poke, count=(1, 5), during_migration=(0, 3))
            selftest.check(lambda plugin, host: None)
            selftest.command("poke", {"out": "{out}/poke.json"})

    pm = new_plugin_manager([], extra=[Contributor()])
    offered = contributions(pm)
    name = next(iter(offered.tables))
    assert offered.tables[name] == {"every": 8} and offered.commands == {"poke": {"out": "{out}/poke.json"}}
    step = offered.steps["poke"]
    assert step.plugin == name and step.arguments == {"count": (1, 5)} and step.during_migration == (0, 3)
    assert len(offered.checks) == 1

    class Clash:
        @hookimpl
        def memvisor_selftest(self, selftest):
            selftest.step("migrate", poke, count=(1, 2))

    with pytest.raises(ValueError, match="selftest step 'migrate' is the core's already"):
        contributions(new_plugin_manager([], extra=[Clash()]))


def test_host_counters_and_events_are_what_the_report_shows():
    """host.counters(vm) is zeros before the VM's first batch, then the counters report.json
    shows for it (a copy: changing it changes nothing); host.record_event lands in report.json's
    events, stamped with the time."""
    from memvisor import hookimpl
    from memvisor.metrics import COUNTERS
    from memvisor.report import ReportSection
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import parse_scenario

    seen = {}

    class P:
        @hookimpl
        def memvisor_vm_created(self, host, vm):
            seen["before"] = host.counters(vm)

        @hookimpl
        def memvisor_tick(self, host):
            if "time" not in seen:
                host.record_event("custom", vm="a", pages=3)
                seen["time"] = host.now

        @hookimpl
        def memvisor_report(self, host):
            vm = host.vms["a"]
            counts = host.counters(vm)
            counts["accesses"] = -1
            return ReportSection("p", "Mine", {"counters": host.counters(vm)})

    scenario = parse_scenario({
        "name": "t", "host": {"memory": "64MiB", "tick": "1ms", "batch": 4096},
        "vm": [{"name": "a", "memory": "8MiB", "workload": {"kind": "uniform", "write_fraction": 0.5}}],
        "timeline": [{"do": "run", "for": "5ms"}]})
    report = ScenarioRun(scenario, extra_plugins=[P()]).run()
    assert seen["before"] == dict.fromkeys(COUNTERS, 0)
    counters = report.metric("p", "counters")
    assert counters["accesses"] > 0
    assert counters == {k: report.data["vms"]["a"][k] for k in COUNTERS}
    events = [e for e in report.data["core"]["events"] if e["kind"] == "custom"]
    assert events == [{"time": seen["time"], "kind": "custom", "vm": "a", "pages": 3}]


def test_every_hook_is_isolated_or_documented_as_not():
    """Every hook of the core is under exactly one outcome of memvisor.isolation, and
    docs/reliability.md names it (the registration hooks as a group)."""
    from pathlib import Path

    from memvisor import hookspecs, isolation

    lists = (isolation.OBSERVED, isolation.FATAL, isolation.STARTING, isolation.NOT_ISOLATED)
    listed = [name for names in lists for name in names]
    assert len(listed) == len(set(listed))
    assert set(hookspecs.HOOK_NAMES) | set(hookspecs.DEPRECATED) == set(listed)
    text = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    section = text[text.index("## Plugin isolation"):text.index("## How each guarantee is tested")]
    missing = [n for n in hookspecs.HOOK_NAMES if f"`{n}`" not in section and not n.startswith("memvisor_register_")]
    assert not missing and "registration hooks" in section
