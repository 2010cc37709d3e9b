"""Reports of a run: report.json (every metric), PNG plots and report.html that shows them.

Plugins contribute :class:`ReportSection` values from :func:`memvisor_report`: metrics as
JSON-able values, and how a person reads them: :class:`Headline` sentences (what the technique
did for each VM, in words and numbers), :class:`Table` views of the metrics with real columns
and units, and :class:`Plot` data. The core formats every number (:mod:`memvisor.units`), draws
every plot and writes the page (:mod:`memvisor.report_html`), so every plugin's section —
a third party's too — reads like the others. A section that gives only metrics (the API before
headlines and tables) still renders: its tables are derived from the metrics' shape.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

import memvisor
from memvisor.files import atomic_write, path_inside
from memvisor.units import UNITS, check_unit, exact, shown

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.runner import ScenarioRun

Path_ = Sequence[str | int]
"""A path of keys into a section's metrics (``("vms", "web", "balloon_pages")``)."""


@attrs.frozen(eq=False)
class Plot:
    """A plot as data: named series of (x, y) points drawn as lines (or steps, or bars).

    :ivar name: file-name stem of the PNG, unique within the report.
    :ivar title: the plot's title.
    :ivar xlabel: label of the x axis, with its unit (``"time (s)"``).
    :ivar ylabel: label of the y axis, with its unit.
    :ivar series: label -> (xs, ys). A series labelled with a VM's name (or the name and more
        words: ``"web #0 on fault"``) is drawn in that VM's colour, the same in every plot.
    :ivar logx: logarithmic x axis.
    :ivar logy: logarithmic y axis.
    :ivar kind: ``"line"``, ``"step"`` or ``"bar"``.
    :ivar ends_at: series label -> where a table of the report holds the value the series ends
        at (a running total ends at the total): a path of keys into the section's metrics (for
        a plot of the core, into report.json; see :func:`metric_at`). A report's plot may not
        contradict its tables: the tests of every example check these.
    :ivar scale: the series' unit in the table's: a series ends at its table value × ``scale``
        (a balloon's size plotted in MiB, counted in pages: ``1 / 256``).
    :ivar shows: what the series that are not in ``ends_at`` show, when that is not a value
        of a table (a rate per tick, a curve, a reference line): shown under the plot.
    """

    name: str
    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]]
    logx: bool = False
    logy: bool = False
    kind: str = "line"
    ends_at: Mapping[str, Sequence[str | int]] = attrs.field(factory=dict)
    scale: float = 1.0
    shows: str = ""

    def to_json(self, section: str | None) -> dict[str, Any]:
        """The plot as data in report.json (``section``: the title of its section, None for
        the core's)."""
        return {"section": section, "title": self.title, "xlabel": self.xlabel, "ylabel": self.ylabel,
                "kind": self.kind, "logx": self.logx, "logy": self.logy, "shows": self.shows,
                "scale": self.scale, "ends_at": {label: list(path) for label, path in self.ends_at.items()},
                "series": {label: {"x": list(xs), "y": list(ys)} for label, (xs, ys) in self.series.items()}}

    def points(self) -> int:
        """The finite points it draws (a plot without any is left out of the page)."""
        return sum(int(np.count_nonzero(np.isfinite(np.asarray(ys, dtype=float)))) for _, ys in self.series.values())


@attrs.frozen
class Column:
    """One column of a :class:`Table`: the value at ``key`` of each record.

    :ivar key: a key of the record, or a path of keys into it (``("budget", "trap_rate")``).
    :ivar label: the column's heading (without the unit: the cells carry it).
    :ivar unit: how the value is shown, one of :data:`memvisor.units.UNITS` (``"pages"``,
        ``"bytes"``, ``"s"``, ``"fraction"``...); the exact value is in the cell's tooltip.
    :ivar none: what a missing value (None) means (``"not reached"``, ``"unlimited"``): the
        cell shows a dash and says this in its tooltip.
    :ivar help: what the column is, for the heading's tooltip.
    """

    key: str | Sequence[str | int]
    label: str
    unit: str = attrs.field(default="", validator=lambda _, __, unit: check_unit(unit))
    none: str = ""
    help: str = ""

    @property
    def path(self) -> tuple[str | int, ...]:
        """:attr:`key` as a path."""
        return (self.key,) if isinstance(self.key, (str, int)) else tuple(self.key)

    def to_json(self) -> dict[str, Any]:
        """The column's definition in report.json."""
        return {"key": list(self.path), "label": self.label, "unit": self.unit, "none": self.none, "help": self.help}


