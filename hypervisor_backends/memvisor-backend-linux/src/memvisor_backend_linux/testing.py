"""Test helpers: what this process holds that a guest could leak (child processes, descriptors,
memfds), read from /proc."""

from __future__ import annotations

import os
import time


def child_pids() -> set[int]:
    """Live (not zombie) processes whose parent is this process."""
    me, out = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.add(int(entry))
    return out


def open_fds() -> dict[int, str]:
    """This process's descriptors and what each refers to."""
    out = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            out[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:  # the descriptor listdir itself used
            continue
    return out


def memfd_mappings() -> list[str]:
    """Mappings of memvisor memfds in this process."""
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if "memfd:memvisor-" in line]


def process_gone(pid: int, timeout: float = 5.0) -> bool:
    """Whether ``pid`` is dead (gone or a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


class Snapshot:
    """Children, descriptors and memfd mappings at one moment; :meth:`leaks` compares."""

    def __init__(self) -> None:
        self.children = child_pids()
        self.fds = open_fds()
        self.memfds = memfd_mappings()

    def leaks(self) -> list[str]:
        """What exists now and did not at the snapshot."""
        now = Snapshot()
        out = [f"child process {pid}" for pid in sorted(now.children - self.children)]
        out += [f"fd {fd} -> {target}" for fd, target in sorted(now.fds.items())
                if self.fds.get(fd) != target and ("memfd:" in target or "userfaultfd" in target
                                                    or "socket:" in target)]
        out += [f"mapping {m}" for m in now.memfds if m not in self.memfds]
        return out
