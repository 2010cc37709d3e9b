"""Virtual disks in the core: attaching disks, guest disk I/O into the page cache, the pagecache
workload, the disk I/O hook, and memory errors with the hook that repairs them."""

import numpy as np
import pytest

from memvisor import PAGE_SIZE, hookimpl
from memvisor.contents import ContentSpec
from memvisor.errors import ScenarioError, UserError
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import HookRecorder, small_host


def test_hook_memvisor_disk_io():
    """A read puts block bytes into guest pages, a write puts page bytes into blocks; the hook
    sees each batch after it happened, and reads trap on write-protected pages first."""
    host = small_host(memory_pages=1024)
    vm = host.create_vm("a", 64, contents=ContentSpec.parse("random", "t"))
    disk = host.attach_disk(vm, blocks=32)
    host.backend.protect(vm, np.array([3]))
    recorder = HookRecorder(host.pm)
    host.disk_io(vm, disk, np.array([3, 4]), np.array([10, 11]), np.array([False, False]))
    assert recorder.names().index("memvisor_write_trap") < recorder.names().index("memvisor_disk_io")
    (call,) = recorder.of("memvisor_disk_io")
    assert call.io.disk is disk and call.io.gpps.tolist() == [3, 4] and not call.io.writes.any()
    assert (host.backend.read(vm, np.array([3, 4])) == disk.read([10, 11])).all()
    before = disk.versions[5]
    host.disk_io(vm, disk, np.array([7]), np.array([5]), np.array([True]))
    assert (disk.read([5]) == host.backend.read(vm, np.array([7]))).all() and disk.versions[5] == before + 1
    assert host.backend.take_dirty(vm, np.array([3, 4])).all()  # migration sees DMA as writes
    assert host.metrics.counters["a"]["disk_reads"] == 2 and host.metrics.counters["a"]["disk_writes"] == 1
    recorder.close()


def test_disk_from_an_image_file_is_read_and_written_in_place(tmp_path):
    """A file-backed disk reads the file's blocks and writes back to it; before_write callbacks
    see blocks while they still hold their old bytes."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 16 * 8 + b"tail")  # 8 blocks and a partial one
    host = small_host(memory_pages=512)
    vm = host.create_vm("a", 16)
    disk = host.attach_disk(vm, str(image))
    assert disk.blocks == 8 and host.disk(vm) is disk
    old = []
    disk.before_write.append(lambda d, blocks: old.append(d.read(blocks)))
    host.backend.write(vm, np.array([1]), np.full((1, PAGE_SIZE), 7, np.uint8))
    host.disk_io(vm, disk, np.array([1]), np.array([2]), np.array([True]))
    host.destroy_vm(vm)
    assert old[0][0, 1] == 1
    assert image.read_bytes()[2 * PAGE_SIZE : 3 * PAGE_SIZE] == bytes([7]) * PAGE_SIZE
    with pytest.raises(UserError, match="no such disk image"):
        host.attach_disk(host.create_vm("b", 4), str(tmp_path / "none.img"))


def scenario(**vm):
    return parse_scenario({
        "host": {"memory": "16MiB", "batch": 4096},
        "vm": [{"name": "a", "memory": "1MiB", "contents": "text", **vm}],
        "timeline": [{"do": "run", "for": "2ms"}],
    })


def test_pagecache_workload_reads_files_through_the_disk():
    """A VM with a disk and the pagecache workload reads blocks into its page cache and writes
    modified pages back; the page cache holds copies of blocks from the start."""
    spec = scenario(disk={"size": "512KiB", "page_cache": 0.5},
                    workload={"kind": "pagecache", "read_fraction": 0.2, "file_write_fraction": 0.2})
    run = ScenarioRun(spec)
    vm = run.host.vms["a"]
    disk = run.host.disk(vm)
    cache = run.host.backend.read(vm, np.arange(128, 256))
    blocks = disk.read(np.arange(disk.blocks))
    assert all((blocks == page).all(axis=1).any() for page in cache[:8])
    report = run.run()
    assert report.data["vms"]["a"]["disk_reads"] > 128 and report.data["vms"]["a"]["disk_writes"] > 0


def test_scenario_disk_table_is_checked():
    """A disk needs exactly one of path and size; page_cache is a fraction; the pagecache
    workload needs a disk."""
    with pytest.raises(ScenarioError, match="image path or a size"):
        scenario(disk={"page_cache": 0.5})
    with pytest.raises(ScenarioError, match="page_cache"):
        scenario(disk={"size": "64KiB", "page_cache": 2})
    with pytest.raises(ScenarioError, match="has no disk"):
        ScenarioRun(scenario(workload={"kind": "pagecache"}))


class RepairEven:
    """Repairs the even pages of a memory error from a copy it kept."""

    def __init__(self):
        self.saved = {}

    @hookimpl
    def memvisor_memory_error(self, host, vm, error):
        even = error.gpps[error.gpps % 2 == 0]
        host.backend.write(vm, even, self.saved[vm.name][even])
        return even


def test_hook_memvisor_memory_error():
    """Pages a plugin repairs come back exactly; the others are reported lost, never hidden."""
    plugin = RepairEven()
    host = small_host(memory_pages=1024, extra_plugins=[plugin])
    vm = host.create_vm("a", 32, contents=ContentSpec.parse("random", "t"))
    plugin.saved["a"] = host.backend.read(vm, np.arange(32))
    pages = np.array([2, 3, 4, 9])
    data = host.backend.read(vm, pages)
    data[:, 0] ^= 1
    host.backend.write(vm, pages, data)
    outcome = host.memory_error(vm, pages)
    assert outcome["repaired"] == [2, 4] and outcome["lost"] == [3, 9]
    assert (host.backend.read(vm, np.array([2, 4])) == plugin.saved["a"][[2, 4]]).all()
    assert host.memory_errors == [outcome]


def test_memory_error_action_reports_lost_pages():
    """The memory_error action flips bits in present pages; with no plugin every page is lost."""
    spec = parse_scenario({
        "host": {"memory": "8MiB"}, "vm": [{"name": "a", "memory": "256KiB", "contents": "random"}],
        "timeline": [{"do": "memory_error", "vm": "a", "pages": 5, "bits": 3}],
    })
    report = ScenarioRun(spec).run()
    section = next(s for s in report.data["sections"] if s["title"].startswith("Live migrations"))
    assert section["metrics"]["memory_error_lost"] == 5 and section["metrics"]["memory_error_repaired"] == 0