@attrs.frozen
class Table:
    """A table of a section: a view of its metrics, one row per record, one :class:`Column`
    per figure.

    Give ``rows``, a path to a list of records or to a mapping of name -> record (one row
    each; the names fill a first column headed ``keys[0]``); a ``"*"`` in the path takes every
    item at that level (``("vms", "*", "moves")``: every move of every VM, with a first column
    of VM names). Or give ``record``, a path to one record shown as label / value lines
    (``()``: the section's top-level figures). Rows past :data:`FOLD_ROWS` are folded.

    :ivar title: a caption ("" for none).
    :ivar columns: the columns.
    :ivar rows: path to the records.
    :ivar record: path to the one record.
    :ivar keys: headings of the name columns (one per ``"*"`` and one for a mapping of records).
    """

    title: str
    columns: Sequence[Column]
    rows: Path_ | None = None
    record: Path_ | None = None
    keys: Sequence[str] = ("VM",)

    def __attrs_post_init__(self):
        if (self.rows is None) == (self.record is None):
            raise ValueError(f"table {self.title!r}: give rows or record, not both nor neither")

    def to_json(self) -> dict[str, Any]:
        """The table's definition in report.json (its values are the metrics it points at)."""
        return {"title": self.title, "rows": None if self.rows is None else list(self.rows),
                "record": None if self.record is None else list(self.record), "keys": list(self.keys),
                "columns": [c.to_json() for c in self.columns]}


FOLD_ROWS = 12
"""A table longer than this is folded (``<details>``) on the page."""


@attrs.frozen
class Figure:
    """A number of a :class:`Headline`: the metric at ``path`` in the section, shown in ``unit``.

    :ivar path: keys into the section's metrics.
    :ivar unit: one of :data:`memvisor.units.UNITS`.
    :ivar better: ``"higher"`` or ``"lower"`` when one of two runs is better for it (``memvisor
        compare`` says which run is), None when it only describes.
    :ivar label: what it is, in a few words, where it stands without its sentence (``memvisor
        compare``'s rows); default: the last key of ``path`` without its unit.
    """

    path: Path_
    unit: str = attrs.field(default="", validator=lambda _, __, unit: check_unit(unit))
    better: str | None = attrs.field(default=None, validator=attrs.validators.in_((None, "higher", "lower")))
    label: str = ""


@attrs.frozen
class Headline:
    """One sentence of the report's summary: what a technique did, for one VM or the host.

    ``text`` is a :meth:`str.format` template whose fields are ``figures``: the core fills
    them with the metrics they point at, formatted in their units (``"sharing reclaimed
    {saved} of the {estimated} it estimated"``), so the sentence can never disagree with the
    section's tables. Write numbers only through figures.

    :ivar text: the template.
    :ivar figures: field name -> :class:`Figure`.
    :ivar vm: the VM it is about, None for the host.
    :ivar key: what identifies it among the section's headlines across runs (``memvisor
        compare`` pairs headlines by section, VM and key): default the VM's name or ``"host"``.
    """

    text: str
    figures: Mapping[str, Figure] = attrs.field(factory=dict)
    vm: str | None = None
    key: str = ""


@attrs.frozen(eq=False)
class ReportSection:
    """One plugin's part of a report.

    :ivar plugin: the contributing plugin's name.
    :ivar title: a heading for people.
    :ivar metrics: JSON-able values (numbers, strings, lists, nested dicts): report.json.
    :ivar plots: plots drawn under the heading.
    :ivar text: a short paragraph explaining the figures.
    :ivar headlines: sentences of the report's summary (what the technique did, per VM).
    :ivar tables: how the page shows the metrics; None derives tables from their shape
        (:func:`auto_tables`), ``()`` shows none.
    """

    plugin: str
    title: str
    metrics: Mapping[str, Any] = attrs.field(factory=dict)
    plots: Sequence[Plot] = ()
    text: str = ""
    headlines: Sequence[Headline] = ()
    tables: Sequence[Table] | None = None


