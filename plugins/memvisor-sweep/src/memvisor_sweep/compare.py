"""The comparison report of a sweep, DIR/index.html: the best policy per workload, each metric
by policy (its distribution over workloads and seeds, and its mean per workload), and the runs
that failed. Plots are PNGs drawn with matplotlib next to the page.

Which axis holds the policies and which the workloads comes from the sweep's ``[compare]``
table, else from the axis names: ``policy``, ``plugins`` or ``plugins.*`` are policies; an axis
about a workload or a trace is the workload; the other axes (seeds) are repetitions, averaged.
"""

from __future__ import annotations

import html
import math
import re
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memvisor_sweep.spec import SweepSpec, is_finite_number, label
from memvisor_sweep.table import FIXED_COLUMNS, WALL_CLOCK_COLUMNS

MAX_METRICS = 12
"""Metrics plotted when the sweep does not name them: the page stays readable."""

POLICY_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                  "#7f7f7f")
"""Each policy's colour, in the order of its axis: the same in every panel and on the page."""


def policy_colours(policies: Sequence[str]) -> dict[str, str]:
    """The colour of each policy."""
    return {p: POLICY_COLOURS[i % len(POLICY_COLOURS)] for i, p in enumerate(policies)}


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads on a cell of colour ``rgba`` (by its luminance)."""
    red, green, blue = rgba[:3]
    return "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"

_PRIORITY = ("total.", "memory.", "time.virtual_seconds", "events.")


def pick_axes(spec: SweepSpec) -> tuple[str | None, str | None]:
    """``(policy axis, workload axis)`` names (either may be None)."""
    names = [a.name for a in spec.axes]
    seeds = ("seed", "host.seed")

    def workload_like(name: str) -> bool:
        """Whether an axis varies the workload or its trace."""
        return "workload" in name or "trace" in name or name.endswith(".path")

    # Seeds are repetitions, never the policy or the workload unless nothing else varies.
    policy = spec.compare.policy if spec.compare.policy in names else next(
        (n for n in names if n in ("policy", "plugins") or n.startswith("plugins.")),
        next((n for n in names if n not in seeds and not workload_like(n)),
             next((n for n in names if n not in seeds), names[0] if names else None)))
    others = [n for n in names if n != policy]
    workload = spec.compare.workload if spec.compare.workload in others else next(
        (n for n in others if workload_like(n)), next((n for n in others if n not in seeds), None))
    return policy, workload


def pick_metrics(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics to plot: those the sweep names, else the numeric ones that vary across runs,
    the goal and the core's totals first."""
    ok = [r for r in rows if r.get("status") == "ok"]
    axes = {a.name for a in spec.axes}
    if spec.compare.metrics:
        return [m for m in spec.compare.metrics if any(m in r for r in ok)]
    candidates = []
    for name in dict.fromkeys(k for r in ok for k in r):
        if name in axes or name in FIXED_COLUMNS or name in WALL_CLOCK_COLUMNS:
            continue
        values = [r.get(name) for r in ok]
        numbers = [v for v in values if is_finite_number(v)]
        if len(numbers) == len(values) and len(set(numbers)) > 1:
            candidates.append(name)

    def rank(name: str) -> tuple[int, int]:
        """Sort key: the goal, then the core's totals, memory, time, events, plugins, per-VM."""
        if name == spec.compare.goal:
            return (0, 0)
        for i, prefix in enumerate(_PRIORITY):
            if name.startswith(prefix):
                return (1 + i, 0)
        return (len(_PRIORITY) + (2 if name.startswith("vms.") else 1), 0)

    return sorted(candidates, key=rank)[:MAX_METRICS]


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:100] or "metric"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        from memvisor.units import shown

        return shown(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return label(value)


def _number(value: float) -> str:
    """Short text for a plot: 77,824 rather than 7.782e+04."""
    return f"{value:,.0f}" if 1e4 <= abs(value) < 1e9 else f"{value:.4g}"


def _tick(text: str) -> str:
    """A tick label wrapped to a few short lines: workload tables make long labels."""
    return textwrap.fill(text, 24)


def _order(spec: SweepSpec, axis: str | None, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """An axis's values as text, in the sweep's order."""
    if axis is None:
        return ["all"]
    for a in spec.axes:
        if a.name == axis:
            return [label(v) for v in dict.fromkeys(a.values)]
    return list(dict.fromkeys(label(r.get(axis)) for r in rows))


def _group(rows, policy, workload, metric) -> dict[tuple[str, str], list[float]]:
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        value = r.get(metric)
        if is_finite_number(value):
            key = (label(r.get(policy)) if policy else "all", label(r.get(workload)) if workload else "all")
            groups.setdefault(key, []).append(float(value))
    return groups


def best_per_workload(spec: SweepSpec, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each workload, the policies ranked by the goal metric (mean over repetitions):
    ``[{"workload", "best", "value", "runner_up", "runner_up_value", "margin"}, ...]``."""
    policy, workload = pick_axes(spec)
    ok = [r for r in rows if r.get("status") == "ok"]
    groups = _group(ok, policy, workload, spec.compare.goal)
    out = []
    for w in _order(spec, workload, ok):
        means = {p: statistics.fmean(groups[(p, w)]) for p in _order(spec, policy, ok) if (p, w) in groups}
        if not means:
            continue
        ranked = sorted(means.items(), key=lambda kv: kv[1], reverse=spec.compare.better == "max")
        best, value = ranked[0]
        runner, runner_value = ranked[1] if len(ranked) > 1 else (None, None)
        margin = None
        if runner_value is not None and runner_value != 0:
            margin = abs(value - runner_value) / abs(runner_value)
        out.append({"workload": w, "best": best, "value": value, "runner_up": runner,
                    "runner_up_value": runner_value, "margin": margin})
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from memvisor.files import atomic_write

    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        _plt().close(fig)


def _draw_metric(spec, rows, metric, policies, workloads, policy, workload, path: Path) -> None:
    """Left: the metric's distribution per policy over every workload and seed. Right: its mean
    per workload, one line per policy (when there is a workload axis)."""
    plt = _plt()
    colours = policy_colours(policies)
    groups = _group(rows, policy, workload, metric)
    panels = 2 if workload and len(workloads) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.4), dpi=100, squeeze=False)
    left = axes[0][0]
    data = [[v for (p, _), vs in groups.items() if p == pol for v in vs] for pol in policies]
    present = [(pol, d) for pol, d in zip(policies, data) if d]
    if present:
        boxes = left.boxplot([d for _, d in present], showfliers=False, patch_artist=True)
        for box, (pol, _) in zip(boxes["boxes"], present):
            box.set(facecolor=colours[pol], alpha=0.25, edgecolor=colours[pol])
        for i, (pol, d) in enumerate(present, start=1):
            # Points over the boxes: with few runs the points are the distribution.
            jitter = [i + 0.12 * math.sin(7.0 * k) for k in range(len(d))]
            left.scatter(jitter, d, s=10, alpha=0.8, color=colours[pol], zorder=3)
        left.set_xticks(range(1, len(present) + 1), [_tick(p) for p, _ in present], rotation=20, ha="right",
                        fontsize="small")
    left.set_title(f"{metric} by {policy or 'run'}", fontsize="medium")
    left.grid(True, axis="y", alpha=0.3)
    if panels == 2:
        right = axes[0][1]
        xs = range(len(workloads))
        for pol in policies:
            ys = [statistics.fmean(groups[(pol, w)]) if (pol, w) in groups else float("nan") for w in workloads]
            if all(math.isnan(y) for y in ys):
                continue  # a policy without this metric (its plugin is off): no empty legend entry
            right.plot(xs, ys, marker="o", label=pol, linewidth=1.3, color=colours[pol])
        right.set_xticks(list(xs), [_tick(w) for w in workloads], rotation=20, ha="right", fontsize="small")
        right.set_title(f"mean over repetitions, by {workload}", fontsize="medium")
        right.grid(True, alpha=0.3)
        if len(policies) > 1:
            right.legend(fontsize="x-small")
    _save(fig, path)


def _draw_best(spec, rows, policies, workloads, policy, workload, path: Path) -> None:
    """Goal metric for each workload (rows) and policy (columns), coloured relative to the
    workload's best, so that the winner of each row stands out whatever the scale."""
    plt = _plt()
    groups = _group(rows, policy, workload, spec.compare.goal)
    grid = [[statistics.fmean(groups[(p, w)]) if (p, w) in groups else float("nan") for p in policies]
            for w in workloads]
    relative = []
    for row in grid:
        finite = [v for v in row if math.isfinite(v)]
        best = (max if spec.compare.better == "max" else min)(finite) if finite else float("nan")
        relative.append([v / best if best and math.isfinite(v) else float("nan") for v in row])
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(policies) + 2.5), max(2.2, 0.45 * len(workloads) + 1.4)),
                           dpi=100)
    cmap = "viridis" if spec.compare.better == "max" else "viridis_r"
    image = ax.imshow(relative, aspect="auto", cmap=cmap)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if math.isfinite(v):  # black on the light cells, white on the dark ones
                colour = text_colour(image.cmap(image.norm(relative[i][j])))
                ax.text(j, i, _number(v), ha="center", va="center", fontsize="x-small", color=colour)
    ax.set_xticks(range(len(policies)), [_tick(p) for p in policies], rotation=20, ha="right", fontsize="small")
    for tick, pol in zip(ax.get_xticklabels(), policies):
        tick.set_color(policy_colours(policies)[pol])
    ax.set_yticks(range(len(workloads)), [_tick(w) for w in workloads], fontsize="small")
    ax.set_xlabel(policy or "")
    ax.set_ylabel(workload or "")
    ax.set_title(f"{spec.compare.goal} ({'higher' if spec.compare.better == 'max' else 'lower'} is better)",
                 fontsize="medium")
    fig.colorbar(image, ax=ax, label="÷ the row's best")
    _save(fig, path)


