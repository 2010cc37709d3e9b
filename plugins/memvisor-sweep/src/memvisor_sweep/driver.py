"""Running a sweep: check the plan, skip runs already written, send the rest to an executor
(serial, a Dask LocalCluster or an existing Dask cluster: the same code path), write each
outcome as it arrives, then the table and index.html.

Layout of the output folder::

    DIR/sweep.json               the sweep: axes, runs and their keys
    DIR/runs/KEY/scenario.toml   the run's resolved scenario (`memvisor run` repeats it)
    DIR/runs/KEY/report.json     its report, once it finished
    DIR/runs/KEY/report.html     the same for people, with its plots (index.html links it)
    DIR/runs/KEY/outcome.json    status, error line and traceback, wall-clock seconds
    DIR/results.parquet          one row per run (results.csv without pyarrow)
    DIR/index.html               the comparison report, with its PNGs
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from memvisor.errors import UserError
from memvisor.report import write_files
from memvisor_sweep.run import RunOutcome, RunTask, one_line, run_one, to_toml
from memvisor_sweep.spec import PlannedRun, SweepSpec
from memvisor_sweep.table import make_row, write_table

DASK_MISSING = "memvisor sweep needs dask[distributed]: pip install 'memvisor-sweep[dask]'"
"""The one line shown when a sweep needs Dask and it is not installed."""

RunFunction = Callable[[RunTask], RunOutcome]
"""What executes one run: :func:`memvisor_sweep.run.run_one` unless a test or benchmark says."""


# ---------------------------------------------------------------------------------------------
# executors
# ---------------------------------------------------------------------------------------------

class SerialExecutor:
    """Runs every task in this process, one after the other (``--serial``): the reference a
    cluster's results are compared with, and a sweep with no Dask installed."""

    dashboard_link: str | None = None
    local = True
    workers = 1

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def run(self, function: RunFunction, tasks: Sequence[RunTask], retries: int = 0) -> Iterator[RunOutcome]:
        """Yield each task's outcome in order."""
        for task in tasks:
            try:
                yield function(task)
            except Exception as exc:  # a run function other than run_one may raise
                yield RunOutcome.failed(task.key, exc)


class DaskExecutor:
    """Runs tasks on Dask distributed: a LocalCluster sized to this machine, or the cluster
    whose scheduler is at ``scheduler`` (``tcp://HOST:PORT``).

    :param scheduler: address of an existing scheduler, or None for a LocalCluster.
    :param workers: worker processes of the LocalCluster (default: one per CPU).
    :param processes: worker processes (True) or threads in this process (False; tests). Runs
        are Python-heavy, so processes are what makes them parallel.
    :param dashboard: serve the LocalCluster's dashboard (on 127.0.0.1, a free port) when bokeh
        is installed.
    """

    def __init__(self, scheduler: str | None = None, workers: int | None = None, *, processes: bool = True,
                 dashboard: bool = True):
        self.scheduler, self.processes, self.dashboard = scheduler, processes, dashboard
        self.workers = workers or os.cpu_count() or 1
        self.local = scheduler is None
        self.client: Any = None
        self.cluster: Any = None

    def __enter__(self) -> DaskExecutor:
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            raise UserError(DASK_MISSING) from None
        try:
            if self.scheduler:
                try:
                    self.client = Client(self.scheduler, timeout="20s")
                except (OSError, TimeoutError) as exc:
                    raise UserError(f"--scheduler {self.scheduler}: cannot connect: {one_line(exc)}") from None
                self.workers = len(self.client.scheduler_info().get("workers", {})) or self.workers
            else:
                import dask

                # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's dynamic
                # mmap threshold: every run's machine memory is then a fresh mmap whose pages the
                # kernel faults in and zeroes again (18,000 minor faults and +25% CPU per short run
                # measured here). Without it a worker reuses freed memory as one process does.
                with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
                        _workers_ignore_ctrl_c():
                    self.cluster = LocalCluster(
                        n_workers=self.workers,
                        threads_per_worker=1,  # one run per process: runs hold the GIL most of the time
                        processes=self.processes,
                        host="127.0.0.1",  # never listen beyond this machine
                        dashboard_address="127.0.0.1:0" if self.dashboard and _have_bokeh() else None,
                        silence_logs=logging.ERROR,
                    )
                self.client = Client(self.cluster)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        # Close in this order, each even if the other fails: no worker or port is left behind.
        try:
            if self.client is not None:
                self.client.close()
        finally:
            self.client = None
            if self.cluster is not None:
                try:
                    self.cluster.close()
                finally:
                    self.cluster = None

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's address, when there is one."""
        if self.client is None:
            return None
        if self.cluster is not None and not _have_bokeh():
            return None
        try:
            return self.client.dashboard_link
        except Exception:  # no dashboard configured
            return None

    def run(self, function: RunFunction, tasks: Sequence[RunTask], retries: int = 2) -> Iterator[RunOutcome]:
        """Submit every task and yield outcomes as they complete.

        A task's Dask key is its run key, so a cluster that still holds a result does not
        compute it again. ``retries`` is Dask's own: a task that fails outside the run function
        (its worker died and the scheduler gave up rescheduling it, a broken worker) is tried
        again that many times before it is recorded as failed.
        """
        from distributed import as_completed

        futures = self.client.map(function, list(tasks), key=[f"memvisor-run-{t.key}" for t in tasks],
                                  retries=retries, pure=False)
        keys = {f.key: t.key for f, t in zip(futures, tasks)}
        for future in as_completed(futures):
            if future.status == "finished":
                outcome = future.result()
            else:
                try:
                    exc = future.exception()
                except BaseException as lost:  # cancelled: the scheduler lost the task
                    exc = lost
                outcome = RunOutcome.failed(keys[future.key], exc, f"Dask: {one_line(exc)}")
            future.release()  # results are written as they come: keep none on the cluster
            yield outcome


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Start worker processes with SIGINT ignored (an ignored signal stays ignored across exec,
    and Python then installs no KeyboardInterrupt handler): Ctrl-C reaches the whole process
    group, and only the client should act on it, closing the cluster in order, rather than
    every worker printing a traceback."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _have_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------

