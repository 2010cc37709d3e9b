"""A plugin with a report section, installed for the sweep's tests: they need no other
distribution of this repository."""

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


@pytest.fixture(scope="session", autouse=True)
def counter_plugin(tmp_path_factory):
    """The ``counter`` plugin, installed for the runs of these tests (and their subprocesses)."""
    site = build_plugin(tmp_path_factory.mktemp("counter"), "counter", COUNTER, target="Counter")
    with plugins_at(site):
        yield
