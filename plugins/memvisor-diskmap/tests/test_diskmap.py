"""memvisor-diskmap against the real core: mappings from disk I/O and by content, dropped on
guest writes and disk writes; snapshots and live migration with disk references; swap without
writes; memory-error repair; the scan command."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memvisor_diskmap import KIND, DiskmapPlugin
from memvisor_diskmap.index import DiskIndex, sample_keys, scan_image

from memvisor import PAGE_SIZE
from memvisor.builtins.checkpoint import CheckpointReader
from memvisor.builtins.checkpoint.vm import make_present
from memvisor.builtins.migration import LiveMigration, MigrationOptions
from memvisor.contents import ContentSpec
from memvisor.errors import BackendError
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.identity import fingerprints
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import small_host

CONTENTS = ContentSpec.parse({"zero": 0.3, "random": 0.7}, "t")


def plugin_of(host) -> DiskmapPlugin:
    return host.pm.get_plugin("diskmap")


def vm_with_cache(host, pages=256, blocks=512, cached=0.5):
    vm = host.create_vm("a", pages, contents=CONTENTS, seed=4)
    disk = host.attach_disk(vm, blocks=blocks, contents=ContentSpec.parse("random", "d"), seed=9)
    cache = host.fill_page_cache(vm, disk, cached)
    return vm, disk, cache


def memory(host, vm):
    make_present(host, vm)
    return host.backend.read(vm, np.arange(vm.pages))


def test_diskmap_is_listed_as_an_installed_plugin():
    """`memvisor plugins --json` lists diskmap with the hooks it implements."""
    done = subprocess.run([sys.executable, "-m", "memvisor", "plugins", "--json", "-"], capture_output=True, text=True)
    row = next(r for r in json.loads(done.stdout) if r["name"] == "diskmap")
    assert row["distribution"] == "memvisor-diskmap"
    for hook in ("memvisor_disk_io", "memvisor_describe_pages", "memvisor_resolve_records", "memvisor_memory_error"):
        assert hook in row["hooks"]


def test_mappings_follow_disk_io_guest_writes_and_disk_writes():
    """Pages read from blocks are mapped and write-protected; a guest write drops the page's
    mapping; a write to a block drops the mappings of the other pages that pointed at it."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(host)
    dm = plugin_of(host)
    assert dm.mapped(vm).tolist() == cache.tolist() and host.backend.protected(vm, cache).all()
    host.access(vm, cache[:3], np.ones(3, bool))
    assert set(dm.mapped(vm).tolist()) == set(cache[3:].tolist())
    page, block = int(cache[10]), int(dm.maps["a"].block[cache[10]])
    host.disk_io(vm, disk, np.array([5]), np.array([block]), np.array([True]))  # page 5 written to that block
    mapped = set(dm.mapped(vm).tolist())
    assert page not in mapped and 5 in mapped


def test_scan_maps_pages_identical_to_blocks_by_content():
    """With scan = true, pages equal to a disk block are found by content, verified, and mapped."""
    host = small_host(memory_pages=2048, plugins=["diskmap"], settings={"diskmap": {"scan": True}})
    vm = host.create_vm("a", 64, contents=CONTENTS)
    disk = host.attach_disk(vm, blocks=128, contents=ContentSpec.parse("random", "d"))
    host.backend.write(vm, np.array([7, 8]), disk.read([100, 3]))
    assert plugin_of(host).scan(vm) == 2
    assert plugin_of(host).maps["a"].block[[7, 8]].tolist() == [100, 3]


