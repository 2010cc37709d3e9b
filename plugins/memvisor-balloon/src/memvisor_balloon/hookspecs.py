"""The hook the balloon's policy asks other plugins (declared through
``memvisor_register_hookspecs``)."""

from __future__ import annotations

from memvisor import hookspec


@hookspec(firstresult=True)
def memvisor_giveable_pages(host, vm, miss_ratio_increase: float) -> int | None:
    """Decision. How many pages ``vm`` could give up for at most ``miss_ratio_increase`` more
    misses, by a plugin that knows the VM's miss-rate curve.

    The balloon's policy (``policy = "auto"`` or ``"mrc"``) asks this to take memory where the
    miss ratio rises least. ``None`` means no plugin can tell; the policy falls back to the
    idle-memory tax. The count is of the VM's whole memory: ``vm.pages`` minus the smallest
    size whose miss ratio is at most the miss ratio at the VM's current allocation (its pages
    less those a guest driver has pinned) plus ``miss_ratio_increase``; pages already taken by
    a balloon are included, so the balloon subtracts what it holds. Implement it with
    ``@memvisor.hookimpl(optionalhook=True)``.

    :param host: the host.
    :param vm: the VM.
    :param miss_ratio_increase: the largest acceptable rise of the VM's miss ratio (0..1).
    :returns: pages the VM can give up, or ``None``.
    """
