"""memvisor-lazy-save: a lazy save of a running VM holds the memory as of its start, in the
checkpoint format, and restores eagerly byte for byte."""

import math

import numpy as np
import pytest

from memvisor.builtins.checkpoint import CheckpointReader
from memvisor.contents import ContentSpec
from memvisor.errors import UserError
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import ReferenceMemory, listed_plugin, small_host
from memvisor_lazy_save import LazySavePlugin
from memvisor_lazy_save import order as order_file

MIX = ContentSpec.parse({"zero": 0.5, "text": 0.3, "random": 0.2}, "test")


def test_lazy_save_is_listed_by_memvisor_plugins():
    """The plugin appears in `memvisor plugins --json` with the hooks it implements."""
    row = listed_plugin("lazy-save")
    assert row["distribution"] == "memvisor-lazy-save"
    for hook in ("memvisor_checkpoint_save", "memvisor_write_trap", "memvisor_tick", "memvisor_report",
                 "memvisor_register_benchmarks"):
        assert hook in row["hooks"]


def lazy_host(pages=8192, memory_pages=24576, **settings):
    plugin = LazySavePlugin()
    host = small_host(memory_pages=memory_pages, extra_plugins=[plugin], settings={"lazy-save": settings})
    vm = host.create_vm("a", pages, contents=MIX)
    return host, vm, plugin


def run_until_done(host, vm, job, model, rng, batch=2000, write_fraction=0.5):
    """Run the guest (random accesses, mirrored by the model) until the save is complete."""
    while not job.done:
        result = model.access(host, vm, rng.integers(0, vm.pages, batch), rng.random(batch) < write_fraction)
        host.advance(max(result.seconds, host.tick_interval / 4))


def test_lazy_save_holds_memory_as_of_its_start(tmp_path):
    """Copy before write: the guest writes during the save, the checkpoint holds the contents
    at the save's start, and the guest reads its own writes."""
    host, vm, plugin = lazy_host()
    model = ReferenceMemory()
    model.follow(host, vm)
    at_start = model.expected["a"].copy()
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    assert job.method == "lazy" and not job.done
    # the last windows are not saved yet: writes to them copy their block first
    top = np.arange(vm.pages - 512, vm.pages)
    model.access(host, vm, top, np.ones(len(top), bool))
    run_until_done(host, vm, job, model, np.random.default_rng(1))
    assert job.stats["cow_windows"] >= 8 and job.stats["cow_pages"] >= 512
    # they went to the side buffer: the guest waited for a memory copy, not for compression
    assert job.stats["cow_seconds"] <= job.stats["cow_windows"] * 64 * 600e-9
    model.check(host)  # the guest sees its own writes
    with CheckpointReader(tmp_path / "a.ckpt") as reader:
        reader.verify()
        got = np.zeros_like(at_start)
        for _, gpps, data in reader.iter_page_blocks():
            got[gpps] = data
        assert reader.zero_pages + reader.data_pages == vm.pages
    assert np.array_equal(got, at_start)
    # the core's eager restore gives back the memory of the save's start, byte for byte
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt"), lazy=False))
    model.expected["a"] = at_start
    model.check(host)
    assert host.backend.check_invariants() == 0
    assert not host.backend.protected(vm).any()  # protection is gone once the save is done


def test_lazy_save_stops_the_vm_far_less_than_stop_the_world(tmp_path):
    """The stop (write-protecting every page) is reported apart from the total save time."""
    host, vm, _ = lazy_host()
    model = ReferenceMemory()
    model.follow(host, vm)
    lazy = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "l.ckpt")))
    run_until_done(host, vm, lazy, model, np.random.default_rng(2))
    stw = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "s.ckpt"), lazy=False))
    assert stw.method == "stop-the-world"
    assert lazy.stop_seconds * 100 < stw.stop_seconds
    # same bytes through the same disk; blocks saved by copy before write were compressed by
    # the guest's own thread (charged to its batches), not by the background saver
    assert 0 < lazy.finished - lazy.started <= stw.finished - stw.started + host.tick_interval
    report = lazy.to_json()
    for key in ("stop_s", "total_s", "write_calls", "bytes_out", "compression_ratio", "throughput_mib_per_s"):
        assert report[key] is not None and report[key] > 0


