"""Techniques (other plugins) on the Linux backend, on real memory and real traps: ballooning
on zero pages (holes in the memfd, write trapped), miss-rate curves from real minor faults,
and the one-line refusals of what the backend cannot do (large pages, NUMA, sharing)."""

import numpy as np
import pytest

from memvisor import PAGE_SIZE
from memvisor.backend import Capability
from memvisor.errors import BackendError, CapabilityError
from memvisor.testing import ReferenceMemory, small_host
from memvisor.workloads import make_workload
from memvisor_backend_linux.backend import machine_numa_nodes, unavailable_reason
from memvisor_backend_linux.testing import Snapshot

REASON = unavailable_reason()


@pytest.fixture
def make_host():
    """Small hosts on the Linux backend (skipped with the reason where it cannot run); every
    guest is stopped at the end and nothing may be left behind."""
    before = Snapshot()
    hosts = []

    def make(**kwargs):
        if REASON:
            pytest.skip(REASON)
        host = small_host(backend="linux", **kwargs)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        host.backend.close()
    assert not before.leaks()


def needs(host, *capabilities):
    missing = [c for c in capabilities if c not in host.backend.capabilities]
    if missing:
        pytest.skip(f"backend 'linux' lacks {', '.join(missing)} on this kernel")


def plugin_named(host, name):
    (plugin,) = [p for n, p in host.pm.list_name_plugin() if n == name]
    return plugin


# -- zero pages and the balloon -----------------------------------------------------------------


def test_zero_page_is_a_hole_whose_read_maps_zeros_and_whose_first_write_traps(make_host):
    """share(discard=True) onto the zero page frees the memfd's pages at once; a guest read
    returns zeros (a zero-filled page mapped write-protected: shmem has no shared zero page); the
    first write, read first or not, is a write to a shared page; the write then lands."""
    from memvisor import hookimpl

    class Writes:
        def __init__(self):
            self.batches = []

        @hookimpl
        def memvisor_write_trap(self, host, vm, write):
            self.batches.append((write.gpps.copy(), write.mpns.copy(), write.shared.copy()))

    writes = Writes()
    host = make_host(memory_pages=1024, extra_plugins=[writes], backend_options={"zero_share": True})
    needs(host, Capability.ZERO_PAGE, Capability.SHARE)
    backend = host.backend
    vm = host.create_vm("a", 256)
    backend.write(vm, np.arange(256), np.full((256, PAGE_SIZE), 7, np.uint8))
    assert backend.memfd_pages(vm) == 256
    free = backend.free_pages()
    pages = np.arange(16, 48)
    assert backend.share(vm, pages, np.full(32, backend.zero_mpn), discard=True) == 32
    assert backend.memfd_pages(vm) == 224 and backend.free_pages() == free + 32
    assert np.all(backend.mpns(vm, pages) == backend.zero_mpn)
    assert backend.refcounts(np.array([backend.zero_mpn]))[0] == 32
    assert not backend.read(vm, pages).any() and backend.memfd_pages(vm) == 224  # memvisor's read: no fill
    assert not backend.guest_read(vm, pages[:8]).any()  # the guest's: zeros
    assert backend.stats["zero_reads"] == 8 and not writes.batches
    host.access(vm, np.array([16, 40]), np.array([True, True]))  # 16 was read (WP fault), 40 a hole
    # A real guest stops on one fault at a time: one write event per page here.
    gpps, mpns, shared = (np.concatenate(parts) for parts in zip(*writes.batches))
    assert sorted(gpps.tolist()) == [16, 40] and shared.all() and np.all(mpns == backend.zero_mpn)
    got = backend.guest_read(vm, np.array([16, 40, 41]))
    stamp = np.frombuffer(np.uint64(vm.write_epoch).tobytes(), np.uint8)
    assert np.array_equal(got[0, :8], stamp) and np.array_equal(got[1, :8], stamp) and not got[2].any()
    assert backend.mpns(vm, np.array([16, 40, 41]))[:2].min() > 0  # private again
    # Sharing anything but zeros onto the zero page without discard is refused, changing nothing.
    with pytest.raises(BackendError, match="not zeros"):
        backend.share(vm, np.array([100]), np.array([backend.zero_mpn]))
    assert backend.share(vm, np.array([45]), np.array([backend.zero_mpn])) == 0  # a hole already
    blocks = backend.memfd_pages(vm)
    assert backend.share(vm, np.array([41]), np.array([backend.zero_mpn])) == 1  # the page its read mapped
    assert backend.memfd_pages(vm) == blocks - 1
    # Two memfd pages onto one page: a one-line refusal.
    with pytest.raises(CapabilityError) as info:
        backend.share(vm, np.array([100]), backend.mpns(vm, np.array([101])))
    assert "'linux'" in str(info.value) and "\n" not in str(info.value) and "KSM" in str(info.value)


