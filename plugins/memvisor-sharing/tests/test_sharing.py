"""memvisor-sharing in a host: scanning, the estimate against brute force, salting, sharing
small pages, break-up under pressure in order, writes breaking sharing, settings, the report."""


import numpy as np
import pytest

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.contents import ContentSpec
from memvisor.errors import UserError
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import ReferenceMemory, listed_plugin, small_host
from memvisor_sharing import SharingPlugin


def test_sharing_is_listed_by_memvisor_plugins():
    """The plugin appears in `memvisor plugins --json` with the hooks it implements."""
    row = listed_plugin("sharing")
    assert row["distribution"] == "memvisor-sharing"
    for hook in ("memvisor_tick", "memvisor_write_trap", "memvisor_memory_pressure", "memvisor_report",
                 "memvisor_register_commands", "memvisor_register_benchmarks"):
        assert hook in row["hooks"]


def make_host(settings=None, memory_pages=16384, contents=None):
    """A small host (of machine model ``contents``) with a sharing plugin we hold on to."""
    plugin = SharingPlugin()
    host = small_host(memory_pages=memory_pages, extra_plugins=[plugin], settings={"sharing": settings or {}},
                      contents=contents)
    return host, plugin


def brute_force(host, groups):
    """Machine pages sharing would reclaim, by brute force: every zero page, and per sharing
    group every non-zero page but one per distinct content (pages each on their own machine page)."""
    zeros, duplicates = 0, 0
    for names in groups:
        rows = np.concatenate([host.backend.read(host.vms[n], np.arange(host.vms[n].pages)) for n in names])
        is_zero = ~rows.any(axis=1)
        zeros += int(is_zero.sum())
        nonzero = rows[~is_zero]
        duplicates += len(nonzero) - len(np.unique(nonzero, axis=0))
    return zeros + duplicates


def scan_all(host, plugin, passes=1):
    """Tick until every page has been hashed ``passes`` times."""
    total = sum(vm.pages for vm in host.vms.values()) * passes
    while plugin.pages_hashed < total:
        host.advance(host.tick_interval)


RANDOM = ContentSpec(zero=0.0, random=1.0)
SPEC = ContentSpec(zero=0.25, text=0.3, random=0.2, duplicate=0.25, pool_pages=48)


@pytest.mark.parametrize("model", ["bytes", "identity"])
@pytest.mark.parametrize("share_small", [False, True])
def test_sharing_estimate_equals_brute_force_within_each_vm(share_small, model):
    """Salted (the default): the estimate counts duplicates within each VM only, exactly, on
    either machine model (pages compared byte for byte, or identity for identity)."""
    host, plugin = make_host({"pages_per_tick": 1400, "share_small": share_small}, contents=model)
    host.create_vm("a", 2048, contents=SPEC)
    host.create_vm("b", 2048, large_pages=True, contents=SPEC, seed=99)
    expected = brute_force(host, [["a"], ["b"]])
    scan_all(host, plugin, passes=2)  # small pages are shared once seen unchanged twice
    assert plugin.estimated == expected
    plugin.refresh(host)  # a fresh count of what sharing saves and what is left agrees
    assert plugin.estimated == expected
    assert plugin.table.small + int(plugin.table.large_reclaimable.sum()) == plugin.table.total
    if share_small:  # small pages were shared as found: what is left is inside the large pages
        assert plugin.saved > 0 and plugin.table.small == 0
    host.backend.check_invariants()


@pytest.mark.parametrize("model", ["bytes", "identity"])
def test_sharing_estimate_across_a_group_counts_cross_vm_twins(model):
    """With `across`, byte-identical pages of the VMs of a group count (and are shared)."""
    host, plugin = make_host({"pages_per_tick": 4096, "across": [["a", "b"]]}, contents=model)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        host.create_vm(name, 1024, contents=SPEC, seed=seed)
    ref = ReferenceMemory()
    ref.follow_all(host)
    expected = brute_force(host, [["a", "b"], ["c"]])
    salted = brute_force(host, [["a"], ["b"], ["c"]])
    assert expected > salted
    scan_all(host, plugin, passes=2)
    assert plugin.estimated == expected
    assert plugin.saved == expected  # everything was in small pages: all of it is shared now
    ref.check(host)
    host.backend.check_invariants()


def test_sharing_per_large_page_estimate_is_exact_on_known_layout():
    """Large page k holds k zero subpages and k copies of one page (else random bytes): the
    estimate per large page is k + (k - 1), and nothing is shared while memory is plentiful."""
    host, plugin = make_host({"pages_per_tick": 8192})
    vm = host.create_vm("v", 8 * LARGE_PAGE_PAGES, large_pages=True, contents=RANDOM)
    twin = np.full(PAGE_SIZE, 7, np.uint8)
    for k in range(8):
        base = k * LARGE_PAGE_PAGES
        host.backend.write(vm, np.arange(base, base + k), np.zeros((k, PAGE_SIZE), np.uint8))
        data = np.tile(twin, (k, 1))
        data[:, 1] = k  # a different content per large page: twins only within it
        host.backend.write(vm, np.arange(base + 100, base + 100 + k), data)
    scan_all(host, plugin)
    per_large = plugin.per_large_page("v")
    assert per_large.tolist() == [2 * k - (1 if k else 0) for k in range(8)]
    assert plugin.saved == 0 and host.backend.large(vm).all()


