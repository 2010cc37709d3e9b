"""memvisor-numa: migration after a NUMA move, most used pages first, within the bandwidth."""


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor import hookimpl
from memvisor.errors import CapabilityError, UserError
from memvisor.testing import ReferenceMemory, listed_plugin, small_host
from memvisor_numa import HEURISTICS
from memvisor_numa.locality import time_to_reach
from memvisor_numa.settings import bandwidth_pages


def test_numa_is_listed_by_memvisor_plugins():
    """The plugin appears in `memvisor plugins --json` with the hooks it implements."""
    row = listed_plugin("numa")
    assert row["distribution"] == "memvisor-numa" and row["error"] is None
    for hook in ("memvisor_vcpus_moved", "memvisor_tick", "memvisor_traced_access", "memvisor_report",
                 "memvisor_register_commands", "memvisor_register_benchmarks"):
        assert hook in row["hooks"]


def numa_host(heuristic="scan", memory_pages=4096, **numa_settings):
    """A two-node host with the numa plugin, and the plugin instance."""
    host = small_host(memory_pages=memory_pages, numa_nodes=2, plugins=["numa"],
                      settings={"numa": {"heuristic": heuristic, **numa_settings}})
    return host, host.pm.get_plugin("numa")


def random_contents(host, vm, seed=0):
    """Fill a VM with random bytes (so that a wrong copy would show)."""
    data = np.random.default_rng(seed).integers(0, 256, (vm.pages, 4096), dtype=np.uint8)
    host.backend.write(vm, np.arange(vm.pages), data)


def test_one_node_host_is_refused_in_one_line():
    """On a one-node host the plugin says it cannot migrate, naming the node count."""
    with pytest.raises(CapabilityError, match=r"cannot migrate: backend 'emulator' has 1 NUMA node"):
        small_host(numa_nodes=1, plugins=["numa"])


@pytest.mark.parametrize("table, problem", [
    ({"heuristic": "lru"}, "plugins.numa.heuristic: must be one of"),
    ({"pages_per_tick": 10486}, "plugins.numa.pages_per_tick: 10486 pages per tick is more than"),
    ({"pages_per_tick": 0}, "plugins.numa.pages_per_tick: must be at least 1, got 0"),
    ({"stop_local": 2}, "plugins.numa.stop_local: must be from 0.0 to 1.0, got 2"),
    ({"budget": 5}, "plugins.numa.budget: unknown setting"),
])
def test_bad_settings_are_one_line(table, problem):
    """A wrong setting is a UserError of one line naming plugins.numa.KEY."""
    with pytest.raises(UserError, match=problem) as info:
        small_host(numa_nodes=2, plugins=["numa"], settings={"numa": table})
    assert "\n" not in str(info.value)


def test_budget_defaults_to_the_bandwidth_of_one_tick():
    """pages_per_tick defaults to numa_gib_per_s x tick / 4 KiB (10485 at 4 GiB/s and 10 ms)."""
    host, plugin = numa_host()
    assert plugin.settings.pages_per_tick == bandwidth_pages(4.0, 0.01) == 10485
    assert host.backend.work_seconds("numa_copy", 4096) == 4096 / (4.0 * 2**30)


def test_remote_pages_migrate_to_the_new_node_within_the_budget():
    """After a move every touched page ends on the new node, at most pages_per_tick per tick;
    migration starts at the move, with the budget of the tick interval it falls in."""
    host, plugin = numa_host("address", pages_per_tick=100)
    vm = host.create_vm("a", 1000, home_node=1)
    host.move_vcpus(vm, 0)
    counts = [plugin.vms["a"].migrated]
    assert counts == [100]
    for _ in range(12):
        before = plugin.vms["a"].migrated
        host.advance(host.tick_interval)
        counts.append(plugin.vms["a"].migrated - before)
    assert max(counts) == 100 and sum(counts) == 1000
    assert (host.backend.node_of(vm) == 0).all()
    host.backend.check_invariants()


def test_pages_move_only_to_nodes_with_free_capacity():
    """When the new node is nearly full, migration fills it up to the reserve and no further."""
    host, plugin = numa_host("address", memory_pages=4096, reserve=0.05)  # 2048 pages per node
    filler = host.create_vm("filler", 1700, home_node=0)
    vm = host.create_vm("a", 1000, home_node=1)
    host.move_vcpus(vm, 0)
    for _ in range(5):
        host.advance(host.tick_interval)
    reserve = int(0.05 * host.backend.total_pages(0))
    assert host.backend.free_pages(0) >= reserve
    on_zero = int((host.backend.node_of(vm) == 0).sum())
    assert 0 < on_zero == plugin.vms["a"].migrated
    assert (host.backend.node_of(filler) == 0).all()
    host.backend.check_invariants()


