"""Runs side by side: ``memvisor compare A/ B/ [C/ ...]``.

Two or more reports of one scenario under different policies or code: every headline figure
of each run beside the first run's, with the difference and whether it is better or worse
(each figure says which way is better, :class:`memvisor.report.Figure`), the settings that
differ, and each plot drawn once with every run's series on it. What a person does after every
change to a policy.

:func:`load_report` reads a report.json as hostile input (bounded, checked shape);
:func:`compare` pairs the figures; :func:`write_page` writes compare.html, compare.json and
the overlaid plots.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from memvisor.errors import UserError
from memvisor.units import UNITS, exact, shown

RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
"""One colour per run in the overlaid plots (the first run blue, the second red...)."""

_STYLES = ("-", "--", ":", "-.")


@attrs.frozen(eq=False)
class Run:
    """One report: its label, where it is, and its report.json.

    :ivar label: a short name for the run (its folder's name, or more of its path when two
        runs' folders have one name).
    :ivar path: report.json.
    :ivar data: report.json's contents, checked.
    """

    label: str
    path: Path
    data: dict[str, Any]

    @property
    def page(self) -> Path | None:
        """The run's report.html, when it is there."""
        page = self.path.with_name("report.html")
        return page if os.path.isfile(page) else None


def report_file(path: str | os.PathLike) -> Path:
    """The report.json of ``path``: the file itself, or the one in a folder."""
    path = Path(path)
    return path / "report.json" if os.path.isdir(path) else path  # False, not an error, for a name too long


# -- reading a report.json as hostile input -------------------------------------------------------


def _bad(path: Path, where: str, problem: str) -> UserError:
    return UserError(f"{path}: not a memvisor report: {where}: {problem}")


def _expect(path: Path, value: Any, kind, where: str) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind == (int, float)):
        names = {dict: "a table", list: "a list", str: "text", (int, float): "a number"}
        raise _bad(path, where, f"expected {names.get(kind, kind)}, found {type(value).__name__}")
    return value


