"""The mrc plugin on the emulator: listing, traps to curves, agreement with `memvisor mrc`,
answers to the page-heat and giveable-pages hooks, settings and the report."""

from __future__ import annotations

import numpy as np
import pytest

from memvisor import hookimpl, hookspec
from memvisor.errors import UserError
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import ReferenceMemory, listed_plugin, small_host
from memvisor.workloads import make_workload
from memvisor_mrc.cli import compute
from memvisor_mrc.curve import Curve
from memvisor_mrc.online import VMTracker
from memvisor_mrc.plugin import MRCPlugin
from memvisor_mrc.stack_distance import exact_mrc
from memvisor_mrc.summary import giveable_pages, recommended_pages, working_sets

VM_PAGES = 4096


def test_mrc_is_listed_by_memvisor_plugins():
    """The plugin appears in `memvisor plugins --json` with the hooks it implements."""
    row = listed_plugin("mrc")
    assert row["distribution"] == "memvisor-mrc" and row["error"] is None
    for hook in ("memvisor_traced_access", "memvisor_tick", "memvisor_page_heat", "memvisor_giveable_pages",
                 "memvisor_report", "memvisor_register_commands", "memvisor_register_benchmarks"):
        assert hook in row["hooks"]


def plugin_of(host) -> MRCPlugin:
    (plugin,) = [p for name, p in host.pm.list_name_plugin() if name == "mrc"]
    return plugin


class AskedHooks:
    """The two hooks mrc answers, declared as the plugins that ask them declare them (numa,
    lazy save, the balloon): mrc's tests run without those plugins installed."""

    @hookspec(firstresult=True)
    def memvisor_page_heat(self, host, vm, gpps):
        """How hot each page is."""

    @hookspec(firstresult=True)
    def memvisor_giveable_pages(self, host, vm, miss_ratio_increase):
        """How many pages the VM can give up."""


class Asker:
    """A plugin that asks mrc's hooks: it declares them (memvisor_register_hookspecs)."""

    @hookimpl
    def memvisor_register_hookspecs(self, register):
        register(AskedHooks)


def drive(settings: dict, batches: int = 200, batch: int = 1024, seed: int = 3, alpha: float = 0.9):
    """Run a zipf guest on a small host with the plugin, one tick after each batch; returns the
    host, the VM, the plugin and the accesses concatenated in order (what the guest touched)."""
    host = small_host(memory_pages=2 * VM_PAGES, plugins=["mrc"], settings={"mrc": settings}, extra_plugins=[Asker()])
    vm = host.create_vm("a", VM_PAGES)
    workload = make_workload({"kind": "zipf", "alpha": alpha, "write_fraction": 0.2}, VM_PAGES, seed)
    seen = []
    for _ in range(batches):
        gpps, writes = workload.next_batch(batch)
        host.access(vm, gpps, writes)
        seen.append(host.guest_pages(vm, gpps))
        host.advance(host.tick_interval)
    return host, vm, plugin_of(host), np.concatenate(seen)


def test_plugin_matches_offline_mrc_without_untraced_period():
    """With untrace_period 0 (pages retraced at the tick after each batch) the plugin's curve is
    within 0.02 MAE of `memvisor mrc --rate` over the same accesses concatenated."""
    host, vm, plugin, pages = drive({"rate": 0.1, "untrace_period": 0, "refresh": "50ms"})
    state = plugin.vms["a"]
    online = state.tracker.curve(len(pages))
    offline = compute(pages, rate=0.1).curve
    assert online.mae(offline, VM_PAGES) <= 0.02
    assert online.mae(exact_mrc(pages), VM_PAGES) <= 0.02
    # every trap is a first touch per batch of a sampled page: never more than the sampled accesses
    sampled = state.tracker.in_sample(pages)
    assert state.tracker.traps <= sampled.sum()


def test_plugin_with_untraced_period_stays_close_and_traps_less():
    """With a 50 ms untraced period (5 ticks, ~5 batches) the plugin traps about half as often
    and its modelled curve stays within 0.03 MAE of the offline curve (the documented bound for
    an untraced period shorter than the reuse times that matter); without the model (traps
    only) it is far off."""
    _, _, plain, pages = drive({"rate": 0.1, "untrace_period": 0})
    host, vm, plugin, pages2 = drive({"rate": 0.1, "untrace_period": "50ms"})
    assert np.array_equal(pages, pages2)  # same seed, same guest
    tracker = plugin.vms["a"].tracker
    assert tracker.traps < 0.7 * plain.vms["a"].tracker.traps
    offline = compute(pages, rate=0.1).curve
    online = tracker.curve(len(pages))
    assert online.mae(offline, VM_PAGES) <= 0.03
    assert tracker.curve(len(pages), "shards").mae(offline, VM_PAGES) > 2 * online.mae(offline, VM_PAGES)


