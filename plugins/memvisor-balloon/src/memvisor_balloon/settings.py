"""The ``[plugins.balloon]`` table of a scenario, declared for the core to check."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from memvisor.settings import Duration, setting

POLICIES = ("auto", "idle_tax", "mrc")
"""Values of ``policy``."""

RESETS = ("lazy", "eager")
"""Values of ``reset``."""


@attrs.frozen
class BalloonSettings:
    """What ``[plugins.balloon]`` may set (docs/balloon.md explains the policies)."""

    policy: str = setting("auto", choices=POLICIES,
                          doc="auto: MRC-guided when a plugin answers memvisor_giveable_pages for every VM, else "
                              "the idle-memory tax; idle_tax; or mrc (the idle tax when nobody answers); see above.")
    tax_rate: float = setting(0.75, low=0.0, high=0.99, doc="The idle-memory tax rate (ESX's default is 0.75).")
    max_fraction: float = setting(0.65, low=0.0, high=0.99,
                                  doc="The largest balloon as a fraction of a VM's memory (ESX: 0.65).")
    shares: Mapping[str, float] = setting({}, above=0.0, high=1e18,
                                          doc="Shares per VM name, a table { vm-name = shares }; a VM that is not "
                                              "named has one share per page.")
    reset: str = setting("lazy", choices=RESETS,
                         doc="After a driver reset, balloon pages go to the zero page and become private on their "
                             "first write (lazy), or become private zero-filled pages at once, as free memory allows "
                             "(eager).")
    reload_delay: Duration = setting(0.05, low=0.0, doc="How long a reset guest driver takes before it inflates again.")
    sample_interval: Duration = setting(0.05, above=0.0,
                                        doc="Time between samples of accessed bits (idle ages and activity).")
    verify: bool = setting(True, doc="Check every balloon page's mapping and the balloon page's bytes at each tick.")
