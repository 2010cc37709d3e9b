"""A guest that traps in a loop beside a well-behaved one: the fixture of the tests and the
benchmark of per-VM budgets (:mod:`memvisor.budgets`).

:class:`DirtyLogging` write-protects every page of every VM at every tick, as continuous
replication's dirty logging does. VM ``web`` (zipf, 30% writes) then traps on the few hot pages
it writes; VM ``hog`` writes all of its memory in a loop and traps on every page, every tick.
"""

from __future__ import annotations

import numpy as np

from memvisor import hookimpl


class DirtyLogging:
    """Write-protects every page of every VM at every tick. With ``copy_out``, each write trap
    of ``hog`` also writes the page out to disk inside the trap (as a lazy save's copy before
    write may): few traps, each heavy."""

    def __init__(self, copy_out: bool = False):
        self.copy_out = copy_out

    @hookimpl
    def memvisor_tick(self, host, tick):
        """Protect every page again: the next write to each traps."""
        for vm in host.vms.values():
            host.backend.protect(vm, np.arange(vm.pages))

    @hookimpl
    def memvisor_write_trap(self, host, vm, write):
        """Charge the copy-out of ``hog``'s trapped pages (one disk write call each)."""
        if self.copy_out and vm.name == "hog":
            host.backend.account("disk_write", len(write.gpps) * 4096, len(write.gpps))


def hog_scenario(hog: bool = True, hog_budget: dict | None = None, default: dict | None = None,
                 seconds: str = "1s", memory: str = "64MiB"):
    """``web`` alone, or beside ``hog`` (under ``hog_budget``), every VM under ``default``."""
    from memvisor.scenario import parse_scenario

    vms = [{"name": "web", "memory": memory, "workload": {"kind": "zipf", "write_fraction": 0.3}}]
    if hog:
        vms.append({"name": "hog", "memory": memory, "workload": {"kind": "scan", "write_fraction": 1.0},
                    **({"budgets": hog_budget} if hog_budget else {})})
    host = {"memory": "256MiB", "tick": "10ms", "batch": 16384}
    if default:
        host["budgets"] = default
    return parse_scenario({"name": "hog", "host": host, "vm": vms, "timeline": [{"do": "run", "for": seconds}]})


def run_with_dirty_logging(scenario, copy_out: bool = False):
    """Run ``scenario`` with :class:`DirtyLogging`; returns the report."""
    from memvisor.runner import ScenarioRun

    return ScenarioRun(scenario, extra_plugins=[DirtyLogging(copy_out)]).run()
