"""Save and restore real QEMU VMs (TCG): the guest runs on where it stopped, page by page.

The guest (memvisor_qemu.guest) counts passes over 7 MiB of its memory and copied 4 MiB of
its disk into memory at boot. Tests skip, with the reason, where QEMU 7.2 is not installed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from memvisor.builtins.checkpoint import CheckpointReader
from memvisor_qemu.guest import PAGE, GuestLayout
from memvisor_qemu.state import TAG, QemuState
from memvisor_qemu.testing import QemuVM, consistent, counters, needs, unavailable_reason, write_disk

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

LAYOUT = GuestLayout(loop_start=1 << 20, loop_end=8 << 20, disk_lba=8, disk_sectors=(4 << 20) // 512,
                     disk_dest=16 << 20)
DISK_PAGES = np.arange(LAYOUT.disk_dest // PAGE, (LAYOUT.disk_dest + LAYOUT.disk_sectors * 512) // PAGE)


def memvisor(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """The memvisor command line, end to end."""
    return subprocess.run([sys.executable, "-m", "memvisor", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("qemu")


@pytest.fixture(scope="module")
def disk(folder):
    data = np.random.default_rng(7).integers(0, 256, LAYOUT.disk_sectors * 512, dtype=np.uint8).tobytes()
    return write_disk(folder / "disk.img", LAYOUT, data)


def save_stopped(folder, disk, name: str, *options) -> tuple:
    """A stop-the-world save of a running guest, and the guest's memory at that moment."""
    with QemuVM(folder, name, disk) as src:
        src.wait_markers(3)
        src.stop()
        reference = src.ram(folder)
        ckpt = folder / f"{name}.ckpt"
        out = ok(memvisor("qemu", "save", ckpt, "--qmp", src.qmp_path, *options)).stdout
        assert src.monitor.status() != "running"  # a paused VM stays paused
        assert (src.ram(folder) == reference).all()
    return ckpt, reference, out


@pytest.fixture(scope="module")
def saved(folder, disk):
    """A checkpoint without disk references (memvisor-qemu alone)."""
    return save_stopped(folder, disk, "plain")[:2]


@pytest.fixture(scope="module")
def saved_with_disk(folder, disk):
    """A checkpoint whose pages copied from the disk are disk references (with memvisor-diskmap)."""
    ckpt, reference, out = save_stopped(folder, disk, "with-disk", "--disk", disk)
    assert "1,024 disk references" in out
    return ckpt, reference


@needs("diskmap")
def test_checkpoint_holds_the_disk_copy_as_references(saved_with_disk):
    """The pages the guest copied from its disk are disk references, exactly those."""
    ckpt, reference = saved_with_disk
    with CheckpointReader(ckpt) as r:
        refs = r.records("disk-ref").gpps
        state = QemuState.decode(r.section(TAG), ckpt)
    assert refs.tolist() == DISK_PAGES.tolist()
    assert state.machine == "pc-i440fx-7.2" and state.qemu.startswith("7.2.") and state.blocks[0].name == "pc.ram"


def check_ran_on(reference: np.ndarray, got: np.ndarray) -> None:
    """Every page the guest does not count in is the saved one; every counter moved on by the
    same number of passes (within one). Counters are bytes and the guest makes about 2,900
    passes a second under TCG here, so they wrap every 90 ms or so: the passes are compared
    modulo 256 (that the guest ran at all, its markers say)."""
    loop = np.zeros(len(reference), bool)
    loop[np.asarray(LAYOUT.pages)] = True
    same = (got[~loop] == reference[~loop]).all(axis=1)
    assert same.all(), f"pages changed: {np.flatnonzero(~loop)[~same][:10]}"
    assert (got[loop, 1:] == reference[loop, 1:]).all()
    moved = (counters(got, LAYOUT).astype(np.int16) - counters(reference, LAYOUT)) % 256
    spread = (moved - moved[0]) % 256
    assert np.isin(spread, (0, 1)).all() or np.isin(spread, (0, 255)).all(), np.unique(moved)
    assert consistent(counters(got, LAYOUT))


@pytest.mark.parametrize("lazy, with_disk", [
    pytest.param(True, True, marks=needs("lazy-restore", "diskmap"), id="lazy-disk"),
    pytest.param(True, False, marks=needs("lazy-restore"), id="lazy"),
    pytest.param(False, True, marks=needs("diskmap"), id="eager-disk"),
    pytest.param(False, False, id="eager"),
])
def test_restore_runs_on_from_where_it_stopped(request, folder, disk, lazy, with_disk):
    """Restored (lazily through post-copy, or eagerly; disk references resolved from the disk), the guest
    goes on: its markers continue and every page is the saved one but for its counters, which moved on
    together."""
    ckpt, reference = request.getfixturevalue("saved_with_disk" if with_disk else "saved")
    with QemuVM(folder, "dst", disk, incoming=True) as dst:
        out = ok(memvisor("qemu", "restore", ckpt, "--qmp", dst.qmp_path, *(["--disk", disk] if with_disk else []),
                          *(["--lazy"] if lazy else []), "--json", folder / "restore.json")).stdout
        assert ("lazy" if lazy else "eager") + " restore of" in out
        if not lazy:  # saved paused, restored paused (post-copy runs it: that is its point)
            assert dst.monitor.status() == "paused"
            dst.monitor.execute("cont")
        dst.wait_markers(3)
        assert dst.serial.read_bytes().startswith(b"B")  # it did not boot again
        dst.stop()
        check_ran_on(reference, dst.ram(folder))
        assert dst.monitor.migration()["status"] == "completed"


@needs("lazy-restore", "diskmap")
def test_live_save_records_the_pages_written_and_restores_them_first(folder, disk):
    """A live save lets the guest run (markers continue during it); the pages QEMU sent again are
    the counted ones, kept as heat, and the lazy restore prefetches hottest first."""
    import json

    with QemuVM(folder, "live", disk) as src:
        src.wait_markers(3)
        ckpt = folder / "live.ckpt"
        ok(memvisor("qemu", "save", ckpt, "--qmp", src.qmp_path, "--disk", disk, "--live",
                    "--json", folder / "live.json"))
        figures = json.loads((folder / "live.json").read_text())
        assert src.monitor.status() == "running"
        before = src.markers()
        src.wait_markers(before + 3)  # it keeps running after the save
        assert figures["order"] is not None and figures["pages_resent"] > 0
        with QemuVM(folder, "live-dst", disk, incoming=True) as dst:
            ok(memvisor("qemu", "restore", ckpt, "--qmp", dst.qmp_path, "--disk", disk, "--lazy",
                        "--json", folder / "live-restore.json"))
            dst.wait_markers(3)
            restored = json.loads((folder / "live-restore.json").read_text())
            assert restored["job"]["prefetch_order"] == "hot (page_heat)"
            dst.stop()
            assert consistent(counters(dst.ram(folder), LAYOUT))