@attrs.define
class SweepSummary:
    """What a sweep did.

    :ivar out_dir: the output folder.
    :ivar table: the results table's path.
    :ivar index: index.html's path.
    :ivar runs: distinct runs planned (combinations with equal scenarios are one run).
    :ivar rows: rows of the table (combinations).
    :ivar ran: runs executed now.
    :ivar resumed: runs whose report was already written and not run again.
    :ivar ok: runs with a report.
    :ivar failed: runs that failed.
    :ivar errors: error line -> how many runs failed with it.
    :ivar seconds: wall-clock seconds of the whole sweep.
    :ivar dashboard: the Dask dashboard's address, when there was one.
    """

    out_dir: Path
    table: Path
    index: Path
    runs: int
    rows: int
    ran: int
    resumed: int
    ok: int
    failed: int
    errors: dict[str, int]
    seconds: float
    dashboard: str | None = None


def _atomic_json(path: Path, value: Any) -> None:
    from memvisor.files import atomic_write

    atomic_write(path, json.dumps(value, indent=1) + "\n")


def _manifest(spec: SweepSpec, plan: Sequence[PlannedRun]) -> dict:
    from memvisor import __version__

    return {
        "memvisor": __version__, "name": spec.name, "description": spec.description, "source": str(spec.source),
        "scenario": str(spec.base_path), "backend": spec.backend,
        "set": dict(spec.fixed),
        "axes": [{"name": a.name, "values": list(a.labels)} for a in spec.axes],
        "compare": attrs.asdict(spec.compare),
        "runs": [{"key": r.key, "axes": dict(r.axes)} for r in plan],
    }


def _load_done(run_dir: Path) -> tuple[dict, float | None] | None:
    """A run written by an earlier sweep: its report and wall-clock seconds, or None."""
    try:
        report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or cut short: run it again
    try:
        seconds = json.loads((run_dir / "outcome.json").read_text(encoding="utf-8")).get("seconds")
    except (OSError, ValueError):
        seconds = None
    return report, seconds


