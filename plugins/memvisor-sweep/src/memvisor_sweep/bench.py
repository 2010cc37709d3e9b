"""``memvisor bench sweep``: what Dask buys on this machine, and what the sweep machinery costs.

- ``parallel-64``: wall-clock seconds of a sweep of 64 short runs on a 2-worker LocalCluster,
  from starting the cluster to closing it; baseline: the same sweep run serially. Goal: ratio
  at most 0.6.
- ``parallel-64-warm``: the same with the cluster started (and its workers' imports done)
  before timing, as on a cluster that outlives one sweep.
- ``processes-64`` (a control, no sweep machinery): the same 64 runs through the run function
  on two plain worker processes (``concurrent.futures``) against one: the parallelism this
  machine offers at the moment, which bounds what any sweep driver can reach.
- ``overhead-serial`` and ``overhead-dask``: milliseconds per trivial run through the whole
  sweep (plan, keys, scenario.toml, Dask or serial execution, report.json and outcome.json,
  the table) against calling the run function directly on the same tasks; the overhead is the
  difference (goal: under 50 ms). ``overhead-dask`` uses one worker process, so the figure is
  the machinery's and not parallelism's.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from memvisor.bench import Baseline, BenchCase


def _scenario(milliseconds: int, vm_memory: str, batch: int) -> dict:
    return {
        "name": "bench-sweep", "seed": 1,
        "host": {"memory": "64MiB", "tick": "1ms", "batch": batch},
        "vm": [
            {"name": "a", "memory": vm_memory, "contents": {"zero": 0.5, "text": 0.5},
             "workload": {"kind": "zipf", "alpha": 0.9}},
            {"name": "b", "memory": vm_memory, "contents": "text", "workload": {"kind": "uniform"}},
        ],
        "timeline": [{"do": "run", "for": f"{milliseconds}ms"}],
    }


def bench_spec(milliseconds: int, vm_memory: str = "8MiB", batch: int = 8192, runs: int = 64):
    """A sweep of ``runs`` runs (seeds 1..runs) of a small two-VM scenario."""
    from memvisor_sweep.spec import Axis, SweepSpec

    base = _scenario(milliseconds, vm_memory, batch)
    return SweepSpec(name="bench", description="", source=Path("<bench>"), base_path=Path("bench.toml"), base=base,
                     axes=(Axis.of_path("seed", list(range(1, runs + 1))),))


def _timed_sweep(spec, executor) -> float:
    from memvisor_sweep.driver import run_sweep

    out = Path(tempfile.mkdtemp(prefix="memvisor-bench-sweep-"))
    try:
        started = time.perf_counter()
        run_sweep(spec, out, executor, write_index=False)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _prime(executor) -> None:
    """Make every worker import the runner and run one tiny scenario, untimed."""
    from memvisor_sweep.run import RunTask, run_one

    tiny = RunTask("prime", _scenario(1, "1MiB", 1024), "prime.toml")
    executor.client.run(run_one, tiny)


def _serial(spec) -> float:
    from memvisor_sweep.driver import SerialExecutor

    return _timed_sweep(spec, SerialExecutor())


def _cluster_cold(spec) -> float:
    from memvisor_sweep.driver import DaskExecutor

    started = time.perf_counter()
    with DaskExecutor(workers=2, dashboard=False) as executor:
        _timed_sweep(spec, executor)
    return time.perf_counter() - started


def _cluster_warm(spec, workers: int = 2) -> float:
    from memvisor_sweep.driver import DaskExecutor

    with DaskExecutor(workers=workers, dashboard=False) as executor:
        _prime(executor)
        return _timed_sweep(spec, executor)


def _setup_short():
    from memvisor_sweep.run import RunTask, run_one

    spec = bench_spec(200)
    run_one(RunTask("warm", dict(spec.base), "bench.toml"))  # this process's imports, untimed
    return spec


def _plain_processes(tasks, processes: int) -> float:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from memvisor_sweep.run import run_one

    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(run_one, tasks[:processes]))  # imports and first runs, untimed
        started = time.perf_counter()
        list(pool.map(run_one, tasks))
        return time.perf_counter() - started


def _setup_control():
    spec = _setup_short()
    from memvisor_sweep.run import RunTask

    return [RunTask(r.key, r.data, "bench.toml") for r in spec.plan()]


def _setup_trivial():
    from memvisor_sweep.run import RunTask, run_one

    spec = bench_spec(1, vm_memory="1MiB", batch=1024)
    tasks = [RunTask(r.key, r.data, "bench.toml") for r in spec.plan()]
    run_one(tasks[0])
    return spec, tasks


def _direct_ms(context) -> float:
    from memvisor_sweep.run import run_one

    _, tasks = context
    started = time.perf_counter()
    for task in tasks:
        run_one(task)
    return 1000 * (time.perf_counter() - started) / len(tasks)


def cases() -> list[BenchCase]:
    """The sweep's benchmark cases."""
    serial = Baseline("serial", _serial)
    direct = Baseline("direct-call", _direct_ms)
    return [
        BenchCase("parallel-64", "seconds", "s", _cluster_cold, setup=_setup_short, baseline=serial,
                  higher_is_better=False, runs=3, warmup=0,
                  goal="ratio <= 0.6 (2-worker LocalCluster incl. start and close vs serial)"),
        BenchCase("parallel-64-warm", "seconds", "s", _cluster_warm, setup=_setup_short, baseline=serial,
                  higher_is_better=False, runs=3, warmup=0, goal="ratio <= 0.6 (cluster already running)"),
        BenchCase("processes-64", "seconds", "s", lambda tasks: _plain_processes(tasks, 2), setup=_setup_control,
                  baseline=Baseline("one-process", lambda tasks: _plain_processes(tasks, 1)),
                  higher_is_better=False, runs=3, warmup=0,
                  goal="control: what 2 processes give on this machine now (ideal 0.5)"),
        BenchCase("overhead-serial", "ms_per_run", "ms",
                  lambda ctx: 1000 * _serial(ctx[0]) / len(ctx[1]), setup=_setup_trivial, baseline=direct,
                  higher_is_better=False, runs=5, warmup=1, goal="value - baseline < 50 ms"),
        BenchCase("overhead-dask", "ms_per_run", "ms",
                  lambda ctx: 1000 * _cluster_warm(ctx[0], workers=1) / len(ctx[1]), setup=_setup_trivial,
                  baseline=direct, higher_is_better=False, runs=5, warmup=0,
                  goal="value - baseline < 50 ms (1 worker process)"),
    ]
