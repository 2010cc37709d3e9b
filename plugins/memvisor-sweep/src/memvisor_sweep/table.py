"""The results table of a sweep: one row per run, the axis values and the scalar metrics of its
report.json flattened into dotted column names; Parquet through pyarrow when it is installed,
CSV otherwise.

Columns: ``key``, ``status`` (``ok`` or ``error``), ``error``, one per axis, ``run_seconds``,
then ``time.*``, ``total.*`` (counters summed over VMs), ``memory.*``, ``events.*``,
``vms.NAME.*`` and every report section's scalar metrics as ``PLUGIN.KEY.SUBKEY``.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from memvisor.metrics import COUNTERS

FIXED_COLUMNS = ("key", "status", "error")
"""Columns every table starts with."""

WALL_CLOCK_COLUMNS = ("run_seconds", "time.real_seconds")
"""Columns measured in real time: the only ones that differ between two runs of one sweep."""


def flatten_report(data: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar metrics of a report.json dict as ``{dotted name: value}``."""
    row: dict[str, Any] = {}
    for key, value in data.get("time", {}).items():
        row[f"time.{key}"] = value
    vms = data.get("vms", {})
    for counter in COUNTERS:
        row[f"total.{counter}"] = sum(vm.get(counter, 0) or 0 for vm in vms.values())
    if row.get("total.accesses"):
        # The one NUMA figure that compares across VM mixes.
        row["total.local_fraction"] = 1.0 - row["total.remote"] / row["total.accesses"]
    series = data.get("core", {}).get("series", {})
    for name, reduce in (("used_pages", ("max", "mean")), ("free_pages", ("min",))):
        values = [v for v in series.get(name, []) if v is not None]
        if values:
            for how in reduce:
                row[f"memory.{name}.{how}"] = {"max": max, "min": min,
                                               "mean": lambda xs: sum(xs) / len(xs)}[how](values)
    for event in data.get("core", {}).get("events", []):
        if event.get("kind") != "step":
            row[f"events.{event['kind']}"] = row.get(f"events.{event['kind']}", 0) + 1
    for name, vm in vms.items():
        for key, value in vm.items():
            if _is_cell(value):
                row[f"vms.{name}.{key}"] = value
    sections = data.get("sections", [])
    per_plugin: dict[str, int] = {}
    for section in sections:
        per_plugin[section["plugin"]] = per_plugin.get(section["plugin"], 0) + 1
    for section in sections:
        prefix = section["plugin"]
        if per_plugin[prefix] > 1:  # two sections of one plugin: tell them apart by title
            prefix += "." + re.sub(r"[^a-z0-9]+", "_", section["title"].lower()).strip("_")
        _flatten(section.get("metrics", {}), prefix + ".", row)
    return row


CORE_COLUMNS = {"time": {"virtual_seconds", "real_seconds"},
                "total": {*COUNTERS, "local_fraction"},
                "memory": {"used_pages.max", "used_pages.mean", "free_pages.min"}}
"""The core's metric columns, by their first part (``events.KIND`` and ``vms.NAME.COUNTER``
follow from the run)."""


def column_problem(name: str, vm_names: set[str], plugins: set[str]) -> str | None:
    """What is wrong with ``name`` as a metric column of a sweep whose runs have VMs
    ``vm_names`` and enable ``plugins`` (None: it can be one). The core's columns are checked
    exactly; a plugin's metric only by its plugin, whose report alone knows its keys."""
    head, _, rest = name.partition(".")
    if head in CORE_COLUMNS:
        known = CORE_COLUMNS[head]
        return None if rest in known else f"no such column (the {head} columns: {', '.join(sorted(known))})"
    if head == "events":
        return None if rest else "an events column is events.KIND"
    if head == "vms":
        vm, _, counter = rest.partition(".")
        if vm not in vm_names:
            return f"no VM named {vm[:40]!r} in the sweep"
        return None if counter else "a VM column is vms.NAME.METRIC"
    if head == "memvisor" or head in plugins:
        return None if rest else f"a {head} column is {head}.METRIC"
    return (f"no column starts with {head[:40]!r}: columns are time.*, total.*, memory.*, events.*, vms.NAME.* "
            f"or PLUGIN.* of an enabled plugin ({', '.join(sorted(plugins)) or 'none here'})")


