"""memvisor-lazy-restore: the VM resumes at once, faults are served from the checkpoint a window
at a time, the prefetcher loads the rest without ever overwriting the guest's pages, and a
damaged block stops the VM with one line."""

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from memvisor import hookimpl
from memvisor.builtins.checkpoint import CheckpointError, CheckpointReader
from memvisor.contents import ContentSpec
from memvisor.errors import UserError
from memvisor.events import PageRecords, RestoreRequest, SaveRequest
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import ReferenceMemory, listed_plugin, small_host
from memvisor_lazy_restore import LazyRestoreError, LazyRestorePlugin

MIX = ContentSpec.parse({"zero": 0.5, "text": 0.3, "random": 0.2}, "test")


def test_lazy_restore_is_listed_by_memvisor_plugins():
    """The plugin appears in `memvisor plugins --json` with the hooks it implements."""
    row = listed_plugin("lazy-restore")
    assert row["distribution"] == "memvisor-lazy-restore"
    for hook in ("memvisor_checkpoint_restore", "memvisor_page_fault", "memvisor_tick", "memvisor_report",
                 "memvisor_register_benchmarks"):
        assert hook in row["hooks"]


def saved_vm(tmp_path, pages=8192, extra=(), key=None, **settings):
    """A host with the plugin, a VM with mixed contents saved stop-the-world, and the model
    holding the saved contents."""
    plugin = LazyRestorePlugin()
    host = small_host(memory_pages=4 * pages, extra_plugins=[plugin, *extra], settings={"lazy-restore": settings})
    vm = host.create_vm("a", pages, contents=MIX)
    model = ReferenceMemory()
    model.follow(host, vm)
    path = str(tmp_path / "a.ckpt")
    host.save_checkpoint(vm, SaveRequest(path, lazy=False, key=key))
    return host, vm, plugin, model, path


def test_sequential_touch_faults_once_per_64_pages(tmp_path):
    """Without prefetching, a guest reading every page in order takes pages/64 faults, and each
    storage block is read once."""
    host, vm, plugin, model, path = saved_vm(tmp_path, prefetch="off")
    job = host.restore_checkpoint(vm, RestoreRequest(path))
    assert job.method == "lazy" and 64 <= host.backend.present(vm).sum() <= 192  # the probe's window and its blocks
    for start in range(0, vm.pages, 512):
        host.advance(model.access(host, vm, np.arange(start, start + 512), np.zeros(512, bool)).seconds)
    with CheckpointReader(path) as reader:
        blocks = reader.storage_blocks
    assert job.stats["fault_windows"] <= vm.pages // 64
    assert job.stats["read_calls"] == 3 + blocks  # open (3) + one read per storage block
    assert job.stats["pages_prefetched"] == 0 and job.stats["pages_loaded"] == vm.pages
    model.check(host)
    assert host.backend.check_invariants() == 0


def test_first_access_is_fast_and_prefetch_finishes_the_restore(tmp_path):
    """The guest's first access is served long before an eager restore would be done; the
    prefetcher then loads every page that needs I/O and closes the file."""
    host, vm, plugin, model, path = saved_vm(tmp_path)
    eager = host.restore_checkpoint(vm, RestoreRequest(path, lazy=False))
    lazy = host.restore_checkpoint(vm, RestoreRequest(path))
    assert lazy.first_access_s * 5 < eager.first_access_s
    while "complete_s" not in lazy.stats:
        host.advance(host.tick_interval)
    restore = plugin.restores["a"]
    assert restore.reader is None and lazy.stats["pages_prefetched"] > 0
    assert not (restore.pending & (restore.kinds != 1)).any()  # only zero pages are left to faults
    model.check(host)
    host.stop()
    assert lazy.stats["pages_never_touched"] == 0  # the check read every page


def test_prefetch_never_overwrites_a_page_the_guest_wrote(tmp_path):
    """Pages the guest writes after resuming keep the guest's bytes while the prefetcher loads
    everything around them."""
    host, vm, plugin, model, path = saved_vm(tmp_path, prefetch="file", prefetch_share=1.0)
    saved = model.expected["a"].copy()
    rng = np.random.default_rng(7)
    model.access(host, vm, rng.integers(0, vm.pages, 3000), rng.random(3000) < 0.5)
    host.restore_checkpoint(vm, RestoreRequest(path))
    model.expected["a"] = saved
    written = np.arange(100, vm.pages, 97)  # scattered writes, page by page, between ticks
    for chunk in np.array_split(written, 8):
        model.guest_write(host, vm, chunk, np.full((len(chunk), 4096), 0xAB, np.uint8))
        host.advance(host.tick_interval)
    while plugin.restores["a"].reader is not None:
        host.advance(host.tick_interval)
    model.check(host)