_STYLE = """
.win{font-weight:600} .err{color:#b00} code{font-size:.95em} .legend span{margin-right:1em;white-space:nowrap}
"""


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """An HTML table; cells are HTML already."""
    return ("<div class='wide'><table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
            + "</tbody></table></div>")


def _page(out_dir: Path, key: str) -> str:
    """A run's report page: report.html, or report.json for a run written by a memvisor that
    wrote no page (a resumed sweep)."""
    return "report.html" if (out_dir / "runs" / key / "report.html").is_file() else "report.json"


def _role(axis: str, policy: str | None, workload: str | None) -> str:
    return " (policy)" if axis == policy else " (workload)" if axis == workload else ""


def write_index(spec: SweepSpec, rows: Sequence[Mapping[str, Any]], out_dir: Path, table_path: Path) -> Path:
    """Draw the comparison plots and write ``out_dir/index.html``; returns its path."""
    out_dir = Path(out_dir)
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    policy, workload = pick_axes(spec)
    policies, workloads = _order(spec, policy, ok), _order(spec, workload, ok)
    metrics = pick_metrics(spec, rows)
    from memvisor.report_html import STYLE, swatch

    esc = html.escape
    colours = policy_colours(policies)
    legend = "<p class='legend'>" + "".join(f"<span>{swatch(colours[p])}{esc(p)}</span>" for p in policies) + "</p>"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>memvisor sweep: {esc(spec.name)}</title><style>{STYLE}{_STYLE}</style></head><body>",
        f"<h1>{esc(spec.name)}</h1>",
        f"<p class='sub'>{esc(spec.description)}</p>" if spec.description else "",
        f"<p>{len(rows)} runs of <code>{esc(str(spec.base_path))}</code>: {len(ok)} finished, "
        f"<span class='{'err' if failed else ''}'>{len(failed)} failed</span>. "
        f"Every row is in <a href='{esc(table_path.name)}'>{esc(table_path.name)}</a>; every run's report in "
        "<code>runs/KEY/report.html</code> (linked from the list of runs below), its figures in "
        "<code>runs/KEY/report.json</code>.</p>",
        "<nav><a href='#best'>best per workload</a><a href='#metrics'>metrics</a>"
        "<a href='#runs'>runs</a>" + ("<a href='#failed'>failed</a>" if failed else "") + "</nav>",
        _table(["axis", "values"], [[f"<code>{esc(a.name)}</code>" + _role(a.name, policy, workload),
                                     esc(", ".join(a.labels))] for a in spec.axes]),
    ]
    # -- best policy per workload ---------------------------------------------------------------
    parts.append("<section id='best'><h2>Best policy per workload</h2>")
    best = best_per_workload(spec, rows)
    if best:
        direction = "higher" if spec.compare.better == "max" else "lower"
        parts.append(f"<p>By <code>{esc(spec.compare.goal)}</code>, {direction} is better; "
                     "mean over the other axes.</p>")
        parts.append(_table(
            [workload or "workload", f"best {policy or 'run'}", spec.compare.goal, "runner-up", "its value", "margin"],
            [[esc(b["workload"]), f"<span class='win'>{esc(b['best'])}</span>", _text(b["value"]),
              esc(b["runner_up"] or "-"), _text(b["runner_up_value"]),
              f"{100 * b['margin']:.1f}%" if b["margin"] is not None else "-"] for b in best]))
        _draw_best(spec, ok, policies, workloads, policy, workload, out_dir / "sweep-best.png")
        parts.append("<img src='sweep-best.png' alt='goal by workload and policy'>")
        parts.append(legend)
    else:
        parts.append(f"<p>No finished run has the goal metric <code>{esc(spec.compare.goal)}</code>.</p>")
    parts.append("</section>")
    # -- each metric by policy -------------------------------------------------------------------
    parts.append("<section id='metrics'><h2>Metrics by policy</h2>")
    parts.append(legend)
    if not metrics:
        parts.append("<p>No metric varies across the finished runs.</p>")
    for metric in metrics:
        name = f"sweep-metric-{_slug(metric)}.png"
        _draw_metric(spec, ok, metric, policies, workloads, policy, workload, out_dir / name)
        parts.append(f"<h3><code>{esc(metric)}</code></h3><img src='{name}' alt='{esc(metric)}'>")
    parts.append("</section>")
    # -- runs and failures -----------------------------------------------------------------------
    axis_names = [a.name for a in spec.axes]
    shown = [m for m in (spec.compare.goal,) if any(m in r for r in ok)]
    parts.append("<section id='runs'><h2>Runs</h2>")
    parts.append(_table(
        axis_names + shown + ["status", "report"],
        [[esc(_text(r.get(a))) for a in axis_names] + [_text(r.get(m)) for m in shown]
         + [esc(r["status"]), f"<a href='runs/{r['key']}/{_page(out_dir, r['key'])}'>{r['key']}</a>"
            if r["status"] == "ok" else f"<a href='runs/{r['key']}/outcome.json'>{r['key']}</a>"] for r in rows]))
    parts.append("</section>")
    if failed:
        parts.append(f"<section id='failed'><h2 class='err'>Failed runs ({len(failed)})</h2>")
        parts.append(_table(axis_names + ["error"], [[esc(_text(r.get(a))) for a in axis_names]
                                                     + [f"<span class='err'>{esc(r.get('error') or '')}</span>"]
                                                     for r in failed]))
        parts.append("</section>")
    parts.append("</body></html>\n")
    from memvisor.files import atomic_write

    page = out_dir / "index.html"
    atomic_write(page, "\n".join(p for p in parts if p))
    return page
