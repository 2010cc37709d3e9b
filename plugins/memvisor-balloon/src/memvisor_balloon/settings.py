"""The ``[plugins.balloon]`` table of a scenario, checked in full when the host starts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from memvisor.errors import ScenarioError, UserError
from memvisor.scenario import Table

POLICIES = ("auto", "idle_tax", "mrc")
"""Values of ``policy``."""

RESETS = ("lazy", "eager")
"""Values of ``reset``."""


@attrs.frozen
class BalloonSettings:
    """What ``[plugins.balloon]`` may set (docs/balloon.md has the full table).

    :ivar policy: ``"auto"`` (MRC-guided when a plugin answers
        :func:`memvisor_giveable_pages` for every VM, else the idle-memory tax), ``"idle_tax"``
        or ``"mrc"`` (falls back to the idle tax when nobody answers).
    :ivar tax_rate: the idle-memory tax rate (0 <= tax < 1); ESX's default is 0.75.
    :ivar max_fraction: the largest balloon as a fraction of a VM's memory (ESX: 0.65).
    :ivar shares: shares per VM name; a VM that is not named has one share per page.
    :ivar reset: ``"lazy"`` (balloon pages go to the zero page; each becomes a private
        zero-filled page on its first write) or ``"eager"`` (private zero-filled pages at once,
        as far as free memory above the low watermark allows).
    :ivar reload_delay: seconds a reset guest driver needs before it inflates again.
    :ivar sample_interval: seconds between samples of accessed bits (idle ages and activity).
    :ivar verify: check every balloon page's mapping and the balloon page's bytes at each tick.
    """

    policy: str = "auto"
    tax_rate: float = 0.75
    max_fraction: float = 0.65
    shares: Mapping[str, float] = attrs.field(factory=dict)
    reset: str = "lazy"
    reload_delay: float = 0.05
    sample_interval: float = 0.05
    verify: bool = True

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> BalloonSettings:
        """Check a ``[plugins.balloon]`` table; a mistake is one :class:`UserError` line naming
        the key (the runner adds the scenario's path)."""
        table = Table("", "plugins.balloon", data)
        try:
            policy = table.get("policy", str, "auto")
            if policy not in POLICIES:
                raise table.error("policy", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
            tax = table.number("tax_rate", 0.75, low=0.0, high=0.99)
            max_fraction = table.number("max_fraction", 0.65, low=0.0, high=0.99)
            shares_table = table.table("shares")
            shares = {}
            for name in shares_table.data:
                shares[name] = float(shares_table.number(name, low=0.0, high=1e18))
                if shares[name] <= 0:
                    raise shares_table.error(name, "must be positive")
            reset = table.get("reset", str, "lazy")
            if reset not in RESETS:
                raise table.error("reset", f"must be one of {', '.join(RESETS)}, got {reset!r}")
            reload_delay = table.duration("reload_delay", 0.05)
            sample_interval = table.duration("sample_interval", 0.05)
            if sample_interval <= 0:
                raise table.error("sample_interval", "must be positive")
            verify = table.get("verify", bool, True)
            table.check_unknown()
        except ScenarioError as exc:
            # The host does not know the scenario's path; the runner prefixes it.
            raise UserError(f"{exc.key}: {exc.problem}") from None
        return cls(policy, float(tax), float(max_fraction), shares, reset, reload_delay, sample_interval, verify)
