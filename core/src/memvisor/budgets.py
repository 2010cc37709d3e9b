"""Per-VM resource budgets: trap rate, handler share, scan rate and migration bandwidth.

The host's trap handler, its content scanners and its network are shared by every VM. A
misbehaving guest — one that writes all of its memory in a loop while its pages are write
protected, or whose pages never settle so the scanners hash them again and again — must not
take them from the other VMs. Each VM therefore has a :class:`Budget`:

``trap_rate``
    Traps per second (faults, traced accesses and write traps together) the handler serves
    for the VM, with ``trap_burst`` traps of slack: a token bucket. Before a batch runs the
    host asks the backend which accesses would trap (:meth:`memvisor.backend.Backend.trapping`)
    and runs the batch only up to the first trap the tokens cannot pay for; the rest runs once
    the bucket is half full again (:meth:`Budgets.batch_cut`). A trap is never refused — that
    would change what the guest reads —, so what ran is charged afterwards, and a VM in debt
    waits until it is paid back (the runner gives its virtual CPUs no batch meanwhile).
``handler_share``
    The fraction of the trap handler's time the VM's traps may take (``0.25``: a quarter), with
    10 ms of slack: traps differ in cost (a lazy save's copy before write, a lazy restore's
    disk read inside the fault), so a trap count alone does not bound the handler's work.
    Enforced like ``trap_rate`` in seconds of handler work, at the cost per trap the VM's
    recent batches had: the first batch after its traps turn heavier can exceed it.
``scan_rate``
    Pages per second of the VM's memory that the host's content scanners read (the sharing
    scanner's hashing, diskmap's content scan). A scanner asks :meth:`Budgets.take_scan` for
    pages and scans no more than it is granted; scans never go into debt.
``migration_bandwidth``
    Bytes per second that a live migration of the VM may send: a batch of records takes at
    least ``bytes / migration_bandwidth`` seconds, so a guest that dirties memory faster than
    that cannot hold the link (its pre-copy runs out of rounds and stops and copies).

``None`` is no limit. Budgets come from ``[host.budgets]`` (every VM) and a VM's own
``budgets`` table in a scenario, or :meth:`memvisor.host.Host.create_vm`. The figures of each
VM — budget, use, peak rate, time waited — are in the report (``memvisor`` section "Budgets").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from memvisor.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.backend import AccessResult
    from memvisor.host import VM

BURST_SECONDS = 0.01
"""Default slack of a trap budget: this many seconds of traps at the rate."""

MIN_BATCH = 256
"""The fewest accesses a batch of a VM with a trap budget is sized to when the backend cannot
tell which accesses would trap (Python's cost per batch must not dominate)."""

FIRST_TRAPS = 16
"""Traps a VM with a handler budget may take before what a trap costs it is known."""


@attrs.frozen
class Budget:
    """Limits of one VM's use of the host's shared resources (``None``: unlimited).

    :ivar trap_rate: traps per second the host's trap handler serves for the VM.
    :ivar trap_burst: traps the VM may take at once above the rate (default: 10 ms of rate).
    :ivar handler_share: fraction of the trap handler's time the VM's traps may take.
    :ivar scan_rate: pages per second of the VM's memory that content scanners may read.
    :ivar migration_bandwidth: bytes per second a live migration of the VM may send.
    """

    trap_rate: float | None = None
    trap_burst: float | None = None
    handler_share: float | None = None
    scan_rate: float | None = None
    migration_bandwidth: float | None = None

    @classmethod
    def parse(cls, table: Mapping[str, Any], where: str, base: Budget | None = None) -> Budget:
        """A budget from a scenario table (``trap_rate = 20000``, ``migration_bandwidth =
        "100MiB"`` per second…), over ``base`` for the keys it does not give. Raises
        :class:`UserError` naming ``where.key`` for an unknown key or a bad value."""
        from memvisor.scenario import parse_size

        values = attrs.asdict(base) if base is not None else {}
        for key, value in table.items():
            if key not in {f.name for f in attrs.fields(cls)}:
                known = ", ".join(f.name for f in attrs.fields(cls))
                raise UserError(f"{where}.{key}: unknown budget (known: {known})")
            if key == "migration_bandwidth" and isinstance(value, str):
                try:
                    value = parse_size(value.removesuffix("/s"))
                except ValueError:
                    raise UserError(f"{where}.{key}: {value!r} is not a bandwidth (use e.g. \"100MiB/s\")") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise UserError(f"{where}.{key}: must be a positive number, got {value!r}")
            if key == "handler_share" and value > 1:
                raise UserError(f"{where}.{key}: a fraction of the handler's time, at most 1, got {value!r}")
            values[key] = float(value)
        return cls(**values)

    def to_json(self) -> dict[str, float | None]:
        """The limits as a JSON-able dict (the report's ``budget`` of a VM)."""
        return attrs.asdict(self)


class TokenBucket:
    """Tokens refilled at ``rate`` per second up to ``capacity``; the balance may go negative
    (a debt) when a charge exceeds it."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.tokens, self._time = capacity, now

    def refill(self, now: float) -> float:
        """Add the tokens earned since the last call; returns the balance."""
        if now > self._time:
            self.tokens = min(self.capacity, self.tokens + (now - self._time) * self.rate)
            self._time = now
        return self.tokens

    def charge(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens, going into debt if need be; returns the seconds until the
        balance is back to zero (0 when it never went negative)."""
        self.refill(now)
        self.tokens -= amount
        return max(0.0, -self.tokens / self.rate)

    def grant(self, wanted: int, now: float) -> int:
        """Take at most ``wanted`` whole tokens, never going into debt; returns those taken."""
        granted = int(min(wanted, max(0.0, self.refill(now))))
        self.tokens -= granted
        return granted


class RateLimit:
    """A token bucket for one cost of a VM's batches (``"traps"``, or ``"handler_seconds"`` of
    handler work) and what one access and one trap have cost of it lately: the host cuts the
    VM's next batch at the traps its tokens pay for."""

    def __init__(self, cost: str, rate: float, burst: float, now: float):
        self.cost = cost
        self.bucket = TokenBucket(rate, burst, now)
        self.per_access: float | None = None  # unknown until a batch tells
        self.per_trap: float | None = 1.0 if cost == "traps" else None

    @staticmethod
    def _recent(ratio: float, previous: float | None) -> float:
        # The highest recent cost, forgotten by 10% a batch: a guest's costs jump when a
        # technique starts protecting its pages at a tick.
        return ratio if previous is None else max(ratio, 0.9 * previous)

    def charge(self, amount: float, traps: int, accesses: int, now: float) -> float:
        """Charge a batch's ``amount``; returns the seconds the VM must wait (0: none)."""
        if accesses:
            self.per_access = self._recent(amount / accesses, self.per_access)
        if traps and self.cost != "traps":
            self.per_trap = self._recent(amount / traps, self.per_trap)
        return self.bucket.charge(amount, now) if amount else 0.0

    def affordable_accesses(self, now: float) -> float:
        """Accesses the tokens left pay for at the recent cost per access (inf: any)."""
        if self.per_access is None:
            return 0.0  # the first batch is the smallest: its cost is not known yet
        if self.per_access <= 0:
            return float("inf")
        return self.bucket.refill(now) / self.per_access

    def affordable_traps(self, now: float) -> float:
        """Traps the tokens left pay for at the recent cost per trap."""
        if self.per_trap is None:
            return FIRST_TRAPS  # learn what a trap costs on a few
        return self.bucket.refill(now) / self.per_trap if self.per_trap > 0 else float("inf")


@attrs.define
class VMUse:
    """What one VM took of the host's shared resources, against its budget."""

    budget: Budget
    traps: int = 0
    throttled_batches: int = 0
    waited_s: float = 0.0
    ready_at: float = 0.0
    peak_trap_rate: float = 0.0
    scan_pages: int = 0
    scan_refused: int = 0
    migration_bytes: int = 0
    migration_limited_s: float = 0.0
    handler_s: float = 0.0
    handler_wait_s: float = 0.0
    trap_series: list[tuple[float, float, float]] = attrs.field(factory=list)  # (time, traps/s, handler s)
    limits: list[RateLimit] = attrs.field(factory=list)  # traps, handler seconds: charged per batch
    scan_bucket: TokenBucket | None = None
    _window: list[float] = attrs.field(factory=lambda: [0.0, 0.0, 0.0])  # [start, traps, handler s] since a tick

    def to_json(self) -> dict[str, Any]:
        """Budget and use, for the report."""
        return {
            "budget": self.budget.to_json(),
            "guest_traps": self.traps,
            "peak_trap_rate": round(self.peak_trap_rate, 1),
            "throttled_batches": self.throttled_batches,
            "waited_s": round(self.waited_s, 6),
            "handler_s": round(self.handler_s, 6),
            "handler_wait_s": round(self.handler_wait_s, 6),
            "scan_pages": self.scan_pages,
            "scan_refused": self.scan_refused,
            "migration_bytes": self.migration_bytes,
            "migration_limited_s": round(self.migration_limited_s, 6),
        }


class Budgets:
    """The budgets of every VM of a host and what each VM used (``host.budgets``).

    :param default: the budget of a VM created without its own.
    """

    def __init__(self, default: Budget | None = None):
        self.default = default or Budget()
        self.vms: dict[str, VMUse] = {}

    def add(self, vm: VM, budget: Budget | None, now: float) -> None:
        """Start accounting ``vm`` under ``budget`` (the default when None)."""
        budget = budget or self.default
        use = VMUse(budget)
        if budget.trap_rate is not None:
            burst = budget.trap_burst if budget.trap_burst is not None else budget.trap_rate * BURST_SECONDS
            use.limits.append(RateLimit("traps", budget.trap_rate, max(1.0, burst), now))
        if budget.handler_share is not None:
            share = budget.handler_share
            use.limits.append(RateLimit("handler_seconds", share, share * BURST_SECONDS, now))
        if budget.scan_rate is not None:
            # Scanners run at ticks: one tick's worth of pages must fit, or nothing is ever scanned.
            use.scan_bucket = TokenBucket(budget.scan_rate, max(1.0, budget.scan_rate * 0.1), now)
        use._window = [now, 0.0, 0.0]
        self.vms[vm.name] = use

    def use(self, vm: VM) -> VMUse:
        """What ``vm`` used (accounted under the default budget if it was never added)."""
        if vm.name not in self.vms:
            self.add(vm, None, 0.0)
        return self.vms[vm.name]

    # -- traps --------------------------------------------------------------------------------

    def charge_traps(self, vm: VM, result: AccessResult, now: float) -> None:
        """Charge a batch's traps and handler work to ``vm``; past its budget, the VM waits
        until the debt is paid (:meth:`ready_at`)."""
        use = self.use(vm)
        traps = result.faults + result.traced + result.write_traps
        use.traps += traps
        use.handler_s += result.handler_seconds
        use._window[1] += traps
        use._window[2] += result.handler_seconds
        costs = {"traps": traps, "handler_seconds": result.handler_seconds}
        wait = max((limit.charge(costs[limit.cost], traps, result.accesses, now) for limit in use.limits),
                   default=0.0)
        if wait > 0:
            use.throttled_batches += 1
            self._wait(use, now, wait)

    def batch_size(self, vm: VM, size: int, now: float) -> int:
        """How many of ``size`` accesses ``vm``'s next batch may have: as many as its tokens
        pay for at its recent costs per access (at least :data:`MIN_BATCH`): where the cut is
        when the backend cannot tell which accesses would trap (else :meth:`allowed_traps`)."""
        use = self.use(vm)
        if not use.limits:
            return size
        affordable = min(limit.affordable_accesses(now) for limit in use.limits)
        return int(min(size, max(MIN_BATCH, affordable)))

    def batch_cut(self, vm: VM, now: float) -> None:
        """``vm``'s batch was cut at its budget: it waits until its buckets are half full
        again, so that it runs in chunks of half its burst rather than one trap at a time."""
        use = self.use(vm)
        refill = max((limit.bucket.capacity / 2 - limit.bucket.refill(now)) / limit.bucket.rate
                     for limit in use.limits)
        use.throttled_batches += 1
        self._wait(use, now, refill)

    def _wait(self, use: VMUse, now: float, seconds: float) -> None:
        if seconds > 0:
            ready = max(use.ready_at, now + seconds)
            use.waited_s += ready - max(now, use.ready_at)
            use.ready_at = ready

    def allowed_traps(self, vm: VM, now: float) -> float:
        """Traps ``vm``'s tokens pay for now (inf without a trap or handler budget)."""
        use = self.use(vm)
        return min((limit.affordable_traps(now) for limit in use.limits), default=float("inf"))

    def record_handler_wait(self, vm: VM, seconds: float) -> None:
        """``vm``'s batch waited ``seconds`` for the shared trap handler (other VMs' trap work)."""
        self.use(vm).handler_wait_s += seconds

    def ready_at(self, vm: VM) -> float:
        """The time from which ``vm`` may run its next batch (its trap debt paid)."""
        use = self.vms.get(vm.name)
        return 0.0 if use is None else use.ready_at

    def sample(self, now: float) -> None:
        """Close each VM's window: its trap rate and handler seconds since the last tick."""
        for use in self.vms.values():
            start, traps, handler = use._window
            if now > start:
                rate = traps / (now - start)
                use.peak_trap_rate = max(use.peak_trap_rate, rate)
                use.trap_series.append((now, rate, handler))
                use._window = [now, 0.0, 0.0]

    # -- scans and migrations -----------------------------------------------------------------

    def take_scan(self, vm: VM, pages: int, now: float) -> int:
        """A content scanner wants to read ``pages`` pages of ``vm``: returns how many it may
        (all of them when the VM has no scan budget)."""
        use = self.use(vm)
        granted = pages if use.scan_bucket is None else use.scan_bucket.grant(pages, now)
        use.scan_pages += granted
        use.scan_refused += pages - granted
        return granted

    def migration_seconds(self, vm: VM, nbytes: int, seconds: float) -> float:
        """A batch of ``nbytes`` of ``vm``'s migration that the link would carry in ``seconds``:
        returns how long it takes within the VM's bandwidth budget."""
        use = self.use(vm)
        use.migration_bytes += nbytes
        bandwidth = use.budget.migration_bandwidth
        if bandwidth is None:
            return seconds
        limited = nbytes / bandwidth
        if limited > seconds:
            use.migration_limited_s += limited - seconds
            return limited
        return seconds