def corrupt_block(path, sblock):
    """Flip a byte in the middle of a storage block; returns the block's first page."""
    with CheckpointReader(path) as reader:
        pblock = next(p for p in range(reader.page_blocks) if reader.storage_block_of(p) == sblock)
        first = int(reader.page_block_pages(pblock)[0])
        # blocks follow the 64-byte header back to back
        offset = 64 + sum(len(reader.read_storage_block(i)) for i in range(sblock)) + 100
    raw = bytearray(Path(path).read_bytes())
    raw[offset] ^= 0xFF
    Path(path).write_bytes(bytes(raw))
    return first


def test_corrupted_block_stops_the_vm_with_one_line_and_no_wrong_page(tmp_path):
    """A fault on a page of a damaged storage block is not served: one line naming the VM, the
    file and the block; every page that was loaded holds the saved bytes."""
    host, vm, plugin, model, path = saved_vm(tmp_path, prefetch="off")
    page = corrupt_block(path, 1)
    host.restore_checkpoint(vm, RestoreRequest(path))
    host.access(vm, np.arange(0, 640), np.zeros(640, bool))  # block 0 is fine
    with pytest.raises(LazyRestoreError) as info:
        host.access(vm, np.array([page]), np.zeros(1, bool))
    message = str(info.value)
    assert "\n" not in message and "a.ckpt" in message and "storage block 1" in message and "'a'" in message
    assert isinstance(info.value, UserError)
    assert not host.backend.present(vm, np.array([page]))[0]
    present = np.flatnonzero(host.backend.present(vm))
    assert np.array_equal(host.backend.read(vm, present), model.expected["a"][present])
    with pytest.raises(LazyRestoreError):  # the VM stays stopped
        host.access(vm, np.array([page]), np.zeros(1, bool))


def test_corrupted_block_found_by_the_prefetcher_stops_the_vm(tmp_path):
    """The prefetcher meets the damaged block first: the same one line, raised from the tick."""
    host, vm, plugin, model, path = saved_vm(tmp_path, prefetch="file")
    corrupt_block(path, 1)
    host.restore_checkpoint(vm, RestoreRequest(path))
    with pytest.raises(LazyRestoreError, match=r"stopped: lazy restore from .*a\.ckpt: storage block 1"):
        for _ in range(100):
            host.advance(host.tick_interval)


def test_keyed_checkpoint_restores_lazily_and_a_wrong_key_is_refused(tmp_path):
    """The MAC is checked when the restore opens the file, before any page is dropped."""
    key = b"k" * 32
    host, vm, plugin, model, path = saved_vm(tmp_path, pages=2048, key=key)
    with pytest.raises(CheckpointError):
        host.restore_checkpoint(vm, RestoreRequest(path, key=b"x" * 32))
    assert host.backend.present(vm).all()  # nothing was dropped
    host.restore_checkpoint(vm, RestoreRequest(path, key=key))
    model.check(host)


class DiskRefs:
    """Describes pages whose first byte is 0x41 as records (payload: the page reversed)."""

    @hookimpl
    def memvisor_describe_pages(self, host, vm, gpps, purpose):
        data = host.backend.read(vm, gpps)
        mine = data[:, 0] == 0x41
        return PageRecords("test-ref", gpps[mine], data[mine][:, ::-1].copy()) if mine.any() else None

    @hookimpl
    def memvisor_resolve_records(self, records):
        return np.asarray(records.payloads)[:, ::-1] if records.kind == "test-ref" else None


def test_records_of_other_plugins_are_resolved_on_fault(tmp_path):
    """Pages stored as another plugin's records come back through memvisor_resolve_records."""
    plugin = LazyRestorePlugin()
    host = small_host(extra_plugins=[plugin, DiskRefs()], settings={"lazy-restore": {"prefetch": "off"}})
    vm = host.create_vm("a", 1024, contents=MIX)
    page = np.full((20, 4096), 0x41, np.uint8)
    page[:, 9] = np.arange(20)
    host.backend.write(vm, np.arange(300, 320), page)
    model = ReferenceMemory()
    model.follow(host, vm)
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt"), lazy=False))
    assert job.stats["record_pages"] >= 20  # (a text page may start with "A" too)
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))
    model.check(host)