def test_lazy_save_writes_one_storage_block_per_full_buffer(tmp_path):
    """Write calls: at most ceil(output / buffer) + 1 (blocks of 64 pages, a 256 KiB buffer)."""
    host, vm, _ = lazy_host()
    model = ReferenceMemory()
    model.follow(host, vm)
    buffer = 256 << 10
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt"), buffer_bytes=buffer))
    run_until_done(host, vm, job, model, np.random.default_rng(3))
    assert job.stats["write_calls"] <= math.ceil(job.stats["bytes_out"] / buffer) + 1
    assert job.stats["storage_blocks"] >= 4


def test_page_at_a_time_baseline_writes_once_per_page(tmp_path):
    """The page-at-a-time baseline writes each data page with its own write call."""
    host, vm, _ = lazy_host(pages=2048, page_at_a_time=True)
    model = ReferenceMemory()
    model.follow(host, vm)
    at_start = model.expected["a"].copy()
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    run_until_done(host, vm, job, model, np.random.default_rng(4), batch=200)
    assert job.method == "page-at-a-time"
    assert job.stats["write_calls"] >= job.stats["data_pages"]
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt"), lazy=False))
    model.expected["a"] = at_start
    model.check(host)


def test_stop_the_world_when_asked_and_flush_before_a_restore(tmp_path):
    """lazy=False leaves the save to the core; a restore during a lazy save finishes it first."""
    host, vm, plugin = lazy_host()
    assert host.save_checkpoint(vm, SaveRequest(str(tmp_path / "s.ckpt"), lazy=False)).method == "stop-the-world"
    model = ReferenceMemory()
    model.follow(host, vm)
    at_start = model.expected["a"].copy()
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt"), lazy=True))
    assert not job.done
    model.access(host, vm, np.arange(0, vm.pages, 7), np.ones(len(range(0, vm.pages, 7)), bool))
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt"), lazy=False))
    assert job.done and not plugin.saves
    model.expected["a"] = at_start
    model.check(host)


def test_access_order_sidecar_names_the_checkpoint(tmp_path):
    """The sidecar carries the checkpoint's file id and a heat per window; the guest's hot
    region is the hottest."""
    host, vm, _ = lazy_host()
    model = ReferenceMemory()
    model.follow(host, vm)
    host.backend.take_accessed(vm)
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    rng = np.random.default_rng(5)
    while not job.done:  # the guest works on pages 1024..2047 only
        model.access(host, vm, rng.integers(1024, 2048, 500), rng.random(500) < 0.2)
        host.advance(host.tick_interval / 2)
    assert job.stats["order"] == "accessed_bits"
    raw = (tmp_path / "a.ckpt.order").read_bytes()
    head = order_file.HEAD.unpack_from(raw, 0)
    with CheckpointReader(tmp_path / "a.ckpt") as reader:
        assert head[4] == reader.file_id and head[5] == vm.pages
    heat = np.frombuffer(raw[64:], "<f4")
    assert len(heat) == vm.pages // 64 and set(np.argsort(-heat)[:16]) == set(range(16, 32))


def test_lazy_save_in_a_scenario_and_bad_settings():
    """The checkpoint action waits for a lazy save; the report has the save's figures."""
    scenario = parse_scenario({
        "host": {"memory": "128MiB", "tick": "1ms", "batch": 4096},
        "plugins": {"lazy-save": {}},
        "vm": [{"name": "a", "memory": "16MiB", "contents": "mixed", "workload": {"kind": "zipf"}}],
        "timeline": [{"do": "run", "for": "2ms"}, {"do": "checkpoint", "vm": "a", "name": "c1"},
                     {"do": "run", "for": "2ms"}, {"do": "restore", "vm": "a", "name": "c1", "lazy": False}],
    })
    report = ScenarioRun(scenario).run()
    jobs = report.metric("memvisor", "jobs")
    assert [j["method"] for j in jobs] == ["lazy", "eager"]
    (save,) = report.metric("lazy-save", "saves")
    assert save["pages"] == 4096 and save["stop_s"] < save["total_s"]
    with pytest.raises(UserError, match="plugins.lazy-save.nope: unknown setting"):
        small_host(plugins=["lazy-save"], settings={"lazy-save": {"nope": 1}})
