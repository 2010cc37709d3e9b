"""Per-VM resource budgets (memvisor.budgets): a guest trapping in a loop cannot starve the
other VMs of the trap handler, scans and migrations stay within their budgets, the report shows
budgets and use, and bad budgets are one-line errors."""

import json
import re
import subprocess
import sys

import attrs
import numpy as np
import pytest

from memvisor.budgets import Budget, TokenBucket
from memvisor.builtins.migration import LiveMigration, MigrationOptions
from memvisor.contents import ContentSpec
from memvisor.errors import UserError
from memvisor.scenario import parse_scenario
from memvisor.testing import small_host
from memvisor.testing.hog import hog_scenario, run_with_dirty_logging


def budgets(report):
    return next(x for x in report.sections if x.title == "Budgets").metrics["vms"]


def test_a_guest_trapping_in_a_loop_cannot_starve_the_others_of_the_handler():
    """Alone, web makes N accesses in 1 s. Beside a hog that traps on every write, it makes
    a fraction of them (its traps wait behind the hog's in the one handler); with a trap budget
    on the hog (50,000 traps/s: a tenth of the handler), it is back within 5% of alone, and the
    hog took no more traps than its budget allows."""
    alone = run_with_dirty_logging(hog_scenario(hog=False)).data["vms"]["web"]["accesses"]
    starved = run_with_dirty_logging(hog_scenario())
    limited = run_with_dirty_logging(hog_scenario(hog_budget={"trap_rate": 50000}))
    assert starved.data["vms"]["web"]["accesses"] < 0.3 * alone
    assert budgets(starved)["web"]["handler_wait_s"] > 0.5
    assert limited.data["vms"]["web"]["accesses"] > 0.95 * alone
    hog = budgets(limited)["hog"]
    # rate * time + burst (10 ms of rate) + the first batch, run before its cost was known
    assert hog["guest_traps"] <= 50000 * 1.0 + 500 + 16384
    assert hog["throttled_batches"] > 0 and hog["waited_s"] > 0.5
    assert hog["budget"]["trap_rate"] == 50000


def test_a_handler_share_bounds_heavy_traps_a_trap_count_does_not():
    """hog's traps are few but heavy (each writes its page out inside the trap): a trap
    budget that web alone could live with does not protect web; a share of the handler does."""
    alone = run_with_dirty_logging(hog_scenario(hog=False), copy_out=True).data["vms"]["web"]["accesses"]
    counted = run_with_dirty_logging(hog_scenario(hog_budget={"trap_rate": 50000}), copy_out=True)
    shared = run_with_dirty_logging(hog_scenario(hog_budget={"handler_share": 0.1}), copy_out=True)
    assert counted.data["vms"]["web"]["accesses"] < 0.5 * alone
    assert shared.data["vms"]["web"]["accesses"] > 0.9 * alone
    hog = budgets(shared)["hog"]
    # 10% of 1 s, 1 ms of slack, and the first small batch (256 traps of ~0.1 ms)
    assert hog["handler_s"] <= 0.1 * 1.0 + 0.001 + 256 * 0.0001 + 0.001
    assert hog["throttled_batches"] > 0


def test_a_budget_under_what_a_vm_needs_slows_only_that_vm():
    """The host-wide default applies to every VM; a VM's own table overrides it key by key."""
    s = hog_scenario(default={"trap_rate": 1e9, "scan_rate": 1000}, hog_budget={"trap_rate": 20000})
    web, hog = s.vms
    assert web.budget is None and s.host.budget == Budget(trap_rate=1e9, scan_rate=1000)
    assert hog.budget == Budget(trap_rate=20000, scan_rate=1000)


def test_token_bucket_debt_and_grants():
    bucket = TokenBucket(rate=100.0, capacity=10.0, now=0.0)
    assert bucket.charge(30, now=0.0) == pytest.approx(0.2)  # 20 in debt at 100/s
    assert bucket.grant(5, now=0.1) == 0  # still 10 in debt: a grant never borrows
    assert bucket.grant(50, now=1.0) == 10  # full again, and no more than the capacity


def test_scan_budget_caps_the_pages_scanned_per_vm():
    """A scanner asking for more pages than a VM's scan rate allows gets what is left."""
    host = small_host(memory_pages=4096)
    vm = host.create_vm("a", 1024, budget=Budget(scan_rate=1000))
    free = host.create_vm("b", 1024)
    granted = 0
    for _ in range(100):  # 1 s of ticks, asking 512 pages of each every time
        granted += host.budgets.take_scan(vm, 512, host.now)
        assert host.budgets.take_scan(free, 512, host.now) == 512
        host.advance(0.01)
    assert 1000 <= granted <= 1000 * 1.0 + 100  # the rate for 1 s and the initial burst (0.1 s)
    use = host.budgets.vms["a"]
    assert use.scan_pages == granted and use.scan_refused == 100 * 512 - granted


