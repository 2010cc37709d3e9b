"""Reports of a run: report.json (every metric), PNG plots and report.html that shows them.

Plugins contribute :class:`ReportSection` values from :func:`memvisor_report`: metrics as
JSON-able values and plots as data. The core draws every plot, so plugins need no plotting code
and every report looks alike.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

import memvisor
from memvisor.files import atomic_write, path_inside

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.runner import ScenarioRun


@attrs.frozen(eq=False)
class Plot:
    """A plot as data: named series of (x, y) points drawn as lines (or steps, or bars).

    :ivar name: file-name stem of the PNG, unique within the report.
    :ivar title: the plot's title.
    :ivar xlabel: label of the x axis.
    :ivar ylabel: label of the y axis.
    :ivar series: label -> (xs, ys).
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


@attrs.frozen(eq=False)
class ReportSection:
    """One plugin's part of a report.

    :ivar plugin: the contributing plugin's name.
    :ivar title: a heading for people.
    :ivar metrics: JSON-able values (numbers, strings, lists, nested dicts).
    :ivar plots: plots drawn under the heading.
    :ivar text: a short paragraph explaining the figures.
    """

    plugin: str
    title: str
    metrics: Mapping[str, Any] = attrs.field(factory=dict)
    plots: Sequence[Plot] = ()
    text: str = ""


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
    return value


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
                         "seed": scenario.host.seed},
            "host": {"backend": host.backend.describe(), "memory_pages": host.config.memory_pages,
                     "numa_nodes": host.config.numa_nodes, "tick_interval": host.tick_interval},
            "plugins": sorted(scenario.plugins),
            "time": _time(host, real_seconds),
            "vms": {
                name: {"pages": vm.pages, "home_node": vm.home_node, "large_pages": vm.large_pages,
                       **metrics["vms"].get(name, {})}
                for name, vm in host.vms.items()
            },
            "core": {"series": metrics["series"], "events": metrics["events"]},
            "sections": [
                {"plugin": s.plugin, "title": s.title, "metrics": s.metrics, "text": s.text,
                 "plots": [p.name + ".png" for p in s.plots]}
                for s in sections
            ],
        }
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

    def write(self, out_dir: str | Path) -> Path:
        """Write report.json, one PNG per plot and report.html into ``out_dir``; returns the
        path of report.html. Files are written under temporary names and renamed, so an
        interrupted write never leaves a half report under the final name."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for plot in self.plots:  # a plot's name becomes a file name: it stays in the folder
            draw_plot(plot, path_inside(out, plot.name, ".png", "a plot name"))
        atomic_write(out / "report.json", json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        page = out / "report.html"
        atomic_write(page, _html(self))
        return page


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
        return f"{time['virtual_seconds']:.3f} s virtual, {time['real_seconds']:.1f} s real"
    return f"{time['real_seconds']:.1f} s real (real clock)"


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


def draw_plot(plot: Plot, path: str | Path) -> None:
    """Draw a :class:`Plot` as a PNG at ``path`` (written under a temporary name, then renamed).
    Non-finite points (NaN: no data in that interval) are left out as gaps."""
    path = Path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for label, (xs, ys) in plot.series.items():
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if plot.kind != "bar":
            keep = np.isfinite(ys)
            xs, ys = xs[keep], ys[keep]
        if plot.kind == "bar":
            ax.bar(xs if xs.dtype.kind in "fi" else np.arange(len(ys)), ys, label=label)
        elif plot.kind == "step":
            ax.step(xs, ys, where="post", label=label)
        else:
            ax.plot(xs, ys, label=label, linewidth=1.4)
    if plot.logx:
        ax.set_xscale("log")
    if plot.logy:
        ax.set_yscale("log")
    ax.set_title(plot.title)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel(plot.ylabel)
    ax.grid(True, alpha=0.3)
    if len(plot.series) > 1:
        ax.legend(fontsize="small")
    # Fixed margins that fit the title and labels of a 7x3.6 in figure: tight_layout measured
    # every text and took half of a plot's time (a fleet report draws tens of plots).
    fig.subplots_adjust(left=0.11, right=0.97, top=0.9, bottom=0.14)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested metrics into (dotted name, value) rows, leaving long lists out."""
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_scalars(value, name + "."))
        elif isinstance(value, list):
            if all(isinstance(v, Mapping) for v in value) and len(value) <= 16:
                for i, item in enumerate(value):
                    rows.extend(_scalars(item, f"{name}[{i}]."))
            elif len(value) <= 8 and all(not isinstance(v, (list, dict)) for v in value):
                rows.append((name, ", ".join(_fmt(v) for v in value)))
        else:
            rows.append((name, value))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:0} .sub{color:#666;margin-top:.2em} section{border-top:1px solid #ddd;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0} th,td{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}
th{font-weight:500;color:#555} td{font-variant-numeric:tabular-nums} img{max-width:100%;display:block;margin:.5em 0}
nav a{margin-right:1em}
"""


def _figure(plot: Plot) -> str:
    image = f"<img src='{plot.name}.png' alt='{html.escape(plot.title)}'>"
    return f"<figure>{image}<figcaption>{html.escape(plot.shows)}</figcaption></figure>" if plot.shows else image


def _html(report: Report) -> str:
    d = report.data
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>memvisor report: {html.escape(d['scenario']['name'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(d['scenario']['name'])}</h1>",
        f"<p class='sub'>{html.escape(d['scenario']['description'])}</p>",
    ]
    nav = ["<a href='#host'>host</a>"] + [
        f"<a href='#{_slug(s['plugin'] + '-' + s['title'])}'>{html.escape(s['title'])}</a>" for s in d["sections"]
    ]
    parts.append("<nav>" + "".join(nav) + "</nav>")
    host_rows = [
        ("backend", d["host"]["backend"]["name"]),
        ("machine memory", f"{d['host']['memory_pages'] * 4096 / 2**30:.2f} GiB"),
        ("NUMA nodes", d["host"]["numa_nodes"]),
        ("plugins", ", ".join(d["plugins"]) or "none"),
        ("time", time_summary(d["time"])),
        ("seed", d["scenario"]["seed"]),
    ]
    parts.append("<section id='host'><h2>Host and VMs</h2>" + _table(host_rows))
    columns = ("pages", "home node", "accesses", "remote", "faults", "traced", "write traps", "guest traps")
    vm_head = "<tr><th>VM</th>" + "".join(f"<th>{k}</th>" for k in columns)
    vm_rows = "".join(
        f"<tr><th>{html.escape(n)}</th>" + "".join(
            f"<td>{_fmt(v.get(k, 0))}</td>" for k in ("pages", "home_node", "accesses", "remote", "faults", "traced",
                                                       "write_traps", "guest_traps")) + "</tr>"
        for n, v in d["vms"].items())
    parts.append(f"<table>{vm_head}</tr>{vm_rows}</table>")
    parts.append("<p class='sub'>faults, traced and write traps: every trap of the VM's memory delivered to the "
                 "plugins, of its guest's accesses and of its disk I/O alike; guest traps: those of its guest's "
                 "own accesses (what a trap budget is charged).</p>")
    for plot in report.plots:
        if plot.name.startswith("core-"):
            parts.append(_figure(plot))
    parts.append("</section>")
    for section, meta in zip(report.sections, d["sections"]):
        parts.append(f"<section id='{_slug(section.plugin + '-' + section.title)}'>")
        parts.append(f"<h2>{html.escape(section.title)} <small>({html.escape(section.plugin)})</small></h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        parts.append(_table(_scalars(meta["metrics"])))
        for plot in section.plots:
            parts.append(_figure(plot))
        parts.append("</section>")
    parts.append("<p class='sub'>Every figure is also in report.json.</p></body></html>\n")
    return "\n".join(parts)