def _number_or_none(path: Path, value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool)):
        return
    _expect(path, value, (int, float), where)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(path, where, "not a finite number")


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """report.json at ``path`` (a file, or a folder holding one): read within
    :data:`memvisor.limits.MAX_REPORT_BYTES`, and the parts ``compare`` uses checked.

    :raises UserError: one line naming the file and what is wrong.
    """
    from memvisor.files import read_regular
    from memvisor.limits import MAX_REPORT_BYTES

    path = report_file(path)
    raw = read_regular(path, "report", MAX_REPORT_BYTES)

    def constant(name: str):
        raise _bad(path, "a number", f"{name} is not JSON")

    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except UnicodeDecodeError:
        raise _bad(path, "the file", "not UTF-8 text") from None
    except RecursionError:
        raise _bad(path, "the file", "nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise _bad(path, f"line {exc.lineno}", exc.msg) from None
    _expect(path, data, dict, "the file")
    scenario = _expect(path, data.get("scenario"), dict, "scenario")
    _expect(path, scenario.get("name"), str, "scenario.name")
    _expect(path, scenario.get("settings", {}), dict, "scenario.settings")
    _expect(path, data.get("vms"), dict, "vms")
    backend = _expect(path, _expect(path, data.get("host"), dict, "host").get("backend"), dict, "host.backend")
    _expect(path, backend.get("name"), str, "host.backend.name")
    time = _expect(path, data.get("time"), dict, "time")
    if time.get("clock") not in ("virtual", "real"):
        raise _bad(path, "time.clock", "not virtual or real")
    for key in ("real_seconds", "virtual_seconds") if time["clock"] == "virtual" else ("real_seconds",):
        _number_or_none(path, _expect(path, time.get(key), (int, float), f"time.{key}"), f"time.{key}")
    for i, section in enumerate(_expect(path, data.get("sections"), list, "sections")):
        where = f"sections[{i}]"
        _expect(path, section, dict, where)
        for key in ("title", "plugin"):
            _expect(path, section.get(key), str, f"{where}.{key}")
        for j, headline in enumerate(_expect(path, section.get("headlines", []), list, f"{where}.headlines")):
            at = f"{where}.headlines[{j}]"
            _expect(path, headline, dict, at)
            _expect(path, headline.get("key"), str, f"{at}.key")
            _expect(path, headline.get("text"), str, f"{at}.text")
            if headline.get("vm") is not None:
                _expect(path, headline["vm"], str, f"{at}.vm")
            for name, figure in _expect(path, headline.get("figures"), dict, f"{at}.figures").items():
                _expect(path, figure, dict, f"{at}.figures.{name}")
                _number_or_none(path, figure.get("value"), f"{at}.figures.{name}.value")
                if figure.get("unit") not in UNITS:
                    raise _bad(path, f"{at}.figures.{name}.unit", f"no unit {str(figure.get('unit'))[:20]!r}")
                if figure.get("better") not in (None, "higher", "lower"):
                    raise _bad(path, f"{at}.figures.{name}.better", "not higher, lower or null")
    for name, plot in _expect(path, data.get("plots", {}), dict, "plots").items():
        where = f"plots.{name}"
        _expect(path, plot, dict, where)
        for key in ("title", "xlabel", "ylabel"):
            _expect(path, plot.get(key), str, f"{where}.{key}")
        for label, series in _expect(path, plot.get("series"), dict, f"{where}.series").items():
            _expect(path, series, dict, f"{where}.series.{label}")
            xs = _expect(path, series.get("x"), list, f"{where}.series.{label}.x")
            ys = _expect(path, series.get("y"), list, f"{where}.series.{label}.y")
            if len(xs) != len(ys):
                raise _bad(path, f"{where}.series.{label}", "x and y of different lengths")
            for k, v in enumerate(xs + ys):
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise _bad(path, f"{where}.series.{label}", f"point {k} is not a number")
    return data


def labels(paths: Sequence[Path]) -> list[str]:
    """Short, distinct names for the runs: their folders' names, with as many parent folders
    as it takes to tell them apart."""
    folders = [p.parent.resolve() for p in paths]
    for depth in range(1, 8):
        names = ["/".join(f.parts[-depth:]) for f in folders]
        if len(set(names)) == len(names):
            return names
    return [f"run {i + 1}" for i in range(len(paths))]


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """The runs at ``paths`` (folders or report.json files), labelled."""
    files = [report_file(p) for p in paths]
    return [Run(label, path, load_report(path)) for label, path in zip(labels(files), files)]


# -- pairing the figures ----------------------------------------------------------------------------


def _settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """A run's plugins and their settings, named as the scenario file writes them
    (``[plugins.numa] heuristic``)."""
    out: dict[str, Any] = {"plugins": ", ".join(sorted(map(str, data.get("plugins", ()))))}

    def walk(value, table, key):
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(v, table, f"{key}.{k}" if key else str(k))
        elif key:
            out[f"[{table}] {key}"] = value

    for plugin, settings in data["scenario"].get("settings", {}).items():
        walk(settings, f"plugins.{plugin}", "")
    return out


def differences(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The settings (and seed, backend) that differ between the runs: ``[{"setting", "values"}]``."""
    per_run = []
    for run in runs:
        values = _settings(run.data)
        values["seed"] = run.data["scenario"].get("seed")
        values["backend"] = run.data["host"]["backend"]["name"]
        per_run.append(values)
    keys = sorted({k for values in per_run for k in values})
    return [{"setting": k, "values": [values.get(k) for values in per_run]}
            for k in keys if len({json.dumps(values.get(k), sort_keys=True, default=str) for values in per_run}) > 1]


def compare(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Every headline figure of every run, paired by section, VM, headline and figure: one row
    each with the runs' values (None where a run has no such figure), the differences from the
    first run and whether each is better or worse."""
    rows: dict[tuple, dict[str, Any]] = {}
    for i, run in enumerate(runs):
        for section in run.data["sections"]:
            for headline in section.get("headlines", ()):
                for name, figure in headline["figures"].items():
                    key = (section["title"], headline["vm"] or "", headline["key"], name)
                    row = rows.setdefault(key, {
                        "section": section["title"], "vm": headline["vm"], "headline": headline["key"],
                        "figure": str(figure.get("label") or name), "unit": figure["unit"],
                        "better": figure["better"],
                        "sentence": headline["text"], "values": [None] * len(runs), "present": [False] * len(runs)})
                    row["values"][i], row["present"][i] = figure["value"], True
    out = []
    for row in rows.values():
        base = row["values"][0]
        row["changes"] = [_change(base, value, row["better"], row["unit"]) for value in row["values"][1:]]
        row["shown"] = [shown(v, row["unit"]) if p else "absent" for v, p in zip(row["values"], row["present"])]
        out.append(row)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _change(base: Any, value: Any, better: str | None, unit: str) -> dict[str, Any]:
    """How ``value`` differs from ``base``: the difference, the ratio, and ``direction``:
    better, worse, same, changed (a difference of no known direction) or "" (nothing to say).
    Words (``unit`` "text", a node number among them) are the same or changed."""
    if _number(base) and _number(value) and unit != "text":
        diff = value - base
        direction = "same" if diff == 0 else "changed" if better is None else \
            "better" if (diff > 0) == (better == "higher") else "worse"
        return {"difference": diff, "ratio": value / base if base else None, "direction": direction}
    if base is None and value is None:
        return {"difference": None, "ratio": None, "direction": ""}
    return {"difference": None, "ratio": None, "direction": "same" if base == value else "changed"}


def difference_shown(change: Mapping[str, Any], unit: str) -> str:
    """A difference in the figure's unit, signed, with the relative change (``+1.2 ms
    (+8 %)``); for words, "same" or "changed"; a dash when there is nothing to compare."""
    diff = change["difference"]
    if diff is None:
        return change["direction"] if change["direction"] in ("same", "changed") else "–"
    if diff == 0:
        return "0"
    text = ("+" if diff > 0 else "-") + shown(abs(diff), unit if unit not in ("text", "") else "")
    ratio = change["ratio"]
    if ratio is not None and unit != "fraction":
        text += f" ({'+' if ratio >= 1 else '-'}{shown(abs(ratio - 1), 'fraction')})"
    return text


def summary(runs: Sequence[Run], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """compare.json: the runs, the settings that differ, every paired figure."""
    return {"scenario": [run.data["scenario"]["name"] for run in runs],
            "runs": [{"label": run.label, "report": str(run.path)} for run in runs],
            "differences": differences(runs), "figures": list(rows)}


# -- the page ---------------------------------------------------------------------------------------


def overlaid_plots(runs: Sequence[Run]) -> list[tuple[Any, dict[str, tuple[str, str]]]]:
    """Each plot that two runs or more have, as one :class:`memvisor.report.Plot` with every
    run's series (``"RUN: series"``) and their styles: a colour per run, a line style per
    series."""
    from memvisor.report import Plot

    names = [n for n in runs[0].data.get("plots", {}) if sum(n in r.data.get("plots", {}) for r in runs) >= 2]
    names += [n for r in runs[1:] for n in r.data.get("plots", {}) if n not in names
              and sum(n in q.data.get("plots", {}) for q in runs) >= 2]
    out = []
    for name in dict.fromkeys(names):
        first = next(r.data["plots"][name] for r in runs if name in r.data.get("plots", {}))
        series, styles, kinds = {}, {}, []
        for i, run in enumerate(runs):
            plot = run.data.get("plots", {}).get(name)
            if plot is None:
                continue
            for label in plot["series"]:
                if label not in kinds:
                    kinds.append(label)
            for label, points in plot["series"].items():
                key = f"{run.label}: {label}"
                ys = [math.nan if y is None else y for y in points["y"]]
                series[key] = (points["x"], ys)
                styles[key] = (RUN_COLOURS[i % len(RUN_COLOURS)], _STYLES[kinds.index(label) % len(_STYLES)])
        titles = [r.data["plots"][name]["title"] for r in runs if name in r.data.get("plots", {})]
        title = titles[0] if len(set(titles)) == 1 else os.path.commonprefix(titles).rstrip(" (:") or titles[0]
        out.append((Plot(name, title, first["xlabel"], first["ylabel"], series,
                         logx=bool(first.get("logx")), logy=bool(first.get("logy")),
                         kind="step" if first.get("kind") == "step" else "line",
                         shows="Every run's series, one colour per run."), styles))
    return out


def write_page(runs: Sequence[Run], rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> Path:
    """compare.html, compare.json and the overlaid plots' PNGs in ``out_dir``; returns the page."""
    from memvisor.files import atomic_write, path_inside
    from memvisor.report import draw_plot

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = overlaid_plots(runs)
    drawn = []
    for plot, styles in plots:
        if plot.points():
            draw_plot(plot, path_inside(out, plot.name, ".png", "a plot name"), styles=styles)
            drawn.append(plot.name)
    figures = summary(runs, rows)
    figures["plots"] = drawn
    atomic_write(out / "compare.json", json.dumps(figures, indent=2, allow_nan=False) + "\n")
    page = out / "compare.html"
    atomic_write(page, _html(runs, rows, figures, [p for p, _ in plots if p.name in drawn], out))
    return page


def _html(runs, rows, figures, plots, out: Path) -> str:
    from memvisor.report import time_summary
    from memvisor.report_html import STYLE, cell, esc

    names = sorted({run.data["scenario"]["name"] for run in runs})
    head = ["<th>run</th><th>report</th><th>backend</th><th>time</th>"]
    run_rows = []
    for i, run in enumerate(runs):
        page = run.page
        link = f"<a href='{esc(os.path.relpath(page, out))}'>report.html</a>" if page else "report.json only"
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        run_rows.append(f"<tr><th><span class='swatch' style='background:{colour}'></span>{esc(run.label)}</th>"
                        f"<td>{link}</td><td>{esc(run.data['host']['backend']['name'])}</td>"
                        f"<td>{esc(time_summary(run.data['time']))}</td></tr>")
    diffs = "".join(f"<tr><th>{esc(d['setting'])}</th>" + "".join(cell(v, "text") for v in d["values"])
                    + "</tr>" for d in figures["differences"])
    labels_head = "".join(f"<th>{esc(run.label)}</th>" for run in runs)
    diff_head = "".join(f"<th>{esc(run.label)} − {esc(runs[0].label)}</th>" for run in runs[1:])
    body = []
    for row in rows:
        cells = "".join(
            f"<td class=n title='{esc(exact(v, row['unit']) if p else 'not in this run')}'>{esc(s)}</td>"
            for v, p, s in zip(row["values"], row["present"], row["shown"]))
        changes = "".join(f"<td class='n {c['direction']}'>{esc(difference_shown(c, row['unit']))}"
                          f"{' ' + c['direction'] if c['direction'] in ('better', 'worse') else ''}</td>"
                          for c in row["changes"])
        body.append(f"<tr><th>{esc(row['section'])}</th><th>{esc(row['vm'] or 'host')}</th>"
                    f"<th title='{esc(row['sentence'])}'>{esc(row['figure'])}</th>{cells}{changes}</tr>")
    images = "".join(
        f"<figure><img src='{esc(p.name)}.png' alt='{esc(p.title)}' width='770' height='396' "
        f"data-points='{p.points()}'><figcaption>{esc(p.shows)}</figcaption></figure>" for p in plots)
    return "\n".join([
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>memvisor compare: {esc(', '.join(names))}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(' vs '.join(run.label for run in runs))}</h1>",
        f"<p class='sub'>{esc(', '.join(names))}: every headline figure of each run beside the first's; better and "
        "worse as each figure counts them (lower times, more memory reclaimed...).</p>",
        f"<section id='runs'><h2>Runs</h2><table><thead><tr>{''.join(head)}</tr></thead>"
        f"<tbody>{''.join(run_rows)}</tbody></table>",
        f"<table><caption>What differs</caption><thead><tr><th>setting</th>{labels_head}</tr></thead><tbody>{diffs}"
        "</tbody></table>" if diffs else "<p>No setting differs (the code may).</p>",
        "</section>",
        f"<section id='figures'><h2>Figures</h2><div class='wide'><table><thead><tr><th>section</th><th>VM</th>"
        f"<th>figure</th>{labels_head}{diff_head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>",
        f"<section id='plots'><h2>Plots</h2><div class='plots'>{images}</div></section>" if images else "",
        "<p class='sub'>Every figure is also in compare.json.</p></body></html>\n",
    ])
