"""The report a person reads: headlines whose numbers are the tables' figures, tables with real
columns and units, a summary first, the same colour for a VM in every plot, and sections of
plugins written against the first report API still readable."""

import json
import re

import pytest

from memvisor import hookimpl
from memvisor.report import Column, Figure, Headline, Plot, ReportSection, Table, series_styles, vm_colours
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing.report_checks import headline_problems, page_problems
from memvisor.units import exact, shown


def _scenario():
    return parse_scenario({"name": "t", "description": "two VMs",
                           "host": {"memory": "64MiB", "tick": "1ms", "batch": 4096},
                           "vm": [{"name": "web", "memory": "8MiB", "workload": {"kind": "uniform"}},
                                  {"name": "db", "memory": "4MiB", "workload": {"kind": "uniform"}}],
                           "timeline": [{"do": "run", "for": "3ms"}]})


def _report(tmp_path, *sections):
    class P:
        @hookimpl
        def memvisor_report(self, host):
            return list(sections)

    report = ScenarioRun(_scenario(), extra_plugins=[P()]).run()
    page = report.write(tmp_path)
    return report, page.read_text(encoding="utf-8"), page


def test_units_are_the_ones_a_person_reads():
    """Sizes in binary units, times in µs/ms/s, counts with separators; the exact value
    beside; an empty value is a dash."""
    assert shown(44032, "pages") == "172 MiB" and exact(44032, "pages") == "44,032 pages (180,355,072 bytes)"
    assert shown(55251173, "bytes") == "52.7 MiB" and shown(3 << 30, "bytes") == "3 GiB"
    assert shown(1023.99609375, "MiB") == "1,024 MiB" and shown(4096, "bytes") == "4 KiB"
    assert shown(0.0026015, "s") == "2.6 ms" and shown(6.4e-05, "s") == "64 µs" and shown(14.6006, "s") == "14.6 s"
    assert shown(2454, "count") == "2,454" and shown(0.99778, "fraction") == "99.8 %"
    assert shown(4.7665, "ratio") == "4.77×" and shown(1224.39, "MiB/s") == "1.2 GiB/s"
    assert shown(None, "s") == "–" and shown(True) == "yes" and shown([["web", "db"]]) == "(web, db)"
    with pytest.raises(ValueError, match="no unit"):
        Column("x", "x", "furlongs")


def test_headlines_lead_the_page_with_the_tables_figures(tmp_path):
    """A headline's numbers are the metrics it points at, shown in their units, with the exact
    value in a tooltip; the summary with it comes before any section, on the VM's card."""
    section = ReportSection(
        "mine", "My technique", {"vms": {"web": {"saved_pages": 44032, "first_s": 0.0026}}, "total": 2454},
        headlines=[Headline("mine saved {saved}, first after {first}",
                            {"saved": Figure(("vms", "web", "saved_pages"), "pages", "higher"),
                             "first": Figure(("vms", "web", "first_s"), "s", "lower")}, vm="web"),
                   Headline("{total} copies in all", {"total": Figure(("total",), "count")})],
        tables=[Table("Per VM", [Column("saved_pages", "saved", "pages"), Column("first_s", "first", "s")],
                      rows=("vms",))])
    report, page, path = _report(tmp_path, section)
    data = json.loads((tmp_path / "report.json").read_text())
    mine = next(s for s in data["sections"] if s["plugin"] == "mine")
    web, host = mine["headlines"]
    assert web["text"] == "mine saved 172 MiB, first after 2.6 ms" and web["key"] == "web"
    assert web["figures"]["saved"] == {"path": ["vms", "web", "saved_pages"], "unit": "pages", "value": 44032,
                                       "shown": "172 MiB", "exact": "44,032 pages (180,355,072 bytes)",
                                       "better": "higher", "label": "saved pages"}
    assert host["vm"] is None and host["text"] == "2,454 copies in all"
    assert not headline_problems(data) and not page_problems(path)
    summary = page.index("What each technique did")
    assert summary < page.index("<h2>Host and VMs") < page.index("My technique <small>")
    card = page[page.index("web <small>"):page.index("</div>", page.index("web <small>"))]
    assert "Mine saved <b title='44,032 pages (180,355,072 bytes)'>172 MiB</b>" in card
    assert "db <small>4 MiB, node 0</small></h3><ul><li>no technique reported on it" in page
    host_card = page[page.index("<h3>Host</h3>"):page.index("</section>")]
    assert "<li><b>2,454</b> copies in all" in host_card and "The VMs" in host_card
    assert "<td class=n title='44,032 pages (180,355,072 bytes)'>172 MiB</td>" in page


