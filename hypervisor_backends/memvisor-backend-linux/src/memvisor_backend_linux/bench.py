"""``memvisor bench linux``: how long a guest waits on a page fault that memvisor serves.

The guest (its own process) touches pages that are not present, one after the other, timing
each touch with ``clock_gettime`` in C (``mv_touch_timed``); memvisor serves the faults. Cases:

``uffd-fault-4k`` / ``-p99``
    The compiled fast path: the page's contents were staged by Python beforehand, the fault loop
    resolves the fault by itself with one ``UFFDIO_COPY`` of 4 KiB.
``uffd-fault-64p`` / ``-p99``
    The same with blocks of 64 pages: the first touch of each block resolves the whole block
    (256 KiB) with one ioctl; the figure is the latency of those first touches.
``python-fault-4k``
    The hook path: each fault goes back to Python, becomes a ``memvisor_page_fault`` call, and
    the core's zero-fill populates it (``UFFDIO_ZEROPAGE``).

The baseline, measured in the same run, is the wake-up floor: two threads blocked in ``read``
on pipes waking each other (``mv_wakeup_roundtrip``), the least a fault round trip can cost (a
sleeping guest thread wakes a handler that wakes it). Figures are medians over runs of the
p50 (or p99) of each run's touches, in microseconds.
"""

from __future__ import annotations

import numpy as np

from memvisor.bench import Baseline, BenchCase

TOUCHES = 2048  # faults timed per run
BLOCK = 64
ROUND_TRIPS = 4000

_context: dict = {}


def _shared():
    """One host with two guests for every case (guests cost a process each)."""
    if not _context:
        from memvisor.host import Host, HostConfig

        host = Host(HostConfig(memory_pages=TOUCHES + TOUCHES * BLOCK + 1024, backend="linux"))
        _context["host"] = host
        _context["small"] = host.create_vm("bench-4k", TOUCHES)
        _context["blocks"] = host.create_vm("bench-64p", TOUCHES * BLOCK)
        rng = np.random.default_rng(5)
        _context["data"] = rng.integers(0, 256, (TOUCHES * BLOCK, 4096), dtype=np.uint8)
    return _context


def _touch(backend, vm, pages: np.ndarray) -> np.ndarray:
    """Have the guest touch ``pages`` in order; the per-touch latencies in microseconds."""
    from memvisor_backend_linux import protocol

    g = backend._guest(vm)
    payload, _ = backend._call(vm, g, protocol.TOUCH_TIMED, len(pages), 0, np.ascontiguousarray(pages))
    return np.frombuffer(payload, dtype=np.int64) / 1000.0


def _staged(block: int, quantile: float):
    def measure(context) -> float:
        host = context["host"]
        backend = host.backend
        vm = context["small"] if block == 1 else context["blocks"]
        every = np.arange(vm.pages, dtype=np.int64)
        backend.unmap(vm, every)
        backend.stage(vm, every, context["data"][: vm.pages], block_pages=block)
        order = np.random.default_rng(len(every)).permutation(vm.pages // block) * block
        return float(np.quantile(_touch(backend, vm, order), quantile))

    return measure


def _python_path(context) -> float:
    backend = context["host"].backend
    vm = context["small"]
    every = np.arange(vm.pages, dtype=np.int64)
    backend.unmap(vm, every)
    order = np.random.default_rng(1).permutation(vm.pages)
    return float(np.quantile(_touch(backend, vm, order), 0.5))


def _floor(quantile: float):
    def measure(context) -> float:
        backend = context["host"].backend
        ns = np.zeros(ROUND_TRIPS, dtype=np.int64)
        rc = backend.lib.mv_wakeup_roundtrip(ROUND_TRIPS, backend.ffi.cast("int64_t *", ns.ctypes.data))
        if rc < 0:
            raise OSError(-rc, "wake-up round trip")
        return float(np.quantile(ns / 1000.0, quantile))

    return measure


def cases() -> list[BenchCase]:
    """The Linux backend's benchmark cases."""
    p50 = Baseline("wakeup-roundtrip-p50", _floor(0.5))
    p99 = Baseline("wakeup-roundtrip-p99", _floor(0.99))
    common = dict(unit="us", setup=_shared, higher_is_better=False, runs=5, warmup=1)
    return [
        BenchCase("uffd-fault-4k", "p50_us", measure=_staged(1, 0.5), baseline=p50,
                  goal="p50 <= 15 us and <= 2x the wake-up floor", **common),
        BenchCase("uffd-fault-4k-p99", "p99_us", measure=_staged(1, 0.99), baseline=p99,
                  goal="p99 beside the p50 above", **common),
        BenchCase("uffd-fault-64p", "p50_us", measure=_staged(BLOCK, 0.5), baseline=p50,
                  goal="one ioctl resolves 64 pages (256 KiB)", **common),
        BenchCase("uffd-fault-64p-p99", "p99_us", measure=_staged(BLOCK, 0.99), baseline=p99,
                  goal="p99 beside the p50 above", **common),
        BenchCase("python-fault-4k", "p50_us", measure=_python_path, baseline=p50,
                  goal="the hook path: fault -> memvisor_page_fault -> zero-fill", **common),
    ]