def metric_at(data: Mapping[str, Any], section: str | None, path: Sequence[str | int]) -> Any:
    """The value at ``path`` in report.json's ``data``: in the metrics of the section titled
    ``section``, or from the root when it is None. A string key into a list picks the element
    whose ``title`` it is (``("sections", "Checkpoints", "metrics", ...)``).

    :raises KeyError: no such value.
    """
    value: Any = data if section is None else metric_at(data, None, ("sections", section, "metrics"))
    for key in path:
        if isinstance(value, list) and isinstance(key, str):
            value = next((v for v in value if isinstance(v, Mapping) and v.get("title") == key), None)
            if value is None:
                raise KeyError(f"no section titled {key!r}")
        else:
            value = value[key]
    return value


def value_at(value: Any, path: Sequence[str | int], missing: Any = None) -> Any:
    """The value at ``path`` in ``value`` (plain keys and indexes), ``missing`` where there is
    none."""
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return missing
    return value


_MISSING = object()


def table_rows(metrics: Mapping[str, Any], table: Mapping[str, Any] | Table) -> Iterator[tuple[list[str], Mapping]]:
    """The rows of a table (its report.json definition or the :class:`Table`) over a section's
    metrics: (names from the ``"*"`` levels and a final mapping, record)."""
    spec = table.to_json() if isinstance(table, Table) else table
    if spec["record"] is not None:
        record = value_at(metrics, spec["record"])
        if isinstance(record, Mapping):
            yield [], record
        return

    def walk(value: Any, path: list, names: list[str]) -> Iterator[tuple[list[str], Mapping]]:
        if not path:
            if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
                for name, record in value.items():
                    yield [*names, str(name)], record
            elif isinstance(value, list):
                for record in value:
                    if isinstance(record, Mapping):
                        yield names, record
            return
        key, rest = path[0], path[1:]
        if key == "*":
            items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
            for name, item in items:
                yield from walk(item, rest, [*names, str(name)])
        else:
            item = value_at(value, [key])
            if item is not None:
                yield from walk(item, rest, names)

    yield from walk(metrics, list(spec["rows"]), [])


# -- tables derived from the metrics' shape (sections that declare none) ------------------------

_SUFFIX_UNITS = (("_per_s", "per_s"), ("_mib_per_s", "MiB/s"), ("_seconds", "s"), ("_s", "s"), ("_bytes", "bytes"),
                 ("_mib", "MiB"), ("_fraction", "fraction"), ("_ratio", "ratio"))


def guess_column(key: str) -> Column:
    """A column for metric ``key`` named the project's way: its unit from its suffix
    (``first_access_s`` -> seconds, ``bytes_read`` -> bytes, ``used_mib`` -> MiB), its label
    the words of the key without the unit."""
    unit, label = "", key
    for suffix, suffix_unit in sorted(_SUFFIX_UNITS, key=lambda s: -len(s[0])):
        if key.endswith(suffix) and len(key) > len(suffix):
            unit, label = suffix_unit, key[: -len(suffix)]
            break
    else:
        if key.startswith("bytes_") or key == "bytes":
            unit = "bytes"
    return Column(key, label.replace("_", " "), unit)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _short_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 8 and all(_scalar(v) for v in value)