def test_untraced_pages_are_retraced_after_the_period():
    """A sampled page that trapped stays untraced for untrace_period, then is traced again."""
    host = small_host(memory_pages=2 * VM_PAGES, plugins=["mrc"],
                      settings={"mrc": {"rate": 0.05, "untrace_period": "30ms"}})
    vm = host.create_vm("a", VM_PAGES)
    sample = plugin_of(host).vms["a"].tracker.sample()
    assert host.backend.traced(vm)[sample].all() and host.backend.traced(vm).sum() == len(sample)
    page = sample[:1]
    host.access(vm, page, np.zeros(1, bool))
    assert not host.backend.traced(vm)[page[0]]
    host.advance(0.02)
    assert not host.backend.traced(vm)[page[0]]
    host.advance(0.02)
    assert host.backend.traced(vm)[page[0]]


def test_fixed_size_sample_keeps_at_most_s_pages_and_untraces_the_rest():
    """In fixed-size mode the sample's rate drops as pages are touched: at most S pages are
    tracked and pages that left the sample are no longer traced; guest memory is untouched."""
    host = small_host(memory_pages=2 * VM_PAGES, plugins=["mrc"], settings={"mrc": {"sample_size": 64}})
    vm = host.create_vm("a", VM_PAGES)
    reference = ReferenceMemory()
    reference.follow(host, vm)
    workload = make_workload({"kind": "uniform", "write_fraction": 0.3}, VM_PAGES, 5)
    for _ in range(20):
        reference.access(host, vm, *workload.next_batch(2048))
        host.advance(host.tick_interval)
    tracker = plugin_of(host).vms["a"].tracker
    assert tracker.sampled_pages <= 64
    assert tracker.rate < 64 * 1.5 / VM_PAGES
    assert host.backend.traced(vm).sum() <= len(tracker.sample())
    reference.check(host)


def test_page_heat_answer_is_lru_recency():
    """The heat of sampled pages follows the order of their last traps (most recent hottest);
    pages outside the sample, or never touched, get 0."""
    host = small_host(memory_pages=2 * VM_PAGES, plugins=["mrc"], settings={"mrc": {"rate": 0.05}},
                      extra_plugins=[Asker()])
    vm = host.create_vm("a", VM_PAGES)
    tracker = plugin_of(host).vms["a"].tracker
    sample = tracker.sample()
    outside = np.setdiff1d(np.arange(VM_PAGES), sample)[:3]
    a, b, c, untouched = sample[:4]
    for pages in ([a, b, c], [b], [a]):  # LRU order now: c, b, a
        host.access(vm, np.array(pages), np.zeros(len(pages), bool))
        host.advance(host.tick_interval)
    heat = host.hook.memvisor_page_heat(host=host, vm=vm, gpps=np.array([a, b, c, untouched, *outside]))
    assert heat[0] > heat[1] > heat[2] > 0
    assert heat[3] == 0 and np.all(heat[4:] == 0)


def test_giveable_pages_answer_follows_the_curve_and_allocation():
    """The giveable-pages answer reads the VM's curve at its current allocation: a VM whose
    working set is small can give most of its memory for no rise, more for a larger rise,
    and what a balloon pinned already counts as given."""
    host, vm, plugin, pages = drive({"rate": 0.1, "untrace_period": 0}, alpha=1.3, batches=100)
    ask = lambda x: host.hook.memvisor_giveable_pages(host=host, vm=vm, miss_ratio_increase=x)  # noqa: E731
    curve = plugin.vms["a"].curve
    steps = [ask(x) for x in (0.0, 0.01, 0.05, 0.2)]
    assert steps == sorted(steps) and 0 <= steps[0] < steps[-1] <= VM_PAGES
    keep = VM_PAGES - steps[2]
    assert curve.at(keep) <= curve.at(VM_PAGES) + 0.05 + 1e-9
    host.pin_guest_pages(vm, np.arange(1000))  # a balloon took 1,000 pages
    assert ask(0.0) >= 1000