def test_migration_bandwidth_budget_stretches_the_migration():
    """Every page of a 16 MiB VM of random bytes at 8 MiB/s takes at least 2 s; without the
    budget the 10 Gbit/s link carries it in a fraction of that."""
    contents = ContentSpec.parse("random", "c")
    times = {}
    for bandwidth in (None, 8 << 20):
        source, destination = small_host(memory_pages=8192), small_host(memory_pages=8192)
        vm = source.create_vm("a", 4096, contents=contents, budget=Budget(migration_bandwidth=bandwidth))
        result = LiveMigration(source, vm, destination, MigrationOptions(max_rounds=1)).run()
        times[bandwidth] = result.total_s
        use = source.budgets.vms["a"]
        assert use.migration_bytes >= 16 << 20
    assert times[8 << 20] >= 2.0 > 10 * times[None]
    assert source.budgets.vms["a"].migration_limited_s > 1.5


@pytest.mark.parametrize("budget, problem", [
    ({"trap_rate": -1}, "vm[0].budgets.trap_rate: must be a positive number"),
    ({"trap_rat": 5}, "vm[0].budgets.trap_rat: unknown budget"),
    ({"migration_bandwidth": "fast"}, "vm[0].budgets.migration_bandwidth: 'fast' is not a bandwidth"),
])
def test_bad_budgets_are_one_line_errors(tmp_path, budget, problem):
    with pytest.raises(UserError, match=re.escape(problem)):
        parse_scenario({"host": {"memory": "16MiB"}, "vm": [{"memory": "4MiB", "budgets": budget}]})
    path = tmp_path / "bad.toml"
    key, value = next(iter(budget.items()))
    path.write_text(f'[host]\nmemory = "16MiB"\n[[vm]]\nmemory = "4MiB"\nbudgets = {{ {key} = {json.dumps(value)} }}\n')
    proc = subprocess.run([sys.executable, "-m", "memvisor", "run", str(path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert problem in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_budgets_section_in_report_json(tmp_path):
    budget = {"trap_rate": 50000, "migration_bandwidth": "100MiB/s"}
    report = run_with_dirty_logging(hog_scenario(hog_budget=budget, seconds="50ms"))
    report.write(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    section = next(s for s in data["sections"] if s["title"] == "Budgets")
    hog = section["metrics"]["vms"]["hog"]
    assert hog["budget"] == {"trap_rate": 50000.0, "trap_burst": None, "handler_share": None, "scan_rate": None,
                             "migration_bandwidth": 100.0 * 2**20}
    assert (tmp_path / "trap_rates.png").exists()


def test_a_batch_is_cut_before_the_first_trap_the_budget_cannot_pay():
    """Trap budget 1,000/s with 10 traps of slack: of a batch touching 100 traced pages (each
    twice), the first 10 pages' traps run and the batch ends before the 11th page's first touch;
    the VM then waits until its bucket is half full."""
    host = small_host(memory_pages=4096)
    vm = host.create_vm("a", 1024, budget=Budget(trap_rate=1000))
    pages = np.arange(0, 200, 2)
    host.backend.trace(vm, pages)
    gpps = np.repeat(pages, 2)  # 0 0 2 2 4 4 ...
    result = host.access(vm, gpps, np.zeros(len(gpps), bool), within_budget=True)
    assert result.accesses == 20 and result.traced == 10
    assert host.backend.traced(vm, pages).sum() == 90
    use = host.budgets.vms["a"]
    assert use.throttled_batches == 1 and host.budgets.ready_at(vm) == pytest.approx(0.005)
    whole = host.access(vm, gpps, np.zeros(len(gpps), bool))  # without within_budget: all of it
    assert whole.accesses == 200 and whole.traced == 90


def test_more_handler_threads_leave_less_to_wait_for():
    """With two handler threads the hog's trap work occupies one and web's traps are served by
    the other: web waits far less for the handler than with one thread, budget or none."""
    def web(threads):
        scenario = hog_scenario(seconds="300ms")
        scenario = attrs.evolve(scenario, host=attrs.evolve(scenario.host, handler_threads=threads))
        report = run_with_dirty_logging(scenario)
        return report.data["vms"]["web"]["accesses"], budgets(report)["web"]["handler_wait_s"]

    (one, wait_one), (two, wait_two) = web(1), web(2)
    assert two > 2 * one and wait_two < wait_one / 10