def _records(value: Any) -> list[Mapping] | None:
    """The records of a list of records or a mapping of name -> record, else None."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        return list(value)
    if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
        return list(value.values())
    return None


def _record_columns(records: Sequence[Mapping]) -> list[Column]:
    keys: list[str] = []
    for record in records:
        keys += [k for k, v in record.items() if k not in keys and (_scalar(v) or _short_list(v))]
    return [guess_column(k) for k in keys]


def auto_tables(metrics: Mapping[str, Any]) -> list[Table]:
    """Tables for a section that declares none: its top-level figures as one label / value
    table, each list or mapping of records as a table with one row per record, each mapping of
    figures as a label / value table. Values nested deeper stay in report.json only."""
    top = [guess_column(k) for k, v in metrics.items() if _scalar(v) or _short_list(v)]
    tables = [Table("", top, record=())] if top else []
    for key, value in metrics.items():
        records = _records(value)
        title = key.replace("_", " ")
        if records is not None:
            columns = _record_columns(records)
            if columns:
                tables.append(Table(title, columns, rows=(key,), keys=("VM" if key == "vms" else "name",)))
        elif isinstance(value, Mapping) and value:
            columns = [guess_column(k) for k, v in value.items() if _scalar(v) or _short_list(v)]
            if columns:
                tables.append(Table(title, columns, record=(key,)))
    return tables


# -- report.json and the files -------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Turn numpy scalars and arrays, tuples and NaN into plain JSON values (NaN -> null)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float)):
        return value
    return str(value)  # a TOML date among a scenario's settings, say


VM_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
              "#7f7f7f")
"""The colours of a report's VMs, in the order the VMs were created (then again from the first)."""


def vm_colours(names: Sequence[str]) -> dict[str, str]:
    """Each VM's colour: the same in every plot and on the page."""
    return {name: VM_COLOURS[i % len(VM_COLOURS)] for i, name in enumerate(names)}


def headline_json(section: ReportSection, metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The section's headlines as report.json holds them: the sentence, its template and every
    figure with its path, value, unit and how it was shown.

    :raises ValueError: a figure's path is not in the metrics, or the template names a field
        that is not a figure (a bug of the plugin, named in the message).
    """
    out, seen = [], {}
    fields = re.compile(r"{(\w+)}")
    for headline in section.headlines:
        figures = {}
        for name, figure in headline.figures.items():
            value = value_at(metrics, figure.path, _MISSING)
            if value is _MISSING:
                raise ValueError(f"{section.plugin}: headline {headline.text!r}: no metric at {list(figure.path)}")
            last = figure.path[-1] if figure.path and isinstance(figure.path[-1], str) else name
            figures[name] = {"path": list(figure.path), "unit": figure.unit, "value": value,
                             "shown": shown(value, figure.unit), "exact": exact(value, figure.unit),
                             "better": figure.better, "label": figure.label or guess_column(last).label}
        missing = [f for f in fields.findall(headline.text) if f not in figures]
        if missing:
            raise ValueError(f"{section.plugin}: headline {headline.text!r} names {missing[0]!r}, not a figure")
        key = headline.key or headline.vm or "host"
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            key = f"{key} #{seen[key]}"
        out.append({"key": key, "vm": headline.vm, "template": headline.text,
                    "text": headline.text.format(**{n: f["shown"] for n, f in figures.items()}),
                    "figures": figures})
    return out


@attrs.define
class Report:
    """A finished run's report: ``data`` is report.json; ``plots`` are drawn by :meth:`write`."""

    data: dict[str, Any]
    sections: list[ReportSection]
    plots: list[Plot]

    @classmethod
    def build(cls, run: ScenarioRun, real_seconds: float) -> Report:
        """Collect the core's metrics and every plugin's sections after the run."""
        host, scenario = run.host, run.scenario
        sections = host.report_sections()  # first: a section's hook may still record an event
        metrics = host.metrics.to_json()
        core_plots = _core_plots(metrics)
        data = {
            "memvisor": memvisor.__version__,
            "scenario": {"name": scenario.name, "path": str(scenario.path), "description": scenario.description,
                         "seed": scenario.host.seed, "settings": {k: dict(v) for k, v in scenario.plugins.items()}},
            "host": {"backend": host.backend.describe(), "memory_pages": host.config.memory_pages,
                     "numa_nodes": host.config.numa_nodes, "tick_interval": host.tick_interval},
            "plugins": sorted(scenario.plugins),
            "time": _time(host, real_seconds),
            "vms": {
                name: {"pages": vm.pages, "home_node": vm.home_node, "large_pages": vm.large_pages,
                       **metrics["vms"].get(name, {})}
                for name, vm in host.vms.items()
            },
            "colours": vm_colours(list(host.vms)),
            "core": {"series": metrics["series"], "events": metrics["events"]},
            "sections": [],
        }
        for s in sections:
            section_metrics = to_jsonable(s.metrics)
            tables = auto_tables(section_metrics) if s.tables is None else s.tables
            data["sections"].append({
                "plugin": s.plugin, "title": s.title, "metrics": section_metrics, "text": s.text,
                "headlines": headline_json(s, section_metrics), "tables": [t.to_json() for t in tables],
                "plots": [p.name + ".png" for p in s.plots]})
        plots = core_plots + [p for s in sections for p in s.plots]
        names = [p.name for p in plots]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"two plots of the report are named {dup!r}")
        data["plots"] = {p.name: p.to_json(None) for p in core_plots}
        data["plots"].update({p.name: p.to_json(s.title) for s in sections for p in s.plots})
        return cls(to_jsonable(data), sections, plots)

    def metric(self, plugin: str, key: str) -> Any:
        """A plugin's metric by name (first section of that plugin that has it)."""
        for section in self.data["sections"]:
            if section["plugin"] == plugin and key in section["metrics"]:
                return section["metrics"][key]
        raise KeyError(f"{plugin}: {key}")

    def page_files(self) -> dict[str, bytes]:
        """report.html and one PNG per plot, by file name, drawn in memory (a sweep's worker
        draws them, its driver writes them)."""
        from memvisor.report_html import render

        colours = self.data.get("colours", {})
        files = {f"{plot.name}.png": plot_png(plot, colours) for plot in self.plots}
        files["report.html"] = render(self.data).encode("utf-8")
        return files

    def write(self, out_dir: str | Path) -> Path:
        """Write report.json, one PNG per plot and report.html into ``out_dir``; returns the
        path of report.html. Files are written under temporary names and renamed, so an
        interrupted write never leaves a half report under the final name."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_files(out, self.page_files())
        atomic_write(out / "report.json", json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        return out / "report.html"


def write_files(folder: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` (name -> bytes) into ``folder``, each whole or not at all; a name from a
    plot stays a file of the folder (:func:`memvisor.files.path_inside`)."""
    for name, data in files.items():
        stem, dot, suffix = name.rpartition(".")
        atomic_write(path_inside(folder, stem, dot + suffix, "a report file's name"), data)


