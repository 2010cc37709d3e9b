"""The balloon's memory-pressure policy: the idle-memory tax, MRC guidance through
memvisor_giveable_pages, and its place among reclaimers."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor import hookimpl
from memvisor.events import MemoryPressure
from memvisor.testing import small_host
from memvisor_balloon import BalloonPlugin
from memvisor_balloon.policy import idle_tax_reclaim, mrc_reclaim

vm_count = st.integers(1, 5)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=vm_count, tax=st.floats(0.0, 0.95))
def test_idle_tax_covers_the_deficit_within_each_vms_room(data, n, tax):
    """The split sums to the deficit (or all the room there is) and no VM goes below its floor."""
    shares = np.array(data.draw(st.lists(st.floats(1, 1e6), min_size=n, max_size=n)))
    allocated = np.array(data.draw(st.lists(st.integers(1, 100_000), min_size=n, max_size=n)), dtype=float)
    active = np.array(data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    floor = np.floor(allocated * data.draw(st.floats(0.0, 1.0)))
    deficit = data.draw(st.integers(0, 200_000))
    pages = idle_tax_reclaim(shares, allocated, active, floor, tax, deficit)
    room = (allocated - floor).astype(np.int64)
    assert np.all(pages >= 0) and np.all(pages <= room)
    assert pages.sum() == min(deficit, room.sum())


def test_idle_tax_takes_more_from_the_idle_vm():
    """Two VMs with equal shares and memory: the idle one gives more, and with no tax the split
    follows shares alone (equal)."""
    args = (np.array([1000.0, 1000.0]), np.array([1000.0, 1000.0]), np.array([0.9, 0.1]), np.zeros(2))
    taxed = idle_tax_reclaim(*args, tax_rate=0.75, deficit=500)
    assert taxed[1] > taxed[0] and taxed.sum() == 500
    untaxed = idle_tax_reclaim(*args, tax_rate=0.0, deficit=500)
    assert untaxed.tolist() == [250, 250]


def test_idle_tax_takes_from_the_vm_with_fewest_shares_per_page():
    """ESX's rule: the VM that pays least per page (fewer shares) gives first."""
    pages = idle_tax_reclaim(np.array([3000.0, 1000.0]), np.array([1000.0, 1000.0]), np.array([0.5, 0.5]),
                             np.zeros(2), 0.75, 300)
    assert pages.tolist() == [0, 300]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=vm_count)
def test_mrc_reclaim_takes_the_deficit_at_the_lowest_increase(data, n):
    """The split covers the deficit within caps; nothing is taken from a VM beyond what it can
    give at the chosen miss-ratio increase."""
    sizes = np.array(data.draw(st.lists(st.integers(10, 10_000), min_size=n, max_size=n)))
    slopes = np.array(data.draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n)))
    cap = (sizes * 0.65).astype(np.int64)
    ballooned = np.minimum(cap, np.array(data.draw(st.lists(st.integers(0, 5000), min_size=n, max_size=n))))

    def giveable(x):
        return np.minimum(sizes, (sizes * np.minimum(1.0, x / slopes)).astype(np.int64))

    deficit = data.draw(st.integers(0, 20_000))
    more, x = mrc_reclaim(giveable, ballooned, cap, deficit)
    room = np.maximum(0, np.minimum(giveable(1.0), cap) - ballooned)
    assert np.all(more >= 0) and np.all(more <= room)
    assert more.sum() == min(deficit, room.sum())
    assert np.all(ballooned + more <= np.maximum(np.minimum(giveable(x), cap), ballooned))


class FakeMRC:
    """Answers memvisor_giveable_pages as a miss-rate-curve plugin would: VM "flat" can give
    anything for no extra misses, VM "steep" nothing below a 0.5 miss-ratio increase."""

    def __init__(self):
        self.asked = []

    @hookimpl
    def memvisor_giveable_pages(self, vm, miss_ratio_increase):
        self.asked.append((vm.name, miss_ratio_increase))
        if vm.name == "flat":
            return vm.pages
        return vm.pages if miss_ratio_increase >= 0.5 else 0


def pressure_on(host, free_target):
    """Fire memory pressure as the core does, towards ``free_target`` free pages."""
    return host.check_pressure(target_free_pages=free_target)


