"""``memvisor bench checkpoint`` (save side): the core's save of a raw image against zstd, and a
lazy save of a running 1 GiB VM against the core's stop-the-world save, in virtual time.

- ``save-1gib`` (real time, MiB/s of image): :func:`memvisor.builtins.checkpoint.save_image` of a 1 GiB
  raw image with a realistic mix of pages (``{zero = 0.5, text = 0.35, random = 0.15}``, made
  once in setup) against ``zstd -1 -T0 -q -f`` over the same file, run as a subprocess in the
  same run, both writing into the same temporary folder.
- ``save-1gib-cpu``: the same per CPU second (every thread of ours, the zstd child's), which
  the other jobs of a shared machine do not move; ours also fsyncs, which costs wall time only.
- ``lazy-save-stop-1gib`` (virtual seconds the VM is stopped) and ``lazy-save-total-1gib``
  (virtual seconds until the file is complete) of a lazy save while the guest runs a zipf
  workload with 30% writes, against the stop-the-world save of the same VM.
"""

from __future__ import annotations

import atexit
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from memvisor.bench import Baseline, BenchCase

IMAGE_PAGES = 262_144  # 1 GiB
MIX = {"zero": 0.5, "text": 0.35, "random": 0.15}
CHUNK = 16_384


def make_image(path: Path, pages: int = IMAGE_PAGES, seed: int = 1) -> Path:
    """Write a raw memory image of ``pages`` pages with the benchmark's mix of contents."""
    from memvisor.contents import ContentSpec

    spec = ContentSpec.parse(MIX, "bench")
    with open(path, "wb") as f:
        for start in range(0, pages, CHUNK):
            f.write(spec.fill(pages, seed, np.arange(start, min(pages, start + CHUNK))).tobytes())
    return path


def _folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="memvisor-bench-ckpt-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _image_setup():
    folder = _folder()
    return folder, make_image(folder / "image.raw")


def measure_save_image(context) -> float:
    """MiB of image per second saved by the core's ``save_image`` (defaults: level 1, 64-page
    blocks, 4 MiB buffer)."""
    from memvisor.builtins.checkpoint import save_image

    folder, image = context
    stats = save_image(image, folder / "image.ckpt")
    return stats.bytes_in / 2**20 / stats.seconds


def measure_zstd(context) -> float:
    """MiB of image per second of ``zstd -1 -T0`` over the same image (the baseline)."""
    folder, image = context
    start = time.perf_counter()
    subprocess.run(["zstd", "-1", "-T0", "-q", "-f", "-o", str(folder / "image.zst"), str(image)], check=True)
    return image.stat().st_size / 2**20 / (time.perf_counter() - start)


def _cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure_save_image_cpu(context) -> float:
    """MiB of image per CPU second (every thread) of the core's ``save_image``: the same work
    as ``save-1gib`` seen without the other jobs of a shared machine."""
    from memvisor.builtins.checkpoint import save_image

    folder, image = context
    before = _cpu_seconds(resource.RUSAGE_SELF)
    stats = save_image(image, folder / "image.ckpt")
    return stats.bytes_in / 2**20 / (_cpu_seconds(resource.RUSAGE_SELF) - before)


def measure_zstd_cpu(context) -> float:
    """MiB of image per CPU second of ``zstd -1 -T0`` (the baseline of ``save-1gib-cpu``)."""
    folder, image = context
    before = _cpu_seconds(resource.RUSAGE_CHILDREN)
    subprocess.run(["zstd", "-1", "-T0", "-q", "-f", "-o", str(folder / "image.zst"), str(image)], check=True)
    return image.stat().st_size / 2**20 / (_cpu_seconds(resource.RUSAGE_CHILDREN) - before)


def _vm_setup():
    from memvisor.contents import ContentSpec
    from memvisor.host import Host, HostConfig
    from memvisor.workloads import make_workload
    from memvisor_lazy_save.plugin import LazySavePlugin

    plugin = LazySavePlugin()
    host = Host(HostConfig(memory_pages=IMAGE_PAGES + 8192), extra_plugins=[plugin])
    vm = host.create_vm("bench", IMAGE_PAGES, contents=ContentSpec.parse(MIX, "bench"))
    workload = make_workload({"kind": "zipf", "alpha": 0.99, "write_fraction": 0.3}, IMAGE_PAGES, 1)
    return host, vm, workload, _folder(), {}


def _save(context, lazy: bool):
    from memvisor.events import SaveRequest

    host, vm, workload, folder, memo = context
    if lazy in memo:  # virtual time is deterministic: one save of each kind is the figure
        return memo[lazy]
    job = host.save_checkpoint(vm, SaveRequest(str(folder / f"vm-{lazy}.ckpt"), lazy=lazy))
    while not job.done:  # the guest runs while a lazy save proceeds, as the checkpoint action does
        gpps, writes = workload.next_batch(65_536)
        host.advance(host.access(vm, gpps, writes).seconds)
    memo[lazy] = job
    return job


def measure_lazy_stop(context) -> float:
    """Virtual seconds the VM is stopped by a lazy save."""
    return _save(context, True).stop_seconds


def measure_stw_stop(context) -> float:
    """Virtual seconds the VM is stopped by the core's stop-the-world save (the baseline)."""
    return _save(context, False).stop_seconds


def measure_lazy_total(context) -> float:
    """Virtual seconds from the start of a lazy save until its file is complete."""
    job = _save(context, True)
    return job.finished - job.started


def measure_stw_total(context) -> float:
    """Virtual seconds of the core's stop-the-world save (the baseline)."""
    job = _save(context, False)
    return job.finished - job.started


def cases() -> list[BenchCase]:
    """The save side of ``memvisor bench checkpoint``."""
    vm_setup = _vm_setup
    return [
        BenchCase("save-1gib", "mib_per_s", "MiB/s", measure_save_image, _image_setup,
                  Baseline("zstd -1 -T0", measure_zstd), goal=">= 0.8x zstd -1 -T0 (real time)"),
        BenchCase("save-1gib-cpu", "mib_per_cpu_s", "MiB/CPU-s", measure_save_image_cpu, _image_setup,
                  Baseline("zstd -1 -T0", measure_zstd_cpu), runs=3, goal="CPU cost against zstd's (informative)"),
        BenchCase("lazy-save-stop-1gib", "stop_seconds", "s (virtual)", measure_lazy_stop, vm_setup,
                  Baseline("stop-the-world", measure_stw_stop), higher_is_better=False, runs=1, warmup=0,
                  goal="VM stop far below the stop-the-world save's"),
        BenchCase("lazy-save-total-1gib", "total_seconds", "s (virtual)", measure_lazy_total, vm_setup,
                  Baseline("stop-the-world", measure_stw_total), higher_is_better=False, runs=1, warmup=0,
                  goal="total save time close to stop-the-world's (same bytes, same disk)"),
    ]


__all__ = ["cases", "make_image"]