def layered_vm(host, name="v", large=16, rich=(5, 11)):
    """A VM of ``large`` large pages of random bytes, except the ``rich`` ones: all zeros."""
    vm = host.create_vm(name, large * LARGE_PAGE_PAGES, large_pages=True, contents=RANDOM)
    for k in rich:
        pages = np.arange(k * LARGE_PAGE_PAGES, (k + 1) * LARGE_PAGE_PAGES)
        host.backend.write(vm, pages, np.zeros((len(pages), PAGE_SIZE), np.uint8))
    return vm


@pytest.mark.parametrize("order, broken", [("reclaimable", 1), ("address", 6)])
def test_sharing_breaks_large_pages_most_reclaimable_first(order, broken):
    """Under pressure the richest large page goes first; address order breaks every large page
    up to it. Guest memory reads the same either way."""
    host, plugin = make_host({"pages_per_tick": 0, "order": order}, memory_pages=16 * 512 + 1024)
    vm = layered_vm(host)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    free = host.backend.free_pages()
    freed = host.check_pressure(target_free_pages=free + 300)
    assert plugin.large_broken == broken
    assert freed >= 300 and host.backend.free_pages() >= free + 300
    assert host.backend.large(vm).sum() == (16 - broken) * LARGE_PAGE_PAGES
    ref.check(host)
    host.backend.check_invariants()


def test_sharing_pressure_is_a_no_op_when_memory_is_free_already():
    """The hook reads free memory first and does nothing when the target is met."""
    host, plugin = make_host({"pages_per_tick": 0})
    layered_vm(host, large=4, rich=(1,))
    assert host.check_pressure(target_free_pages=1) == 0
    assert plugin.large_broken == 0 and plugin.pages_hashed == 0


def test_sharing_write_to_a_shared_page_gives_the_writer_a_private_copy():
    """A guest write to a shared page breaks sharing for the writer only: the other sharers
    keep the shared page, the writer's fingerprint is void."""
    host, plugin = make_host({"pages_per_tick": 4096})
    vm = host.create_vm("v", 64, contents=RANDOM)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    ref.guest_write(host, vm, np.arange(10, 14), np.tile(np.arange(PAGE_SIZE, dtype=np.uint8) | 1, (4, 1)))
    host.advance(2 * host.tick_interval)
    mpns = host.backend.mpns(vm, np.arange(10, 14))
    assert len(set(mpns.tolist())) == 1 and plugin.pages_shared == 4
    ref.access(host, vm, np.array([11]), np.array([True]))
    after = host.backend.mpns(vm, np.arange(10, 14))
    assert after[1] != mpns[1] and after[[0, 2, 3]].tolist() == mpns[[0, 2, 3]].tolist()
    assert plugin.writes_broken == 1 and not plugin.vms["v"].scanned[11]
    ref.check(host)
    host.backend.check_invariants()


def test_sharing_zero_pages_map_to_the_zero_page_even_across_salted_vms():
    """Zero pages of every VM map to the host's one zero page, salting or not."""
    host, plugin = make_host({"pages_per_tick": 4096})
    a, b = host.create_vm("a", 256), host.create_vm("b", 256)
    host.advance(host.tick_interval)
    assert plugin.saved == 0  # seen once: maybe about to be written, not shared yet
    host.advance(host.tick_interval)
    zero = host.backend.zero_mpn
    assert (host.backend.mpns(a) == zero).all() and (host.backend.mpns(b) == zero).all()
    assert plugin.saved == 512 and plugin.zero_mapped == 512


@pytest.mark.parametrize("settings, key", [
    ({"bogus": 1}, "plugins.sharing.bogus"),
    ({"pages_per_tick": -1}, "plugins.sharing.pages_per_tick"),
    ({"order": "random"}, "plugins.sharing.order"),
    ({"across": "a,b"}, "plugins.sharing.across"),
    ({"across": [["a"], ["a", "b"]]}, "plugins.sharing.across"),
    ({"share_small": "yes"}, "plugins.sharing.share_small"),
    ({"wait_stable": 1}, "plugins.sharing.wait_stable"),
])
def test_sharing_bad_settings_are_one_line_naming_the_key(settings, key):
    """A mistake in [plugins.sharing] is a UserError naming the key."""
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        make_host(settings)


