"""The run function of a sweep: one resolved scenario in, one outcome out.

:func:`run_one` is a pure function of its task (the scenario and its seed decide everything
the emulator does), so a run is identified by its key and never needs doing twice. It never
raises for a run that fails: the outcome records the error, so that one bad combination does
not stop a sweep and Dask's own retries are kept for lost workers.
"""

from __future__ import annotations

import datetime
import json
import time
import traceback
from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class RunTask:
    """What a worker needs for one run; small and picklable.

    :ivar key: the run's key (hash of the resolved scenario and backend).
    :ivar data: the resolved scenario, as TOML would give it.
    :ivar path: the base scenario's file name, for messages and the report.
    :ivar backend: the backend to use instead of the scenario's, or None.
    :ivar pages: also draw the run's report.html and plots (on the worker, in parallel with
        the other runs; the driver writes them beside report.json).
    """

    key: str
    data: Mapping[str, Any]
    path: str
    backend: str | None = None
    pages: bool = False


@attrs.frozen
class RunOutcome:
    """The result of one run.

    :ivar key: the run's key.
    :ivar status: ``"ok"`` or ``"error"``.
    :ivar report: report.json's dict when the run finished, else None.
    :ivar error: one line saying why the run failed, else None.
    :ivar detail: the traceback of a failed run (kept in its error.json), else None.
    :ivar seconds: wall-clock seconds the run took on its worker.
    :ivar files: the run's report.html and PNGs by file name, when its task asked for pages.
    """

    key: str
    status: str
    report: dict[str, Any] | None = None
    error: str | None = None
    detail: str | None = None
    seconds: float = 0.0
    files: Mapping[str, bytes] = attrs.field(factory=dict)

    @classmethod
    def failed(cls, key: str, exc: BaseException, detail: str | None = None, seconds: float = 0.0) -> RunOutcome:
        """The outcome of a run that raised ``exc``."""
        return cls(key, "error", None, one_line(exc), detail, seconds)


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters: what a summary can show."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def run_one(task: RunTask) -> RunOutcome:
    """Run one scenario and return its outcome; a run that raises gives ``status="error"``.

    Imports happen here rather than at module import so that a Dask worker pays them once,
    when its first run arrives, and the client never needs the runner to unpickle outcomes.
    """
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import parse_scenario

    _quiet_worker_logs()
    started = time.perf_counter()
    try:
        scenario = parse_scenario(dict(task.data), task.path)
        if task.backend:
            scenario = scenario.with_backend(task.backend)
        report = ScenarioRun(scenario).run()
        seconds = time.perf_counter() - started  # the run's own: drawing its pages is not the policy's
        return RunOutcome(task.key, "ok", report.data, seconds=seconds,
                          files=report.page_files() if task.pages else {})
    except Exception as exc:  # recorded in the table; the sweep goes on
        return RunOutcome.failed(task.key, exc, traceback.format_exc(), time.perf_counter() - started)


def _quiet_worker_logs() -> None:
    """In a worker (a child process, or a Dask worker thread), route structlog as the
    ``memvisor`` command does (``MEMVISOR_LOG``, warnings by default): unconfigured, structlog
    would print every debug line of every run to standard output."""
    import multiprocessing

    import structlog

    if structlog.is_configured():
        return
    if multiprocessing.parent_process() is None:  # the main process: only a Dask worker thread
        try:
            from distributed import get_worker

            get_worker()
        except (ImportError, ValueError):
            return  # not in a worker: the caller's logging stays as it is
    from memvisor.logs import configure_logging

    configure_logging()


# ---------------------------------------------------------------------------------------------
# a run's scenario written down, so that `memvisor run runs/KEY/scenario.toml` repeats it
# ---------------------------------------------------------------------------------------------

def to_toml(data: Mapping[str, Any]) -> str:
    """TOML text for a scenario dict (values as :mod:`tomllib` gives them)."""
    lines: list[str] = []
    _emit_table(lines, [], data)
    return "\n".join(lines).strip() + "\n"


def _emit_table(lines: list[str], where: list[str], table: Mapping[str, Any]) -> None:
    simple = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    for key, value in simple.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in table.items():
        if _is_table(value):
            lines.append("")
            lines.append(f"[{'.'.join(_key(k) for k in [*where, key])}]")
            _emit_table(lines, [*where, key], value)
        elif _is_table_array(value):
            for item in value:
                lines.append("")
                lines.append(f"[[{'.'.join(_key(k) for k in [*where, key])}]]")
                _emit_table(lines, [*where, key], item)


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "-_" for c in key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value != value:
            return "nan"
        if isinstance(value, float) and value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