def test_vm_moving_back_mid_migration_is_handled():
    """A VM that moves back half-way ends with all its memory on its (original) node."""
    host, plugin = numa_host("address", pages_per_tick=64)
    vm = host.create_vm("a", 512, home_node=1)
    ref = ReferenceMemory()
    random_contents(host, vm)
    ref.follow(host, vm)
    host.move_vcpus(vm, 0)
    for _ in range(2):
        host.advance(host.tick_interval)
    nodes = host.backend.node_of(vm)
    assert (nodes == 0).sum() == 192 and (nodes == 1).sum() == 320
    host.move_vcpus(vm, 1)
    for _ in range(4):
        host.advance(host.tick_interval)
    assert (host.backend.node_of(vm) == 1).all()
    moves = plugin.vm_metrics(plugin.vms["a"])["moves"]
    assert [m["migrated_pages"] for m in moves] == [192, 192]
    ref.check(host)
    host.backend.check_invariants()


class FakeHeat:
    """A page-heat plugin: page p has heat (p * 7919) % 1000, so the order is scattered."""

    def __init__(self):
        self.asked = 0

    @hookimpl
    def memvisor_page_heat(self, vm, gpps):
        """Answer the hook for every page asked."""
        self.asked += 1
        return ((gpps * 7919) % 1000).astype(np.float64)


def test_hook_memvisor_page_heat():
    """The mrc heuristic asks memvisor_page_heat and migrates the hottest pages first."""
    heat = FakeHeat()
    host = small_host(memory_pages=4096, numa_nodes=2, plugins=["numa"], extra_plugins=[heat],
                      settings={"numa": {"heuristic": "mrc", "pages_per_tick": 50}})
    plugin = host.pm.get_plugin("numa")
    vm = host.create_vm("a", 1000, home_node=1)
    host.move_vcpus(vm, 0)
    assert heat.asked == 1
    moved = np.flatnonzero(host.backend.node_of(vm) == 0)
    expected = np.argsort(-((np.arange(1000) * 7919) % 1000), kind="stable")[:50]
    assert sorted(moved.tolist()) == sorted(expected.tolist())
    host.advance(host.tick_interval)
    moved = np.flatnonzero(host.backend.node_of(vm) == 0)
    expected = np.argsort(-((np.arange(1000) * 7919) % 1000), kind="stable")[:100]
    assert sorted(moved.tolist()) == sorted(expected.tolist())
    assert plugin.vms["a"].heat_source == "page_heat"


def test_mrc_without_a_heat_plugin_falls_back_to_aging():
    """Without a page-heat plugin the mrc heuristic orders by accessed-bit aging, like scan."""
    moved = {}
    for heuristic in ("mrc", "scan"):
        host, plugin = numa_host(heuristic, pages_per_tick=20, scan_window=0)
        vm = host.create_vm("a", 1000, home_node=1)
        hot = np.arange(0, 1000, 50)  # 20 hot pages scattered
        host.access(vm, hot, np.zeros(20, bool))
        host.advance(host.tick_interval)  # a scan ages them
        host.move_vcpus(vm, 0)
        host.advance(host.tick_interval)
        moved[heuristic] = np.flatnonzero(host.backend.node_of(vm) == 0)
        if heuristic == "mrc":
            assert plugin.vms["a"].heat_source == "accessed_bits"
    assert moved["mrc"].tolist() == moved["scan"].tolist() == list(range(0, 1000, 50))


def test_scan_moves_hot_pages_first_and_never_moves_cold_ones():
    """Pages seen in more scans go first; pages no scan saw stay on the old node."""
    host, plugin = numa_host("scan", pages_per_tick=10, scan_window=0)
    vm = host.create_vm("a", 1000, home_node=1)
    hot, warm = np.arange(10), np.arange(500, 520)
    for i in range(4):
        host.access(vm, hot if i else np.concatenate([hot, warm]), np.zeros(10 if i else 30, bool))
        host.advance(host.tick_interval)
    host.move_vcpus(vm, 0)
    assert np.flatnonzero(host.backend.node_of(vm) == 0).tolist() == hot.tolist()
    for _ in range(4):
        host.advance(host.tick_interval)
    assert np.flatnonzero(host.backend.node_of(vm) == 0).tolist() == hot.tolist() + warm.tolist()


def test_hinting_migrates_what_traps_and_ignores_other_plugins_traces():
    """hinting traces a sample, migrates the sampled pages the guest touches, and leaves pages
    another plugin traced alone."""
    host, plugin = numa_host("hinting", pages_per_tick=1000, hint_pages=1000)
    vm = host.create_vm("a", 1000, home_node=1)
    host.move_vcpus(vm, 0)
    host.advance(host.tick_interval)  # arms every page (the sample is the whole VM)
    assert host.backend.traced(vm).all()
    host.access(vm, np.arange(0, 100), np.zeros(100, bool))
    host.advance(host.tick_interval)
    assert np.flatnonzero(host.backend.node_of(vm) == 0).tolist() == list(range(100))
    host.move_vcpus(vm, 1)  # the old arming is dropped at the move
    host.backend.trace(vm, np.arange(900, 1000))  # another plugin's traces
    host.access(vm, np.arange(900, 1000), np.zeros(100, bool))
    assert not plugin.vms["a"].queue


