"""A plugin with a report section, installed for the sweep's tests (they need no other
distribution of this repository), and the small scenario they sweep."""

import pytest

from memvisor.testing import build_plugin, plugins_at

COUNTER = """
from memvisor import hookimpl
from memvisor.report import ReportSection


class Counter:
    def __init__(self):
        self.ticks = 0

    @hookimpl
    def memvisor_tick(self):
        self.ticks += 1

    @hookimpl
    def memvisor_report(self):
        return ReportSection("counter", "Ticks", {"ticks": self.ticks})
"""

TINY = """
name = "tiny"
seed = 1
[host]
memory = "16MiB"
tick = "1ms"
batch = 1024
[plugins.counter]
[[vm]]
name = "web"
memory = "1MiB"
contents = { zero = 0.5, text = 0.5 }
workload = { kind = "zipf", alpha = 0.9 }
[[vm]]
name = "db"
memory = "1MiB"
workload = { kind = "uniform" }
[[timeline]]
do = "run"
for = "2ms"
"""
"""A two-VM scenario of 2 ms on a 16 MiB host with the counter plugin."""


@pytest.fixture(scope="session", autouse=True)
def counter_plugin(tmp_path_factory):
    """The ``counter`` plugin, installed for the runs of these tests (and their subprocesses)."""
    site = build_plugin(tmp_path_factory.mktemp("counter"), "counter", COUNTER, target="Counter")
    with plugins_at(site):
        yield


@pytest.fixture
def tiny(tmp_path):
    """:data:`TINY` as a file."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path
