"""``memvisor bench balloon``: the real time of inflating and resetting a 1 GiB balloon.

Each run builds a fresh host (untimed) with a VM of 1 GiB + 64 MiB whose pages are private,
then times one operation on 262,144 pages (1 GiB):

- ``inflate-1gib``: the driver picks and pins the pages (by idle age), the plugin remaps them
  onto the balloon page and frees their machine pages.
- ``reset-1gib``: with the 1 GiB balloon inflated and the driver reset (untimed), one guest
  write to a balloon page: the trap, the detection and the reset of all 262,144 pages.

Baseline of both, measured in the same run on the same pages: a plain ``unmap`` of the
262,144 pages through the backend (in the same chunks), the cheapest bulk operation that frees
or drops them; the ratio is the balloon's cost over that floor.
"""

from __future__ import annotations

import time

import numpy as np

from memvisor.bench import Baseline, BenchCase

BALLOON_PAGES = 262_144
"""Pages inflated and reset: 1 GiB."""

VM_PAGES = BALLOON_PAGES + 16_384
"""The benchmark VM: 1 GiB + 64 MiB, so the guest keeps memory of its own."""


def _fresh():
    from memvisor.host import Host, HostConfig
    from memvisor_balloon.plugin import BalloonPlugin

    plugin = BalloonPlugin()
    host = Host(HostConfig(memory_pages=VM_PAGES + 4096, low_watermark=0.0, high_watermark=0.0),
                extra_plugins=[plugin])
    vm = host.create_vm("bench", VM_PAGES)
    return host, vm, plugin


def measure_inflate(_context=None) -> float:
    """Seconds to inflate a balloon by 1 GiB."""
    host, vm, plugin = _fresh()
    start = time.perf_counter()
    plugin.inflate(vm, BALLOON_PAGES)
    seconds = time.perf_counter() - start
    assert plugin.state(vm).size == BALLOON_PAGES
    return seconds


def measure_reset(_context=None) -> float:
    """Seconds from a guest write to a balloon page to every page of a 1 GiB balloon reset."""
    host, vm, plugin = _fresh()
    plugin.inflate(vm, BALLOON_PAGES)
    first = plugin.state(vm).order[:1]
    plugin.reset_driver(vm)
    start = time.perf_counter()
    host.access(vm, first, np.ones(1, dtype=bool))
    seconds = time.perf_counter() - start
    assert plugin.state(vm).size == 0 and plugin.resets == 1
    return seconds


def measure_unmap(_context=None) -> float:
    """Seconds to unmap the same 262,144 pages through the backend (the baseline)."""
    from memvisor_balloon import pages as bulk

    host, vm, _ = _fresh()
    gpps = np.arange(BALLOON_PAGES, dtype=np.int64)
    start = time.perf_counter()
    bulk.unmap(host.backend, vm, gpps)
    return time.perf_counter() - start


def cases() -> list[BenchCase]:
    """The balloon's benchmark cases."""
    floor = Baseline("unmap-1gib", measure_unmap)
    return [
        BenchCase("inflate-1gib", "seconds", "s", measure_inflate, None, floor, higher_is_better=False,
                  goal="< 50 ms real time"),
        BenchCase("reset-1gib", "seconds", "s", measure_reset, None, floor, higher_is_better=False,
                  goal="< 50 ms real time"),
    ]