def test_a_headline_that_disagrees_with_its_metric_is_found(tmp_path):
    """The checks find a figure that is not its metric, and a number written into a sentence."""
    section = ReportSection("mine", "Mine", {"n": 5},
                            headlines=[Headline("{n} done", {"n": Figure(("n",), "count")})])
    report, _, _ = _report(tmp_path, section)
    data = json.loads(json.dumps(report.data))
    mine = next(s for s in data["sections"] if s["plugin"] == "mine")
    mine["metrics"]["n"] = 6
    assert any("its metric 6" in p for p in headline_problems(data))
    mine["metrics"]["n"] = 5
    mine["headlines"][0]["template"] = mine["headlines"][0]["text"] = "5 done"
    assert any("a number written into the template" in p for p in headline_problems(data))


def test_a_headline_of_a_missing_metric_is_refused(tmp_path):
    """A headline pointing at no metric is a bug of its plugin, named in the error."""
    section = ReportSection("mine", "Mine", {"n": 5},
                            headlines=[Headline("{n} done", {"n": Figure(("nothing",), "count")})])
    with pytest.raises(ValueError, match=r"mine: headline '\{n\} done': no metric at \['nothing'\]"):
        _report(tmp_path, section)


def test_tables_show_a_dash_fold_long_lists_and_turn_wide_ones(tmp_path):
    """An empty value is a dash saying what it means; a column with no value is left out; a
    long list of records is folded; a wide list of few records is turned; a ``*`` in the path
    takes every item and names it."""
    records = [{"vm": "web", "i": i, "t90_s": None if i == 3 else i / 1000, "never": None} for i in range(20)]
    wide = {f"c{k}": k for k in range(12)}
    section = ReportSection(
        "mine", "Mine", {"jobs": records, "wide": [wide], "vms": {"web": {"moves": [{"at_s": 0.5}, {"at_s": 1.5}]}}},
        tables=[Table("Jobs", [Column("i", "i", "count"), Column("t90_s", "t90", "s", "not reached"),
                               Column("never", "never", "count")], rows=("jobs",), keys=()),
                Table("Wide", [Column(k, k, "count") for k in wide], rows=("wide",), keys=()),
                Table("Moves", [Column("at_s", "at", "s")], rows=("vms", "*", "moves"))])
    _, page, path = _report(tmp_path, section)
    assert "<details><summary>Jobs: 20 rows</summary>" in page
    assert "<td class='none' title='not reached'>–</td>" in page and ">never<" not in page
    assert "<tr><th>c11</th><td class=n>11</td></tr>" in page  # a row per column: turned
    assert "<tr><th>web</th><td class=n title='0.5 s'>500 ms</td></tr>" in page
    assert not page_problems(path)


