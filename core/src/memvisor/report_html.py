"""report.html from report.json: the answer first, then one section per technique.

The page opens with a summary: a card per VM with what each technique did for it (the
sections' headlines, numbers in human units with the exact value in a tooltip), and one for
the host. Then the host and its VMs, then every section that has something to show: its
tables (one row per record, real columns, a dash for an empty value, long tables folded) and
its plots. Everything is rendered from report.json alone, so ``memvisor compare`` and the
sweep's pages reuse the same pieces (:func:`table_html`, :func:`headline_html`, :data:`STYLE`).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from typing import Any

from memvisor.report import FOLD_ROWS, table_rows, time_summary, value_at
from memvisor.units import exact, shown

STYLE = """
body{font-family:system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}
h1{margin:0} h2{margin:.4em 0} h3{margin:0 0 .3em;font-size:1.05em} .sub{color:#555;margin:.2em 0}
.meta{color:#555;font-size:.9em;margin:.3em 0 1em}
section{border-top:1px solid #ddd;margin-top:1.6em;padding-top:.4em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:.8em}
.card{border:1px solid #ddd;border-top:5px solid #999;border-radius:4px;padding:.5em .8em;font-size:.93em}
.card ul{margin:.2em 0;padding-left:1.1em} .card li{margin:.15em 0} .card small{color:#666;font-weight:normal}
.cards.many .host{grid-column:1/-1} .cards.many .host ul{columns:2 340px}
.swatch{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:baseline}
table{border-collapse:collapse;margin:.4em 0 .8em} caption{text-align:left;font-weight:600;padding:.2em 0}
th,td{padding:.2em .7em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td{white-space:nowrap} caption{white-space:nowrap} .wide{overflow-x:auto;max-width:100%}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:.5em 1.2em;align-items:start}
thead th{font-weight:600;color:#444;border-bottom:1px solid #ccc} tbody th{font-weight:500;color:#444}
td.n{text-align:right;font-variant-numeric:tabular-nums} td.none{color:#999;text-align:center}
[title]{text-decoration:none} b[title]{cursor:help}
img{max-width:100%;height:auto;display:block;margin:.5em 0} figure{margin:.5em 0} figcaption{color:#555;font-size:.9em}
nav{font-size:.92em;margin-top:.8em} nav a{margin-right:.9em}
details{margin:.4em 0} summary{cursor:pointer;font-weight:600}
.better{color:#176b1d} .worse{color:#b3261e}
"""
"""The style sheet of every page memvisor writes."""

DASH = "–"
"""What a table cell shows for a value that is absent (None, an empty list)."""


def esc(value: Any) -> str:
    """``value`` as HTML text."""
    return html.escape(str(value), quote=True)


def slug(text: str) -> str:
    """An HTML id from a title."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def section_id(section: Mapping[str, Any]) -> str:
    """The HTML id of a report section."""
    return slug(f"{section['plugin']}-{section['title']}")


def swatch(colour: str | None) -> str:
    """A small square of a VM's colour."""
    return f"<span class='swatch' style='background:{esc(colour)}'></span>" if colour else ""


# -- values and tables ----------------------------------------------------------------------------


def cell(value: Any, unit: str = "", none: str = "") -> str:
    """A ``<td>`` of ``value`` in ``unit``: the human value, the exact one in its tooltip; a
    dash for None or an empty list or text (``none`` says what that means)."""
    if value is None or (isinstance(value, (str, list)) and not value):
        return f"<td class='none' title='{esc(none or 'no value')}'>{DASH}</td>"
    if isinstance(value, Mapping) or (isinstance(value, list) and not _short_list(value)):
        return f"<td title='in report.json'>{len(value):,} value{'' if len(value) == 1 else 's'}</td>"
    text = shown(value, unit)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    precise = exact(value, unit)
    tip = f" title='{esc(precise)}'" if precise != text else ""
    return f"<td{' class=n' if number else ''}{tip}>{esc(text)}</td>"


def _short_list(value: list, depth: int = 0) -> bool:
    """Whether ``value`` reads well in one cell: a few words or numbers, or a few groups of
    them (``(web, db), (files)``)."""
    return len(value) <= 8 and all(
        not isinstance(v, (list, Mapping)) or (depth == 0 and isinstance(v, list) and _short_list(v, 1))
        for v in value)


def table_html(metrics: Mapping[str, Any], spec: Mapping[str, Any], fold: int = FOLD_ROWS,
               turn: bool = True) -> str:
    """A table of report.json (its definition ``spec`` over a section's ``metrics``): columns
    whose every value is empty are left out; a table of more than ``fold`` rows is folded; a
    wide one of a few rows is turned (unless not ``turn``). Empty string when it has no rows."""
    rows = list(table_rows(metrics, spec))
    if not rows:
        return ""
    columns = [c for c in spec["columns"] if any(value_at(r, c["key"]) is not None for _, r in rows)]
    if not columns:
        return ""
    caption = f"<caption>{esc(spec['title'])}</caption>" if spec["title"] else ""
    if spec["record"] is not None:
        record = rows[0][1]
        body = "".join(f"<tr><th{_help(c)}>{esc(c['label'])}</th>"
                       f"{cell(value_at(record, c['key']), c['unit'], c['none'])}</tr>" for c in columns)
        return f"<table>{caption}<tbody>{body}</tbody></table>"
    if turn and len(columns) > WIDE_COLUMNS and len(rows) <= WIDE_ROWS:
        return _transposed(caption, columns, rows)
    width = max(len(names) for names, _ in rows)
    keys = list(spec.get("keys") or [])
    keys = (keys + [""] * width)[:width]
    head = "".join(f"<th>{esc(k)}</th>" for k in keys) + "".join(f"<th{_help(c)}>{esc(c['label'])}</th>"
                                                                  for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<th>{esc(n)}</th>" for n in (names + [""] * width)[:width])
        + "".join(cell(value_at(r, c["key"]), c["unit"], c["none"]) for c in columns) + "</tr>"
        for names, r in rows)
    table = (f"<div class='wide'><table>{caption if len(rows) <= fold else ''}<thead><tr>{head}</tr></thead>"
             f"<tbody>{body}</tbody></table></div>")
    if len(rows) > fold:
        return f"<details><summary>{esc(spec['title'] or 'table')}: {len(rows):,} rows</summary>{table}</details>"
    return table


WIDE_COLUMNS, WIDE_ROWS = 9, 4
"""A table of more columns and at most this many rows is shown turned: a column per record."""


def _transposed(caption: str, columns: list[Mapping[str, Any]], rows: list[tuple[list[str], Mapping]]) -> str:
    """A few wide records side by side: a row per figure, a column per record, headed by its
    names and first words (``web · web-1``)."""
    texts = [c for c in columns if c["unit"] == "text"][:2]
    heads = [" · ".join([*names, *(shown(value_at(r, c["key"])) for c in texts if value_at(r, c["key"]) is not None)])
             for names, r in rows]
    head = "<th></th>" + "".join(f"<th>{esc(h)}</th>" for h in heads)
    body = "".join(f"<tr><th{_help(c)}>{esc(c['label'])}</th>"
                   + "".join(cell(value_at(r, c["key"]), c["unit"], c["none"]) for _, r in rows) + "</tr>"
                   for c in columns if c not in texts)
    return f"<div class='wide'><table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _help(column: Mapping[str, Any]) -> str:
    return f" title='{esc(column['help'])}'" if column.get("help") else ""


def headline_html(headline: Mapping[str, Any]) -> str:
    """A headline's sentence with each figure in bold, its exact value in a tooltip."""
    figures = headline["figures"]
    parts = []
    for i, piece in enumerate(re.split(r"{(\w+)}", headline["template"])):
        if i % 2 == 0:
            parts.append(esc(piece))
        else:
            f = figures[piece]
            tip = f" title='{esc(f['exact'])}'" if f["exact"] != f["shown"] else ""
            parts.append(f"<b{tip}>{esc(f['shown'])}</b>")
    return "".join(parts)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


# -- the page -------------------------------------------------------------------------------------


def _header(d: Mapping[str, Any]) -> list[str]:
    host = d["host"]
    meta = [f"{esc(host['backend']['name'])} backend", esc(shown(host["memory_pages"], "pages")) + " of memory",
            f"{host['numa_nodes']} NUMA node{'s' if host['numa_nodes'] != 1 else ''}", esc(time_summary(d["time"])),
            f"seed {esc(d['scenario']['seed'])}", "plugins: " + esc(", ".join(d["plugins"]) or "none")]
    return [f"<h1>{esc(d['scenario']['name'])}</h1>", f"<p class='sub'>{esc(d['scenario']['description'])}</p>"
            if d["scenario"]["description"] else "", f"<p class='meta'>{' · '.join(meta)}</p>"]


def _headlines(d: Mapping[str, Any]) -> Iterable[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    for section in d["sections"]:
        for headline in section.get("headlines", ()):
            yield section, headline


def summary_html(d: Mapping[str, Any]) -> str:
    """The summary: a card per VM with its headlines, and the host's."""
    by_vm: dict[str | None, list[str]] = {}
    for section, headline in _headlines(d):
        by_vm.setdefault(headline["vm"], []).append(
            f"<li>{_sentence(headline_html(headline))} <a href='#{section_id(section)}' "
            f"title='{esc(section['title'])}'>›</a></li>")
    if not by_vm:
        return ""
    colours = d.get("colours", {})
    cards = []
    for name, vm in d["vms"].items():
        lines = by_vm.get(name)
        about = f"{shown(vm['pages'], 'pages')}, node {vm['home_node']}"
        items = "".join(lines) if lines else "<li>no technique reported on it</li>"
        colour = colours.get(name)
        cards.append(f"<div class='card' style='border-top-color:{esc(colour or '#999')}'>"
                     f"<h3>{swatch(colour)}{esc(name)} <small>{esc(about)}</small></h3><ul>{items}</ul></div>")
    for vm, lines in by_vm.items():  # headlines of VMs the host no longer has (migrated away)
        if vm is not None and vm not in d["vms"]:
            cards.append(f"<div class='card'><h3>{esc(vm)}</h3><ul>{''.join(lines)}</ul></div>")
    if None in by_vm:
        cards.append(f"<div class='card host'><h3>Host</h3><ul>{''.join(by_vm[None])}</ul></div>")
    many = " many" if len(cards) > 4 else ""  # the host's card then spans the page, under the VMs'
    return (f"<section id='summary'><h2>What each technique did</h2><div class='cards{many}'>{''.join(cards)}</div>"
            "</section>")


VM_TABLE = {"title": "", "rows": [], "record": None, "keys": ["VM"], "columns": [
    {"key": ["pages"], "label": "memory", "unit": "pages", "none": "", "help": "the VM's memory"},
    {"key": ["home_node"], "label": "home node", "unit": "text", "none": "", "help": ""},
    {"key": ["accesses"], "label": "accesses", "unit": "count", "none": "", "help": "its guest's accesses"},
    {"key": ["remote"], "label": "remote", "unit": "count", "none": "",
     "help": "accesses to memory on another NUMA node"},
    {"key": ["faults"], "label": "faults", "unit": "count", "none": "", "help": "page faults delivered to the plugins"},
    {"key": ["traced"], "label": "traced", "unit": "count", "none": "", "help": "traced accesses delivered"},
    {"key": ["write_traps"], "label": "write traps", "unit": "count", "none": "",
     "help": "writes to shared or protected pages delivered"},
    {"key": ["guest_traps"], "label": "guest traps", "unit": "count", "none": "",
     "help": "traps of the guest's own accesses (what a trap budget is charged)"},
    {"key": ["disk_reads"], "label": "disk reads", "unit": "count", "none": "", "help": "pages read from its disk"},
    {"key": ["disk_writes"], "label": "disk writes", "unit": "count", "none": "", "help": "pages written to its disk"},
]}
"""The table of the VMs' own counters (report.json's ``vms``)."""


def figure_html(name: str, plot: Mapping[str, Any]) -> str:
    """A plot's image with what it shows under it; "" for a plot without a point."""
    points = sum(1 for s in plot["series"].values() for y in s["y"] if y is not None)
    if not points:
        return ""
    caption = f"<figcaption>{esc(plot['shows'])}</figcaption>" if plot.get("shows") else ""
    return (f"<figure><img src='{esc(name)}.png' alt='{esc(plot['title'])}' width='770' height='396' "
            f"data-points='{points}'>{caption}</figure>")


def section_html(section: Mapping[str, Any], plots: Mapping[str, Any]) -> str:
    """A section with its text, tables and plots; "" when it has nothing to show."""
    tables = [t for t in (table_html(section["metrics"], t) for t in section.get("tables", ())) if t]
    figures = plots_html(plots, [name[:-4] for name in section["plots"]])
    if not tables and not figures and not section.get("headlines"):
        return ""
    text = f"<p>{esc(section['text'])}</p>" if section["text"] else ""
    return (f"<section id='{section_id(section)}'><h2>{esc(section['title'])} <small>({esc(section['plugin'])})"
            f"</small></h2>{text}{''.join(tables)}{figures}</section>")


def plots_html(plots: Mapping[str, Any], names: Iterable[str]) -> str:
    """The plots ``names`` of report.json's ``plots``, side by side where the page is wide."""
    figures = [figure_html(name, plots[name]) for name in names if name in plots]
    figures = [f for f in figures if f]
    return f"<div class='plots'>{''.join(figures)}</div>" if figures else ""


def render(d: Mapping[str, Any]) -> str:
    """report.html of report.json's ``d``."""
    plots = d.get("plots", {})
    sections = [(s, section_html(s, plots)) for s in d["sections"]]
    shown_sections = [(s, h) for s, h in sections if h]
    nav = ["<a href='#summary'>summary</a>", "<a href='#host'>host and VMs</a>"] + [
        f"<a href='#{section_id(s)}'>{esc(s['title'])}</a>" for s, _ in shown_sections]
    core = plots_html(plots, [name for name, p in plots.items() if p["section"] is None])
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>memvisor report: {esc(d['scenario']['name'])}</title><style>{STYLE}</style></head><body>",
        *_header(d),
        summary_html(d),
        f"<nav>{''.join(nav)}</nav>",
        "<section id='host'><h2>Host and VMs</h2>",
        table_html(d["vms"], VM_TABLE, fold=10**9, turn=False),
        core,
        "</section>",
        *(h for _, h in shown_sections),
        "<p class='sub'>Every figure is also in report.json, unrounded.</p></body></html>\n",
    ]
    return "\n".join(p for p in parts if p)
