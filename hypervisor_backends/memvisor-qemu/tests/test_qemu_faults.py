"""Faults and bad input around real QEMU: one line, exit status 2, no hang, QEMU untouched
where it should be. Tests skip, with the reason, where QEMU 7.2 is not installed."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import numpy as np
import pytest

from memvisor.builtins.checkpoint import CheckpointReader, CheckpointWriter
from memvisor_qemu.guest import GuestLayout
from memvisor_qemu.state import TAG, QemuState
from memvisor_qemu.testing import QemuVM, needs, one_line_error, unavailable_reason, write_disk

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

SMALL = GuestLayout(loop_start=1 << 20, loop_end=4 << 20)
BIG = GuestLayout(loop_start=1 << 20, loop_end=4 << 20, fill_start=8 << 20, fill_end=72 << 20)
"""64 MiB that do not compress: a lazy restore long enough to kill QEMU in the middle of it."""


def memvisor(*args, timeout: float = 120) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "memvisor", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def refused(result, *words: str) -> str:
    code, _, err = result
    return one_line_error(code, err, *words)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def small(folder):
    """A small guest's disk and a checkpoint of it."""
    disk = write_disk(folder / "small.img", SMALL)
    with QemuVM(folder, "small-src", disk) as src:
        src.wait_markers(2)
        code, _, err = finish(memvisor("qemu", "save", folder / "small.ckpt", "--qmp", src.qmp_path))
        assert code == 0, err
    return disk, folder / "small.ckpt"


@needs("lazy-restore")
def test_qemu_killed_during_a_lazy_restore_is_one_line(folder):
    """QEMU killed while memvisor serves its pages: memvisor says so in one line, and does not hang."""
    disk = write_disk(folder / "big.img", BIG)
    with QemuVM(folder, "big-src", disk, memory_mib=96) as src:
        src.wait_markers(2, timeout=120)
        code, _, err = finish(memvisor("qemu", "save", folder / "big.ckpt", "--qmp", src.qmp_path))
        assert code == 0, err
    with QemuVM(folder, "big-dst", disk, memory_mib=96, incoming=True) as dst:
        proc = memvisor("qemu", "restore", folder / "big.ckpt", "--qmp", dst.qmp_path, "--lazy")
        dst.wait_markers(1)  # the guest runs on its restored state: the restore is under way
        dst.kill()
        started = time.monotonic()
        line = refused(finish(proc, timeout=60), "QEMU")
        assert time.monotonic() - started < 30
        assert "connection" in line or "closed" in line


def test_another_machine_type_is_refused_before_qemu_sees_a_byte(folder, small):
    """A checkpoint of machine pc restored into a q35 QEMU: one line naming both, QEMU still waiting."""
    disk, ckpt = small
    with QemuVM(folder, "q35", disk, machine="q35", incoming=True) as dst:
        refused(finish(memvisor("qemu", "restore", ckpt, "--qmp", dst.qmp_path)),
                "machine type pc-i440fx-7.2", "pc-q35-7.2")
        assert dst.monitor.status() == "inmigrate" and dst.monitor.migration() == {}


def _rewrite(src, dst, **change) -> None:
    """A copy of checkpoint ``src`` with its qemu section changed."""
    with CheckpointReader(src) as r:
        state = QemuState.decode(r.section(TAG), src)
        fields = {k: getattr(state, k) for k in ("qemu", "machine", "ram", "blocks", "header", "devices",
                                                 "description", "running")}
        with CheckpointWriter(dst, r.vm_pages) as w:
            for _, gpps, data in r.iter_page_blocks():
                w.add_pages(gpps, data)
            ranges = r.zero_ranges()
            w.add_zero_pages(np.concatenate([np.arange(s, s + c, dtype=np.int64) for s, c in ranges]))
            w.add_section(TAG, QemuState(**{**fields, **change}).encode())


def test_another_qemu_version_is_refused(folder, small):
    """A checkpoint saved by another QEMU version: one line, exit 2, QEMU untouched."""
    disk, ckpt = small
    _rewrite(ckpt, folder / "v8.ckpt", qemu="8.2.0")
    with QemuVM(folder, "v8", disk, incoming=True) as dst:
        refused(finish(memvisor("qemu", "restore", folder / "v8.ckpt", "--qmp", dst.qmp_path)), "QEMU 8.2.0")
        assert dst.monitor.status() == "inmigrate"


