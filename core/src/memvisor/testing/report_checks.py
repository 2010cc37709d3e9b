"""Checks of a written report that a person would otherwise make by reading it.

:func:`headline_problems` checks report.json's headlines against the metrics they summarise:
every figure is the metric at its path, shown in its unit as :mod:`memvisor.units` shows it,
and the sentence is its template filled with those figures and nothing else (a number written
into a template by hand could disagree with the tables; a level such as "90 %" may be).
:func:`page_problems` reads report.html as a browser would not: no table cell shows a
flattened key (``restores[0].vm``), Python's ``None``, a path that does not exist or nothing
(an empty value is a dash), no plot's caption names a key of report.json (``t90_s``) instead
of saying it in words, and every image and link it names is there. Both return a list
of problems, empty when the report is right, so a test can show them all at once::

    assert not headline_problems(data) and not page_problems(out_dir / "report.html")
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

FLATTENED_KEY = re.compile(r"\w\[\d+\]|^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+$")
"""A key path flattened into one name: ``restores[0].bytes_read``, ``budget.trap_rate``."""

FILE_NAME = re.compile(r"\.(html|json|png|md|toml|ckpt|npy|zst|csv|parquet|raw|img)$")
"""A file's name, which looks like a dotted key but is not one."""

KEY_NAME = re.compile(r"\b[a-z][a-z0-9]*(_[a-z0-9]+)+\b")
"""A key of report.json (``t90_s``, ``peak_trap_rate``), which a plot's caption says in words."""

LEVEL = re.compile(r"\d+ %")
"""A level a template may write as a number ("90 % of its accesses local")."""


def _at(value: Any, path) -> Any:
    for key in path:
        value = value[key]
    return value


def headline_problems(data: Mapping[str, Any]) -> list[str]:
    """Problems of the headlines of report.json's ``data`` (see the module's text)."""
    from memvisor.units import exact, shown

    problems = []
    for section in data["sections"]:
        for headline in section.get("headlines", ()):
            where = f"{section['title']}: {headline['text']!r}"
            values = {}
            for name, figure in headline["figures"].items():
                try:
                    metric = _at(section["metrics"], figure["path"])
                except (KeyError, IndexError, TypeError):
                    problems.append(f"{where}: {name} points at {figure['path']}, not a metric")
                    continue
                if metric != figure["value"]:
                    problems.append(f"{where}: {name} is {figure['value']!r}, its metric {metric!r}")
                if figure["shown"] != shown(metric, figure["unit"]) or figure["exact"] != exact(metric, figure["unit"]):
                    problems.append(f"{where}: {name} shows {figure['shown']!r} for {metric!r} {figure['unit']}")
                values[name] = shown(metric, figure["unit"])
            try:
                text = headline["template"].format(**values)
            except (KeyError, IndexError, ValueError) as exc:
                problems.append(f"{where}: its template does not fill: {exc}")
                continue
            if text != headline["text"]:
                problems.append(f"{where}: the sentence is not its template filled ({text!r})")
            literal = LEVEL.sub("", re.sub(r"{\w+}", "", headline["template"]))
            if re.search(r"\d", literal):
                problems.append(f"{where}: a number written into the template, not a figure")
            if headline["vm"] is not None and headline["vm"] not in data["vms"] and not _left(data, headline["vm"]):
                problems.append(f"{where}: about VM {headline['vm']!r}, which the run never had")
    return problems


def _left(data: Mapping[str, Any], vm: str) -> bool:
    """Whether ``vm`` was migrated away during the run (its headlines may outlive it)."""
    return any(e.get("vm") == vm for e in data.get("core", {}).get("events", ()))


class _Cells(HTMLParser):
    """The text of every table cell, summary item and caption; every image and link."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.cells: list[str] = []
        self.captions: list[str] = []
        self.empty_cells = 0
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self._open: list[str] = []
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("th", "td", "li", "caption", "summary", "figcaption"):
            self._open.append(tag)
            self._text.append("")
        elif tag == "img":
            self.images.append({k: v or "" for k, v in attrs.items()})
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if self._open and tag == self._open[-1]:
            self._open.pop()
            (self.captions if tag == "figcaption" else self.cells).append(self._text.pop().strip())
            self.empty_cells += tag == "td" and not self.cells[-1]

    def handle_data(self, data):
        if self._text:
            self._text[-1] += data


def page_problems(page: str | os.PathLike, dotted_names: bool = False) -> list[str]:
    """Problems of the page at ``page`` (report.html, or another page memvisor writes);
    ``dotted_names``: the page may show dotted names, which a sweep's page does (its axes and
    columns are named as the sweep file names them: ``vm.db.workload``, ``total.accesses``)."""
    path = Path(page)
    parser = _Cells()
    parser.feed(path.read_text(encoding="utf-8"))
    problems = []
    for text in parser.cells:
        for word in text.split():
            word = word.strip(",;:()")
            if not dotted_names and FLATTENED_KEY.search(word) and not FILE_NAME.search(word):
                problems.append(f"{path.name}: a flattened key in a table: {text!r}")
            if word == "None":
                problems.append(f"{path.name}: Python's None in a table: {text!r}")
            if word.startswith("/") and len(word) > 1 and not os.path.exists(word):
                problems.append(f"{path.name}: a path that does not exist: {text!r}")
    for caption in parser.captions:
        if not dotted_names and KEY_NAME.search(caption):
            problems.append(f"{path.name}: a key of report.json in a plot's caption: {caption!r}")
    if parser.empty_cells:
        problems.append(f"{path.name}: {parser.empty_cells} empty table cells (an empty value is a dash)")
    for image in parser.images:
        if not (path.parent / image.get("src", "")).is_file():
            problems.append(f"{path.name}: image {image.get('src')!r} is missing")
        if image.get("data-points") == "0":
            problems.append(f"{path.name}: plot {image.get('src')!r} has no point")
    for link in parser.links:
        target = link.split("#", 1)[0]
        if target and "://" not in target and not (path.parent / target).exists():
            problems.append(f"{path.name}: link {link!r} to a file that is not there")
    return problems