def test_hook_memvisor_describe_pages_and_resolve_in_a_checkpoint(tmp_path):
    """A checkpoint stores mapped pages as disk references; a restore reads them back from the
    disk, checks them and gives every page back exactly; a block changed since is refused."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(host)
    saved = memory(host, vm)
    job = host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    assert job.stats["record_pages"] == len(cache)
    with CheckpointReader(tmp_path / "a.ckpt") as reader:
        assert KIND in reader.record_kinds
    host.access(vm, np.arange(vm.pages), np.ones(vm.pages, bool))
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))
    assert (memory(host, vm) == saved).all()
    block = int(plugin_of(host).maps["a"].block[cache[0]])
    disk.data[block, 100] ^= 0xFF  # changed behind everyone's back: the reference must not be used
    with pytest.raises(BackendError, match="changed since"):
        host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))


def test_hook_memvisor_memory_pressure_swaps_mapped_pages_without_writes():
    """Under pressure mapped clean pages are dropped with no disk write; touching them faults
    them back from their blocks, byte for byte."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(host)
    before, writes = memory(host, vm), disk.writes
    free = host.backend.free_pages()
    host.check_pressure(target_free_pages=free + 100)
    assert host.backend.free_pages() >= free + 100 and disk.writes == writes
    assert not host.backend.present(vm, cache).all()
    result = host.access(vm, cache, np.zeros(len(cache), bool))
    assert result.faults > 0 and plugin_of(host).counts["swapped_in"] == result.faults
    assert (memory(host, vm) == before).all()


def test_a_block_overwritten_while_its_page_is_swapped_out_is_read_in_first():
    """Writing a block that backs a dropped page brings the page back before the block changes."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(host)
    before = memory(host, vm)
    host.check_pressure(target_free_pages=host.backend.free_pages() + len(cache))
    gone = cache[~host.backend.present(vm, cache)]
    block = int(plugin_of(host).maps["a"].block[gone[0]])
    host.disk_io(vm, disk, np.array([0]), np.array([block]), np.array([True]))
    assert host.backend.present(vm, gone[:1]).all()
    assert (memory(host, vm) == before).all()


def test_hook_memvisor_memory_error_repairs_mapped_pages():
    """Mapped pages hit by bit flips are rebuilt from their blocks; the others are lost."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(host)
    before = memory(host, vm)
    hit = np.array([1, 2, cache[0], cache[5]])
    data = host.backend.read(vm, hit)
    data[:, 17] ^= 0x10
    host.backend.write(vm, hit, data)
    outcome = host.memory_error(vm, hit)
    assert outcome["repaired"] == sorted(cache[[0, 5]].tolist()) and outcome["lost"] == [1, 2]
    assert (host.backend.read(vm, cache[[0, 5]]) == before[cache[[0, 5]]]).all()