def write_sidecar(path, reader, heat, window=64, source=2):
    """An access-order sidecar written by hand from the documented layout."""
    head = struct.pack("<8sHHI16sQQ", b"MVCKORD\n", 1, source, window, reader.file_id, reader.vm_pages, len(heat))
    raw = np.asarray(heat, "<f4").tobytes()
    digest = hashlib.blake2b(head, digest_size=16)
    digest.update(raw)
    Path(str(path) + ".order").write_bytes(head + digest.digest() + raw)


def test_hot_prefetch_follows_the_access_order_sidecar(tmp_path):
    """With a sidecar the hottest storage block is prefetched first; a stale or damaged sidecar
    is ignored (file order)."""
    host, vm, plugin, model, path = saved_vm(tmp_path)
    with CheckpointReader(path) as reader:
        last = reader.storage_blocks - 1
        pblocks = [p for p in range(reader.page_blocks) if reader.storage_block_of(p) == last]
        hot_page = int(reader.page_block_pages(pblocks[len(pblocks) // 2])[32])  # well inside the block
        heat = np.zeros(vm.pages // 64)
        heat[hot_page // 64] = 5.0
        write_sidecar(path, reader, heat)
    job = host.restore_checkpoint(vm, RestoreRequest(path))
    assert job.stats["prefetch_order"] == "hot (accessed_bits)"
    host.advance(host.tick_interval)
    assert host.backend.present(vm, np.array([hot_page]))[0]
    # a damaged sidecar: file order
    raw = bytearray(Path(path + ".order").read_bytes())
    raw[-1] ^= 1
    Path(path + ".order").write_bytes(bytes(raw))
    assert host.restore_checkpoint(vm, RestoreRequest(path)).stats["prefetch_order"] == "file"
    model.check(host)


def test_lazy_restore_in_a_scenario_reports_its_figures():
    """checkpoint then lazy restore in a scenario; the report has the restore's figures."""
    scenario = parse_scenario({
        "host": {"memory": "128MiB", "tick": "1ms", "batch": 4096},
        "plugins": {"lazy-restore": {"prefetch_share": 0.25}},
        "vm": [{"name": "a", "memory": "16MiB", "contents": "mixed", "workload": {"kind": "zipf"}}],
        "timeline": [{"do": "run", "for": "2ms"}, {"do": "checkpoint", "vm": "a", "name": "c1", "lazy": False},
                     {"do": "run", "for": "2ms"}, {"do": "restore", "vm": "a", "name": "c1"},
                     {"do": "run", "for": "20ms"}],
    })
    report = ScenarioRun(scenario).run()
    assert [j["method"] for j in report.metric("memvisor", "jobs")] == ["stop-the-world", "lazy"]
    (restore,) = report.metric("lazy-restore", "restores")
    for key in ("first_access_s", "read_calls", "bytes_read", "fault_windows", "pages_prefetched",
                "pages_never_touched"):
        assert restore[key] is not None
    assert restore["first_access_s"] < 0.01
    for bad, match in (({"prefetch": "x"}, "prefetch"), ({"prefetch_share": 0}, "prefetch_share"),
                       ({"window_pages": 0}, "window_pages"), ({"nope": 1}, "unknown setting")):
        with pytest.raises(UserError, match=match):
            small_host(plugins=["lazy-restore"], settings={"lazy-restore": bad})


def test_random_faults_read_no_storage_block_more_than_twice(tmp_path):
    """Faults in random order over many more storage blocks than the reader keeps: a block
    needed again once the reader let it go is loaded whole, so no block is read more than
    twice (on the Linux backend random faults re-read each 4 MiB block about 20 times)."""
    plugin = LazyRestorePlugin()
    host = small_host(memory_pages=65536, extra_plugins=[plugin], settings={"lazy-restore": {"prefetch": "off"}})
    vm = host.create_vm("a", 32768, contents=MIX)
    model = ReferenceMemory()
    model.follow(host, vm)
    path = str(tmp_path / "a.ckpt")
    host.save_checkpoint(vm, SaveRequest(path, lazy=False, buffer_bytes=1 << 20))  # small storage blocks
    with CheckpointReader(path) as reader:
        blocks = reader.storage_blocks
        assert blocks > 2 * 8 and reader.page_blocks >= 4 * blocks  # more than it caches; several each
    job = host.restore_checkpoint(vm, RestoreRequest(path))
    order = np.random.default_rng(1).permutation(vm.pages // 64)
    for window in order:
        gpps = window * 64 + np.arange(0, 64, 16)
        host.advance(model.access(host, vm, gpps, np.zeros(len(gpps), bool)).seconds)
    assert job.stats["read_calls"] <= 3 + 2 * blocks
    assert job.stats["storage_blocks_loaded_whole"] > 0
    model.check(host)
