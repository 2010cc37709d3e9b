"""memvisor sweep on a Dask LocalCluster (two worker processes on 127.0.0.1): the same table as a
serial sweep, failures recorded, lost workers and failed tasks retried, nothing left running."""

import multiprocessing
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed")

from memvisor_sweep import parse_vary, read_table, run_sweep, sweep_from_scenario  # noqa: E402
from memvisor_sweep.driver import DaskExecutor, SerialExecutor  # noqa: E402
from memvisor_sweep.table import WALL_CLOCK_COLUMNS  # noqa: E402


def deterministic(rows):
    """Rows without the wall-clock columns, the only ones two equal sweeps may differ in."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_COLUMNS} for r in rows]


@pytest.fixture
def cluster():
    """A 2-worker LocalCluster; afterwards no worker process of this test is left."""
    executor = DaskExecutor(workers=2, dashboard=False)
    try:
        with executor:
            yield executor
    finally:
        assert executor.client is None and executor.cluster is None
        assert multiprocessing.active_children() == []


def test_cluster_gives_the_serial_table_and_records_failures(tmp_path, tiny, cluster):
    """A sweep on two workers, a deliberately failing run included, gives the serial sweep's table."""
    axes = [parse_vary("vm.web.workload.alpha=0.7,0.99"), parse_vary("seed=1,2,3"),
            parse_vary('vm.db.workload=uniform,{kind="trace", path="/nonexistent/sweep-dask.npy"}')]
    spec = sweep_from_scenario(tiny, axes)
    on_cluster = run_sweep(spec, tmp_path / "dask", cluster)
    serial = run_sweep(spec, tmp_path / "serial", SerialExecutor())
    assert (on_cluster.runs, on_cluster.ok, on_cluster.failed) == (12, 6, 6)
    assert on_cluster.errors == serial.errors and "sweep-dask.npy" in next(iter(on_cluster.errors))
    assert deterministic(read_table(on_cluster.table)) == deterministic(read_table(serial.table))
    assert (tmp_path / "dask" / "index.html").exists()


def _flaky_run_function(markers: str):
    """A run function whose first attempt at run 'die' kills its worker process and whose first
    attempt at run 'raise' raises outside the run function; every other attempt runs normally."""
    from memvisor_sweep.run import RunOutcome, run_one

    def run(task):
        """Fail once per flaky key, as the docstring above says."""
        marker = Path(markers) / task.key
        if task.key in ("die", "raise") and not marker.exists():
            marker.write_text("tried")
            if task.key == "die":
                os._exit(1)
            raise RuntimeError("flaky infrastructure")
        if task.key in ("die", "raise"):
            return RunOutcome(task.key, "ok", {"time": {"virtual_seconds": 0.0}})
        return run_one(task)

    return run


def test_lost_worker_and_failed_task_are_retried(tmp_path, cluster):
    """A worker that dies mid-run has its run rescheduled; a task that raises outside the run
    function is retried (Dask's retries=); both end up finished."""
    import cloudpickle

    from memvisor_sweep.run import RunTask

    # The workers cannot import this test module: ship the flaky function by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        tasks = [RunTask(key, {}, "flaky.toml") for key in ("die", "raise")]
        outcomes = list(cluster.run(_flaky_run_function(str(tmp_path)), tasks, retries=2))
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert sorted((o.key, o.status) for o in outcomes) == [("die", "ok"), ("raise", "ok")]
    assert (tmp_path / "die").exists() and (tmp_path / "raise").exists()
