"""Migration of a running QEMU VM through memvisor, and a link cut in the middle of one.
Tests skip, with the reason, where QEMU 7.2 is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from memvisor_qemu.guest import PAGE, GuestLayout
from memvisor_qemu.testing import (
    QemuVM,
    consistent,
    counters,
    needs,
    one_line_error,
    unavailable_reason,
    write_disk,
)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

LAYOUT = GuestLayout(loop_start=1 << 20, loop_end=8 << 20, disk_lba=8, disk_sectors=(4 << 20) // 512,
                     disk_dest=16 << 20)


def memvisor(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "memvisor", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@needs("diskmap")
def test_migrated_vm_runs_on_and_disk_pages_cross_as_references(tmp_path):
    """The VM moves while it runs: its markers continue on the destination, its counters are consistent,
    every other page is the source's at switch-over, and the pages copied from the shared disk crossed
    memvisor's link as references (the link carried far fewer bytes than QEMU's stream)."""
    data = np.random.default_rng(3).integers(0, 256, LAYOUT.disk_sectors * 512, dtype=np.uint8).tobytes()
    disk = write_disk(tmp_path / "disk.img", LAYOUT, data)
    with QemuVM(tmp_path, "src", disk) as src, QemuVM(tmp_path, "dst", disk, incoming=True) as dst:
        src.wait_markers(3)
        proc = memvisor("qemu", "migrate", "--from", src.qmp_path, "--to", dst.qmp_path, "--disk", disk,
                        "--json", tmp_path / "m.json")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        figures = json.loads((tmp_path / "m.json").read_text())
        assert figures["record_pages"] >= LAYOUT.disk_sectors * 512 // PAGE
        assert figures["link_bytes"] < figures["qemu_stream_bytes"] / 4
        assert src.monitor.status() == "postmigrate"
        dst.wait_markers(3)
        assert dst.serial.read_bytes().startswith(b"B")
        dst.stop()
        before, after = src.ram(tmp_path), dst.ram(tmp_path)
        loop = np.zeros(len(before), bool)
        loop[np.asarray(LAYOUT.pages)] = True
        assert (after[~loop] == before[~loop]).all()
        disk_pages = np.arange(LAYOUT.disk_dest // PAGE, LAYOUT.disk_dest // PAGE + len(data) // PAGE)
        assert after[disk_pages].tobytes() == data
        assert consistent(counters(after, LAYOUT))


def test_link_cut_during_a_migration_leaves_the_source_running(tmp_path):
    """The destination QEMU dies in the middle of the migration: memvisor says so in one line, the source's
    migration fails and its VM keeps running."""
    big = GuestLayout(loop_start=1 << 20, loop_end=4 << 20, fill_start=8 << 20, fill_end=72 << 20)
    disk = write_disk(tmp_path / "big.img", big)
    with QemuVM(tmp_path, "src", disk, memory_mib=96) as src, \
            QemuVM(tmp_path, "dst", disk, memory_mib=96, incoming=True) as dst:
        src.wait_markers(2, timeout=120)
        src.monitor.execute("migrate-set-parameters", **{"max-bandwidth": 16 << 20})  # about 5 s for 96 MiB
        proc = memvisor("qemu", "migrate", "--from", src.qmp_path, "--to", dst.qmp_path)
        limit = time.monotonic() + 30
        while src.monitor.migration().get("status") != "active" and time.monotonic() < limit:
            time.sleep(0.01)
        time.sleep(1.0)
        dst.kill()
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - started < 30
        one_line_error(proc.returncode, err)
        limit = time.monotonic() + 30
        while src.monitor.migration().get("status") not in ("failed", "cancelled") and time.monotonic() < limit:
            time.sleep(0.05)
        assert src.monitor.migration()["status"] == "failed"
        assert src.monitor.status() == "running"
        markers = src.markers()
        src.wait_markers(markers + 2)