@pytest.mark.parametrize("keyed", [False, True], ids=["checksum", "mac"])
def test_corrupted_device_state_is_refused_by_its_checksum(folder, small, keyed):
    """One flipped byte in the device state: refused by the metadata checksum (or the MAC) before QEMU
    sees any of the stream."""
    disk, ckpt = small
    if keyed:
        key = folder / "vm.key"
        key.write_bytes(b"0123456789abcdef0123456789abcdef")
        with QemuVM(folder, "keyed-src", disk) as src:
            src.wait_markers(1)
            code, _, err = finish(memvisor("qemu", "save", folder / "keyed.ckpt", "--qmp", src.qmp_path,
                                           "--key-file", key))
            assert code == 0, err
        ckpt = folder / "keyed.ckpt"
    with CheckpointReader(ckpt) as r:
        devices = QemuState.decode(r.section(TAG), ckpt).devices
    raw = bytearray(ckpt.read_bytes())
    at = raw.index(devices[len(devices) // 2 : len(devices) // 2 + 32]) + 5
    raw[at] ^= 0x40
    bad = folder / f"bad-{keyed}.ckpt"
    bad.write_bytes(raw)
    with QemuVM(folder, f"bad-{keyed}", disk, incoming=True) as dst:
        args = ["--key-file", folder / "vm.key"] if keyed else []
        refused(finish(memvisor("qemu", "restore", bad, "--qmp", dst.qmp_path, *args)),
                "metadata checksum mismatch")
        assert dst.monitor.status() == "inmigrate" and dst.monitor.migration() == {}


def test_bad_input_is_one_line(folder, small):
    """Every command's bad input: one line naming it, exit status 2."""
    disk, ckpt = small
    identity = folder / "identity.ckpt"  # an identity-model emulator's checkpoint: no bytes to give QEMU
    with CheckpointWriter(identity, 8192, contents="identity") as writer:
        writer.add_zero_pages(np.arange(8192))
    with QemuVM(folder, "running", disk) as vm, QemuVM(folder, "waiting", disk, incoming=True) as dst, \
            QemuVM(folder, "bigger", disk, memory_mib=64, incoming=True) as bigger:
        vm.wait_markers(1)
        cases = [
            (("qemu", "restore", folder / "none.ckpt", "--qmp", dst.qmp_path), "no such checkpoint"),
            (("qemu", "restore", ckpt, "--qmp", folder / "none.qmp"), "no such QMP socket"),
            (("qemu", "restore", ckpt, "--qmp", vm.qmp_path), "-incoming defer"),
            (("qemu", "restore", disk, "--qmp", dst.qmp_path), "not a checkpoint"),
            (("qemu", "restore", identity, "--qmp", dst.qmp_path), "content identity"),
            (("qemu", "restore", ckpt, "--qmp", bigger.qmp_path), "RAM block 'pc.ram'"),
            (("qemu", "migrate", "--from", vm.qmp_path, "--to", bigger.qmp_path), "RAM block 'pc.ram'"),
            (("qemu", "migrate", "--from", dst.qmp_path, "--to", bigger.qmp_path), "inmigrate"),
            (("qemu", "restore", ckpt, "--qmp", dst.qmp_path, "--disk", folder / "none.img"), "no such disk"),
            (("qemu", "save", folder / "x.ckpt", "--qmp", dst.qmp_path), "inmigrate"),
            (("qemu", "save", folder, "--qmp", vm.qmp_path), "a directory"),
            (("qemu", "save", folder / "x.ckpt", "--qmp", vm.qmp_path, "--key-file", folder / "none.key"), "key"),
        ]
        running = [(memvisor(*args), word) for args, word in cases]  # at once: each starts a Python
        for proc, word in running:
            refused(finish(proc), word)
        assert vm.monitor.status() == "running" and dst.monitor.status() == "inmigrate"
        assert bigger.monitor.status() == "inmigrate"


@pytest.mark.parametrize("command", ["save", "migrate"])
def test_sigterm_in_the_middle_leaves_nothing_and_the_vm_running(folder, tmp_path, command):
    """memvisor stopped by SIGTERM while QEMU streams to it (a save, a migration): it exits with
    status 143, leaves no temporary (its socket folder, a partial checkpoint) and the source VM
    runs on, its migration failed."""
    import os
    import signal

    temp = tmp_path / "tmp"
    temp.mkdir()
    disk = write_disk(folder / "term.img", BIG)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(QemuVM(folder, f"term-{command}", disk, memory_mib=96))
        src.wait_markers(2, timeout=120)
        src.monitor.execute("migrate-set-parameters", **{"max-bandwidth": 8 << 20})  # about 10 s for 96 MiB
        if command == "save":
            args = ("qemu", "save", tmp_path / "x.ckpt", "--qmp", src.qmp_path)
        else:
            dst = stack.enter_context(QemuVM(folder, "term-dst", disk, memory_mib=96, incoming=True))
            args = ("qemu", "migrate", "--from", src.qmp_path, "--to", dst.qmp_path)
        proc = subprocess.Popen([sys.executable, "-m", "memvisor", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(temp)})
        limit = time.monotonic() + 60
        while src.monitor.migration().get("status") != "active" and time.monotonic() < limit:
            time.sleep(0.01)
        time.sleep(1.0)
        assert list(temp.iterdir())  # the socket folder, while it runs
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=60)
        assert code == 128 + signal.SIGTERM, err
        assert list(temp.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
        limit = time.monotonic() + 30
        while src.monitor.migration().get("status") not in ("failed", "cancelled") and time.monotonic() < limit:
            time.sleep(0.05)
        assert src.monitor.migration()["status"] == "failed"
        limit = time.monotonic() + 30
        while src.monitor.status() != "running" and time.monotonic() < limit:
            time.sleep(0.05)
        assert src.monitor.status() == "running"
        src.wait_markers(src.markers() + 2)
