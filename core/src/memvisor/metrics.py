"""The core's own measurements of a run: counters per VM, series over time, and events."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.backend import AccessResult
    from memvisor.host import Host

COUNTERS = ("accesses", "remote", "faults", "traced", "write_traps", "guest_traps")
"""Per VM: accesses of its guest and how many were remote; faults, traced accesses and write
traps as delivered to the plugins (of its guest's accesses and of its disk I/O alike);
guest_traps, the traps of its guest's own accesses (what a trap budget is charged)."""


class Metrics:
    """Counters per VM (accesses and traps), series sampled at every tick, and events.

    Series are columns of numbers keyed by name, all sampled at the times in ``series["time"]``.
    """

    def __init__(self) -> None:
        self.counters: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
        self.series: dict[str, list[float]] = defaultdict(list)
        self.events: list[dict[str, Any]] = []
        self._since_sample: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def add_access(self, vm: str, result: AccessResult) -> None:
        """Count one batch of a VM's accesses (their traps are counted as they are delivered,
        :meth:`add_traps`)."""
        c = self.counters[vm]
        c["accesses"] += result.accesses
        c["remote"] += result.remote
        c["guest_traps"] += result.faults + result.traced + result.write_traps
        window = self._since_sample[vm]
        window[0] += result.accesses
        window[1] += result.remote

    def add_traps(self, vm: str, kind: str, pages: int) -> None:
        """Count traps delivered to the plugins: ``kind`` is ``faults``, ``traced`` or
        ``write_traps``."""
        self.counters[vm][kind] += pages

    def event(self, time: float, kind: str, **fields: Any) -> None:
        """Record something that happened once (a scenario step, memory pressure)."""
        self.events.append({"time": time, "kind": kind, **fields})

    def sample_memory(self, host: Host) -> None:
        """Append one sample of machine memory and each VM's local-access fraction."""
        backend = host.backend
        self.series["time"].append(host.now)
        self.series["free_pages"].append(backend.free_pages())
        self.series["used_pages"].append(backend.total_pages() - backend.free_pages())
        for name in host.vms:
            accesses, remote = self._since_sample[name]
            local = 1.0 - remote / accesses if accesses else float("nan")
            column = self.series[f"local_fraction/{name}"]
            column.extend([float("nan")] * (len(self.series["time"]) - 1 - len(column)))  # VM came late
            column.append(local)
            self._since_sample[name] = [0, 0]

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON-able values."""
        return {
            "vms": {name: dict(c) for name, c in self.counters.items()},
            "series": {name: list(values) for name, values in self.series.items()},
            "events": list(self.events),
        }