def test_zero_filling_a_hole_on_shmem_allocates_a_page(make_host):
    """Why a zero page is a hole here: on shmem, UFFDIO_ZEROPAGE (the core's zero fill of a
    fault) allocates a zero-filled page; it never maps the kernel's zero page."""
    host = make_host(memory_pages=1024)
    backend = host.backend
    vm = host.create_vm("a", 256)
    backend.unmap(vm, np.arange(256))
    assert backend.memfd_pages(vm) == 0
    host.access(vm, np.arange(64), np.zeros(64, bool))  # read faults, zero-filled by the core
    assert backend.memfd_pages(vm) == 64


@pytest.mark.parametrize("reset", ["lazy", "eager"])
def test_balloon_runs_on_real_memory(make_host, reset):
    """The balloon plugin on the Linux backend: inflating frees the memfd's pages (st_blocks),
    the guest reads zeros from balloon pages, a guest write to a balloon page after a driver
    reset is detected and resets the balloon, and no guest write is ever lost."""
    pytest.importorskip("memvisor_balloon", reason="memvisor-balloon is not installed beside the backend")
    vm_pages = 1024
    host = make_host(memory_pages=4096, plugins=["balloon"],
                     backend_options={"accessed": True, "zero_share": True},
                     settings={"balloon": {"reload_delay": 0.0, "sample_interval": 0.01, "reset": reset}})
    needs(host, Capability.ZERO_PAGE, Capability.SHARE, Capability.ACCESSED)
    backend = host.backend
    plugin = plugin_named(host, "balloon")
    vm = host.create_vm("a", vm_pages)
    rng = np.random.default_rng(1)
    backend.write(vm, np.arange(vm_pages), rng.integers(1, 256, (vm_pages, PAGE_SIZE), dtype=np.uint8))
    ref = ReferenceMemory()
    ref.follow(host, vm)
    workload = make_workload({"kind": "zipf", "alpha": 0.8, "write_fraction": 0.3}, vm_pages, 5)

    def run(batches):
        for _ in range(batches):
            gpps, writes = workload.next_batch(256)
            ref.access(host, vm, gpps, writes)
            host.advance(host.tick_interval)

    run(3)
    allocated, free = backend.memfd_pages(vm), backend.free_pages()
    assert allocated == vm_pages
    freed = plugin.inflate(vm, 400)
    balloon = plugin.balloon_pages(vm)
    ref.expected["a"][balloon] = 0  # the guest gave them up: they read zeros from now on
    assert len(balloon) == 400 and freed == 400
    assert backend.memfd_pages(vm) == vm_pages - 400  # really freed: holes in the memfd
    assert backend.free_pages() == free + 400
    st = plugin.state(vm)
    assert np.all(backend.mpns(vm, balloon) == st.mpn) and backend.refcounts(np.array([st.mpn]))[0] == 401
    assert not backend.guest_read(vm, balloon[:50]).any()  # zeros, and each read maps one page
    assert plugin.verify() == 0
    run(5)  # the guest works around its balloon (pinned pages are not touched)
    assert plugin.resets == 0 and plugin.state(vm).size == 400
    assert backend.memfd_pages(vm) <= vm_pages - 400 + 50

    # The guest reboots: its driver forgets the balloon, and the guest writes two of its pages,
    # one it had read and one still a hole (the batch's load maps it first; each store is then a
    # write-protect fault). Whole-page writes below are pure stores: missing write faults on holes.
    plugin.reset_driver(vm)
    ref.access(host, vm, np.array([balloon[0], balloon[300]]), np.array([True, True]))
    assert plugin.resets == 1 and plugin.state(vm).size == 0 and st.mpn == -1
    assert backend.stats["zero_writes"] >= 1
    ref.guest_write(host, vm, balloon[301:303], np.full((2, PAGE_SIZE), 9, np.uint8))
    assert plugin.resets == 1  # a write to a former balloon page is not the balloon's
    ref.check(host)  # every write landed; the former balloon pages the guest did not write read zeros
    assert plugin.guest_visible_errors == 0
    # The driver reloads at once here: at the next tick the balloon inflates to its target again,
    # onto a new balloon page, freeing memory again.
    before = backend.memfd_pages(vm)
    run(2)
    assert plugin.state(vm).size == 400 and plugin.state(vm).mpn >= 0
    assert backend.memfd_pages(vm) <= before - 390
    ref.expected["a"][plugin.balloon_pages(vm)] = 0
    assert plugin.verify() == 0
    ref.check(host)


# -- miss-rate curves from real traps -----------------------------------------------------------


