"""The guest side: a model of the balloon driver that runs inside a VM.

A real balloon driver (VMware's vmmemctl, virtio-balloon) allocates pages from the guest's own
allocator, pins them so the guest never uses them, and reports their page numbers to the
hypervisor. This model does the same through the core's model of the guest allocator
(:meth:`memvisor.host.Host.pin_guest_pages`): the guest's workloads stop touching pinned pages.

It picks the pages a guest allocator would hand out first: free memory, which here means the
pages the guest has not touched for the longest time (idle ages from accessed bits), then the
others. It deflates last-in first-out, as drivers do. A reset (guest reboot, driver reload)
forgets every page: they are ordinary guest memory again, and the driver inflates only after
it has reloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.host import VM, Host


class GuestBalloonDriver:
    """The balloon driver of one VM (guest side).

    :param host: the host, whose guest-allocator model pins the pages.
    :param vm: the VM this driver runs in.
    :param reload_delay: seconds the driver needs to come back after a reset.
    """

    def __init__(self, host: Host, vm: VM, reload_delay: float = 0.05):
        self.host = host
        self.vm = vm
        self.reload_delay = reload_delay
        self.pages = np.empty(0, dtype=np.int64)  # the driver's list, in inflate order
        self.loaded_at = 0.0
        self.resets = 0

    @property
    def size(self) -> int:
        """Pages the driver holds."""
        return len(self.pages)

    def loaded(self, now: float) -> bool:
        """Whether the driver is running (not between a reset and its reload)."""
        return now >= self.loaded_at

    def inflate(self, count: int, idle_age: np.ndarray | None = None) -> np.ndarray:
        """Allocate and pin up to ``count`` more pages and return them (the report to the
        hypervisor). Pages idle longest come first; the guest always keeps one page."""
        pinned = self.host.guest_pinned(self.vm)
        candidates = np.flatnonzero(~pinned)
        count = max(0, min(int(count), len(candidates) - 1))
        if count == 0:
            return np.empty(0, dtype=np.int64)
        if idle_age is not None:
            # uint8 keys sort by radix in numpy (stable), so choosing is linear in VM size.
            key = np.uint8(255) - idle_age[candidates].astype(np.uint8)
            candidates = candidates[np.argsort(key, kind="stable")]
        chosen = np.ascontiguousarray(candidates[:count], dtype=np.int64)
        self.host.pin_guest_pages(self.vm, chosen, pinned=True)
        self.pages = np.concatenate([self.pages, chosen])
        return chosen

    def deflate(self, count: int) -> np.ndarray:
        """Give back up to ``count`` pages to the guest (last in, first out) and return them."""
        count = max(0, min(int(count), self.size))
        if count == 0:
            return np.empty(0, dtype=np.int64)
        released = self.pages[self.size - count :]
        self.pages = self.pages[: self.size - count]
        self.host.pin_guest_pages(self.vm, released, pinned=False)
        return released

    def reset(self, now: float) -> np.ndarray:
        """The driver restarts (guest reboot or reload): it forgets its pages, which become
        ordinary guest memory again, and inflates again only ``reload_delay`` later. Returns
        the pages it forgot."""
        forgotten = self.pages
        self.pages = np.empty(0, dtype=np.int64)
        if len(forgotten):
            self.host.pin_guest_pages(self.vm, forgotten, pinned=False)
        self.loaded_at = now + self.reload_delay
        self.resets += 1
        return forgotten
