"""Checkpoints of running VMs: the core's stop-the-world save and eager restore, and the hooks
through which plugins take over a save or restore and describe pages more cheaply."""

import numpy as np
import pytest

from memvisor import hookimpl
from memvisor.builtins.checkpoint import CheckpointError, CheckpointReader
from memvisor.contents import ContentSpec
from memvisor.events import PageRecords, RestoreRequest, SaveRequest
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import ReferenceMemory, small_host


def make_vm(host, pages=2048):
    return host.create_vm("a", pages, contents=ContentSpec.parse({"zero": 0.5, "text": 0.3, "random": 0.2}, "t"))


def test_hook_memvisor_checkpoint_save(tmp_path):
    """Without a plugin the core saves stop-the-world; a plugin's job replaces it."""
    host = small_host()
    vm = make_vm(host)
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    assert job.method == "stop-the-world" and job.done and job.stop_seconds > 0
    assert job.stats["zero_pages"] + job.stats["data_pages"] == vm.pages
    with CheckpointReader(tmp_path / "a.ckpt") as reader:
        assert reader.vm_pages == vm.pages

    class Mine:
        @hookimpl
        def memvisor_checkpoint_save(self, host, vm, request):
            from memvisor.builtins.checkpoint.vm import SaveJob

            return SaveJob(vm.name, request.path, "mine", host.now)

    host = small_host(extra_plugins=[Mine()])
    assert host.save_checkpoint(make_vm(host), SaveRequest(str(tmp_path / "b.ckpt"))).method == "mine"


def test_hook_memvisor_checkpoint_restore(tmp_path):
    """An eager restore gives back every page as saved, whatever the guest wrote since."""
    host = small_host()
    vm = make_vm(host)
    model = ReferenceMemory()
    model.follow(host, vm)
    host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    saved = model.expected["a"].copy()
    rng = np.random.default_rng(1)
    model.access(host, vm, rng.integers(0, vm.pages, 5000), rng.random(5000) < 0.5)
    job = host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))
    assert job.method == "eager" and job.first_access_s >= job.resumed - job.started > 0
    model.expected["a"] = saved
    model.check(host)
    assert host.backend.check_invariants() == 0


class DiskRefs:
    """Describes pages whose first byte is 0x41 ('A') as records: payload = the page's bytes
    reversed (a stand-in for a disk reference that lets the page be rebuilt exactly)."""

    def __init__(self):
        self.resolved = 0

    @hookimpl
    def memvisor_describe_pages(self, host, vm, gpps, purpose):
        data = host.backend.read(vm, gpps)
        mine = data[:, 0] == 0x41
        if not mine.any():
            return None
        return PageRecords("test-ref", gpps[mine], data[mine][:, ::-1].copy())

    @hookimpl
    def memvisor_resolve_records(self, records):
        if records.kind != "test-ref":
            return None
        self.resolved += len(records.gpps)
        return np.asarray(records.payloads)[:, ::-1]


def test_hook_memvisor_describe_pages(tmp_path):
    """Pages a plugin describes are stored as its records, not as data."""
    host = small_host(extra_plugins=[DiskRefs()])
    vm = host.create_vm("a", 256)
    host.backend.write(vm, np.arange(10, 20), np.full((10, 4096), 0x41, np.uint8))
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    assert job.stats["record_pages"] == 10 and job.stats["data_pages"] == 0
    with CheckpointReader(tmp_path / "a.ckpt") as reader:
        assert reader.record_kinds == ("test-ref",) or list(reader.record_kinds) == ["test-ref"]


def test_hook_memvisor_resolve_records(tmp_path):
    """Records come back as the exact bytes on restore; without a resolver the restore fails."""
    plugin = DiskRefs()
    host = small_host(extra_plugins=[plugin])
    vm = host.create_vm("a", 256)
    page = np.full((1, 4096), 0x41, np.uint8)
    page[0, 100] = 7
    host.backend.write(vm, np.array([3]), page)
    model = ReferenceMemory()
    model.follow(host, vm)
    host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    host.backend.write(vm, np.array([3]), np.zeros((1, 4096), np.uint8))
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))
    assert plugin.resolved == 1
    model.check(host)
    bare = small_host()
    vm2 = bare.create_vm("a", 256)
    with pytest.raises(Exception, match="no plugin resolves records of kind 'test-ref'"):
        bare.restore_checkpoint(vm2, RestoreRequest(str(tmp_path / "a.ckpt")))


def test_corrupt_checkpoint_never_loads_wrong_pages(tmp_path):
    """A flipped byte in a storage block is refused with one line naming the block."""
    host = small_host()
    vm = make_vm(host)
    host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    raw = bytearray((tmp_path / "a.ckpt").read_bytes())
    raw[200] ^= 0xFF
    (tmp_path / "a.ckpt").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))
    assert "a.ckpt" in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_and_restore_actions_in_a_scenario():
    """A scenario saves a VM, runs on, restores it; the report lists both jobs."""
    scenario = parse_scenario({
        "host": {"memory": "64MiB", "tick": "1ms", "batch": 4096},
        "vm": [{"name": "a", "memory": "8MiB", "contents": "mixed", "workload": {"kind": "zipf"}}],
        "timeline": [{"do": "run", "for": "3ms"}, {"do": "checkpoint", "vm": "a", "name": "c1"},
                     {"do": "run", "for": "3ms"}, {"do": "restore", "vm": "a", "name": "c1"},
                     {"do": "run", "for": "2ms"}],
    })
    report = ScenarioRun(scenario).run()
    jobs = report.metric("memvisor", "jobs")
    assert [j["method"] for j in jobs] == ["stop-the-world", "eager"]
    assert jobs[0]["pages"] == 2048 and jobs[1]["first_access_s"] > 0