def test_mrc_builds_a_curve_from_real_minor_fault_traps(make_host):
    """memvisor-mrc traces a spatial sample of pages; on this backend each trap is a real minor
    fault that the compiled loop resolves (UFFDIO_CONTINUE) and logs; the plugin retraces on
    ticks and builds a curve."""
    pytest.importorskip("memvisor_mrc", reason="memvisor-mrc is not installed beside the backend")
    vm_pages = 2048
    host = make_host(memory_pages=4096, plugins=["mrc"], settings={"mrc": {"rate": 0.25, "refresh": 0.02}})
    needs(host, Capability.TRACE)
    backend = host.backend
    vm = host.create_vm("a", vm_pages)
    plugin = plugin_named(host, "mrc")
    sample = plugin.vms["a"].tracker.sample()
    assert 0 < len(sample) < vm_pages and backend.traced(vm)[sample].all()
    ref = ReferenceMemory()
    ref.follow(host, vm)
    workload = make_workload({"kind": "zipf", "alpha": 0.9, "write_fraction": 0.2}, vm_pages, 3)
    traced = 0
    for _ in range(40):
        gpps, writes = workload.next_batch(1024)
        traced += ref.access(host, vm, gpps, writes).traced
        host.advance(host.tick_interval)
    state = plugin.vms["a"]
    assert traced > 0 and state.tracker.traps == traced
    assert backend.stats["served_minor"] >= traced  # real minor faults, served by the compiled loop
    assert traced > len(sample)  # pages were retraced on ticks and trapped again
    assert state.curve is not None and len(state.snapshots) > 0
    ref.check(host)


# -- large pages ---------------------------------------------------------------------------------


def test_large_pages_are_shmem_thps_mapped_2mib_by_the_guest(make_host):
    """A large-page VM: its memfd is collapsed into shmem THPs (MADV_COLLAPSE) and its guest,
    whose mapping is 2 MiB-aligned and registers no minor faults, maps each with one PMD
    (ShmemPmdMapped in its /proc/PID/smaps). Split copies a block back into 4 KiB pages; a hole
    punched into a large page splits it; collapse makes it large again; contents never change."""
    from memvisor_backend_linux.backend import shmem_thp_mode

    host = make_host(memory_pages=8192)
    if Capability.LARGE_PAGES not in host.backend.capabilities:
        pytest.skip(f"no shmem THP here (shmem_enabled: {shmem_thp_mode()})")
    backend = host.backend
    vm = host.create_vm("big", 2048, large_pages=True)  # 8 MiB: 4 large pages
    backend.write(vm, np.arange(2048), np.random.default_rng(2).integers(0, 256, (2048, PAGE_SIZE), dtype=np.uint8))
    ref = ReferenceMemory()
    ref.follow(host, vm)
    assert backend.large(vm).all()
    every = np.arange(0, 2048, 16)

    def pmd_kb():
        ref.access(host, vm, every, np.zeros(len(every), bool))  # touch: map what can be mapped
        return backend.guest_smaps(vm).get("ShmemPmdMapped", 0)

    assert pmd_kb() == 8192
    assert backend.split(vm, np.array([1])) == 1 and not backend.large(vm, np.arange(512, 1024)).any()
    assert pmd_kb() == 6144
    ref.check(host)
    assert backend.collapse(vm, np.array([1])) == 1 and backend.large(vm).all()
    assert pmd_kb() == 8192
    backend.unmap(vm, np.array([5]))  # a hole in large page 0 splits it
    assert not backend.large(vm, np.array([0]))[0] and backend.large(vm, np.array([600]))[0]
    ref.expected["big"][5] = 0  # served again by the core's zero fill
    ref.access(host, vm, np.arange(0, 2048, 7), np.arange(0, 2048, 7) % 3 == 0)
    ref.check(host)
    assert backend.collapse(vm, np.array([0])) == 1  # present again: collapsible
    with pytest.raises(CapabilityError, match="'linux'.*large-page VM"):
        backend.trace(vm, np.array([1]))
    if Capability.WRITE_PROTECT in backend.capabilities:  # protecting splits the PMD mapping, not the page
        pmd_kb()
        backend.protect(vm, np.array([600]))
        result = ref.access(host, vm, np.array([600, 601]), np.array([True, True]))
        assert result.write_traps == 1 and backend.large(vm, np.array([600]))[0]
        ref.check(host)


# -- what the backend refuses -------------------------------------------------------------------


