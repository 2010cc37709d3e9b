"""memvisor-stats counts events by kind and VM and reports them."""


import numpy as np

from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import listed_plugin, small_host


def test_stats_is_listed_by_memvisor_plugins():
    """The plugin appears in `memvisor plugins --json` with the hooks it implements."""
    row = listed_plugin("stats")
    assert row["distribution"] == "memvisor-stats"
    assert "memvisor_page_fault" in row["hooks"] and "memvisor_report" in row["hooks"]


def test_stats_counts_pages_per_event_kind_and_vm():
    """Faults, traced accesses and write traps are counted per VM, each page once per batch."""
    host = small_host(plugins=["stats"])
    a, b = host.create_vm("a", 64), host.create_vm("b", 64)
    host.backend.unmap(a, np.arange(4))
    host.backend.trace(b, np.arange(10))
    host.backend.protect(b, np.arange(3))
    host.access(a, np.array([0, 1, 1, 2, 40]), np.zeros(5, bool))
    host.access(b, np.array([0, 1, 2, 2, 30]), np.array([True, True, False, True, False]))
    (plugin,) = [p for name, p in host.pm.list_name_plugin() if name == "stats"]
    assert plugin.pages["a"] == {"faults": 3}
    assert plugin.pages["b"] == {"traced_accesses": 3, "write_traps": 3}
    section = plugin.memvisor_report()
    assert section.metrics["pages_by_vm"]["b"]["write_traps"] == 3


def test_stats_section_is_in_the_report_of_a_run():
    """A scenario that enables stats has its section in report.json, ticks counted."""
    scenario = parse_scenario({
        "host": {"memory": "32MiB", "tick": "1ms", "batch": 1024},
        "plugins": {"stats": {}},
        "vm": [{"name": "a", "memory": "4MiB", "workload": {"kind": "uniform"}}],
        "timeline": [{"do": "run", "for": "10ms"}],
    })
    report = ScenarioRun(scenario).run()
    calls = report.metric("stats", "hook_calls")
    assert calls["ticks"] >= 10
