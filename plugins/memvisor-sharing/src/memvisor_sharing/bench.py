"""``memvisor bench sharing``: the estimate's throughput, the break-up order, the scanner's rate.

``estimate``
    GiB/s of ``sharing estimate`` over a 1 GiB raw image on one core: the real idle Linux guest
    (/work/shared/images/idle-guest-1g.raw.zst, decompressed once to /tmp) where it exists, else
    a synthetic 1 GiB image of mixed contents. Baseline: reading the same file in the same
    chunks and summing it with numpy (the floor of any pass over the bytes).
``breakup-order``
    Machine pages freed per broken large page when memory pressure asks for half of what
    sharing could reclaim and large pages are broken up most reclaimable first, on a VM whose
    64 large pages hold very uneven opportunities (a few rich in zero and duplicate subpages,
    most nearly none). Baseline: the same, in address order.
``scan``
    Pages the plugin's scanner hashes per second (read through the backend, fingerprint, record).
    Baseline: the backend's read of the same pages alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.bench import Baseline, BenchCase

GUEST_IMAGE = Path("/work/shared/images/idle-guest-1g.raw.zst")
"""The real guest image (a raw 1 GiB memory dump, zstd-compressed)."""

_CACHE = Path("/tmp/memvisor-sharing-idle-guest-1g.raw")
_SYNTHETIC = Path("/tmp/memvisor-sharing-synthetic-1g.raw")


def guest_image() -> Path | None:
    """The real guest image decompressed to /tmp (once; later calls reuse it), or None where the
    compressed image is absent."""
    if not GUEST_IMAGE.exists():
        return None
    if not _CACHE.exists() or _CACHE.stat().st_size != 1 << 30:
        import zstandard

        tmp = _CACHE.with_suffix(f".{os.getpid()}.tmp")
        with GUEST_IMAGE.open("rb") as src, tmp.open("wb") as dst:
            zstandard.ZstdDecompressor().copy_stream(src, dst, write_size=1 << 24)
        tmp.replace(_CACHE)
    return _CACHE


def _synthetic_image() -> Path:
    """A 1 GiB image of mixed contents (memvisor.contents "mixed"), written once to /tmp."""
    if not _SYNTHETIC.exists() or _SYNTHETIC.stat().st_size != 1 << 30:
        from memvisor.contents import ContentSpec

        spec = ContentSpec.parse("mixed", "bench")
        pages = (1 << 30) // PAGE_SIZE
        tmp = _SYNTHETIC.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as out:
            for start in range(0, pages, 16384):
                out.write(spec.fill(pages, 1, np.arange(start, min(pages, start + 16384))).tobytes())
        tmp.replace(_SYNTHETIC)
    return _SYNTHETIC


def _estimate_setup():
    path = guest_image() or _synthetic_image()
    with path.open("rb") as f:  # warm the page cache: the figure is hashing, not the disk
        while f.read(1 << 24):
            pass
    return path


def _estimate_gib_per_s(path: Path) -> float:
    from memvisor_sharing.estimate import estimate
    from memvisor_sharing.sources import ImageSource

    source = ImageSource(path, 2 << 20)
    start = time.perf_counter()
    estimate([source])
    seconds = time.perf_counter() - start
    source.close()
    return path.stat().st_size / 2**30 / seconds


def _read_sum_gib_per_s(path: Path) -> float:
    from memvisor_sharing.sources import ImageSource

    source = ImageSource(path, 2 << 20)
    start = time.perf_counter()
    for _, _, data in source.chunks():
        data.view(np.uint64).sum()
    seconds = time.perf_counter() - start
    source.close()
    return path.stat().st_size / 2**30 / seconds


LARGE = 64  # large pages of the break-up VM (128 MiB)


def _breakup_setup():
    """Contents of the uneven VM: per large page, a share of zero and duplicate subpages drawn
    from a skewed distribution (most near 0, a few near 1)."""
    rng = np.random.default_rng(11)
    pages = LARGE * LARGE_PAGE_PAGES
    data = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
    pool = rng.integers(0, 256, (32, PAGE_SIZE), dtype=np.uint8)
    share = rng.beta(0.25, 2.5, LARGE)
    for k in range(LARGE):
        base = k * LARGE_PAGE_PAGES
        picked = np.flatnonzero(rng.random(LARGE_PAGE_PAGES) < share[k])
        half = len(picked) // 2
        data[base + picked[:half]] = 0
        data[base + picked[half:]] = pool[rng.integers(0, len(pool), len(picked) - half)]
    return data


def _freed_per_broken(order: str):
    def measure(data) -> float:
        from memvisor.host import Host, HostConfig
        from memvisor_sharing.plugin import SharingPlugin

        plugin = SharingPlugin()
        config = HostConfig(memory_pages=len(data) + 2048,
                            plugin_settings={"sharing": {"pages_per_tick": 0, "order": order}})
        host = Host(config, extra_plugins=[plugin])
        vm = host.create_vm("uneven", len(data), large_pages=True)
        host.backend.write(vm, np.arange(len(data)), data)
        plugin.scan(host, len(data))
        potential = plugin.refresh(host).total
        host.check_pressure(target_free_pages=host.backend.free_pages() + potential // 2)
        return plugin.reclaimed_by_breakup / max(plugin.large_broken, 1)

    return measure


SCAN_PAGES = 65536  # a 256 MiB VM


def _scan_setup():
    from memvisor.contents import ContentSpec
    from memvisor.host import Host, HostConfig
    from memvisor_sharing.plugin import SharingPlugin

    plugin = SharingPlugin()
    host = Host(HostConfig(memory_pages=SCAN_PAGES + 2048, plugin_settings={"sharing": {"pages_per_tick": 0}}),
                extra_plugins=[plugin])
    vm = host.create_vm("scanned", SCAN_PAGES, contents=ContentSpec.parse("mixed", "bench"))
    return host, plugin, vm


def _scan_rate(context) -> float:
    host, plugin, _ = context
    start = time.perf_counter()
    plugin.scan(host, SCAN_PAGES)
    return SCAN_PAGES / (time.perf_counter() - start)


def _read_rate(context) -> float:
    host, _, vm = context
    start = time.perf_counter()
    for first in range(0, SCAN_PAGES, 8192):
        host.backend.read(vm, np.arange(first, first + 8192))
    return SCAN_PAGES / (time.perf_counter() - start)


def cases() -> list[BenchCase]:
    """The sharing plugin's benchmark cases."""
    return [
        BenchCase("estimate", "gib_per_s", "GiB/s", _estimate_gib_per_s, _estimate_setup,
                  Baseline("read+numpy-sum", _read_sum_gib_per_s), goal=">= 1 GiB/s on one core"),
        BenchCase("breakup-order", "freed_per_broken_large_page", "pages", _freed_per_broken("reclaimable"),
                  _breakup_setup, Baseline("address-order", _freed_per_broken("address")), runs=3,
                  goal="ratio >= 2 vs address order"),
        BenchCase("scan", "pages_per_s", "pages/s", _scan_rate, _scan_setup,
                  Baseline("backend-read", _read_rate), goal="hashing is not the bottleneck"),
    ]
