"""Running every heuristic on the same workload and seed: ``memvisor numa compare``.

Each heuristic gets its own scenario run: one VM on node 1 of a two-node host runs for
``pre`` seconds (so that the aging heuristics have history, as a VM that ran for a while
has), its virtual CPUs move to node 0, and it runs on long enough for address order to
migrate the whole VM and a fifth more at the default bandwidth.

The defaults are the scenario of ``memvisor bench numa``: a 4 GiB VM with 3 s of history. A
smaller VM shows hot-first orders gaining less, because of the workload, not of the orders:
at 1 GiB the hottest 29% of a zipf(0.99)'s pages carry 90% of its accesses (at 4 GiB, 26%),
so even a perfect order must move 0.32 of the pages address order moves before 90% of the
accesses are local (at 4 GiB, 0.29).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any

import click

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.cli import OutputFile, Size, json_option, write_json
from memvisor.errors import UserError
from memvisor_numa.settings import DEFAULT_NUMA_GIB_PER_S, HEURISTICS, bandwidth_pages

TICK = 0.01
"""Tick of the comparison scenarios (the core's default)."""

DEFAULT_VM_GIB = 4.0
"""Size of the VM ``numa compare`` runs by default (the benchmark's)."""

DEFAULT_PRE = 3.0
"""Seconds the VM runs before its move by default: 32 scan windows of one access per page
at 4 GiB, the history the aging heuristics keep."""

POST_FACTOR = 1.2
"""The default run after the move lasts this many times what address order needs to
migrate the whole VM (it reaches 99% local just before the end of its migration)."""


def parse_workload(text: str) -> dict[str, Any]:
    """A workload table from ``zipf:ALPHA``, ``zipf``, ``phased``, ``scan`` or ``trace:FILE``.

    :raises UserError: one line naming ``--workload``.
    """
    kind, _, arg = text.partition(":")
    if kind == "zipf":
        try:
            alpha = float(arg) if arg else 0.99
        except ValueError:
            raise UserError(f"--workload: zipf:ALPHA needs a number, got {arg!r}") from None
        if not 0.0 <= alpha <= 10.0:
            raise UserError(f"--workload: zipf alpha must be between 0 and 10, got {alpha}")
        return {"kind": "zipf", "alpha": alpha}
    if kind in ("phased", "scan") and not arg:
        return {"kind": kind}
    if kind == "trace" and arg:
        if not Path(arg).is_file():
            raise UserError(f"--workload: {arg}: no such trace file")
        return {"kind": "trace", "path": arg, "loop": True}
    raise UserError(f"--workload: {text!r} is not one of zipf:ALPHA, phased, scan, trace:FILE")


MIN_VM_BYTES = 4 << 20
"""The smallest VM ``numa compare`` runs."""


def vm_pages_of(nbytes: float) -> int:
    """The VM's size in pages: ``nbytes`` rounded down to whole 2 MiB (at least 4 MiB)."""
    if not math.isfinite(nbytes) or nbytes < MIN_VM_BYTES:
        raise UserError(f"--vm-memory: must be at least 4MiB, got {nbytes:g} bytes")
    frames = int(nbytes // (LARGE_PAGE_PAGES * PAGE_SIZE))
    return frames * LARGE_PAGE_PAGES


def heat_plugin_installed() -> bool:
    """Whether a plugin named ``mrc`` is installed (it answers ``memvisor_page_heat``); it is
    enabled by name in the scenario, never imported."""
    from memvisor.plugins import installed_plugins

    return any(p.name == "mrc" and p.error is None for p in installed_plugins())


def compare_scenario(heuristic: str | None, vm_pages: int, workload: dict[str, Any], *, seed: int = 1,
                     pre: float | None = None, post: float | None = None, settings: dict | None = None) -> dict:
    """The scenario (as a dict for :func:`memvisor.scenario.parse_scenario`) of one run.

    :param heuristic: the numa plugin's heuristic, or None for a run without the plugin.
    :param pre: seconds before the move (default :data:`DEFAULT_PRE`).
    :param post: seconds after the move (default: :data:`POST_FACTOR` times what address order
        needs, at least 0.2).
    """
    budget = bandwidth_pages(DEFAULT_NUMA_GIB_PER_S, TICK)
    pre = DEFAULT_PRE if pre is None else pre
    if post is None:
        post = max(0.2, round(POST_FACTOR * vm_pages / budget * TICK, 2))
    # Each node holds the VM and then some, so that migration never waits for memory.
    node_pages = (vm_pages * 9 // 8 // LARGE_PAGE_PAGES + 2) * LARGE_PAGE_PAGES
    plugins = {} if heuristic is None else {"numa": {"heuristic": heuristic, **(settings or {})}}
    if heuristic == "mrc" and heat_plugin_installed():
        plugins["mrc"] = {}  # the heuristic's point: the order a page-use plugin offers
    return {
        "name": f"numa-compare-{heuristic or 'none'}",
        "seed": seed,
        "host": {"memory": 2 * node_pages * PAGE_SIZE, "numa_nodes": 2, "tick": TICK, "batch": 65536},
        "plugins": plugins,
        "vm": [{"name": "vm", "memory": vm_pages * PAGE_SIZE, "node": 1, "workload": dict(workload)}],
        "timeline": [
            {"do": "run", "for": pre},
            {"do": "move_vcpus", "vm": "vm", "node": 0},
            {"do": "run", "for": post},
        ],
    }


def run_heuristic(heuristic: str | None, vm_pages: int, workload: dict[str, Any], **options):
    """Run one comparison scenario; returns its :class:`memvisor.report.Report`."""
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import parse_scenario

    run = ScenarioRun(parse_scenario(compare_scenario(heuristic, vm_pages, workload, **options),
                                     f"<numa compare {heuristic}>"))
    report = run.run()
    # The host and its plugin manager refer to each other: without a collection now, the
    # machine memory of several GiB-sized runs would pile up until the cyclic collector ran.
    del run
    gc.collect()
    return report


def row_of(report) -> dict[str, Any]:
    """The figures ``numa compare`` shows for one run; ``guest_accesses`` is how much the guest
    got done in the same virtual time (traps slow it down)."""
    row = {key: report.metric("numa", key) for key in ("t90_s", "t99_s", "migrated_pages", "wasted_pages",
                                                        "migrated_bytes")}
    row["guest_accesses"] = report.data["vms"]["vm"]["accesses"]
    row["heat_source"] = report.metric("numa", "vms")["vm"]["heat_source"]
    return row


def series_of(report) -> tuple[list[float], list[float]]:
    """Local fraction of the VM over time, the move at time 0."""
    move = report.metric("numa", "vms")["vm"]["moves"][0]["time_s"]
    series = report.data["core"]["series"]
    times = [t - move for t in series["time"]]
    return times, [v if v is not None else float("nan") for v in series["local_fraction/vm"]]


def compare(vm_pages: int, workload: dict[str, Any], heuristics=HEURISTICS, seed: int = 1, **options):
    """Run every heuristic on the same workload and seed; returns (rows, series) by name."""
    rows, series = {}, {}
    for name in heuristics:
        report = run_heuristic(name, vm_pages, workload, seed=seed, **options)
        rows[name] = row_of(report)
        series[name] = series_of(report)
    return rows, series


def draw(series: dict, path: Path, title: str) -> None:
    """The local fraction over time, one line per heuristic, as a PNG (the move is at 0)."""
    from memvisor.report import Plot, draw_plot

    draw_plot(Plot("numa-compare", title, "time since the move (s)", "local fraction", series), path)


def _float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{name}: expected a number, got {text!r}") from None


@click.group()
def numa() -> None:
    """NUMA migration after a VM's virtual CPUs move (the numa plugin)."""


@numa.command("compare")
@click.option("--vm-memory", "vm_bytes", type=Size(MIN_VM_BYTES), default=f"{DEFAULT_VM_GIB:g}GiB", show_default=True,
              help="Size of the VM (binary units, as in scenarios: 512MiB, 4G).")
@click.option("--workload", default="zipf:0.99", show_default=True, help="zipf:ALPHA, phased, scan or trace:FILE.")
@click.option("--seed", default="1", show_default=True, help="Seed of the workload (the same for every heuristic).")
@click.option("--pre", default=f"{DEFAULT_PRE:g}", show_default=True,
              help="Seconds the VM runs before its move (history).")
@click.option("--post", default=None,
              help="Seconds it runs after the move [default: 1.2 times what address order needs].")
@json_option()
@click.option("--plot", "plot_out", default=None, type=OutputFile("PNG file"),
              help="Draw the local fraction over time to this PNG.")
def compare_command(vm_bytes, workload, seed, pre, post, json_out, plot_out):
    """Run every heuristic on the same workload and seed and print a table."""
    # Options are read as text and checked here, so that a mistake is one line and status 2.
    vm_pages = vm_pages_of(vm_bytes)
    spec = parse_workload(workload)
    if not (seed.isdigit() and int(seed) < 2**63):
        raise UserError(f"--seed: expected a whole number from 0 to 2**63-1, got {seed[:40]!r}")
    timing = {"pre": _float("--pre", pre)}
    if post is not None:
        timing["post"] = _float("--post", post)
    for option, value in timing.items():
        if not 0 < value <= 3600:
            raise UserError(f"--{option}: must be between 0 and 3600 seconds, got {value:g}")
    from memvisor.cli import console, table
    from memvisor.units import shown

    progress = console(stderr=True)
    rows, series = {}, {}
    for name in HEURISTICS:
        if progress.is_terminal:
            progress.print(f"running {name} ...")
        r, s = compare(vm_pages, spec, (name,), seed=int(seed), **timing)
        rows.update(r)
        series.update(s)
    write_json(json_out, {"heuristics": rows})
    if json_out != "-":
        columns = ("t90", "t99", "migrated", "not touched since", "guest accesses")
        out = table("heuristic", *columns, numbers=columns,
                    title=f"numa compare: {shown(vm_pages, 'pages')} VM, {workload}, seed {seed}")
        for name, row in rows.items():
            out.add_row(name, shown(row["t90_s"], "s") if row["t90_s"] is not None else "not reached",
                        shown(row["t99_s"], "s") if row["t99_s"] is not None else "not reached",
                        shown(row["migrated_pages"], "pages"), shown(row["wasted_pages"], "pages"),
                        f"{row['guest_accesses']:,}")
        console().print(out)
    if plot_out:
        draw(series, Path(plot_out), f"Local accesses after the move ({workload})")