def test_hinting_migrates_inside_the_trap_within_the_budget():
    """hinting migrates a sampled page in its hinting trap, as Linux migrates a misplaced page in
    its NUMA hinting fault, up to the tick's budget, and queues the rest for the next ticks (a
    queue drained only at ticks lost two ticks in three to batches that outlast them)."""
    host, plugin = numa_host("hinting", pages_per_tick=30, hint_pages=200)
    vm = host.create_vm("a", 200, home_node=1)
    host.move_vcpus(vm, 0)
    host.advance(host.tick_interval)  # arms the sample (the whole VM); the tick's budget is unused
    assert host.backend.traced(vm).all()
    host.access(vm, np.arange(50), np.zeros(50, bool))
    assert (host.backend.node_of(vm, np.arange(30)) == 0).all()
    assert (host.backend.node_of(vm, np.arange(30, 200)) == 1).all()
    host.advance(host.tick_interval)
    assert (host.backend.node_of(vm, np.arange(50)) == 0).all()
    assert (host.backend.node_of(vm, np.arange(50, 200)) == 1).all()


def test_touch_migrates_inside_the_trap_within_the_budget():
    """touch migrates pages when they trap, up to the tick's budget, and queues the rest."""
    host, plugin = numa_host("touch", pages_per_tick=30)
    vm = host.create_vm("a", 200, home_node=1)
    host.move_vcpus(vm, 0)
    assert host.backend.traced(vm).all()
    host.access(vm, np.arange(50), np.ones(50, bool))
    assert (host.backend.node_of(vm, np.arange(30)) == 0).all()
    assert (host.backend.node_of(vm, np.arange(30, 200)) == 1).all()
    host.advance(host.tick_interval)
    assert (host.backend.node_of(vm, np.arange(50)) == 0).all()
    assert (host.backend.node_of(vm, np.arange(50, 200)) == 1).all()


def test_large_pages_are_split_so_their_members_move():
    """A VM backed by 2 MiB pages migrates: the large pages it needs to move are split."""
    host, plugin = numa_host("address", memory_pages=8192, pages_per_tick=512)
    vm = host.create_vm("a", 1024, home_node=1, large_pages=True)
    assert host.backend.large(vm).all()
    host.move_vcpus(vm, 0)
    for _ in range(2):
        host.advance(host.tick_interval)
    assert (host.backend.node_of(vm) == 0).all() and not host.backend.large(vm).any()
    assert plugin.split_pages == 1024
    host.backend.check_invariants()


def test_shared_pages_stay_and_do_not_block_the_order():
    """Copy-on-write pages cannot move; the pages after them in the order still do."""
    host, plugin = numa_host("address", pages_per_tick=10)
    vm = host.create_vm("a", 100, home_node=1)
    host.backend.share(vm, np.arange(20), np.full(20, host.backend.zero_mpn))  # zero pages: shared
    host.move_vcpus(vm, 0)
    assert (host.backend.mpns(vm, np.arange(20)) == host.backend.zero_mpn).all()
    assert (host.backend.node_of(vm, np.arange(20, 30)) == 0).all()
    assert (host.backend.node_of(vm, np.arange(30, 100)) == 1).all()
    host.backend.check_invariants()


def test_stop_rule_stops_and_a_new_remote_phase_resumes():
    """Migration stops once accesses are local for stop_ticks ticks, and resumes when the
    working set moves onto remote pages."""
    host, plugin = numa_host("scan", pages_per_tick=200, scan_window=0, stop_ticks=2)
    vm = host.create_vm("a", 1000, home_node=1)
    first, second = np.arange(100), np.arange(500, 600)
    host.access(vm, first, np.zeros(100, bool))
    host.advance(host.tick_interval)
    host.move_vcpus(vm, 0)
    for _ in range(4):
        host.access(vm, first, np.zeros(100, bool))
        host.advance(host.tick_interval)
    state = plugin.vms["a"]
    assert not state.active and state.moves[0].stopped is not None
    for _ in range(3):
        host.access(vm, second, np.zeros(100, bool))
        host.advance(host.tick_interval)
    assert state.resumes == 1 and (host.backend.node_of(vm, second) == 0).all()


