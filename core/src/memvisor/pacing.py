"""Guest batches on a real clock, cut so that none outlasts half a tick interval.

On a virtual clock a batch takes no real time and ticks fire between batches wherever they
fall. On a real clock (the Linux backend) a batch of 65,536 accesses takes from 30 ms to half a
second, and a tick due meanwhile waits for it: a 10 ms tick fired once in a 3.5 s run. So each
VM's batches are sized by what its recent batches cost: accesses at the recent cost per
access, and traps at the recent cost per trap (a trap runs hooks; a lazy restore's fault
reads a storage block), counted exactly where the backend can tell which accesses trap. A
batch holds at least one access and one trap, so a single access that costs more than a tick
still runs.

Costs are moving averages (each batch weighs half), not the highest recent cost: on a shared
machine a batch is sometimes preempted for milliseconds, and a high-water mark would then keep
every batch of the VM tiny for dozens of batches, each paying the round trip to its guest.
A batch's fixed cost (that round trip) counts in its cost per access, so a small batch looks
dear per access; batches still grow (at most twofold each) while they take less than their
share of the tick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.backend import AccessResult
    from memvisor.host import VM, Host

FIRST_BATCH = 64
"""Accesses of a VM's first batch, before its cost per access is known (a guest's first touch
of a page costs 10–40 µs on the Linux backend: up to 2.6 ms)."""


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (previous + value) / 2


@attrs.define
class Cost:
    """What a VM's recent batches cost on a real clock (moving averages, in seconds)."""

    per_access: float | None = None
    per_trap: float | None = None
    last_size: int = FIRST_BATCH


class Pacing:
    """Sizes and cuts the batches of every VM of ``host`` to fit ``share`` of a tick interval."""

    def __init__(self, host: Host, share: float = 0.5):
        self.host = host
        self.seconds = host.tick_interval * share
        self.costs: dict[str, Cost] = {}

    def size(self, vm: VM, size: int) -> int:
        """Accesses to draw for ``vm``'s next batch (at most ``size``): what its recent cost per
        access fits, growing at most twofold a batch."""
        cost = self.costs.get(vm.name)
        if cost is None or cost.per_access is None:
            return min(size, FIRST_BATCH)
        fits = self.seconds / cost.per_access if cost.per_access > 0 else float("inf")
        return int(max(1, min(size, 2 * cost.last_size, fits)))

    def cut(self, vm: VM, gpps: np.ndarray, writes: np.ndarray) -> int:
        """How many accesses of a drawn batch to run now: those before the first trap that its
        recent cost per trap no longer fits (one trap when that cost is not known yet)."""
        cost = self.costs.get(vm.name)
        positions = self.host.first_traps(vm, self.host.guest_pages(vm, gpps), writes)
        if positions is None:
            return len(gpps)
        per_trap = None if cost is None else cost.per_trap
        allowed = 1 if not per_trap else max(1, int(self.seconds / per_trap))
        return len(gpps) if len(positions) <= allowed else max(1, int(positions[allowed]))

    def learn(self, vm: VM, result: AccessResult, seconds: float) -> None:
        """A batch of ``vm`` took ``seconds``: remember its costs per access and per trap."""
        cost = self.costs.setdefault(vm.name, Cost())
        traps = result.faults + result.traced + result.write_traps
        if traps:
            cost.per_trap = _average(cost.per_trap, result.handler_seconds / traps)
        if result.accesses:
            own = max(0.0, seconds - result.handler_seconds) / result.accesses
            cost.per_access = _average(cost.per_access, own)
            cost.last_size = result.accesses