def run_sweep(spec: SweepSpec, out_dir: str | Path, executor: Any = None, *, resume: bool = False,
              retries: int = 2, table_format: str | None = None, run_function: RunFunction = run_one,
              on_start: Callable[[int, int], None] | None = None,
              on_outcome: Callable[[RunOutcome], None] | None = None, write_index: bool = True,
              pages: bool | None = None) -> SweepSummary:
    """Run every combination of ``spec``'s axes and write the results into ``out_dir``.

    :param executor: a :class:`SerialExecutor` or an entered :class:`DaskExecutor` (default:
        serial).
    :param resume: reuse the runs already written in ``out_dir`` (their report.json); without it,
        a folder that already holds a sweep is refused.
    :param retries: Dask retries of a task that fails outside the run function.
    :param table_format: ``"parquet"`` or ``"csv"`` (default: Parquet when pyarrow is installed).
    :param run_function: executes one run (tests and benchmarks substitute it).
    :param on_start: ``on_start(to_run, already_done)`` once the plan is known.
    :param on_outcome: called with every outcome as it arrives (progress bars).
    :param write_index: write index.html (benchmarks of the machinery leave it out).
    :param pages: write each run's report.html and plots, drawn by its worker (default: with
        the index; examples/sweep.toml took a third longer with them, docs/sweep.md).
    :raises UserError: a bad axis, value or combination, or a folder holding another sweep.
    """
    started = time.perf_counter()
    executor = executor or SerialExecutor()
    out = Path(out_dir)
    installed = None
    if getattr(executor, "local", True):  # a remote cluster may have other plugins than this machine
        from memvisor.plugins import installed_plugins

        installed = {p.name for p in installed_plugins() if p.error is None}
    plan = spec.check(installed)
    if (out / "sweep.json").exists() and not resume:
        raise UserError(f"{out}: already holds a sweep: pass --resume to continue it, or choose another --out")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _atomic_json(out / "sweep.json", _manifest(spec, plan))

    tasks: dict[str, RunTask] = {}
    for run in plan:
        if run.key not in tasks:
            tasks[run.key] = RunTask(run.key, run.data, str(spec.base_path), spec.backend,
                                     pages=write_index if pages is None else pages)
    flat: dict[str, dict] = {}  # key -> the row's status, error, seconds and metrics (no axes yet)
    todo = []
    for key, task in tasks.items():
        run_dir = out / "runs" / key
        done = _load_done(run_dir) if resume else None
        if done is not None:
            flat[key] = make_row(key, {}, "ok", None, done[1], done[0])
            continue
        run_dir.mkdir(exist_ok=True)
        (run_dir / "scenario.toml").write_text(to_toml(task.data), encoding="utf-8")
        todo.append(task)
    resumed = len(tasks) - len(todo)
    if on_start:
        on_start(len(todo), resumed)

    for outcome in executor.run(run_function, todo, retries):
        run_dir = out / "runs" / outcome.key
        if outcome.status == "ok":
            write_files(run_dir, outcome.files)  # its report.html and plots, drawn by the worker
            _atomic_json(run_dir / "report.json", outcome.report)
        else:
            for name in ("report.json", "report.html"):
                (run_dir / name).unlink(missing_ok=True)
        _atomic_json(run_dir / "outcome.json", {"status": outcome.status, "error": outcome.error,
                                                "detail": outcome.detail, "seconds": outcome.seconds})
        flat[outcome.key] = make_row(outcome.key, {}, outcome.status, outcome.error, outcome.seconds, outcome.report)
        if on_outcome:
            on_outcome(outcome)

    rows = []
    for run in plan:
        cells = flat[run.key]
        row = {"key": run.key, "status": cells["status"], "error": cells["error"], **run.axes}
        row.update({k: v for k, v in cells.items() if k not in ("key", "status", "error")})
        rows.append(row)
    table = write_table(rows, out, table_format)
    index = out / "index.html"
    if write_index:
        from memvisor_sweep.compare import write_index as write_html

        write_html(spec, rows, out, table)
    errors = collections.Counter(flat[k]["error"] for k in tasks if flat[k]["status"] != "ok")
    failed = sum(errors.values())
    return SweepSummary(out, table, index, len(tasks), len(rows), len(todo), resumed, len(tasks) - failed, failed,
                        dict(errors.most_common()), time.perf_counter() - started,
                        getattr(executor, "dashboard_link", None))