def test_wasted_migrations_are_pages_not_touched_after_their_move():
    """Pages migrated and never touched before the end are counted as wasted."""
    host, plugin = numa_host("address", pages_per_tick=1000)
    vm = host.create_vm("a", 300, home_node=1)
    host.access(vm, np.arange(300), np.zeros(300, bool))  # touched before the move: not evidence
    host.move_vcpus(vm, 0)
    host.advance(host.tick_interval)
    host.access(vm, np.arange(100), np.zeros(100, bool))
    host.stop()
    section = plugin.memvisor_report(host)
    assert section.metrics["migrated_pages"] == 300 and section.metrics["wasted_pages"] == 200
    assert section.metrics["migrated_bytes"] == 300 * 4096


def test_time_to_reach_skips_idle_ticks_and_stops_at_the_next_move():
    """time_to_reach measures from the move to the first tick at or above the level."""
    times = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    local = np.array([1.0, 0.5, np.nan, 0.95, 1.0])
    assert time_to_reach(times, local, 0.15, 0.9) == pytest.approx(0.25)
    assert time_to_reach(times, local, 0.15, 0.99) == pytest.approx(0.35)
    assert time_to_reach(times, local, 0.15, 0.99, until=0.45) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heuristic=st.sampled_from(HEURISTICS), budget=st.integers(1, 80),
       steps=st.lists(st.one_of(
           st.tuples(st.just("access"), st.lists(st.integers(0, 1023), min_size=1, max_size=40), st.booleans()),
           st.tuples(st.just("tick"), st.integers(1, 3), st.booleans()),
           st.tuples(st.just("move"), st.integers(0, 1), st.booleans()),
       ), max_size=25))
def test_migration_never_changes_contents_and_never_leaks(heuristic, budget, steps):
    """Whatever the heuristic, moves and accesses: the guest reads what it wrote, no machine
    page leaks, and no tick interval migrates more than the budget."""
    host = small_host(memory_pages=4096, numa_nodes=2, plugins=["numa"],
                      settings={"numa": {"heuristic": heuristic, "pages_per_tick": budget, "scan_window": 0,
                                         "hint_pages": 50}})
    plugin = host.pm.get_plugin("numa")
    vm = host.create_vm("a", 1024, home_node=1, large_pages=True)
    assert host.backend.large(vm).all()  # two 2 MiB pages: migration must split them
    random_contents(host, vm)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    per_tick: dict[int, int] = {}
    migrate = host.backend.migrate

    def counting_migrate(vm_, gpps, node):
        moved = migrate(vm_, gpps, node)
        per_tick[host._ticks] = per_tick.get(host._ticks, 0) + moved
        return moved

    host.backend.migrate = counting_migrate
    for kind, value, flag in steps:
        if kind == "access":
            pages = np.asarray(value)
            ref.access(host, vm, pages, np.resize(np.array([flag, not flag]), len(pages)))
        elif kind == "tick":
            host.advance(value * host.tick_interval)
        elif value != vm.home_node:
            host.move_vcpus(vm, value)
        host.backend.check_invariants()
    assert max(per_tick.values(), default=0) <= budget
    assert sum(per_tick.values()) == plugin.vms["a"].migrated
    host.stop()
    ref.check(host)
    host.backend.check_invariants()


def test_hot_first_reaches_local_sooner_than_address_order():
    """On a small zipf run, scan reaches 90% local accesses sooner than address order (virtual
    time; the benchmark measures the full-size ratio)."""
    from memvisor_numa.compare import compare

    rows, series = compare(16384, {"kind": "zipf", "alpha": 0.99}, ("scan", "address"), pre=0.05, post=0.35,
                           settings={"pages_per_tick": 512})
    assert rows["scan"]["t90_s"] < rows["address"]["t90_s"]
    assert rows["address"]["migrated_pages"] == 16384
    assert len(series["scan"][0]) == len(series["scan"][1]) > 10


def test_report_of_a_scenario_has_the_section_and_one_line_per_moved_vm():
    """A scenario that enables numa has its metrics in report.json and a local-fraction plot."""
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import parse_scenario

    scenario = parse_scenario({
        "host": {"memory": "32MiB", "numa_nodes": 2, "tick": "1ms", "batch": 1024},
        "plugins": {"numa": {"heuristic": "scan", "pages_per_tick": 200}},
        "vm": [{"name": "a", "memory": "4MiB", "node": 1, "workload": {"kind": "zipf"}},
               {"name": "b", "memory": "4MiB", "node": 0, "workload": {"kind": "uniform"}}],
        "timeline": [{"do": "run", "for": "10ms"}, {"do": "move_vcpus", "vm": "a", "node": 0},
                     {"do": "run", "for": "20ms"}],
    })
    report = ScenarioRun(scenario).run()
    assert report.metric("numa", "heuristic") == "scan"
    assert report.metric("numa", "t90_s") is not None
    assert report.metric("numa", "vms")["a"]["migrated_pages"] > 0
    (plot,) = [p for p in report.plots if p.name == "numa-local-fraction"]
    assert list(plot.series) == ["a"]
