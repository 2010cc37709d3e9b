"""Bulk page operations of the balloon through the Backend interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from memvisor import LARGE_PAGE_PAGES
from memvisor.arrays import unique

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.backend import Backend
    from memvisor.host import VM


def split_large(backend: Backend, vm: VM, gpps: np.ndarray) -> None:
    """Split the large pages that ``gpps`` belong to (sharing needs small pages)."""
    large = gpps[backend.large(vm, gpps)]
    if len(large):
        backend.split(vm, unique(large // LARGE_PAGE_PAGES))


def share_onto(backend: Backend, vm: VM, gpps: np.ndarray, mpn: int) -> int:
    """Map every page of ``gpps`` onto machine page ``mpn`` without comparing contents (only
    for pages the guest gave up); returns machine pages freed."""
    return backend.share(vm, gpps, np.full(len(gpps), mpn, dtype=np.int64), discard=True)


def unmap(backend: Backend, vm: VM, gpps: np.ndarray) -> None:
    """Make pages not present."""
    backend.unmap(vm, gpps)


def populate(backend: Backend, vm: VM, gpps: np.ndarray) -> None:
    """Give not-present pages private zero-filled machine pages."""
    backend.populate(vm, gpps)
