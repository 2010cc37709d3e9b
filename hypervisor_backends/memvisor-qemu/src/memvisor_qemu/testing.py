"""Real QEMU guests for tests and benchmarks: start one, read its markers and memory, stop it.

:class:`QemuVM` runs ``qemu-system-x86_64`` with TCG (no KVM needed) on a disk image whose
boot sector is the guest of :mod:`memvisor_qemu.guest`, with a QMP socket and the serial port
in a file. Every VM is killed when its ``with`` block ends.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np

from memvisor_qemu.guest import MARKER_PASS, PAGE, GuestLayout, disk_image
from memvisor_qemu.qmp import SUPPORTED, Monitor
from memvisor_qemu.stream import QemuError

BINARY = "qemu-system-x86_64"


def unavailable_reason() -> str | None:
    """Why real QEMU 7.2 cannot run here (for tests that skip with the reason), or None."""
    path = shutil.which(BINARY)
    if path is None:
        return f"{BINARY} is not installed (apt-get install -y qemu-system-x86)"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    version = out.split("version", 1)[-1].split()[0] if "version" in out else "?"
    if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) != SUPPORTED:
        return f"{BINARY} is QEMU {version}; memvisor-qemu supports {SUPPORTED[0]}.{SUPPORTED[1]}"
    return None


def write_disk(path, layout: GuestLayout, data: bytes = b"", size: int | None = None) -> Path:
    """The guest's disk image at ``path``."""
    path = Path(path)
    path.write_bytes(disk_image(layout, data, size))
    return path


class QemuVM:
    """One QEMU process with the test guest.

    :param folder: where its QMP socket, serial log and error log go.
    :param name: a name for those files.
    :param disk: the disk image (opened with ``snapshot=on``: the image never changes).
    :param memory_mib: guest memory.
    :param machine: the machine type.
    :param incoming: start with ``-incoming defer`` (a restore or migration destination).
    :param paused: start with ``-S``.
    :param extra: more QEMU arguments (trace events).
    """

    def __init__(self, folder, name: str, disk, *, memory_mib: int = 32, machine: str = "pc",
                 incoming: bool = False, paused: bool = False, extra: list[str] = ()):
        folder = Path(folder)
        self.name = name
        self.qmp_path = folder / f"{name}.qmp"  # memvisor's
        self.test_qmp = folder / f"{name}.test.qmp"  # the test's own (QEMU serves one client per socket)
        self.serial = folder / f"{name}.serial"
        self.errors = folder / f"{name}.err"
        self.memory = memory_mib << 20
        self.trace: Path | None = None
        for p in (self.qmp_path, self.test_qmp, self.serial):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        args = [BINARY, "-machine", machine, "-accel", "tcg", "-m", str(memory_mib), "-nodefaults",
                "-no-user-config", "-vga", "none", "-display", "none", "-serial", f"file:{self.serial}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off", "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
                "-drive", f"file={disk},format=raw,if=ide,snapshot=on"]
        if incoming:
            args += ["-incoming", "defer"]
        if paused:
            args.append("-S")
        args += list(extra)
        with open(self.errors, "wb") as errors:  # QEMU keeps its own copy of the descriptor
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        atexit.register(self.kill)  # QEMU runs in its own session: never leave it behind
        self.monitor: Monitor | None = None
        limit = time.monotonic() + 30
        while not (self.qmp_path.exists() and self.test_qmp.exists()):
            if self.proc.poll() is not None or time.monotonic() > limit:
                self.kill()
                raise RuntimeError(f"QEMU did not start: {self.errors.read_text()}")
            time.sleep(0.02)
        while True:  # the socket file appears when QEMU binds it, a moment before it listens
            try:
                self.monitor = Monitor(self.test_qmp)
                break
            except QemuError:
                if self.proc.poll() is not None or time.monotonic() > limit:
                    self.kill()
                    raise
                time.sleep(0.02)

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        """Stop QEMU at once (SIGKILL), as a crash would."""
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def markers(self) -> int:
        """Passes the guest reported on its serial port so far."""
        try:
            return self.serial.read_bytes().count(MARKER_PASS)
        except FileNotFoundError:
            return 0

    def wait_markers(self, count: int, timeout: float = 60.0) -> float:
        """Wait until the guest has reported ``count`` passes; returns the seconds waited."""
        started = time.monotonic()
        while self.markers() < count:
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{self.name}: {self.markers()} markers after {timeout:.0f} s, waited for {count}")
            if not self.alive:
                raise RuntimeError(f"{self.name}: QEMU exited: {self.errors.read_text()}")
            time.sleep(0.005)
        return time.monotonic() - started

    def ram(self, folder) -> np.ndarray:
        """The guest's memory below its size as ``(pages, 4096)`` uint8, read by QEMU
        (``pmemsave``: through the address space, so the legacy window 640 KiB - 1 MiB shows
        what the CPU sees there)."""
        out = Path(folder) / f"{self.name}-{time.monotonic_ns()}.ram"
        self.monitor.execute("pmemsave", val=0, size=self.memory, filename=str(out))
        data = np.fromfile(out, dtype=np.uint8).reshape(-1, PAGE)
        out.unlink()
        return data

    def stop(self) -> None:
        self.monitor.execute("stop")


def counters(ram: np.ndarray, layout: GuestLayout) -> np.ndarray:
    """The first byte of every page the guest counts in."""
    return ram[np.asarray(layout.pages), 0]


def consistent(values: np.ndarray) -> bool:
    """Whether counters are within one pass of each other: the pages before the loop's position
    were incremented once more than the pages after it (modulo 256)."""
    diff = (values[:-1].astype(np.int16) - values[1:].astype(np.int16)) % 256
    return bool(np.all(diff <= 1) and np.count_nonzero(diff) <= 1)


def missing_plugins(*names: str) -> str | None:
    """Why a test of memvisor-qemu together with other plugins cannot run (they are not
    installed: the tox env ``qemu`` tests memvisor-qemu alone beside the core), or None."""
    from memvisor.plugins import installed_plugins

    have = {p.name for p in installed_plugins() if p.error is None}
    missing = [n for n in names if n not in have]
    return f"needs memvisor-{', memvisor-'.join(missing)} (installed in the all env)" if missing else None


def needs(*names: str):
    """A pytest mark: skip, with the reason, where plugins ``names`` are not installed."""
    import pytest

    reason = missing_plugins(*names)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def one_line_error(returncode: int, stderr: str, *words: str) -> str:
    """Check a refused command: exit status 2 and one line on standard error naming ``words``;
    returns the line."""
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memvisor: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
