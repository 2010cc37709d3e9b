"""Failures: a guest that dies is noticed and cleaned up; a memvisor that dies takes its guests
with it (PR_SET_PDEATHSIG), whether they wait on a fault or on the next batch. Nothing is left
behind: processes, descriptors and memfd mappings are checked in /proc."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memvisor import hookimpl
from memvisor.errors import BackendError
from memvisor.testing import small_host
from memvisor_backend_linux.backend import unavailable_reason
from memvisor_backend_linux.testing import Snapshot, process_gone

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def clean():
    """Fails the test if it leaves a child process, descriptor or memfd mapping behind."""
    before = Snapshot()
    closers = []
    yield closers.append
    for close in closers:
        close()
    assert not before.leaks()


def test_guest_killed_between_batches_is_noticed(clean):
    """A guest killed while idle: the next batch raises one BackendError naming the VM and the
    signal, the guest is reaped and its descriptors closed; destroying the VM still works."""
    host = small_host(backend="linux")
    clean(host.backend.close)
    vm = host.create_vm("victim", 64)
    pid = host.backend.guest_pid(vm)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(BackendError, match=r"'victim'.*died.*signal 9"):
        host.access(vm, np.arange(8), np.zeros(8, bool))
    assert process_gone(pid)
    with pytest.raises(BackendError, match="died"):
        host.backend.present(vm)
    host.destroy_vm(vm)


class KillOnFault:
    """A fault hook during which the guest dies (as if it crashed while memvisor served it)."""

    @hookimpl(tryfirst=True)
    def memvisor_page_fault(self, host, vm, fault):
        os.kill(host.backend.guest_pid(vm), signal.SIGKILL)
        process_gone(host.backend.guest_pid(vm))


def test_guest_killed_while_its_fault_is_served(clean):
    """A guest that dies during a fault hook: the batch raises BackendError, nothing hangs."""
    host = small_host(backend="linux", extra_plugins=[KillOnFault()])
    clean(host.backend.close)
    vm = host.create_vm("victim", 64)
    host.backend.unmap(vm, np.arange(64))
    with pytest.raises(BackendError, match="'victim'"):
        host.access(vm, np.arange(8), np.zeros(8, bool))
    host.destroy_vm(vm)


MEMVISOR = textwrap.dedent("""
    import sys, time, numpy as np
    from memvisor.testing import small_host
    from memvisor_backend_linux import protocol
    host = small_host(backend="linux")
    blocked = host.create_vm("blocked", 64)
    idle = host.create_vm("idle", 64)
    b = host.backend
    b.unmap(blocked, np.arange(64))
    g = b._guest(blocked)
    # A batch nobody will serve: the guest stops on its first fault and waits for memvisor.
    protocol.send(g.sock, protocol.ACCESS, 1, 1, np.array([5], np.int64), np.array([0], np.uint8))
    print("PIDS", b.guest_pid(blocked), b.guest_pid(idle), flush=True)
    if sys.argv[1] == "exit":
        sys.exit(0)  # normal exit without close(): the backend's finalizer stops the guests
    time.sleep(60)
""")


@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_guests_die_with_memvisor(clean, how):
    """When memvisor's process dies (SIGKILL) or exits without closing the backend, its guests
    die too: the one stopped on a fault does not hang, the idle one does not linger."""
    proc = subprocess.Popen([sys.executable, "-c", MEMVISOR, how], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("PIDS"):  # skip log lines
            line = proc.stdout.readline()
        assert line, "the memvisor process did not start its guests"
        pids = [int(p) for p in line.split()[1:]]
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in pids:
            assert process_gone(pid, timeout=10), f"guest {pid} outlived memvisor"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


class FailingPlugin:
    """A fault hook with a bug."""

    @hookimpl(tryfirst=True)
    def memvisor_page_fault(self, host, vm, fault):
        raise RuntimeError("plugin bug")


def test_a_hook_that_raises_stops_the_guest_instead_of_hanging(clean):
    """A hook that raises while the guest waits on its fault: the error reaches the caller and
    the guest is stopped (nobody would ever wake it), never left hanging or fed a zero page."""
    host = small_host(backend="linux", extra_plugins=[FailingPlugin()])
    clean(host.backend.close)
    vm = host.create_vm("buggy", 64)
    pid = host.backend.guest_pid(vm)
    host.backend.unmap(vm, np.arange(64))
    with pytest.raises(RuntimeError, match="plugin bug"):
        host.access(vm, np.arange(8), np.zeros(8, bool))
    assert process_gone(pid)
    with pytest.raises(BackendError, match="'buggy'.*died"):
        host.access(vm, np.arange(8), np.zeros(8, bool))
    host.destroy_vm(vm)


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def test_memvisor_run_with_a_killed_guest_says_which_vm_died_and_writes_the_report(tmp_path):
    """`memvisor run` whose guest process is killed: one line naming the VM and the signal,
    exit status 2, and the report of what ran (report.json and report.html)."""
    import json
    import time

    scenario = tmp_path / "s.toml"
    scenario.write_text(textwrap.dedent("""\
        [host]
        backend = "linux"
        memory = "64MiB"
        [[vm]]
        name = "web"
        memory = "16MiB"
        workload = { kind = "uniform", write_fraction = 0.3 }
        [[timeline]]
        do = "run"
        for = "60s"
    """))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "memvisor", "run", str(scenario), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        guests = []
        while not guests and time.monotonic() < deadline:
            time.sleep(0.2)
            guests = _children(proc.pid)
        assert guests, "the guest process never started"
        time.sleep(1.0)  # let it run a few batches
        os.kill(guests[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "VM 'web': its guest process died (killed by signal 9)" in lines[0], stderr
    report = json.loads((out / "report.json").read_text())
    (died,) = [e for e in report["core"]["events"] if e["kind"] == "guest_died"]
    assert "'web'" in died["error"] and "web" in report["vms"] and (out / "report.html").is_file()