def _time(host, real_seconds: float) -> dict[str, Any]:
    """The run's time: ``clock`` says whether the backend's clock is virtual or real;
    ``clock_seconds`` is that clock at the end (events and series are stamped with it);
    ``virtual_seconds`` only on a virtual clock; ``real_seconds`` is the run's wall time."""
    from memvisor.backend import Capability

    if Capability.VIRTUAL_TIME in host.backend.capabilities:
        return {"clock": "virtual", "clock_seconds": host.now, "virtual_seconds": host.now,
                "real_seconds": real_seconds}
    return {"clock": "real", "clock_seconds": host.now, "real_seconds": real_seconds}


def time_summary(time: Mapping[str, Any]) -> str:
    """The run's time in words: virtual and real seconds, or real seconds only."""
    if time["clock"] == "virtual":
        return f"{shown(time['virtual_seconds'], 's')} virtual, {shown(time['real_seconds'], 's')} real"
    return f"{shown(time['real_seconds'], 's')} real (real clock)"


def _core_plots(metrics: dict) -> list[Plot]:
    series = metrics["series"]
    time = series.get("time", [])
    if not time:
        return []
    plots = [
        Plot("core-memory", "Machine memory in use", "time (s)", "MiB",
             {"used": (time, [p * 4096 / 2**20 for p in series["used_pages"]]),
              "free": (time, [p * 4096 / 2**20 for p in series["free_pages"]])},
             ends_at={"used": ("sections", MEMORY_SECTION, "metrics", "used_mib")},
             shows="Sampled at every tick and at the end of the run; free is the rest of the host's memory.")
    ]
    local = {k.split("/", 1)[1]: (time, v) for k, v in series.items() if k.startswith("local_fraction/")}
    if local and any(v < 1.0 for _, vals in local.values() for v in vals if v == v):
        plots.append(Plot("core-local-fraction", "Accesses local to the VM's NUMA node", "time (s)",
                          "local fraction", local,
                          shows="The fraction of each VM's accesses since the previous tick that were local "
                                "(a gap: no accesses)."))
    return plots