def test_hook_memvisor_giveable_pages():
    """With a plugin answering memvisor_giveable_pages, the balloon takes memory where the miss
    ratio rises least: all of it from the VM whose curve is flat, even though the idle tax
    would have split it."""
    mrc = FakeMRC()
    plugin = BalloonPlugin()
    host = small_host(memory_pages=4096, extra_plugins=[plugin, mrc])
    flat, steep = host.create_vm("flat", 1024), host.create_vm("steep", 1024)
    target = host.backend.free_pages() + 400
    pressure_on(host, target)
    assert host.backend.free_pages() >= target
    assert plugin.state(flat).size >= 400 and plugin.state(steep).size == 0
    assert plugin.policy_used == {"mrc": 1} and plugin.mrc_increase == [0.0]
    assert {name for name, _ in mrc.asked} == {"flat", "steep"}
    # Without the MRC plugin the same pressure is split by the idle-memory tax.
    plugin2 = BalloonPlugin()
    host2 = small_host(memory_pages=4096, extra_plugins=[plugin2])
    a, b = host2.create_vm("flat", 1024), host2.create_vm("steep", 1024)
    pressure_on(host2, host2.backend.free_pages() + 400)
    assert plugin2.policy_used == {"idle_tax": 1}
    assert plugin2.state(a).size > 0 and plugin2.state(b).size > 0


def test_memory_pressure_inflates_the_idle_vm_most():
    """Under pressure the idle-memory tax reclaims mostly from the VM that touches little."""
    plugin = BalloonPlugin()
    host = small_host(memory_pages=8192, extra_plugins=[plugin], settings={"balloon": {"sample_interval": 0.01}})
    busy, idle = host.create_vm("busy", 2048), host.create_vm("idle", 2048)
    for _ in range(3):
        host.access(busy, np.arange(2048), np.zeros(2048, bool))
        host.access(idle, np.arange(64), np.zeros(64, bool))
        host.advance(host.tick_interval)
    assert plugin.state(busy).active > 0.9 and plugin.state(idle).active < 0.1
    target = host.backend.free_pages() + 1000
    freed = pressure_on(host, target)
    assert freed >= 1000 and host.backend.free_pages() >= target
    assert plugin.state(idle).size > 3 * plugin.state(busy).size
    assert plugin.state(idle).size <= plugin.cap(idle)
    assert host.backend.check_invariants() == 1 + (plugin.state(busy).size > 0)  # held balloon pages


class FirstReclaimer:
    """A reclaimer ordered before the balloon (``tryfirst``) that frees the whole deficit by
    dropping pages of a VM whose contents it can restore (as page sharing or swapping would)."""

    def __init__(self, vm_name):
        self.vm_name = vm_name

    @hookimpl(tryfirst=True)
    def memvisor_memory_pressure(self, host, pressure):
        vm = host.vms[self.vm_name]
        gpps = np.arange(pressure.deficit_pages)
        host.backend.share(vm, gpps, np.full(len(gpps), host.backend.zero_mpn))  # zero pages, verified
        return len(gpps)


def test_reclaimers_are_ordered_by_hook_order():
    """A tryfirst reclaimer that covers the deficit leaves the balloon nothing to do: the order
    among reclaimers comes from hook ordering, not from imports."""
    plugin = BalloonPlugin()
    host = small_host(memory_pages=4096, extra_plugins=[plugin, FirstReclaimer("a")])
    host.create_vm("a", 1024)
    results = host.hook.memvisor_memory_pressure(
        host=host, pressure=MemoryPressure(host.backend.free_pages(), host.backend.free_pages() + 100))
    assert results == [100] and plugin.state("a").size == 0 and plugin.pressure_events == 1


def test_an_unloaded_driver_is_not_asked_for_memory():
    """Between a driver reset and its reload the VM's balloon cannot grow; others give instead."""
    plugin = BalloonPlugin()
    host = small_host(memory_pages=4096, extra_plugins=[plugin], settings={"balloon": {"reload_delay": "1s"}})
    a, b = host.create_vm("a", 1024), host.create_vm("b", 1024)
    plugin.reset_driver(a)
    pressure_on(host, host.backend.free_pages() + 200)
    assert plugin.state(a).size == 0 and plugin.state(b).size >= 200
