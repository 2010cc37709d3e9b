"""``memvisor bench migration``: live migration of a VM whose memory is half page cache of its
disk, with diskmap against plain pre-copy (zero pages and zstd), and the speed of
``diskmap scan``. Migration figures are virtual (deterministic); the scan's are wall-clock."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

VM_PAGES = 16384  # 64 MiB
DISK_BLOCKS = 32768  # 128 MiB
SCAN_PAGES = 65536  # 256 MiB memory image
ACCESS_RATE = 5e5  # guest accesses per second of virtual time during the migration
ANONYMOUS = {"zero": 0.35, "text": 0.55, "random": 0.1}
"""Contents of the VM's anonymous half (the other half is page cache): docs/migration.md shows
how the ratio moves with the share of incompressible pages."""


def migrate_half_cache(diskmap: bool, vm_pages: int = VM_PAGES, disk_blocks: int = DISK_BLOCKS):
    """Migrate a VM whose last half is page cache of its disk while a zipf guest writes; returns
    the :class:`memvisor.builtins.migration.MigrationResult`."""
    from memvisor.builtins.migration import LiveMigration, MigrationOptions
    from memvisor.contents import ContentSpec
    from memvisor.host import Host, HostConfig
    from memvisor.workloads import make_workload

    plugins = ("diskmap",) if diskmap else ()
    config = HostConfig(memory_pages=vm_pages * 2 + 1024)
    source, destination = Host(config, plugins), Host(config, plugins)
    contents = ContentSpec.parse(ANONYMOUS, "bench")
    vm = source.create_vm("bench", vm_pages, contents=contents, seed=7)
    disk = source.attach_disk(vm, blocks=disk_blocks, seed=11)
    source.fill_page_cache(vm, disk, 0.5)
    # The guest works in its anonymous half (zipf, 20% writes) and reads its page cache.
    workload = make_workload({"kind": "mixture", "parts": [
        {"weight": 3, "kind": "zipf", "alpha": 0.99, "footprint": 0.5, "write_fraction": 0.2},
        {"weight": 1, "kind": "zipf", "alpha": 0.99, "start": 0.5, "write_fraction": 0.0}]}, vm_pages, 3)

    def guests(seconds):
        # ACCESS_RATE accesses per second of virtual time, one batch per round
        gpps, writes = workload.next_batch(max(1, int(seconds * ACCESS_RATE)))
        result = source.access(vm, gpps, writes)
        source.advance(max(seconds, result.seconds))

    migration = LiveMigration(source, vm, destination, MigrationOptions())
    return migration.run(guests)


def _scan_files(context):
    from memvisor.contents import ContentSpec

    folder = Path(context["dir"])
    disk = ContentSpec.parse("text", "disk").fill(SCAN_PAGES, 5, np.arange(SCAN_PAGES))
    memory = ContentSpec.parse({"zero": 0.3, "text": 0.4, "random": 0.3}, "mem").fill(SCAN_PAGES, 6,
                                                                                     np.arange(SCAN_PAGES))
    picks = np.random.default_rng(1).choice(SCAN_PAGES, SCAN_PAGES // 4, replace=False)
    memory[picks] = disk[np.random.default_rng(2).integers(0, SCAN_PAGES, len(picks))]
    (folder / "disk.img").write_bytes(disk.tobytes())
    (folder / "mem.img").write_bytes(memory.tobytes())


def _scan_setup():
    from memvisor_diskmap.index import DiskIndex, _map

    folder = tempfile.mkdtemp(prefix="memvisor-diskmap-bench-")
    context = {"dir": folder}
    _scan_files(context)
    context["index"] = DiskIndex(_map(Path(folder) / "disk.img"))
    return context


def _scan_rate(context) -> float:
    from memvisor_diskmap.index import scan_image

    folder = Path(context["dir"])
    result = scan_image(folder / "mem.img", folder / "disk.img", index=context["index"])
    return result.pages * 4096 / result.seconds / 2**20


def cases():
    """The benchmark cases of group ``migration``."""
    from memvisor.bench import Baseline, BenchCase

    baseline_bytes = Baseline("precopy-zero-zstd", lambda _: migrate_half_cache(False).bytes_sent / 2**20)
    baseline_time = Baseline("precopy-zero-zstd", lambda _: migrate_half_cache(False).total_s)
    return [
        BenchCase("diskmap-halfcache-bytes", "bytes_sent", "MiB", lambda _: migrate_half_cache(True).bytes_sent / 2**20,
                  baseline=baseline_bytes, higher_is_better=False, runs=3, warmup=0,
                  goal="<= 0.55 of the baseline"),
        BenchCase("diskmap-halfcache-time", "total_time", "s (virtual)", lambda _: migrate_half_cache(True).total_s,
                  baseline=baseline_time, higher_is_better=False, runs=3, warmup=0, goal="< baseline"),
        BenchCase("diskmap-scan", "scan_rate", "MiB/s", _scan_rate, setup=_scan_setup, runs=5,
                  goal=">= 500 MiB/s on one core"),
    ]