def test_hook_memvisor_disk_io_maps_written_back_pages():
    """A page written back to a block equals it afterwards: it is mapped to that block."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, _ = vm_with_cache(host)
    host.disk_io(vm, disk, np.array([3]), np.array([400]), np.array([True]))
    m = plugin_of(host).maps["a"]
    assert m.block[3] == 400 and m.hash[3] == fingerprints(disk.read([400]))[0]


def migrate(diskmap, source_setup=None, **options):
    plugins = ["diskmap"] if diskmap else []
    source = small_host(memory_pages=4096, plugins=plugins)
    destination = small_host(memory_pages=4096, plugins=plugins)
    vm, disk, cache = vm_with_cache(source, pages=512, blocks=1024)
    if source_setup:
        source_setup(source, vm, disk, cache)
    migration = LiveMigration(source, vm, destination, MigrationOptions(**options))
    migration.run()
    if migration.options.postcopy:
        migration.finish_postcopy()
    assert (memory(destination, migration.dest_vm) == memory(source, vm)).all()
    return migration


def test_migration_sends_disk_references_and_fewer_bytes():
    """With diskmap the page cache travels as 24-byte references: far fewer bytes, same memory."""
    plain, mapped = migrate(False).result, migrate(True).result
    assert mapped.records[KIND] == 256 and mapped.bytes_sent < 0.6 * plain.bytes_sent
    assert mapped.total_s < plain.total_s


def test_a_disk_block_changed_after_the_mapping_is_never_used():
    """A block changed behind the plugin's back is refused on the destination and its page is
    sent as data; a block written through the disk drops the mapping before anything is sent."""

    def tamper(source, vm, disk, cache):
        dm = plugin_of(source)
        disk.data[dm.maps["a"].block[cache[:4]], 0] ^= 1  # no version bump: only the hash can tell
        source.disk_io(vm, disk, np.array([0]), dm.maps["a"].block[cache[4:6]][:1], np.array([True]))

    result = migrate(True, tamper).result
    assert result.fallbacks == 4 and result.records[KIND] == 256 - 4 - 1 + 1  # page 0 is mapped now


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1000), writes=st.integers(0, 400), postcopy=st.booleans())
def test_migration_with_diskmap_equals_source_at_switch_over(seed, writes, postcopy):
    """With guest writes and page-cache reads during pre-copy, the destination equals the source
    at switch-over, byte for byte, with and without post-copy."""
    source = small_host(memory_pages=4096, plugins=["diskmap"])
    destination = small_host(memory_pages=4096, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(source, pages=128, blocks=256)
    rng = np.random.default_rng(seed)

    def guests(seconds):
        source.access(vm, rng.integers(0, 128, writes), rng.random(writes) < 0.5)
        n = int(rng.integers(0, 20))
        source.disk_io(vm, disk, rng.integers(64, 128, n), rng.integers(0, 256, n), rng.random(n) < 0.3)
        source.advance(seconds)

    migration = LiveMigration(source, vm, destination, MigrationOptions(postcopy=postcopy, stop_pages=8,
                                                                        max_rounds=3))
    migration.run(guests)
    at_switch_over = memory(source, vm)
    if postcopy:
        migration.finish_postcopy()
    assert (memory(destination, migration.dest_vm) == at_switch_over).all()


def test_scan_command_counts_pages_on_disk(tmp_path):
    """`memvisor diskmap scan --disk D IMAGE --json OUT` counts identical pages, zeros apart."""
    disk = ContentSpec.parse("random", "d").fill(64, 1, np.arange(64))
    mem = ContentSpec.parse("random", "m").fill(32, 2, np.arange(32))
    mem[:10] = disk[20:30]
    mem[10:15] = 0
    mem[15, :] = disk[3]
    mem[15, 9] ^= 1  # differs by one bit: not on disk
    (tmp_path / "d.img").write_bytes(disk.tobytes())
    (tmp_path / "m.img").write_bytes(mem.tobytes())
    done = subprocess.run([sys.executable, "-m", "memvisor", "diskmap", "scan", "--disk", str(tmp_path / "d.img"),
                           str(tmp_path / "m.img"), "--json", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures = json.loads((tmp_path / "o.json").read_text())
    assert {k: figures[k] for k in ("pages", "disk_blocks", "pages_on_disk", "zero_pages")} == {
        "pages": 32, "disk_blocks": 64, "pages_on_disk": 10, "zero_pages": 5}
    assert scan_image(tmp_path / "m.img", tmp_path / "d.img").pages_on_disk == 10
    assert DiskIndex(disk).lookup(np.zeros((1, PAGE_SIZE), np.uint8)).tolist() == [-1]


def test_scenario_end_to_end_with_pagecache_swap_error_snapshot_and_migration():
    """A scenario: page-cache I/O, a memory error, pressure, a checkpoint and restore, a live
    migration; diskmap reports mappings, swaps, repairs and disk references."""
    spec = parse_scenario({
        "host": {"memory": "16MiB", "batch": 1024},
        "plugins": {"diskmap": {}},
        "vm": [{"name": "a", "memory": "1MiB", "contents": {"zero": 0.3, "text": 0.7},
                "disk": {"size": "2MiB", "page_cache": 0.5},
                "workload": {"kind": "pagecache", "read_fraction": 0.1, "write_fraction": 0.1}}],
        "timeline": [
            {"do": "run", "for": "1ms"},
            {"do": "memory_error", "vm": "a", "pages": 32},
            {"do": "pressure", "target_free": "15MiB"},
            {"do": "checkpoint", "vm": "a", "name": "c"},
            {"do": "restore", "vm": "a", "name": "c"},
            {"do": "migrate", "vm": "a", "max_rounds": 3},
            {"do": "run", "for": "1ms"},
        ],
    })
    report = ScenarioRun(spec).run()
    metrics = next(s["metrics"] for s in report.data["sections"] if s["plugin"] == "diskmap")
    core = next(s["metrics"] for s in report.data["sections"] if s["title"].startswith("Live migrations"))
    assert metrics["mapped_by_io"] > 0 and metrics["swapped_out"] > 0 and metrics["records_checkpoint"] > 0
    assert metrics["records_migration"] > 0 and core["migrations"][0]["verified"]
    assert core["memory_error_repaired"] + core["memory_error_lost"] == 32 and core["memory_error_repaired"] > 0


@pytest.mark.parametrize("options", [["--plugin", "diskmap", "--set", "diskmap.scan=true"], []],
                         ids=["diskmap-named", "disk-alone"])
def test_migrate_command_with_an_image_sends_disk_references(tmp_path, options):
    """`memvisor migrate --image M --disk D` finds the image's pages that are disk blocks by
    content and sends them as references, and says so: with diskmap named, and with the disk
    alone (the core enables the plugins that describe pages because the disk was named, and
    diskmap scans by content a VM whose disks are read-only images; it once sent none unless
    `--plugin diskmap --set diskmap.scan=true` was given too)."""
    disk = ContentSpec.parse("text", "d").fill(256, 5, np.arange(256))
    mem = ContentSpec.parse({"zero": 0.5, "random": 0.5}, "m").fill(128, 6, np.arange(128))
    mem[:40] = disk[100:140]
    (tmp_path / "d.img").write_bytes(disk.tobytes())
    (tmp_path / "m.img").write_bytes(mem.tobytes())
    out = tmp_path / "o.json"
    done = subprocess.run([sys.executable, "-m", "memvisor", "migrate", "--image", str(tmp_path / "m.img"),
                           "--disk", str(tmp_path / "d.img"), *options, "--json", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["records"][KIND] == 40
    if options:
        assert figures["describers"] == []  # named, not added
    else:
        assert done.stdout.startswith(f"pages that may equal blocks of {tmp_path / 'd.img'}: described by plugin(s) "
                                      "diskmap")
        assert figures["describers"] == ["diskmap"]


def test_swap_then_restore_then_disk_write_keeps_every_page(tmp_path):
    """Pages dropped under pressure, then replaced by a restore, then their blocks written: the
    restored pages are kept, nothing is read back over them."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(host)
    host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))
    saved = memory(host, vm)
    host.check_pressure(target_free_pages=host.backend.free_pages() + len(cache))
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))
    blocks = plugin_of(host).maps["a"].block[cache[:8]]
    host.disk_io(vm, disk, np.arange(8), blocks, np.ones(8, bool))
    expected = saved.copy()
    expected[:8] = host.backend.read(vm, np.arange(8))
    assert (memory(host, vm) == expected).all()
    host.check_pressure(target_free_pages=host.backend.free_pages() + 50)
    assert (memory(host, vm) == expected).all()


