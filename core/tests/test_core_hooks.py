"""Every hook specification is called by the core when its docstring says (one test each,
named test_hook_<name>; tests/test_docs.py checks that each hook has one)."""

import click
import numpy as np
import pytest

from memvisor import hookimpl
from memvisor.errors import PluginError
from memvisor.host import registries
from memvisor.plugins import new_plugin_manager
from memvisor.registry import GroupedRegistry, fill
from memvisor.report import ReportSection
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import HookRecorder, small_host


def _scenario(extra=None, timeline=None):
    data = {"name": "t", "host": {"memory": "64MiB", "numa_nodes": 2, "tick": "1ms", "batch": 4096},
            "vm": [{"name": "a", "memory": "8MiB", "workload": {"kind": "uniform"}}],
            "timeline": timeline or [{"do": "run", "for": "5ms"}]}
    data.update(extra or {})
    return parse_scenario(data)


def test_hook_memvisor_host_started():
    """Plugins see the host once it is built, with the backend attached and no VM yet."""
    seen = []

    class P:
        @hookimpl
        def memvisor_host_started(self, host):
            seen.append((host.backend.name, dict(host.vms)))

    small_host(extra_plugins=[P()])
    assert seen == [("emulator", {})]


def test_hook_memvisor_vm_created_and_destroyed():
    """VM creation and destruction reach plugins, destruction while the memory is still there."""
    seen = []

    class P:
        @hookimpl
        def memvisor_vm_created(self, host, vm):
            seen.append(("created", vm.name, int(host.backend.present(vm).sum())))

        @hookimpl
        def memvisor_vm_destroyed(self, host, vm):
            seen.append(("destroyed", vm.name, int(host.backend.present(vm).sum())))

    host = small_host(extra_plugins=[P()])
    vm = host.create_vm("a", 16)
    host.destroy_vm(vm)
    assert seen == [("created", "a", 16), ("destroyed", "a", 16)]


test_hook_memvisor_vm_destroyed = test_hook_memvisor_vm_created_and_destroyed
test_hook_memvisor_vm_created = test_hook_memvisor_vm_created_and_destroyed


def test_hook_memvisor_tick():
    """A tick fires for every tick interval of time that passes, numbered from 0."""
    ticks = []

    class P:
        @hookimpl
        def memvisor_tick(self, tick):
            ticks.append((tick.number, round(tick.now, 6)))

    host = small_host(extra_plugins=[P()], tick_interval=0.01)
    host.advance(0.035)
    assert ticks == [(0, 0.01), (1, 0.02), (2, 0.03)]


def test_hook_memvisor_host_stopping():
    """The host tells plugins once that the run ended, before reports are collected."""
    calls = []

    class P:
        @hookimpl
        def memvisor_host_stopping(self, host):
            calls.append(host.stopped)

    host = small_host(extra_plugins=[P()])
    host.stop()
    host.stop()
    assert calls == [True]


def test_hook_memvisor_page_fault():
    """A plugin serves the faulting pages it owns; the core zero-fills the rest."""
    class Restorer:
        @hookimpl
        def memvisor_page_fault(self, host, vm, fault):
            mine = fault.gpps[fault.gpps < 4]
            host.backend.populate(vm, mine, np.full((len(mine), 4096), 9, np.uint8))
            return mine

    host = small_host(extra_plugins=[Restorer()])
    vm = host.create_vm("a", 16)
    host.backend.unmap(vm, np.arange(16))
    recorder = HookRecorder(host.pm)
    host.access(vm, np.array([2, 10, 2, 3]), np.zeros(4, bool))
    (call,) = recorder.of("memvisor_page_fault")
    assert call.fault.gpps.tolist() == [2, 10, 3]
    data = host.backend.read(vm, np.array([2, 3, 10]))
    assert (data[:2] == 9).all() and (data[2] == 0).all()
    assert not host.backend.present(vm, np.array([0, 1])).any()


def test_hook_memvisor_traced_access():
    """Touched traced pages reach the access hook already untraced."""
    seen = []

    class P:
        @hookimpl
        def memvisor_traced_access(self, host, vm, access):
            seen.append((access.gpps.tolist(), host.backend.traced(vm, access.gpps).tolist()))

    host = small_host(extra_plugins=[P()])
    vm = host.create_vm("a", 16)
    host.backend.trace(vm, np.array([1, 2]))
    host.access(vm, np.array([2, 5, 1]), np.zeros(3, bool))
    assert seen == [([2, 1], [False, False])]


def test_hook_memvisor_write_trap():
    """Every plugin sees a write to a protected page before it lands; then it is writable."""
    seen = []

    class Saver:
        @hookimpl
        def memvisor_write_trap(self, host, vm, write):
            seen.append((write.gpps.tolist(), host.backend.read(vm, write.gpps)[:, 0].tolist()))

    host = small_host(extra_plugins=[Saver()])
    vm = host.create_vm("a", 16)
    host.backend.write(vm, np.array([4]), np.full((1, 4096), 3, np.uint8))
    host.backend.protect(vm, np.array([4, 5]))
    host.access(vm, np.array([4, 5, 4]), np.array([True, False, True]))
    assert seen == [([4], [3])]  # the old contents were still there; 5 was only read
    assert host.backend.protected(vm, np.array([4, 5])).tolist() == [False, True]


