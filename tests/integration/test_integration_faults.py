"""Fault injection: a plugin that raises inside a hook, a disk that fills up while a checkpoint
is saved, a migration link that drops mid-stream. Nothing a guest reads is ever wrong.

The Linux backend's own failures (a guest killed mid-fault, the handler killed mid-restore, a
hook that raises while a real guest waits) are covered by
hypervisor_backends/memvisor-backend-linux/tests/test_linux_failures.py and the lazy-restore
example tests there; they are not duplicated here.
"""

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from memvisor import PAGE_SIZE, hookimpl
from memvisor.builtins.checkpoint import CheckpointError
from memvisor.builtins.migration import Link, LiveMigration, MigrationAborted, MigrationOptions
from memvisor.errors import UserError, VMStoppedError
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.testing import small_host
from memvisor.testing.integration import IntegrationModel, machine_plugins

PLUGINS = machine_plugins()
"""Every installed plugin, as the all-techniques machine enables them."""

FAULTY_HOOKS = ("memvisor_tick", "memvisor_traced_access", "memvisor_memory_pressure", "memvisor_memory_error",
                "memvisor_disk_io", "memvisor_vcpus_moved")


class Faulty:
    """A plugin with a bug in every observer hook it implements."""

    def __init__(self):
        self.calls = 0

    def _boom(self):
        self.calls += 1
        raise RuntimeError("plugin bug")

    @hookimpl
    def memvisor_tick(self, host, tick):
        self._boom()

    @hookimpl
    def memvisor_traced_access(self, host, vm, access):
        self._boom()

    @hookimpl(tryfirst=True)
    def memvisor_memory_pressure(self, host, pressure):
        self._boom()

    @hookimpl(tryfirst=True)
    def memvisor_memory_error(self, host, vm, error):
        self._boom()

    @hookimpl
    def memvisor_disk_io(self, host, vm, io):
        self._boom()

    @hookimpl
    def memvisor_vcpus_moved(self, host, vm, move):
        self._boom()


def busy_host(extra=()):
    host = small_host(memory_pages=8192, numa_nodes=2, plugins=PLUGINS, extra_plugins=extra,
                      settings={"mrc": {"rate": 0.5}, "balloon": {"reload_delay": "1ms"}})
    vms = [host.create_vm(f"v{i}", 1024, home_node=i % 2) for i in range(2)]
    rng = np.random.default_rng(1)
    for vm in vms:
        host.backend.write(vm, np.arange(vm.pages), rng.integers(0, 256, (vm.pages, PAGE_SIZE), np.uint8))
    model = IntegrationModel()
    for vm in vms:
        model.follow(host, vm)
    return host, vms, model


def test_integration_observer_hook_failures_are_isolated():
    """A plugin raising in observer hooks is logged by name; the other plugins and the VMs go on
    and every page still reads what the model says."""
    faulty = Faulty()
    host, vms, model = busy_host([faulty])
    disk = host.attach_disk(vms[0], blocks=64)
    for round_ in range(20):
        for vm in vms:
            gpps = np.arange(round_ * 37 % 900, round_ * 37 % 900 + 100)
            host.advance(model.access(host, vm, gpps, gpps % 2 == 0).seconds)
        host.advance(host.tick_interval)
    host.move_vcpus(vms[1], 0)
    host.disk_io(vms[0], disk, np.arange(10), np.arange(10), np.ones(10, bool))
    assert host.check_pressure(7000) > 0  # the balloons and sharing still reclaim
    balloon = host.pm.get_plugin("balloon")
    for vm in vms:  # pages the guest gave up to its balloon read zeros
        model.expected[vm.name][balloon.balloon_pages(vm)] = 0
    outcome = host.memory_error(vms[0], np.array([1, 2]))
    assert outcome["lost"] == [1, 2]  # the failing repairer repaired nothing: reported lost
    model.known["v0"][[1, 2]] = False
    for vm in vms:
        assert not len(model.unexpected_pages(host, vm, fault=True))
    failed = {(f["plugin"], f["hook"]) for f in host.plugin_failures}
    assert {hook for _, hook in failed} == set(FAULTY_HOOKS)
    assert all(f["handled"] for f in host.plugin_failures) and faulty.calls == len(host.plugin_failures)
    assert all(vm.stopped is None for vm in vms)
    host.backend.check_invariants()


class FaultyFault:
    @hookimpl(tryfirst=True)
    def memvisor_page_fault(self, host, vm, fault):
        raise RuntimeError("fault handler bug")


class FaultyWrite:
    @hookimpl(tryfirst=True)
    def memvisor_write_trap(self, host, vm, write):
        raise RuntimeError("write handler bug")


def test_integration_fault_hook_failure_stops_the_vm_never_zero_fills():
    """A plugin raising while serving a fault: no safe fallback (it may own the page), so the VM
    is stopped with the reason naming the plugin; the page is never zero-filled behind it."""
    host = small_host(memory_pages=4096, extra_plugins=[FaultyFault()])
    vm, other = host.create_vm("a", 256), host.create_vm("b", 256)
    host.backend.unmap(vm, np.arange(8))
    with pytest.raises(RuntimeError, match="fault handler bug"):
        host.access(vm, np.arange(8), np.zeros(8, bool))
    assert not host.backend.present(vm, np.arange(8)).any()  # not zero-filled
    assert "failed serving a page fault" in vm.stopped and "RuntimeError" in vm.stopped
    with pytest.raises(VMStoppedError, match="'a' stopped"):
        host.access(vm, np.arange(8, 16), np.zeros(8, bool))
    host.access(other, np.arange(16), np.ones(16, bool))  # the other VM goes on
    host.backend.check_invariants()