def test_hook_memvisor_checkpoint_restore_voids_old_mappings(tmp_path):
    """A restore replaces memory: mappings from before it are dropped (a later repair must not
    write an old block over a restored page); the restore's own references map again."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm = host.create_vm("a", 64, contents=CONTENTS)
    disk = host.attach_disk(vm, blocks=64)
    host.save_checkpoint(vm, SaveRequest(str(tmp_path / "a.ckpt")))  # no page is mapped yet
    host.fill_page_cache(vm, disk, 0.5)
    host.restore_checkpoint(vm, RestoreRequest(str(tmp_path / "a.ckpt")))
    assert len(plugin_of(host).mapped(vm)) == 0
    restored = memory(host, vm)
    assert host.memory_error(vm, np.arange(32, 64))["repaired"] == []
    assert (memory(host, vm) == restored).all()


def test_example_scenario_is_valid():
    """examples/migration.toml parses and names diskmap, a disk and migrate steps."""
    from pathlib import Path

    from memvisor.scenario import load_scenario

    spec = load_scenario(Path(__file__).resolve().parents[3] / "examples" / "migration.toml")
    assert "diskmap" in spec.plugins and spec.vms[0].disk["page_cache"] == 0.5
    assert [s["do"] for s in spec.timeline].count("migrate") == 2


def test_verify_finds_mappings_that_no_longer_hold():
    """verify() (the integration state machine checks it after every step) counts a dropped
    page whose block changed behind diskmap's back, and a trusted present page changed in
    place without a trap; an honest run has none."""
    host = small_host(memory_pages=2048, plugins=["diskmap"])
    vm, disk, cache = vm_with_cache(host)
    plugin = plugin_of(host)
    host.check_pressure(target_free_pages=host.backend.free_pages() + 40)
    assert plugin.verify(vm) == 0
    m = plugin.maps["a"]
    gone = cache[~host.backend.present(vm, cache)][0]
    disk.data[m.block[gone]] ^= 1  # the block changes without a write through the disk (no version)
    kept = cache[host.backend.present(vm, cache)][0]
    host.backend.write(vm, np.array([kept]), np.full((1, PAGE_SIZE), 7, np.uint8))  # in place, no trap
    assert plugin.verify(vm) == 2


def numbered_blocks(count: int, seed: int = 3) -> np.ndarray:
    """``count`` blocks equal but for bytes 8-15, which hold the block's number (records
    numbered in their first bytes)."""
    blocks = np.repeat(np.random.default_rng(seed).integers(0, 256, (1, PAGE_SIZE), dtype=np.uint8), count, axis=0)
    blocks[:, 8:16] = np.arange(count, dtype=np.uint64).view(np.uint8).reshape(count, 8)
    return blocks


def test_blocks_that_differ_only_in_a_few_bytes_are_all_found(tmp_path):
    """A disk of 1,024 blocks identical but for bytes 8-15 and an image holding copies of all
    of them (shuffled): every copy is found, at the block that holds its bytes — the index
    once verified only the first block whose sampled words matched, and found one."""
    disk = numbered_blocks(1024)
    order = np.random.default_rng(1).permutation(1024)
    index = DiskIndex(disk)
    found = index.lookup(disk[order])
    assert (found == order).all()
    (tmp_path / "d.img").write_bytes(disk.tobytes())
    (tmp_path / "m.img").write_bytes(disk[order].tobytes())
    assert scan_image(tmp_path / "m.img", tmp_path / "d.img").pages_on_disk == 1024


def test_every_block_of_a_shared_key_is_tried():
    """2,048 different blocks share one key (they differ only in words the key does not
    sample), half of them on the disk, some twice: each copy in the image is found at a block
    with its bytes, the other half is not found, and equal blocks are indexed once."""
    blocks = numbered_blocks(2048)
    assert len(np.unique(sample_keys(blocks))) == 1
    disk, absent = blocks[::2], blocks[1::2]
    index = DiskIndex(np.concatenate([disk, disk[:100]]))
    assert len(index) == 1024
    order = np.random.default_rng(2).permutation(1024)
    assert (index.lookup(disk[order]) == order).all()
    assert (index.lookup(absent) == -1).all()


def digest_count(image: np.ndarray, disk: np.ndarray) -> int:
    """Non-zero pages of ``image`` whose bytes are some block of ``disk``: an independent,
    byte-for-byte count (a set of the blocks' bytes)."""
    on_disk = {bytes(block) for block in disk if block.any()}
    return sum(bytes(page) in on_disk for page in image if page.any())


@pytest.mark.parametrize("seed", range(6))
def test_scan_equals_a_byte_for_byte_count_on_random_images(tmp_path, seed):
    """`diskmap scan` counts exactly the non-zero pages a byte-for-byte comparison finds, on
    random images with planted copies of disk blocks: two families of numbered records (each
    sharing a key), equal blocks, copies changed by one byte, and zero pages."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 256, (300, PAGE_SIZE), dtype=np.uint8), numbered_blocks(200, seed),
             numbered_blocks(64, seed + 100)[rng.permutation(64)[:40]], np.zeros((20, PAGE_SIZE), np.uint8)]
    disk = np.concatenate(parts)
    disk = np.concatenate([disk, disk[rng.integers(0, len(disk), 50)]])[rng.permutation(len(disk) + 50)]
    copies = disk[rng.integers(0, len(disk), 400)]
    changed = disk[rng.integers(0, len(disk), 100)].copy()
    changed[np.arange(100), rng.integers(0, PAGE_SIZE, 100)] ^= np.uint8(1 << int(rng.integers(8)))
    strangers = rng.integers(0, 256, (100, PAGE_SIZE), dtype=np.uint8)
    image = np.concatenate([copies, changed, numbered_blocks(64, seed + 100), numbered_blocks(300, seed), strangers,
                            np.zeros((50, PAGE_SIZE), np.uint8)])
    image = image[rng.permutation(len(image))]
    (tmp_path / "d.img").write_bytes(disk.tobytes())
    (tmp_path / "m.img").write_bytes(image.tobytes())
    result = scan_image(tmp_path / "m.img", tmp_path / "d.img")
    assert result.pages_on_disk == digest_count(image, disk)
    assert result.zero_pages == int((~image.any(axis=1)).sum())