def test_an_empty_setting_is_a_dash_and_groups_read_as_words(tmp_path):
    """An empty list or text (sharing's ``across = []``) is a dash saying what it means, not
    an empty cell, which page_problems finds; a few groups of names read as words, not as
    "1 values"."""
    section = ReportSection("mine", "Mine", {"settings": {"across": [], "name": "", "groups": [["web", "db"]]}},
                            tables=[Table("Settings", [Column("across", "across", "text", "no group"),
                                                       Column("name", "name", "text"),
                                                       Column("groups", "groups", "text")], record=("settings",))])
    _, page, path = _report(tmp_path, section)
    assert "<th>across</th><td class='none' title='no group'>–</td>" in page
    assert "<th>name</th><td class='none' title='no value'>–</td>" in page
    assert "<th>groups</th><td>(web, db)</td>" in page
    assert not page_problems(path)
    path.write_text(page.replace("<td class='none' title='no group'>–</td>", "<td></td>"))
    assert page_problems(path) == ["report.html: 1 empty table cells (an empty value is a dash)"]


def test_a_plot_caption_naming_a_key_is_found(tmp_path):
    """A plot's caption says in words what it shows: one naming a key of report.json
    (``t90_s``) is a problem page_problems reports."""
    def section(shows):
        return ReportSection("mine", "Mine", {"t90_s": 0.5}, plots=[
            Plot("mine-plot", "Local accesses", "time (s)", "local fraction", {"web": ([0, 1], [0.5, 1.0])},
                 shows=shows)])

    _, _, path = _report(tmp_path / "words", section("when the fraction first reached 0.9, as in the table"))
    assert not page_problems(path)
    _, _, path = _report(tmp_path / "key", section("t90_s is when it first reached 0.9"))
    assert page_problems(path) == ["report.html: a key of report.json in a plot's caption: "
                                   "'t90_s is when it first reached 0.9'"]


def test_a_section_of_metrics_only_still_reads(tmp_path):
    """A section written against the first report API (metrics only, nested) gets tables
    derived from its metrics: a row per record and real column headings, units from the keys'
    suffixes, no flattened key, no None."""
    section = ReportSection("old", "Old style", {
        "ticks": 5, "time_s": 0.25, "missing": None,
        "restores": [{"vm": "web", "bytes_read": 2 << 20, "first_access_s": 0.0026}],
        "vms": {"web": {"hits": 3}, "db": {"hits": 4}},
        "settings": {"rate": 0.5}})
    _, page, path = _report(tmp_path, section)
    assert not page_problems(path)
    body = page[page.index("Old style <small>"):]
    body = body[:body.index("</section>")]
    assert "<th>bytes read</th><th>first access</th>" in body and "<td class=n title='2,097,152 bytes'>2 MiB</td>" \
        in body
    assert "<tr><th>db</th><td class=n>4</td></tr>" in body and "<th>time</th><td class=n title='0.25 s'>250 ms" \
        in body
    assert not re.search(r"restores\[0\]|vms\.web|None", body)


def test_a_section_without_anything_to_show_is_left_out(tmp_path):
    """A section whose tables have no rows and whose plots no point is not on the page (its
    metrics stay in report.json)."""
    empty = ReportSection("mine", "Nothing here", {"jobs": []},
                          plots=[Plot("mine-empty", "Empty", "time (s)", "pages", {"a": ([], [])}, shows="nothing")],
                          tables=[Table("Jobs", [Column("x", "x")], rows=("jobs",))])
    report, page, _ = _report(tmp_path, empty)
    assert "Nothing here" not in page and report.metric("mine", "jobs") == []


def test_each_vm_keeps_its_colour_in_every_plot():
    """A VM's series are drawn in the VM's colour (several of one VM in different line
    styles); other series of such a plot in greys; a plot without VM series keeps the
    default colours."""
    colours = vm_colours(["web", "db", "web-2"])
    styles = series_styles(["db", "web-2 #0 on fault", "web-2 #0 prefetched", "web", "budget 5/s"], colours)
    assert styles["db"] == (colours["db"], "-") and styles["web"] == (colours["web"], "-")
    assert styles["web-2 #0 on fault"] == (colours["web-2"], "-")
    assert styles["web-2 #0 prefetched"] == (colours["web-2"], "--")
    assert styles["budget 5/s"][0] not in colours.values()
    assert series_styles(["used", "free"], colours) == {"used": (None, "-"), "free": (None, "-")}
