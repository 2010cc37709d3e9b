"""``memvisor bench mrc``: the cost and the accuracy of the curves, each case with a baseline
measured in the same run (docs/mrc.md has the table and the commands).

Cost:

- ``cli-rate0.01-10M``: seconds of what ``memvisor mrc --rate 0.01`` does on a 10M-access
  ``.npy`` trace (read + sampled curve); baseline: the exact curve of the same trace.
- ``exact-10M``: seconds of the exact curve (Mattson, O(N log N)); baseline: an LRU cache
  simulated at 100 sizes, *estimated* from a subsample: an OrderedDict LRU (the fastest plain
  LRU in CPython: C-level dict, no per-access numpy) at 10 of the 100 sizes on the first 100K
  accesses, times 10 and times 100.
- ``emulator-zipf-R0.01``: guest accesses per second of the emulator with the plugin on
  (zipf over a 256 MiB VM, untrace period 1 ms); baseline: the same without the plugin.

Accuracy (value: MAE against the exact curve at every size, mean of 3 hash seeds; lower is
better):

- ``mae-TRACE-rR``: this library's sampled curve (footprint-calibrated rate, SHARDS_adj) on 10M
  accesses of zipf(0.99) over 100K and 1M pages, a 100K-page loop, scan-polluted zipf and
  phased zipf; baseline: plain SHARDS (nominal rate, no adjustment), what a sampled MRC
  without those corrections gives.
- ``untrace-TRACE-rR-uU``: the curve from traps alone with an untraced period of ``U``
  accesses, with the model; baseline: the same traps without the model. ``traps-...``: the
  trap rate in percent of all accesses (no baseline).
- ``real-NAME-...``: the shared real traces (sqlite, python; footprints of 448 and 1,740 pages).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from memvisor.bench import Baseline, BenchCase

N = 10_000_000
SEEDS = (0, 1, 2)
REAL_TRACES = Path(os.environ.get("MEMVISOR_TRACES", "/work/shared/traces"))


# -- traces, made once per process ----------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def synthetic_trace(name: str, n: int = N):
    """``(pages, exact curve)`` of a named synthetic trace."""
    from memvisor_mrc import synthetic
    from memvisor_mrc.stack_distance import exact_mrc

    makers = {
        "zipf-100K": lambda: synthetic.zipf_trace(100_000, n, 0.99, seed=1),
        "zipf-1M": lambda: synthetic.zipf_trace(1_000_000, n, 0.99, seed=2),
        "loop-100K": lambda: synthetic.loop_trace(100_000, n, seed=3),
        "scan-zipf-100K": lambda: synthetic.scan_polluted_zipf(100_000, n, 0.2, 1_000_000, seed=4),
        "phases-100K": lambda: synthetic.phased_zipf(100_000, n, 4, 0.5, seed=5),
    }
    pages = makers[name]()
    return pages, exact_mrc(pages)


@functools.lru_cache(maxsize=1)
def real_trace(name: str):
    """``(pages, exact curve)`` of a shared real trace, or None when the files are not here."""
    from memvisor.traces import load_trace
    from memvisor_mrc.curve import Curve

    path = REAL_TRACES / f"{name}.npy.zst"
    if not path.exists():
        return None
    exact = Curve.from_json(json.loads((REAL_TRACES / f"{name}.mrc.json").read_text()))
    return load_trace(path).pages, exact


# -- cost -------------------------------------------------------------------------------------------


def _cli_setup():
    pages, _ = synthetic_trace("zipf-100K")
    folder = tempfile.mkdtemp(prefix="memvisor-mrc-bench-")
    path = os.path.join(folder, "zipf-100K-10M.npy")
    np.save(path, pages.astype(np.int64))
    return path


def _cli_rate(path) -> float:
    from memvisor.traces import load_trace
    from memvisor_mrc.cli import compute

    start = time.perf_counter()
    compute(load_trace(path).pages, rate=0.01)
    return time.perf_counter() - start


def _cli_exact(path) -> float:
    from memvisor.traces import load_trace
    from memvisor_mrc.cli import compute

    start = time.perf_counter()
    compute(load_trace(path).pages, exact=True)
    return time.perf_counter() - start


def _exact_setup():
    return synthetic_trace("zipf-100K")[0]


def _exact(pages) -> float:
    from memvisor_mrc.stack_distance import exact_mrc

    start = time.perf_counter()
    exact_mrc(pages)
    return time.perf_counter() - start


def lru_misses(pages: list, size: int) -> int:
    """Misses of an LRU cache of ``size`` pages (OrderedDict: the fastest plain-Python LRU)."""
    cache: OrderedDict = OrderedDict()
    misses = 0
    move, pop = cache.move_to_end, cache.popitem
    for p in pages:
        if p in cache:
            move(p)
        else:
            misses += 1
            cache[p] = None
            if len(cache) > size:
                pop(last=False)
    return misses


def _lru_100_sizes_estimate(pages) -> float:
    """Seconds to simulate LRU at 100 sizes on the whole trace, estimated from 10 sizes (every
    10th of 100 sizes spread geometrically up to the footprint) on the first 100K accesses."""
    sub = pages[:100_000].tolist()
    footprint = 100_000
    sizes = np.unique(np.geomspace(1, footprint, 100).astype(int))[::10]
    start = time.perf_counter()
    for size in sizes:
        lru_misses(sub, int(size))
    return (time.perf_counter() - start) * (100 / len(sizes)) * (len(pages) / len(sub))


def _emulator_setup(with_plugin: bool):
    from memvisor.host import Host, HostConfig
    from memvisor.workloads import make_workload

    pages = 65_536
    settings = {"mrc": {"rate": 0.01, "untrace_period": "1ms", "refresh": "50ms"}}
    host = Host(HostConfig(memory_pages=pages + 8192, plugin_settings=settings), ["mrc"] if with_plugin else [])
    vm = host.create_vm("bench", pages)
    workload = make_workload({"kind": "zipf", "alpha": 0.99, "write_fraction": 0.3}, pages, 1)
    batches = [workload.next_batch(65_536) for _ in range(64)]
    return host, vm, batches


def _emulator_pair():
    """Two warm hosts on the same batches, with and without the plugin (a fresh host's first
    batches pay for the kernel committing its memory: each side keeps its own across runs)."""
    return _emulator_setup(True), _emulator_setup(False)


def _emulator_run(context) -> float:
    host, vm, batches = context
    start = time.perf_counter()
    for gpps, writes in batches:
        result = host.access(vm, gpps, writes)
        host.advance(result.seconds)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - start)


def _emulator_measure(pair) -> float:
    return _emulator_run(pair[0])


def _emulator_baseline(pair) -> float:
    return _emulator_run(pair[1])


# -- accuracy ---------------------------------------------------------------------------------------


def _mae_case(trace: str, rate: float) -> BenchCase:
    def ours(_):
        from memvisor_mrc.shards import sampled_mrc

        pages, exact = synthetic_trace(trace)
        return float(np.mean([sampled_mrc(pages, rate=rate, seed=s).mae(exact, exact.max_pages) for s in SEEDS]))

    def plain(_):
        from memvisor_mrc.shards import sampled_mrc

        pages, exact = synthetic_trace(trace)
        return float(np.mean([sampled_mrc(pages, rate=rate, seed=s, adj=False, rate_estimate="nominal")
                              .mae(exact, exact.max_pages) for s in SEEDS]))

    goal = "<= 0.01" if rate >= 0.01 else "<= 0.02"
    return BenchCase(f"mae-{trace}-r{rate:g}", "mae", "miss ratio", ours, None, Baseline("plain-shards", plain),
                     higher_is_better=False, runs=1, warmup=0, goal=goal)


def _untrace_cases(name: str, rate: float, untrace: int, real: bool = False) -> list[BenchCase]:
    @functools.lru_cache(maxsize=1)
    def traps():
        from memvisor_mrc.untrace import simulate_traps

        loaded = real_trace(name) if real else synthetic_trace(name)
        if loaded is None:
            return None
        pages, exact = loaded
        return simulate_traps(pages, rate, untrace), exact

    def mae(model: bool):
        def measure(_):
            from memvisor_mrc.untrace import untrace_mrc

            got = traps()
            if got is None:
                return float("nan")
            t, exact = got
            curve = untrace_mrc(t, distinct_pages=exact.max_pages, virtual_touch=model, hidden_hits=model)
            return curve.mae(exact, exact.max_pages)

        return measure

    def trap_percent(_):
        got = traps()
        return float("nan") if got is None else 100 * got[0].trap_rate

    prefix = "real-" if real else "untrace-"
    tag = f"{name}-r{rate:g}-u{untrace}"
    return [
        BenchCase(f"{prefix}{tag}", "mae", "miss ratio", mae(True), None, Baseline("traps-only", mae(False)),
                  higher_is_better=False, runs=1, warmup=0, goal="<= 0.02 with traps <= 1%"),
        BenchCase(f"traps-{tag}", "trap_rate", "% of accesses", trap_percent, None, None, higher_is_better=False,
                  runs=1, warmup=0, goal="<= 1%"),
    ]


def _real_sampled_case(name: str, rate: float | None, sample_size: int | None = None) -> BenchCase:
    def measure(log: bool):
        def run(_):
            from memvisor_mrc.shards import sampled_mrc
            from memvisor_mrc.summary import log_error

            loaded = real_trace(name)
            if loaded is None:
                return float("nan")
            pages, exact = loaded
            curves = [sampled_mrc(pages, rate=rate, sample_size=sample_size, seed=s) for s in SEEDS]
            if log:
                return float(np.mean([log_error(c, exact, exact.max_pages) for c in curves]))
            return float(np.mean([c.mae(exact, exact.max_pages) for c in curves]))

        return run

    label = f"s{sample_size}" if sample_size else f"r{rate:g}"
    return BenchCase(f"real-{name}-{label}", "mae", "miss ratio", measure(False), None,
                     Baseline("mean |log10 error|", measure(True)), higher_is_better=False, runs=1, warmup=0,
                     goal="<= 0.01 (R=0.01), <= 0.02 (R=0.001); ratio meaningless")


def cases() -> list[BenchCase]:
    """Every ``memvisor bench mrc`` case."""
    out = [
        BenchCase("cli-rate0.01-10M", "seconds", "s", _cli_rate, _cli_setup, Baseline("exact", _cli_exact),
                  higher_is_better=False, runs=3, goal="<= ~1 s (libCacheSim's sampled MRC on this machine)"),
        BenchCase("exact-10M", "seconds", "s", _exact, _exact_setup,
                  Baseline("lru-100-sizes-estimate", _lru_100_sizes_estimate), higher_is_better=False, runs=3,
                  goal="ratio <= 0.1"),
        BenchCase("emulator-zipf-r0.01", "accesses_per_s", "accesses/s", _emulator_measure,
                  _emulator_pair, Baseline("no-mrc-plugin", _emulator_baseline), runs=3,
                  goal="cost of tracing 1% of pages"),
    ]
    for trace in ("zipf-100K", "zipf-1M", "loop-100K", "scan-zipf-100K", "phases-100K"):
        for rate in (0.01, 0.001):
            out.append(_mae_case(trace, rate))
    for trace, rate, untrace in (("zipf-100K", 0.01, 100_000), ("zipf-100K", 0.01, 1_000_000),
                                 ("phases-100K", 0.01, 100_000)):
        out.extend(_untrace_cases(trace, rate, untrace))
    for name in ("sqlite", "python"):
        out.extend(_untrace_cases(name, 0.25, 1000, real=True))
        for rate in (0.01, 0.001, 0.25):
            out.append(_real_sampled_case(name, rate))
        out.append(_real_sampled_case(name, None, 64))
    return out


# -- the plugin on the emulator: accuracy against the trap rate -----------------------------------


def emulator_accuracy(untrace_period: float, rate: float = 0.01, vm_pages: int = 65_536, batches: int = 150,
                      kind: str = "zipf") -> dict:
    """Run a workload on the emulator with the plugin and compare its final curve with the exact
    curve of the accesses the guest made: ``{"trap_rate", "mae_model", "mae_traps_only"}``."""
    from memvisor.host import Host, HostConfig
    from memvisor.workloads import make_workload
    from memvisor_mrc.stack_distance import exact_mrc

    settings = {"mrc": {"rate": rate, "untrace_period": untrace_period, "refresh": "1s"}}
    host = Host(HostConfig(memory_pages=vm_pages + 8192, plugin_settings=settings), ["mrc"])
    vm = host.create_vm("vm", vm_pages)
    spec = {"kind": kind, "alpha": 0.99} if kind == "zipf" else {"kind": kind, "phase_accesses": 2_000_000}
    workload = make_workload(spec, vm_pages, 1)
    seen = []
    for _ in range(batches):
        gpps, writes = workload.next_batch(65_536)
        result = host.access(vm, gpps, writes)
        seen.append(host.guest_pages(vm, gpps))
        host.advance(result.seconds)
    pages = np.concatenate(seen)
    exact = exact_mrc(pages)
    (plugin,) = [p for name, p in host.pm.list_name_plugin() if name == "mrc"]
    tracker = plugin.vms["vm"].tracker
    return {"accesses": len(pages), "virtual_s": host.now, "trap_rate": tracker.traps / len(pages),
            "mae_model": tracker.curve(len(pages)).mae(exact, exact.max_pages),
            "mae_traps_only": tracker.curve(len(pages), "shards").mae(exact, exact.max_pages)}


if __name__ == "__main__":  # python -m memvisor_mrc.bench: the emulator figures of docs/mrc.md
    import sys

    for kind in sys.argv[1:] or ["zipf", "phased"]:
        for period in (0.0, 0.001, 0.005, 0.02, 0.1):
            print(json.dumps({"workload": kind, "untrace_period_s": period, **emulator_accuracy(period, kind=kind)}),
                  flush=True)