def test_refusals_are_one_line(make_host):
    """Collapsing a VM made without large pages, more NUMA nodes than the machine has, sharing
    data pages and holding a page without the option zero_share are one-line CapabilityErrors
    naming the backend; the zero page needs no option."""
    host = make_host()
    backend = host.backend
    assert Capability.SHARE not in backend.capabilities
    vm = host.create_vm("a", 1024)
    calls = [lambda: backend.collapse(vm, np.array([0])),  # a 4 KiB VM (or no shmem THP at all)
             lambda: backend.share(vm, np.array([1]), np.array([2]), discard=True),
             lambda: backend.hold_page()]
    if machine_numa_nodes() == 1:
        calls.append(lambda: backend.migrate(vm, np.array([1]), 1))
    for call in calls:
        with pytest.raises(CapabilityError) as info:
            call()
        assert "'linux'" in str(info.value) and "\n" not in str(info.value)
    if Capability.ZERO_PAGE in backend.capabilities:
        assert backend.share(vm, np.array([1]), np.array([backend.zero_mpn]), discard=True) == 1
    if machine_numa_nodes() == 1:
        with pytest.raises(CapabilityError, match="'linux'.*one NUMA node"):
            make_host(numa_nodes=2)
        with pytest.raises(CapabilityError, match="machine has one NUMA node"):
            backend.migrate(vm, np.array([1]), 1)


def test_unprotect_keeps_a_zero_page_write_protected(make_host):
    """Write protection asked for and lifted on a zero-mapped page: its first write still traps
    as a write to a shared page, and lands."""
    from memvisor import hookimpl

    class Writes:
        shared = []

        @hookimpl
        def memvisor_write_trap(self, host, vm, write):
            self.shared.extend(write.gpps[write.shared].tolist())

    writes = Writes()
    host = make_host(memory_pages=1024, extra_plugins=[writes], backend_options={"zero_share": True})
    needs(host, Capability.ZERO_PAGE, Capability.SHARE)
    backend = host.backend
    vm = host.create_vm("a", 64)
    backend.share(vm, np.arange(8), np.zeros(8, np.int64), discard=True)
    backend.guest_read(vm, np.arange(4))  # 0-3 mapped (zero-filled, write-protected), 4-7 holes
    backend.protect(vm, np.arange(8))
    backend.unprotect(vm, np.arange(8))
    assert not backend.protected(vm, np.arange(8)).any()
    host.access(vm, np.array([1, 5]), np.array([True, True]))
    assert sorted(writes.shared) == [1, 5]
    got = backend.guest_read(vm, np.array([1, 5, 6]))
    assert got[0, :8].any() and got[1, :8].any() and not got[2].any()


# -- budgets ------------------------------------------------------------------------------------


def hog_beside_web_on_linux(make_host, budget):
    """1 s of the budgets fixture (memvisor.testing.hog: web and a hog writing all of its
    16 MiB under dirty logging) on real memory; returns the run's seconds and each VM's use."""
    from memvisor.runner import ScenarioRun
    from memvisor.testing.hog import DirtyLogging, hog_scenario

    make_host()  # skips with the reason where the backend cannot run
    scenario = hog_scenario(hog_budget=budget, seconds="1s", memory="16MiB").with_backend("linux")
    run = ScenarioRun(scenario, extra_plugins=[DirtyLogging()])
    try:
        report = run.run()
    finally:
        run.host.backend.close()
    vms = next(s for s in report.sections if s.title == "Budgets").metrics["vms"]
    assert report.data["vms"]["hog"]["write_traps"] == vms["hog"]["guest_traps"] > 0
    return report.data["time"]["clock_seconds"], vms


def test_trap_budget_holds_on_real_write_protection_faults(make_host):
    """A guest writing all of its memory under dirty logging (every page write-protected at
    every tick: real userfaultfd write-protect faults) keeps to its trap budget in real time:
    the backend tells from its page states which accesses would trap, the host cuts the
    guest's batches at its budget, and the guest waits in between."""
    seconds, vms = hog_beside_web_on_linux(make_host, {"trap_rate": 500})
    hog = vms["hog"]
    assert hog["guest_traps"] <= 500 * seconds + 5 + 1  # the rate, its slack, a trap past a cut
    # Cut at its budget and made to wait (guests run one at a time here, in real time, so the
    # time waited is what the other guest's batches did not already take).
    assert hog["throttled_batches"] > 10 and hog["waited_s"] > 0


def test_handler_share_holds_on_real_write_protection_faults(make_host):
    """The Linux backend reports the real time its hook path spent on a batch's traps; a 5%
    share of the handler holds a guest writing all of its memory under dirty logging to about
    5% of the run in its traps."""
    seconds, vms = hog_beside_web_on_linux(make_host, {"handler_share": 0.05})
    hog, web = vms["hog"], vms["web"]
    assert web["handler_s"] > 0  # measured, not modelled
    # the share, its 10 ms of slack, the 16 traps taken before a trap's cost is known
    assert hog["handler_s"] <= 0.05 * seconds + 0.0005 + 16 * 0.002
    assert hog["throttled_batches"] > 0