def test_integration_write_hook_failure_stops_the_vm_before_the_write_lands():
    """A plugin raising on a write trap: the VM stops and the write does not land."""
    host = small_host(memory_pages=4096, extra_plugins=[FaultyWrite()])
    vm = host.create_vm("a", 256)
    before = host.backend.read(vm, np.arange(4))
    host.backend.protect(vm, np.arange(4))
    with pytest.raises(RuntimeError, match="write handler bug"):
        host.access(vm, np.arange(4), np.ones(4, bool))
    assert (host.backend.read(vm, np.arange(4)) == before).all()
    assert vm.stopped and "handling a write trap" in vm.stopped


def test_integration_isolation_switch_off_propagates(monkeypatch):
    """MEMVISOR_ISOLATE_PLUGINS=0: observer failures propagate (development)."""
    monkeypatch.setenv("MEMVISOR_ISOLATE_PLUGINS", "0")
    host = small_host(memory_pages=2048, extra_plugins=[Faulty()])
    host.create_vm("a", 64)
    with pytest.raises(RuntimeError, match="plugin bug"):
        host.advance(host.tick_interval)


class DiskFull:
    """os.write / os.writev that write short, then fail with ENOSPC after ``limit`` bytes."""

    def __init__(self, monkeypatch, limit):
        self.left = limit
        self.real_write, self.real_writev = os.write, os.writev
        monkeypatch.setattr(os, "write", self.write)
        monkeypatch.setattr(os, "writev", self.writev)

    def write(self, fd, data):
        if self.left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.real_write(fd, bytes(memoryview(data)[: max(1, min(len(data) // 2, self.left))]))
        self.left -= n
        return n

    def writev(self, fd, parts):
        return self.write(fd, parts[0])


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("limit", [0, 5000, 200_000])
def test_integration_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, lazy, limit):
    """Disk full and short writes while saving over an existing checkpoint: one CheckpointError,
    the previous checkpoint is intact and restores exactly, no temporary file is left."""
    host, vms, model = busy_host()
    vm = vms[0]
    path = str(tmp_path / "vm.ckpt")
    host.save_checkpoint(vm, SaveRequest(path, lazy=False))
    good = Path(path).read_bytes()
    saved = model.snapshot(vm)
    host.advance(model.access(host, vm, np.arange(0, 1024, 3), np.ones(342, bool)).seconds)
    full = DiskFull(monkeypatch, limit)
    job, raised = None, None
    try:
        job = host.save_checkpoint(vm, SaveRequest(path, lazy=lazy))
        for _ in range(2000):  # a lazy save fails on its own: the guest keeps writing meanwhile
            if job.done or job.error:
                break
            host.advance(model.access(host, vm, np.arange(0, 1024, 5), np.ones(205, bool)).seconds)
    except CheckpointError as exc:
        raised = str(exc)
    error = raised or job.error
    assert error and ("No space left" in error or "cannot write" in error)
    assert job is None or not job.done
    monkeypatch.setattr(os, "write", full.real_write)
    monkeypatch.setattr(os, "writev", full.real_writev)
    assert Path(path).read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.ckpt"]
    # The guest goes on: it writes everywhere, then the old checkpoint restores exactly.
    host.advance(model.access(host, vm, np.arange(1024), np.ones(1024, bool)).seconds)
    assert not len(model.unexpected_pages(host, vm, fault=True))
    host.restore_checkpoint(vm, RestoreRequest(path))
    model.expected[vm.name], model.known[vm.name] = saved
    assert not len(model.unexpected_pages(host, vm, fault=True))


@pytest.mark.parametrize("postcopy", [False, True])
@pytest.mark.parametrize("drop_at", [0, 3, 10])
def test_integration_migration_link_drop(postcopy, drop_at):
    """The link drops mid-stream: one MigrationAborted (a UserError), the destination's VM is
    gone, the source VM runs on unharmed and can be migrated again."""
    host, vms, model = busy_host()
    vm = vms[1]

    def drop(index, wire):
        if index >= drop_at:
            raise ConnectionResetError("link dropped")
        return wire

    destination = small_host(memory_pages=8192, numa_nodes=2, plugins=PLUGINS)
    migration = LiveMigration(host, vm, destination, MigrationOptions(postcopy=postcopy), link=Link(drop))
    with pytest.raises(MigrationAborted, match="'v1' aborted.*link dropped") as info:
        migration.run(lambda s: host.advance(model.access(host, vm, np.arange(0, 1024, 9),
                                                          np.ones(114, bool)).seconds))
    assert isinstance(info.value, UserError)
    assert "v1" not in destination.vms and destination.backend.check_invariants() == 0
    assert vm.stopped is None and not len(model.unexpected_pages(host, vm, fault=True))
    host.advance(model.access(host, vm, np.arange(1024), np.ones(1024, bool)).seconds)
    again = LiveMigration(host, vm, destination, MigrationOptions(postcopy=postcopy))
    again.run()
    if postcopy:
        again.finish_postcopy()
    got = destination.backend.guest_read(again.dest_vm, np.arange(vm.pages))
    assert (got == model.expected[vm.name]).all()
