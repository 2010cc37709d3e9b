"""diskmap's part in ``memvisor selftest`` (the all-techniques state machine of
``memvisor.testing.integration``): a scan step and the check of its mappings."""

from __future__ import annotations


def diskmap_scan(plugin, host, vm) -> None:
    """Look for pages of the VM equal to blocks of its disks (VMs with a disk only)."""
    if host.disks.get(vm.name):
        plugin.scan(vm)


def check(plugin, host) -> None:
    """Every mapping diskmap trusts still holds: the page reads its block's bytes."""
    for vm in host.vms.values():
        if host.disks.get(vm.name):
            assert plugin.verify(vm) == 0, f"VM {vm.name}: a disk mapping diskmap trusts does not hold"


def contribute(selftest) -> None:
    """The scan step, the check, and a valid `memvisor diskmap scan` for the CLI matrix."""
    selftest.step("diskmap_scan", diskmap_scan)
    selftest.check(check)
    selftest.command("diskmap scan", {"image": "{image}", "disk": "{disk}", "json_out": "{out}/scan.json"})
