"""The balloon's part in ``memvisor selftest`` (the all-techniques state machine of
``memvisor.testing.integration``): its steps, its check, and what its pages read."""

from __future__ import annotations

import numpy as np


def inflate(plugin, host, vm, count: int) -> None:
    """The VM's driver takes ``count`` more pages (also while a live migration runs)."""
    plugin.inflate(vm, count)


def deflate(plugin, host, vm, count: int) -> None:
    """The VM's driver gives ``count`` pages back."""
    plugin.deflate(vm, count)


def driver_reset(plugin, host, vm) -> None:
    """The VM's driver restarts (a guest reboot) and forgets its pages."""
    plugin.reset_driver(vm)


def check(plugin, host) -> int:
    """Every balloon page maps the balloon's one page, which has one reference per balloon
    page and the balloon's hold, and reads zeros; returns the pages held (one per balloon)."""
    held = 0
    for vm in host.vms.values():
        state = plugin.state(vm)
        if state.size:
            held += 1
            assert np.all(host.backend.mpns(vm, state.order) == state.mpn), \
                f"VM {vm.name}: a balloon page was remapped behind the balloon"
            assert host.backend.refcounts(np.array([state.mpn]))[0] == state.size + 1, \
                f"VM {vm.name}: the balloon's page has the wrong reference count"
    assert plugin.verify() == 0, "a balloon page does not read zeros"
    return held


def balloon_pages(plugin, host, vm):
    """The VM's pages in its balloon: the guest gave them up, and they read zeros."""
    return plugin.balloon_pages(vm), None


def contribute(selftest) -> None:
    """Settings, steps, check and view of the balloon on the machine's hosts."""
    selftest.settings({"reload_delay": "20ms", "max_fraction": 0.5})
    selftest.step("inflate", inflate, count=(1, 300), during_migration=(0, 200))
    selftest.step("deflate", deflate, count=(1, 300))
    selftest.step("driver_reset", driver_reset)
    selftest.check(check)
    selftest.guest_view(balloon_pages)
