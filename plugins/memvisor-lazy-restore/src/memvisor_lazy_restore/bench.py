"""``memvisor bench checkpoint`` (restore side), in virtual time (deterministic: one run each).

- ``lazy-first-access-1gib``: time from the start of a lazy restore of a 1 GiB VM until the
  guest's first access (page 0, a data page) is served; baseline: the eager restore's.
- ``lazy-first-access-8gib``: the same for an 8 GiB VM; baseline: the 1 GiB figure (the goal is
  a ratio within 0.9..1.1: independent of VM size). Both checkpoints hold mostly zero memory
  in 2 MiB runs (90% zero, 7% text, 3% random), written straight from generated pages, so the
  8 GiB VM costs about 1 GiB of disk and little memory (the emulator's memory array is lazily
  committed and only the pages the guest touches are filled).
- ``lazy-seq-faults-1gib``: faults taken while the guest reads all 262,144 pages in order
  (prefetching off, so every page comes in through a fault); baseline: pages / 64.
- ``lazy-ws10-1gib``: time from the start of the restore until the guest has touched every page
  of a working set of 10% of its pages (a contiguous region, touched in random order, batches of
  4,096 accesses), lazy with prefetching against eager; the realistic mix
  ``{zero = 0.5, text = 0.35, random = 0.15}``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from memvisor.bench import Baseline, BenchCase

GIB_PAGES = 262_144
MOSTLY_ZERO = {"zero": 0.9, "text": 0.07, "random": 0.03, "run_pages": 512}
MIX = {"zero": 0.5, "text": 0.35, "random": 0.15}
CHUNK = 16_384
BATCH = 4096


@functools.cache
def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="memvisor-bench-restore-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.cache
def checkpoint(pages: int, mix: str) -> Path:
    """A checkpoint of ``pages`` pages of the named mix (``"mostly-zero"`` or ``"mix"``), written
    once per process straight from generated contents; page 0 is always a data page."""
    from memvisor.builtins.checkpoint import CheckpointWriter
    from memvisor.contents import ContentSpec

    spec = ContentSpec.parse(MOSTLY_ZERO if mix == "mostly-zero" else MIX, "bench")
    text = ContentSpec.parse("text", "bench")
    path = _folder() / f"{mix}-{pages}.ckpt"
    with CheckpointWriter(path, pages) as w:
        for start in range(0, pages, CHUNK):
            gpps = np.arange(start, min(pages, start + CHUNK), dtype=np.int64)
            kinds = spec.kinds(pages, 1, gpps)
            if start == 0:
                kinds[:512] = 2  # the probe's page 0 and its neighbours hold text
            data = gpps[kinds != 0]
            w.add_zero_pages(gpps[kinds == 0])
            if len(data):
                first = data[data < 512]
                rest = data[data >= 512]
                contents = np.concatenate([text.fill(pages, 1, first), spec.fill(pages, 1, rest)])
                w.add_pages(data, contents)
    return path


def _restore(pages: int, mix: str, lazy: bool, settings: dict | None = None):
    from memvisor.events import RestoreRequest
    from memvisor.host import Host, HostConfig
    from memvisor_lazy_restore.plugin import LazyRestorePlugin

    path = checkpoint(pages, mix)
    config = HostConfig(memory_pages=pages + 8192, plugin_settings={"lazy-restore": settings or {}})
    host = Host(config, extra_plugins=[LazyRestorePlugin()])
    vm = host.create_vm("bench", pages)
    job = host.restore_checkpoint(vm, RestoreRequest(str(path), lazy=lazy))
    return host, vm, job


def first_access(pages: int, lazy: bool = True) -> float:
    """Virtual seconds from the restore's start to the first guest access served."""
    host, vm, job = _restore(pages, "mostly-zero", lazy)
    return job.first_access_s


def sequential_faults(_context=None) -> float:
    """Faults while the guest reads every page in order after a lazy restore (no prefetch)."""
    host, vm, job = _restore(GIB_PAGES, "mix", True, {"prefetch": "off"})
    for start in range(0, vm.pages, BATCH):
        gpps = np.arange(start, min(vm.pages, start + BATCH), dtype=np.int64)
        host.advance(host.access(vm, gpps, np.zeros(len(gpps), dtype=bool)).seconds)
    assert job.stats["pages_loaded"] == vm.pages
    return float(job.stats["fault_windows"])


def working_set(lazy: bool) -> float:
    """Virtual seconds from the restore's start until a 10% working set has been touched."""
    host, vm, job = _restore(GIB_PAGES, "mix", lazy)
    size = vm.pages // 10
    region = np.random.default_rng(3).permutation(size).astype(np.int64) + int(vm.pages * 0.45)
    writes = np.random.default_rng(4).random(BATCH) < 0.3
    for start in range(0, size, BATCH):
        gpps = region[start : start + BATCH]
        host.advance(host.access(vm, gpps, writes[: len(gpps)]).seconds)
    return host.now - job.started


def cases() -> list[BenchCase]:
    """The restore side of ``memvisor bench checkpoint``."""
    once = {"runs": 1, "warmup": 0, "higher_is_better": False}
    return [
        BenchCase("lazy-first-access-1gib", "seconds", "s (virtual)", lambda _: first_access(GIB_PAGES),
                  baseline=Baseline("eager restore", lambda _: first_access(GIB_PAGES, lazy=False)),
                  goal="far below the eager restore's", **once),
        BenchCase("lazy-first-access-8gib", "seconds", "s (virtual)", lambda _: first_access(8 * GIB_PAGES),
                  baseline=Baseline("lazy 1 GiB", lambda _: first_access(GIB_PAGES)),
                  goal="ratio 0.9..1.1: independent of VM size", **once),
        BenchCase("lazy-seq-faults-1gib", "faults", "faults", sequential_faults,
                  baseline=Baseline("pages / 64", lambda _: GIB_PAGES / 64), goal="ratio <= 1", **once),
        BenchCase("lazy-ws10-1gib", "seconds", "s (virtual)", lambda _: working_set(True),
                  baseline=Baseline("eager restore", lambda _: working_set(False)), goal="ratio <= 0.2 (5x faster)",
                  **once),
    ]
