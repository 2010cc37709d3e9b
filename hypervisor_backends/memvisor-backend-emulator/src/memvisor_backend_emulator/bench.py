"""``memvisor bench emulator``: how many guest accesses the emulator processes per second.

Both cases run a zipf(0.99) workload over a 1 GiB VM (262,144 pages, 30% writes) in batches
of 1 Mi accesses, generated before timing starts (the figure is the emulator's, not the
generator's). The baseline is the floor any emulator pays: one numpy gather of the batch's
page flags (``flags[gpps]``), measured on the same batches in the same run.
"""

from __future__ import annotations

import time

import numpy as np

from memvisor import hookimpl
from memvisor.bench import Baseline, BenchCase

VM_PAGES = 262_144
BATCH = 1 << 20
BATCHES = 8


class _TraceAll:
    """A plugin that receives traced-page traps and retraces them every tick, as an MRC or a
    NUMA-hinting policy would (the cost of delivering traps to a plugin is part of the figure)."""

    def __init__(self) -> None:
        self.pending: list[np.ndarray] = []
        self.traps = 0

    @hookimpl
    def memvisor_traced_access(self, access):
        self.pending.append(access.gpps)
        self.traps += len(access.gpps)


def _setup(traced_fraction: float):
    def setup():
        from memvisor.host import Host, HostConfig
        from memvisor.workloads import make_workload

        tracer = _TraceAll()
        host = Host(HostConfig(memory_pages=VM_PAGES + 4096), extra_plugins=[tracer])
        vm = host.create_vm("bench", VM_PAGES)
        workload = make_workload({"kind": "zipf", "alpha": 0.99, "write_fraction": 0.3}, VM_PAGES, 1)
        batches = [workload.next_batch(BATCH) for _ in range(BATCHES)]
        traced = np.random.default_rng(2).choice(VM_PAGES, int(VM_PAGES * traced_fraction), replace=False)
        return host, vm, batches, tracer, traced

    return setup


def _measure(context) -> float:
    host, vm, batches, tracer, traced = context
    backend = host.backend
    if len(traced):
        backend.trace(vm, traced)
    start = time.perf_counter()
    for gpps, writes in batches:
        host.access(vm, gpps, writes)
        if tracer.pending:  # retrace what trapped, as a policy's tick would
            backend.trace(vm, np.concatenate(tracer.pending))
            tracer.pending.clear()
    seconds = time.perf_counter() - start
    return BATCHES * BATCH / seconds


def _gather_floor(context) -> float:
    host, vm, batches, _, _ = context
    flags = host.backend._state(vm).flags
    start = time.perf_counter()
    for gpps, _ in batches:
        flags[gpps]
    return BATCHES * BATCH / (time.perf_counter() - start)


def cases() -> list[BenchCase]:
    """The emulator's benchmark cases."""
    floor = Baseline("numpy-gather", _gather_floor)
    return [
        BenchCase("zipf-untraced", "accesses_per_s", "accesses/s", _measure, _setup(0.0), floor,
                  goal=">= 20M/s"),
        BenchCase("zipf-traced-1pct", "accesses_per_s", "accesses/s", _measure, _setup(0.01), floor,
                  goal=">= 5M/s, traps delivered to a plugin"),
    ]
