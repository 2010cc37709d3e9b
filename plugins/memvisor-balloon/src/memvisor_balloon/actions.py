"""Scenario timeline actions of the balloon: set a target, reset a guest's driver.

Both need the balloon plugin enabled in the scenario (a ``[plugins.balloon]`` table); memory
pressure is raised with the core's ``pressure`` action.
"""

from __future__ import annotations

from memvisor import PAGE_SIZE


def _enabled(plugin, step):
    """The balloon plugin of the running host, which the runner hands the action; one line
    naming the step when the scenario does not enable it."""
    if plugin is None:
        raise step.error("do", f"{step.action} needs the balloon plugin: add a [plugins.balloon] table")
    return plugin


def balloon_target(run, step, plugin):
    """``do = "balloon_target"``: ask VM ``vm``'s balloon driver for a balloon of ``target``
    (a size) or ``fraction`` (of the VM's memory); it inflates or deflates now."""
    plugin = _enabled(plugin, step)
    vm = step.vm()
    if "target" in step.data and "fraction" in step.data:
        raise step.error("fraction", "give target or fraction, not both")
    if "fraction" in step.data:
        pages = int(step.number("fraction", low=0.0, high=1.0) * vm.pages)
    else:
        pages = step.size("target") // PAGE_SIZE
    cap = plugin.cap(vm)
    if pages > cap:
        key = "fraction" if "fraction" in step.data else "target"
        raise step.error(key, f"the balloon of VM {vm.name!r} can hold at most {cap} pages "
                              f"({cap * PAGE_SIZE / 2**20:.0f}MiB, plugins.balloon.max_fraction)")
    plugin.set_target(vm, pages)


def balloon_reset(run, step, plugin):
    """``do = "balloon_reset"``: VM ``vm``'s balloon driver restarts (a guest reboot or a
    driver reload) and forgets its pages; the hypervisor finds out when the guest writes one."""
    plugin = _enabled(plugin, step)
    plugin.reset_driver(step.vm())