def test_giveable_pages_of_a_known_curve():
    """On a hand-made curve the answer is exact: vm_pages minus the smallest size whose miss
    ratio is within the increase of the ratio at the allocation."""
    curve = Curve(cache_pages=[0, 100, 200, 1000], miss_ratio=[1.0, 0.5, 0.1, 0.1])
    assert giveable_pages(curve, 1000, 1000, 0.0) == 800
    assert giveable_pages(curve, 1000, 1000, 0.2) == 1000 - 150
    assert giveable_pages(curve, 500, 1000, 0.0) == 800
    assert giveable_pages(curve, 150, 1000, 0.0) == 850
    assert recommended_pages(curve, 0.01) == 198
    assert working_sets(curve, [0.5, 0.05]) == {"0.5": 100, "0.05": None}


def test_settings_are_checked_in_one_line():
    """A mistake in [plugins.mrc] is one line naming the key; the fixed-rate mode's rate is
    0.01 unless given, the fixed-size mode has no rate."""
    for bad, key in (({"rate": 0}, "rate"), ({"estimator": "magic"}, "estimator"), ({"rat": 0.1}, "rat"),
                     ({"refresh": "-1s"}, "refresh"), ({"miss_ratios": [2]}, r"miss_ratios\[0\]")):
        with pytest.raises(UserError, match=f"plugins.mrc.{key}") as info:
            small_host(plugins=["mrc"], settings={"mrc": bad})
        assert "\n" not in str(info.value)
    assert small_host(plugins=["mrc"]).pm.get_plugin("mrc").settings.rate == 0.01
    fixed_size = small_host(plugins=["mrc"], settings={"mrc": {"sample_size": 10}})
    assert fixed_size.pm.get_plugin("mrc").settings.rate is None


def test_tracker_ignores_pages_outside_the_sample():
    """Traps of pages another plugin traced do not enter the curve."""
    tracker = VMTracker(1000, 0.1, None)
    outside = np.setdiff1d(np.arange(1000), tracker.sample())[:5]
    tracker.on_traps(outside, np.arange(5), 0.0)
    assert tracker.traps == 0 and tracker.sampled_pages == 0


def test_report_of_a_run_has_curves_over_time(tmp_path):
    """A scenario with [plugins.mrc] has the final curve, working sets, recommended size, traps
    and snapshots in report.json, and the plots in report.html."""
    scenario = parse_scenario({
        "host": {"memory": "64MiB", "tick": "5ms", "batch": 4096},
        "plugins": {"mrc": {"rate": 0.05, "untrace_period": "5ms", "refresh": "20ms"}},
        "vm": [{"name": "web", "memory": "16MiB", "workload": {"kind": "zipf", "alpha": 0.99}},
               {"name": "db", "memory": "16MiB", "workload": {"kind": "phased", "phase_accesses": 100000}}],
        "timeline": [{"do": "run", "for": "100ms"}],
    })
    report = ScenarioRun(scenario).run()
    vms = report.metric("mrc", "vms")
    for name in ("web", "db"):
        m = vms[name]
        assert m["cache_pages"][0] == 0 and m["miss_ratio"][0] == 1.0
        assert m["cache_bytes"][-1] == m["cache_pages"][-1] * 4096
        assert np.all(np.diff(m["miss_ratio"]) <= 1e-12)
        assert m["traps"] > 0 and 0 < m["trap_rate"] < 0.05
        assert 0 < m["recommended_pages"] <= 4096
        assert set(m["working_set_pages"]) == {"0.1", "0.05", "0.01"}
        assert len(m["snapshots"]) >= 3
    page = report.write(tmp_path)
    html = page.read_text()
    assert "mrc-final.png" in html and "mrc-over-time-web.png" in html
    assert (tmp_path / "mrc-over-time-db.png").exists()


def test_example_scenario_runs_and_the_balloon_asks():
    """examples/mrc.toml runs: both VMs get a curve, and the balloon's MRC-guided policy took
    memory by asking memvisor_giveable_pages (skipped without memvisor-balloon)."""
    pytest.importorskip("memvisor_balloon")
    from pathlib import Path

    from memvisor.scenario import load_scenario

    path = Path(__file__).resolve().parents[3] / "examples" / "mrc.toml"
    if not path.exists():
        pytest.skip("examples/mrc.toml is not beside this checkout")
    report = ScenarioRun(load_scenario(path)).run()
    vms = report.metric("mrc", "vms")
    assert set(vms) == {"web", "db"} and all(m["trap_rate"] < 0.01 for m in vms.values())
    assert report.metric("balloon", "policy_used").get("mrc", 0) >= 1