def test_sharing_section_is_in_the_report_of_a_run():
    """A scenario with sharing and memory pressure reports the estimate with its history, pages
    reclaimed, large pages broken and intact."""
    scenario = parse_scenario({
        "host": {"memory": "64MiB", "tick": "5ms", "batch": 4096},
        "plugins": {"sharing": {"pages_per_tick": 2048, "across": [["web", "db"]]}},
        "vm": [{"name": "web", "memory": "8MiB", "contents": {"zero": 0.5, "duplicate": 0.3, "random": 0.2},
                "workload": {"kind": "zipf", "write_fraction": 0.1}},
               {"name": "db", "memory": "16MiB", "large_pages": True,
                "contents": {"zero": 0.3, "duplicate": 0.3, "text": 0.4, "run_pages": 64},
                "workload": {"kind": "zipf", "write_fraction": 0.1}}],
        "timeline": [{"do": "run", "for": "40ms"}, {"do": "pressure", "target_free": "56MiB"},
                     {"do": "run", "for": "10ms"}],
    })
    report = ScenarioRun(scenario).run()
    assert report.metric("sharing", "large_pages_broken") >= 1
    assert report.metric("sharing", "large_pages_intact") < report.metric("sharing", "large_pages_at_start")
    assert report.metric("sharing", "reclaimed_pages") > 0
    assert report.metric("sharing", "pressure_events")[0]["reclaimed_pages"] > 0
    (section,) = [s for s in report.sections if s.plugin == "sharing"]
    assert {p.name for p in section.plots} >= {"sharing-estimate"}


def test_sharing_forgets_a_destroyed_vm_and_keeps_counts_exact():
    """Destroying a VM whose pages are shared drops its bookkeeping; the others' estimate and
    memory stay right, and the scanner goes on."""
    host, plugin = make_host({"pages_per_tick": 4096, "across": [["a", "b"]]})
    a = host.create_vm("a", 1024, contents=SPEC, seed=1)
    host.create_vm("b", 1024, contents=SPEC, seed=2)
    ref = ReferenceMemory()
    ref.follow_all(host)
    scan_all(host, plugin, passes=2)
    assert plugin.saved > 0
    ref.forget(a)
    host.destroy_vm(a)
    assert "a" not in plugin.vms
    host.advance(2 * host.tick_interval)
    plugin.refresh(host)
    assert plugin.estimated == brute_force(host, [["b"]])
    ref.check(host)
    host.backend.check_invariants()


def test_sharing_scanner_keeps_within_each_vms_scan_budget():
    """A VM with a scan budget of 2,000 pages/s is hashed at that rate while the scanner (4,096
    pages a tick) hashes the other VM at its full share: a VM whose pages never settle cannot
    take the scanner from the others."""
    from memvisor.budgets import Budget

    host, plugin = make_host({"pages_per_tick": 4096})
    limited = host.create_vm("limited", 4096, contents=SPEC, budget=Budget(scan_rate=2000))
    free = host.create_vm("free", 4096, contents=SPEC)
    for _ in range(100):
        host.advance(host.tick_interval)
    use = host.budgets.vms
    assert use["limited"].scan_pages <= 2000 * 1.0 + 200  # the rate for 1 s and the burst (0.1 s)
    assert use["limited"].scan_pages >= 2000 * 0.9 and use["limited"].scan_refused > 0
    assert use["free"].scan_pages >= 100 * 2048 * 0.9 and use["free"].scan_refused == 0
    assert plugin.vms["limited"].scanned.sum() < limited.pages and plugin.vms["free"].scanned.all()
    assert free.pages == 4096


@pytest.mark.parametrize("model", ["bytes", "identity"])
def test_a_table_cut_in_shards_counts_and_shares_as_one_table(monkeypatch, model):
    """With the table cut in shards (made small here: 1,024 pages a shard), a rebuild of every
    shard gives the estimate a single table gives, the brute-force count, and ticks rebuilding
    one shard each share as much in the end."""
    import memvisor_sharing.plugin as sharing

    monkeypatch.setattr(sharing, "SHARD_PAGES", 1024)
    host, plugin = make_host({"pages_per_tick": 2048, "across": [["a", "b"]]}, contents=model)
    for name, seed in (("a", 1), ("b", 2)):
        host.create_vm(name, 2048, contents=SPEC, seed=seed)
    assert plugin.shards == 4
    ref = ReferenceMemory()
    ref.follow_all(host)
    expected = brute_force(host, [["a", "b"]])
    scan_all(host, plugin, passes=2)
    for _ in range(plugin.shards):  # a tick per shard: each shard's small pages are shared
        host.advance(host.tick_interval)
    plugin.refresh(host)
    assert plugin.estimated == expected
    assert plugin.saved == expected  # everything was in small pages: all of it is shared
    ref.check(host)
    host.backend.check_invariants()