def _is_cell(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _flatten(metrics: Mapping[str, Any], prefix: str, row: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            _flatten(value, f"{prefix}{key}.", row)
        elif _is_cell(value):
            row[f"{prefix}{key}"] = value
        # Lists (curves, histograms) stay in report.json: a table cell holds one number.


def make_row(key: str, axes: Mapping[str, Any], status: str, error: str | None, run_seconds: float | None,
             report: Mapping[str, Any] | None) -> dict[str, Any]:
    """One row of the table. A metric whose name collides with an axis or fixed column is
    prefixed with ``metric.``."""
    row: dict[str, Any] = {"key": key, "status": status, "error": error, **axes, "run_seconds": run_seconds}
    for name, value in (flatten_report(report) if report else {}).items():
        row[f"metric.{name}" if name in row else name] = value
    return row


def columns_of(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every column, in the order first seen."""
    seen: dict[str, None] = {}
    for row in rows:
        for name in row:
            seen.setdefault(name, None)
    return list(seen)


def column_kind(values: Sequence[Any]) -> str:
    """``bool``, ``int``, ``float`` or ``str``: the one type a column's cells can share."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "int"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "float"
    return "str"


def _cell(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "float":
        return float(value)
    if kind == "str" and not isinstance(value, str):
        from memvisor_sweep.spec import label

        return label(value)
    return value


def have_pyarrow() -> bool:
    """Whether pyarrow can be imported (Parquet) or the table falls back to CSV."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: Path, fmt: str | None = None) -> Path:
    """Write ``rows`` as ``out_dir/results.parquet`` (``fmt="parquet"``, the default when pyarrow
    is installed) or ``out_dir/results.csv``; returns the path. The other format's file, left by
    an earlier run of the sweep, is removed so that only current results are found."""
    fmt = fmt or ("parquet" if have_pyarrow() else "csv")
    columns = columns_of(rows)
    kinds = {c: column_kind([r.get(c) for r in rows]) for c in columns}
    from memvisor.files import atomic_write

    path = out_dir / f"results.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}
        arrays = [pa.array([_cell(r.get(c), kinds[c]) for r in rows], type=types[kinds[c]]) for c in columns]
        atomic_write(path, lambda f: pq.write_table(pa.Table.from_arrays(arrays, names=columns), f))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r.get(c) is None else _csv_text(_cell(r.get(c), kinds[c])) for c in columns])
        atomic_write(path, buffer.getvalue())
    else:
        raise ValueError(f"unknown table format {fmt!r}")
    other = out_dir / ("results.csv" if fmt == "parquet" else "results.parquet")
    other.unlink(missing_ok=True)
    return path


def _csv_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return str(value)


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a results table (Parquet or CSV; CSV cells are read back as numbers, booleans
    or text, empty cells as None)."""
    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / "results.parquet", path / "results.csv") if p.exists()), path / "results.csv")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        raw = list(reader)
    columns = [[r[i] for r in raw] for i in range(len(header))]
    typed = [_parse_csv_column(values) for values in columns]
    return [{name: typed[i][j] for i, name in enumerate(header)} for j in range(len(raw))]


def _parse_csv_column(values: list[str]) -> list[Any]:
    present = [v for v in values if v != ""]
    for convert in (_as_bool, int, float):
        try:
            converted = [convert(v) for v in present]
        except ValueError:
            continue
        it = iter(converted)
        return [None if v == "" else next(it) for v in values]
    return [None if v == "" else v for v in values]


def _as_bool(text: str) -> bool:
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(text)
