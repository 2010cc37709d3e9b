"""memvisor-stats: counts every event the core delivers, by kind and VM, and reports them.

It is written as the example to copy: one class, one hook implementation per event, state per
host (the core makes one instance per host), and a report section built from plain values.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import attrs

from memvisor import hookimpl
from memvisor.report import Column, Plot, ReportSection, Table

EVENT_KINDS = ("faults", "traced_accesses", "write_traps", "ticks", "pressure_events", "vcpu_moves")


@attrs.frozen
class StatsSettings:
    """``[plugins.stats]`` has no settings: an empty table enables the plugin (and a misspelt
    key in it is refused)."""


class StatsPlugin:
    """Counts events by kind and VM: pages per event kind, and hook calls (batches)."""

    def __init__(self) -> None:
        self.pages: dict[str, Counter] = defaultdict(Counter)  # VM name -> event kind -> pages
        self.calls: Counter = Counter()  # event kind -> hook calls
        self.timeline: list[tuple[float, int]] = []  # (time, trapped pages in the tick so far)
        self._window = 0

    def _count(self, vm, kind: str, pages: int) -> None:
        self.pages[vm.name][kind] += pages
        self.calls[kind] += 1
        self._window += pages

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare the (empty) settings of ``[plugins.stats]``."""
        register("stats", StatsSettings)

    @hookimpl
    def memvisor_page_fault(self, vm, fault):
        """Count faulting pages (serves none)."""
        self._count(vm, "faults", len(fault.gpps))

    @hookimpl
    def memvisor_traced_access(self, vm, access):
        """Count traced pages touched."""
        self._count(vm, "traced_accesses", len(access.gpps))

    @hookimpl
    def memvisor_write_trap(self, vm, write):
        """Count writes to shared or write-protected pages."""
        self._count(vm, "write_traps", len(write.gpps))

    @hookimpl
    def memvisor_vcpus_moved(self, vm):
        """Count NUMA moves of a VM's virtual CPUs."""
        self._count(vm, "vcpu_moves", 1)

    @hookimpl
    def memvisor_memory_pressure(self):
        """Count memory-pressure events (reclaims nothing)."""
        self.calls["pressure_events"] += 1

    @hookimpl
    def memvisor_tick(self, tick):
        """Count ticks and sample the trap rate once per tick."""
        self.calls["ticks"] += 1
        self.timeline.append((tick.now, self._window))
        self._window = 0

    @hookimpl
    def memvisor_report(self):
        """One section: pages per event kind and VM, hook calls per kind, traps over time."""
        per_vm = {vm: {kind: counts.get(kind, 0) for kind in EVENT_KINDS if kind in counts}
                  for vm, counts in sorted(self.pages.items())}
        plots = []
        if self.timeline:
            times, traps = zip(*self.timeline)
            plots.append(Plot("stats-traps", "Trapped pages per tick", "time (s)", "pages", {"traps": (times, traps)},
                              shows="Pages delivered in every event hook (all VMs) since the previous tick."))
        return ReportSection(
            plugin="stats",
            title="Event counts",
            metrics={"pages_by_vm": per_vm, "hook_calls": dict(sorted(self.calls.items()))},
            plots=plots,
            # How the page shows the metrics: a row per VM, a column per kind (a kind no VM had
            # is left out), and the hook calls.
            tables=[Table("Pages delivered, by VM", [Column(k, k.replace("_", " "), "count") for k in EVENT_KINDS],
                          rows=("pages_by_vm",)),
                    Table("Hook calls", [Column(k, k.replace("_", " "), "count") for k in EVENT_KINDS],
                          record=("hook_calls",))],
            text="Pages delivered per event kind and VM (each page once per guest batch), and hook calls per kind.",
        )