def test_hook_memvisor_vcpus_moved():
    """Moving a VM's virtual CPUs tells plugins the old and the new node."""
    moves = []

    class P:
        @hookimpl
        def memvisor_vcpus_moved(self, vm, move):
            moves.append((vm.home_node, move.old_node, move.new_node))

    host = small_host(numa_nodes=2, extra_plugins=[P()])
    vm = host.create_vm("a", 16)
    host.move_vcpus(vm, 1)
    assert moves == [(1, 0, 1)]


def test_hook_memvisor_memory_pressure():
    """Reclaimers run in hook order until the deficit is covered; reclaimed pages are summed."""
    order = []

    class First:
        @hookimpl(tryfirst=True)
        def memvisor_memory_pressure(self, host, pressure):
            order.append(("first", pressure.deficit_pages))
            vm = host.vms["a"]
            host.backend.unmap(vm, np.arange(100))
            return 100

    class Second:
        @hookimpl
        def memvisor_memory_pressure(self, host, pressure):
            order.append(("second", host.backend.free_pages() >= pressure.target_free_pages))
            return None

    host = small_host(memory_pages=2048, extra_plugins=[Second(), First()])
    host.create_vm("a", 1024)
    free = host.backend.free_pages()
    assert host.check_pressure(target_free_pages=free + 50) == 100
    assert order == [("first", 50), ("second", True)]


def test_hook_memvisor_register_backends():
    """A second backend registered under a taken name is an error naming both plugins."""
    class Clash:
        @hookimpl
        def memvisor_register_backends(self, register):
            register("emulator", object)

    pm = new_plugin_manager(None, extra=[Clash()], strict=False)
    with pytest.raises(PluginError, match="registered twice"):
        registries(pm)


def test_hook_memvisor_register_workloads():
    """A plugin's workload kind can be used by a scenario."""
    class Sweep:
        def __init__(self, spec, vm_pages, seed):
            self.next = 0
            self.vm_pages = vm_pages

        def next_batch(self, n):
            gpps = (np.arange(n) + self.next) % self.vm_pages
            self.next += n
            return gpps, np.zeros(n, bool)

    class P:
        @hookimpl
        def memvisor_register_workloads(self, register):
            register("my-sweep", Sweep)

    pm = new_plugin_manager(None, extra=[P()], strict=False)
    assert registries(pm)["workload"]["my-sweep"] is Sweep


def test_hook_memvisor_register_actions():
    """A plugin's timeline action runs when a scenario step names it."""
    calls = []

    class P:
        @hookimpl
        def memvisor_register_actions(self, register):
            register("poke", lambda run, step: calls.append(step.get("value", int)))

    pm = new_plugin_manager(None, extra=[P()], strict=False)
    registries(pm)["action"]["poke"](None, type("S", (), {"get": lambda self, k, t: 7})())
    assert calls == [7]


def test_hook_memvisor_register_benchmarks():
    """Benchmark cases register in groups; the emulator's group is there."""
    pm = new_plugin_manager(None, strict=False)
    groups = fill(pm.hook.memvisor_register_benchmarks, GroupedRegistry("benchmark"), pm).groups()
    assert [c.name for c in groups["emulator"]] == ["zipf-untraced", "zipf-traced-1pct"]


def test_hook_memvisor_register_commands():
    """A plugin's subcommand is added to the memvisor group."""
    @click.command("hello")
    def hello():
        click.echo("hi")

    class P:
        @hookimpl
        def memvisor_register_commands(self, cli):
            cli.add_command(hello)

    group = click.Group("memvisor")
    new_plugin_manager(None, extra=[P()], strict=False).hook.memvisor_register_commands(cli=group)
    assert "hello" in group.commands and "run" in group.commands


def test_hook_memvisor_report():
    """A plugin's report section lands in report.json with its metrics."""
    class P:
        @hookimpl
        def memvisor_report(self, host):
            return ReportSection("p", "Mine", {"answer": 42, "vms": len(host.vms)})

    report = ScenarioRun(_scenario(), extra_plugins=[P()]).run()
    assert report.metric("p", "answer") == 42
    assert report.metric("p", "vms") == 1


def test_pinned_guest_pages_are_not_touched_by_workloads():
    """Accesses to pages a guest driver pinned land on the VM's other pages; unpinning
    gives them back."""
    host = small_host()
    vm = host.create_vm("a", 64)
    host.pin_guest_pages(vm, np.arange(0, 32))
    host.backend.take_accessed(vm)
    host.access(vm, np.arange(64), np.ones(64, bool))
    accessed = host.backend.take_accessed(vm)
    assert not accessed[:32].any() and accessed[32:].all()
    host.pin_guest_pages(vm, np.arange(0, 32), pinned=False)
    host.access(vm, np.arange(64), np.zeros(64, bool))
    assert host.backend.take_accessed(vm).all()
