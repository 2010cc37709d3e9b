"""The guard over every figure of every example (examples/*.toml, the demo among them): each
runs, its report.json is read back, and

- counters that name the same quantity agree across sections (the core's per-VM traps and the
  stats plugin's, a job in "Checkpoints" and in its plugin's section, …);
- every plotted series ends at its table's value, or the plot says what it shows;
- no figure is NaN, negative where it cannot be, or a float-noise stand-in for "not measured"
  (a null, which its section's text explains, says that);
- time is virtual only on a virtual-time backend;
- the run exercised the techniques its scenario enables.

To stay cheap in CI the examples run shortened: every ``for`` of the timeline and every
``phase_accesses`` times ``MEMVISOR_EXAMPLE_SCALE`` (default 0.25), every memory size (host, VMs,
disks, ``create_vm`` and ``pressure`` steps, ``stop_pages``) times the same factor, so that each
example keeps its shape at a quarter of its cost. ``MEMVISOR_EXAMPLE_SCALE=1`` runs them as
written (about 5 minutes on the project's 2-core machine). The fleet host (1 TiB as written, a few
minutes and 15 GiB of memory) shrinks :data:`SMALLER` times more in memory: its shape is its mix
of VMs, not its size.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from memvisor.report import metric_at
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing.report_checks import headline_problems, page_problems
from memvisor.testing.scaled import scaled

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.toml") if p.name != "sweep.toml")  # a sweep: tests/test_sweep.py
SCALE = float(os.environ.get("MEMVISOR_EXAMPLE_SCALE", "0.25"))
WITH_NUMA = [n for n in NAMES if "numa" in tomllib.loads((EXAMPLES / f"{n}.toml").read_text()).get("plugins", {})]
"""The examples that enable memvisor-numa (the tests of its figures run on these only)."""
SMALLER = {"fleet-host": 128}
"""Examples whose memory shrinks that many times more than their time."""

FLOAT_NOISE = 1e-9
"""Below this, a non-zero figure is a rounding error standing in for zero or for "not measured"
(t90 was once 2.2e-16 s)."""

SIGNED = {"mrc_miss_ratio_increase"}
"""Figures that may be negative (none so far may: an increase of a miss ratio could be)."""


def _no_constant(name: str):
    raise ValueError(f"report.json holds {name}")


@pytest.fixture(scope="module", params=NAMES)
def example(request, tmp_path_factory):
    """(name, report.json as read back, the scenario's plugins) of one example, run once."""
    name = request.param
    path = EXAMPLES / f"{name}.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    backend = data.get("host", {}).get("backend", "emulator")
    if backend == "linux":
        linux = pytest.importorskip("memvisor_backend_linux.backend")
        if linux.unavailable_reason():
            pytest.skip(linux.unavailable_reason())
    run = ScenarioRun(parse_scenario(scaled(data, SCALE, SCALE / SMALLER.get(name, 1)), path))
    try:
        report = run.run()
    finally:
        close = getattr(run.host.backend, "close", None)
        if close is not None:
            close()
    out = tmp_path_factory.mktemp(name)
    report.write(out)
    json.dumps(report.data, allow_nan=False)  # no NaN or infinity in report.json
    PAGES[name] = out / "report.html"
    text = (out / "report.json").read_text(encoding="utf-8")
    return name, json.loads(text, parse_constant=_no_constant), set(data.get("plugins", {}))


PAGES: dict[str, Path] = {}
"""Each example's report.html, once its fixture ran."""


def _section(data: dict, title: str) -> dict | None:
    return next((s for s in data["sections"] if s["title"] == title), None)


def _plugin(data: dict, plugin: str) -> dict | None:
    return next((s for s in data["sections"] if s["plugin"] == plugin), None)


def _numbers(value, where: str = ""):
    """Every (dotted name, value) leaf of ``value``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{where}[{i}]")
    else:
        yield where, value


def _last(values: list):
    finite = [v for v in values if v is not None]
    return (values[-1] if values else None), finite


# -- counters that name the same quantity agree ------------------------------------------------


def test_counters_agree_across_sections(example):
    """The same quantity has one value wherever the report shows it."""
    name, data, _ = example
    vms = data["vms"]
    for vm, counts in vms.items():
        assert counts["guest_traps"] <= counts["faults"] + counts["traced"] + counts["write_traps"], vm
    stats = _plugin(data, "stats")
    if stats is not None:
        for vm, pages in stats["metrics"]["pages_by_vm"].items():
            for theirs, ours in (("faults", "faults"), ("traced_accesses", "traced"), ("write_traps", "write_traps")):
                assert pages.get(theirs, 0) == vms[vm][ours], (vm, ours)
    budgets = _section(data, "Budgets")
    if budgets is not None:
        for vm, use in budgets["metrics"]["vms"].items():
            if vm in vms:
                assert use["guest_traps"] == vms[vm]["guest_traps"], vm
    mrc = _plugin(data, "mrc")
    if mrc is not None:
        for vm, curve in mrc["metrics"]["vms"].items():
            if vm in vms:
                assert curve["accesses"] == vms[vm]["accesses"], vm
    numa = _plugin(data, "numa")
    if numa is not None:
        per_vm = numa["metrics"]["vms"].values()
        assert numa["metrics"]["migrated_pages"] == sum(v["migrated_pages"] for v in per_vm)
        assert numa["metrics"]["migrated_bytes"] == 4096 * numa["metrics"]["migrated_pages"]
        for v in per_vm:
            assert v["migrated_pages"] == sum(m["migrated_pages"] for m in v["moves"])
    jobs = (_section(data, "Checkpoints") or {"metrics": {"jobs": []}})["metrics"]["jobs"]
    for plugin, key in (("lazy-save", "saves"), ("lazy-restore", "restores")):
        section = _plugin(data, plugin)
        for job in [] if section is None else section["metrics"][key]:
            assert job in jobs, (plugin, job["path"])
    lazy = _plugin(data, "lazy-restore")
    for restore in [] if lazy is None else lazy["metrics"]["restores"]:
        assert restore["pages_loaded"] == restore["pages_loaded_on_fault"] + restore["pages_prefetched"]
        assert restore["fault_windows"] <= restore["fault_pages"] <= vms[restore["vm"]]["faults"]
    errors = _section(data, "Live migrations and memory errors")
    if errors is not None:
        m = errors["metrics"]
        assert m["memory_error_repaired"] + m["memory_error_lost"] == m["memory_error_pages"]
        for migration in m["migrations"]:
            assert sum(migration["bytes_by_kind"].values()) <= migration["bytes_sent"]
    memory = _section(data, "Memory, reclaim and reliability")["metrics"]
    assert memory["used_mib"] <= memory["host_mib"]


# -- plots end at their tables -------------------------------------------------------------------


def test_every_plotted_series_ends_at_its_table(example):
    """A series that a table has a value for ends at it; the others are said in ``shows``."""
    name, data, _ = example
    assert data["plots"], "a report without a plot"
    for plot_name, plot in data["plots"].items():
        for label, series in plot["series"].items():
            assert len(series["x"]) == len(series["y"]), (plot_name, label)
            if label not in plot["ends_at"]:
                assert plot["shows"], f"{plot_name}: series {label!r} ends at no table value and the plot " \
                                      "does not say what it shows"
                continue
            table = metric_at(data, plot["section"], plot["ends_at"][label])
            last, _ = _last(series["y"])
            if table is None:
                assert last is None, (plot_name, label, last)
            else:
                assert last == pytest.approx(table * plot["scale"], rel=1e-6, abs=1e-6), (plot_name, label)


@pytest.mark.parametrize("example", WITH_NUMA, indirect=True)
def test_numa_t90_and_t99_are_where_the_plot_reaches_them(example):
    """t90_s and t99_s of each move are when the plotted local fraction first reached 0.9 and
    0.99 after it (it once said 2.2e-16 s while the plot showed tenths of a second)."""
    name, data, _ = example
    numa = _plugin(data, "numa")
    plot = data["plots"]["numa-local-fraction"]
    for vm, figures in numa["metrics"]["vms"].items():
        for index, move in enumerate(figures["moves"]):
            until = figures["moves"][index + 1]["time_s"] if index + 1 < len(figures["moves"]) else math.inf
            xs, ys = plot["series"][vm]["x"], plot["series"][vm]["y"]
            for level, key in ((0.9, "t90_s"), (0.99, "t99_s")):
                reached = [x for x, y in zip(xs, ys) if move["time_s"] < x <= until and y is not None and y >= level]
                expected = reached[0] - move["time_s"] if reached else None
                assert move[key] == (pytest.approx(expected, abs=1e-9) if reached else None), (vm, key)


# -- the summary says what each technique did, with the tables' figures ----------------------------


def test_headlines_are_the_figures_of_their_tables(example):
    """Every headline's numbers are the metrics it points at, formatted in their units, and
    its sentence is its template filled with them: the summary cannot disagree with a table."""
    name, data, _ = example
    assert not headline_problems(data)


def test_headline_figures_agree_with_independent_counts(example):
    """The figures the summary prints that no plot ends at, checked against a count made
    elsewhere: the core's trap counters, the plotted curves and series, the scenario's sizes,
    the sums and bounds they must keep."""
    name, data, _ = example
    vms = data["vms"]
    memory = _section(data, "Memory, reclaim and reliability")["metrics"]
    assert memory["vm_mib"] == sum(v["pages"] for v in vms.values()) * 4096 / 2**20
    assert memory["saved_mib"] == max(0, memory["vm_mib"] - memory["used_mib"])
    mrc, numa = _plugin(data, "mrc"), _plugin(data, "numa")
    # NUMA's "touch" heuristic traces a moved VM's remote pages too: there the core counts more.
    moved = {vm for vm, f in numa["metrics"]["vms"].items() if f["moves"]} if numa else set()
    for vm, curve in [] if mrc is None else mrc["metrics"]["vms"].items():
        if vm in vms:  # the traps the plugin counted are the core's traced accesses of the VM
            if vm in moved:
                assert curve["traps"] <= vms[vm]["traced"], vm
            else:
                assert curve["traps"] == vms[vm]["traced"], vm
        xs, ys = data["plots"]["mrc-final"]["series"][vm]["x"], data["plots"]["mrc-final"]["series"][vm]["y"]
        assert curve["miss_ratio_floor"] == pytest.approx(min(ys)), vm
        assert curve["recommended_miss_ratio"] <= curve["miss_ratio_floor"] + 0.01 + 1e-9, vm
        # the plotted curve is a sample of the points: within half a percent of it
        at = float(np.interp(curve["recommended_pages"] * 4096 / 2**20, xs, ys))
        assert curve["recommended_miss_ratio"] == pytest.approx(at, abs=0.005), vm
    balloon = _plugin(data, "balloon")
    if balloon is not None:
        figures = balloon["metrics"]
        assert figures["resets"] == sum(v["resets"] for v in figures["vms"].values())
        if "balloon-size" in data["plots"]:
            plot = data["plots"]["balloon-size"]
            for vm, v in figures["vms"].items():
                assert v["balloon_pages_peak"] == round(max(plot["series"][vm]["y"]) / plot["scale"]), vm
            assert figures["reclaimed_mib_peak"] == pytest.approx(
                max(data["plots"]["balloon-reclaimed"]["series"]["reclaimed"]["y"]))
    errors = _section(data, "Live migrations and memory errors")
    for migration in [] if errors is None else errors["metrics"]["migrations"]:
        assert 0 < migration["downtime_s"] <= migration["total_s"]
    numa = _plugin(data, "numa")
    for vm, figures in [] if numa is None else numa["metrics"]["vms"].items():
        assert figures["wasted_pages"] <= figures["migrated_pages"], vm


def test_every_technique_says_what_it_did(example):
    """Each technique the example enables has a headline (the summary's sentence of what it
    did); the event counter needs none."""
    name, data, plugins = example
    for plugin in plugins - {"stats"}:
        assert any(s["headlines"] for s in data["sections"] if s["plugin"] == plugin), plugin


def test_report_page_shows_no_key_none_or_missing_path(example):
    """report.html's tables show no flattened key, no Python None and no path that does not
    exist; every image and link it names is there, and every plot has points."""
    name, data, _ = example
    assert not page_problems(PAGES[name])


# -- every figure is a figure ----------------------------------------------------------------------


def test_no_figure_is_negative_float_noise_or_an_unexplained_null(example):
    """Counts, sizes and times are not negative; nothing is a rounding error away from zero; a
    null (not measured, not reached, unlimited) is explained by its section's text."""
    name, data, _ = example
    for section in data["sections"]:
        for key, value in _numbers(section["metrics"]):
            where = f"{section['title']}: {key}"
            if value is None:
                assert "null" in section["text"] or "None" in section["text"], f"{where} is null, unexplained"
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                assert value >= 0 or key.rsplit(".", 1)[-1] in SIGNED, f"{where} = {value}"
                assert value == 0 or abs(value) >= FLOAT_NOISE, f"{where} = {value}: float noise"
    for vm, counts in data["vms"].items():
        for key, value in counts.items():
            if not isinstance(value, bool):
                assert value >= 0, (vm, key)


def test_time_is_virtual_only_on_a_virtual_clock(example):
    """A real clock's report says nothing of virtual time; on a virtual one, the run's clock is
    the virtual time; no sample or event lies beyond the end of the run."""
    name, data, _ = example
    time = data["time"]
    if time["clock"] == "real":
        assert "virtual_seconds" not in time
        words = [s["text"] for s in data["sections"]] + [p["title"] + p["xlabel"] + p["ylabel"] + p["shows"]
                                                         for p in data["plots"].values()]
        words += [key for s in data["sections"] for key, _ in _numbers(s["metrics"])]
        assert not [w for w in words if "virtual" in w.lower()]
    else:
        assert time["virtual_seconds"] == time["clock_seconds"]
    end = time["clock_seconds"] + 1e-9
    assert all(e["time"] <= end for e in data["core"]["events"])
    assert all(t <= end for t in data["core"]["series"].get("time", []))


# -- the shortened runs still exercise every technique ---------------------------------------------


def _acted(plugin: str, metrics: dict) -> bool:
    """Whether the section of ``plugin`` shows the technique at work."""
    if plugin == "stats":
        return any(sum(v.values()) for v in metrics["pages_by_vm"].values())
    if plugin == "mrc":
        return all(v["traps"] > 0 and v.get("recommended_pages") for v in metrics["vms"].values())
    if plugin == "numa":
        return metrics["migrated_pages"] > 0 and metrics["t90_s"] is not None
    if plugin == "balloon":
        return metrics["inflated_pages"] > 0
    if plugin == "sharing":
        return metrics["pages_shared"] + metrics["zero_pages_mapped"] > 0
    if plugin == "lazy-save":
        return bool(metrics["saves"]) and all(s["total_s"] is not None for s in metrics["saves"])
    if plugin == "lazy-restore":
        return bool(metrics["restores"]) and all(r["pages_loaded"] > 0 for r in metrics["restores"])
    if plugin == "diskmap":
        return metrics["mapped"] > 0
    raise AssertionError(f"no check of plugin {plugin!r}: add one to _acted")


def test_the_shortened_run_exercises_every_technique(example):
    """Each plugin the example enables acted; its migrations were verified; its budgets bit."""
    name, data, plugins = example
    for plugin in plugins:
        section = _plugin(data, plugin)
        assert section is not None and _acted(plugin, section["metrics"]), plugin
    errors = _section(data, "Live migrations and memory errors")
    for migration in [] if errors is None else errors["metrics"]["migrations"]:
        assert migration["verified"]
    budgets = _section(data, "Budgets")
    if budgets is not None and budgets["metrics"]["any_budget"]:
        assert any(u["throttled_batches"] or u["scan_refused"] or u["migration_limited_s"]
                   for u in budgets["metrics"]["vms"].values())


@pytest.mark.parametrize("example", ["budgets"], indirect=True)
def test_budgets_example_keeps_the_hog_within_its_budget(example):
    """examples/budgets.toml: hog takes no more traps than its budget allows, web's traps
    hardly ever wait for the handler, the scanner keeps to each VM's scan rate and the
    migration to its bandwidth."""
    name, data, _ = example
    seconds = data["time"]["virtual_seconds"]
    vms = _section(data, "Budgets")["metrics"]["vms"]
    hog, web = vms["hog"], vms["web"]
    assert hog["guest_traps"] <= 50000 * seconds + 500 + 16384
    assert hog["waited_s"] > 0.5 * SCALE and web["waited_s"] == 0
    assert web["handler_wait_s"] < 0.01
    for use in vms.values():
        assert use["scan_pages"] <= 100000 * seconds + 10000
    migration = _section(data, "Live migrations and memory errors")["metrics"]["migrations"][0]
    assert migration["bytes_sent"] / migration["total_s"] <= 64 * 2**20 * 1.001
    assert hog["migration_limited_s"] > 0