MEMORY_SECTION = "Memory, reclaim and reliability"
"""The title of the core's section with the host's memory at the end of the run."""

_OTHER_COLOURS = ("#333333", "#888888", "#555555", "#aaaaaa")
_STYLES = ("-", "--", ":", "-.")


def series_vm(label: str, vms: Sequence[str]) -> str | None:
    """The VM a series is about: the one whose name is the label, or begins it followed by a
    space (the longest such name), None for another series."""
    matches = [vm for vm in vms if label == vm or label.startswith(vm + " ")]
    return max(matches, key=len) if matches else None


def series_styles(labels: Sequence[str], colours: Mapping[str, str]) -> dict[str, tuple[str | None, str]]:
    """(colour, line style) of each series: a VM's series in its colour (several of one VM in
    different line styles); where a plot has VM series, the others in greys; else matplotlib's
    own colour cycle (None)."""
    owners = {label: series_vm(label, list(colours)) for label in labels}
    if not any(owners.values()):
        return {label: (None, "-") for label in labels}
    styles, used, others = {}, {}, 0
    for label in labels:
        vm = owners[label]
        if vm is not None:
            n = used[vm] = used.get(vm, -1) + 1
            styles[label] = (colours[vm], _STYLES[n % len(_STYLES)])
        else:
            styles[label] = (_OTHER_COLOURS[others % len(_OTHER_COLOURS)], "--")
            others += 1
    return styles


def draw_plot(plot: Plot, path: str | Path, colours: Mapping[str, str] | None = None,
              styles: Mapping[str, tuple[str | None, str]] | None = None) -> None:
    """Draw a :class:`Plot` as a PNG at ``path`` (written under a temporary name, then renamed);
    see :func:`plot_png`."""
    atomic_write(path, plot_png(plot, colours, styles))


def plot_png(plot: Plot, colours: Mapping[str, str] | None = None,
             styles: Mapping[str, tuple[str | None, str]] | None = None) -> bytes:
    """A :class:`Plot` as PNG bytes, each VM's series in its colour of ``colours`` (or each
    series in its (colour, line style) of ``styles``). Non-finite points (NaN: no data in that
    interval) are left out as gaps."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = styles or series_styles(list(plot.series), colours or {})
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for label, (xs, ys) in plot.series.items():
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        colour, style = styles[label]
        if plot.kind != "bar":
            keep = np.isfinite(ys)
            xs, ys = xs[keep], ys[keep]
        if plot.kind == "bar":
            ax.bar(xs if xs.dtype.kind in "fi" else np.arange(len(ys)), ys, label=label, color=colour)
        elif plot.kind == "step":
            ax.step(xs, ys, where="post", label=label, color=colour, linestyle=style)
        else:
            ax.plot(xs, ys, label=label, linewidth=1.4, color=colour, linestyle=style)
    if plot.logx:
        ax.set_xscale("log")
    if plot.logy:
        ax.set_yscale("log")
    ax.set_title(plot.title)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3)
    if plot.series:
        ax.legend(fontsize="small")
    # Fixed margins that fit the title and labels of a 7x3.6 in figure: tight_layout measured
    # every text and took half of a plot's time (a fleet report draws tens of plots).
    fig.subplots_adjust(left=0.11, right=0.97, top=0.9, bottom=0.14)
    try:
        png = io.BytesIO()
        fig.savefig(png, format="png")
        return png.getvalue()
    finally:
        plt.close(fig)


__all__ = ["FOLD_ROWS", "MEMORY_SECTION", "UNITS", "Column", "Figure", "Headline", "Plot", "Report", "ReportSection",
           "Table", "auto_tables", "draw_plot", "metric_at", "table_rows", "time_summary", "to_jsonable", "value_at",
           "write_files"]
