"""The ``sweep`` plugin: the ``memvisor sweep`` command and the ``memvisor bench sweep``
cases, registered through the hooks like any plugin's.

Every ``memvisor`` command loads installed plugins, so this module imports only click: the sweep
machinery, Dask and pyarrow load when the command runs.
"""

from __future__ import annotations

import re

import click

from memvisor import hookimpl
from memvisor.cli import InputFile, OutputDir
from memvisor.errors import UserError

SCHEDULER = re.compile(r"(?:(?:tcp|tls|ws|wss|ucx)://)?[A-Za-z0-9._\[\]:-]{1,253}:(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|"
                       r"6[0-4]\d{3}|[1-5]?\d{1,4})")
"""A Dask scheduler address: [PROTOCOL://]HOST:PORT."""


def _goal(text: str | None) -> tuple[str | None, str | None]:
    if text is None:
        return None, None
    metric, sep, better = text.partition(":")
    if not metric:
        raise UserError(f"--goal {text[:80]!r}: name a column, e.g. total.accesses:max")
    if sep and better not in ("max", "min"):
        raise UserError(f"--goal {text[:80]!r}: the direction after ':' is max or min")
    return metric, better or None


@click.command()
@click.argument("sweep_file", metavar="FILE", type=InputFile("sweep file"))
@click.option("--vary", "varies", multiple=True, metavar="PATH=V1,V2,...",
              help="An axis: a dotted scenario path and its values as TOML, comma-separated "
                   "(vm.*.memory=64MiB,128MiB; plugins.sharing.pages_per_tick=1024,4096; seed=1,2,3). Repeatable.")
@click.option("--out", "out_dir", default="memvisor-sweep", show_default=True, type=OutputDir(),
              help="Folder for runs/KEY/report.json, the results table and index.html.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run on this existing Dask cluster instead of a LocalCluster.")
@click.option("--workers", type=click.IntRange(1, 1024), default=None,
              help="Worker processes of the LocalCluster (default: one per CPU).")
@click.option("--serial", is_flag=True, help="Run in this process, one run after the other (no Dask).")
@click.option("--resume", is_flag=True, help="Keep the runs already written in --out and run only the others.")
@click.option("--backend", default=None, help="Run every combination on this backend.")
@click.option("--retries", type=click.IntRange(0, 100), default=2, show_default=True,
              help="Dask retries of a run whose worker failed.")
@click.option("--format", "table_format", type=click.Choice(["parquet", "csv"]), default=None,
              help="Results table format (default: parquet when pyarrow is installed, else csv).")
@click.option("--policy-axis", default=None, help="The axis holding the policies compared in index.html.")
@click.option("--workload-axis", default=None, help="The axis holding the workloads in index.html.")
@click.option("--goal", default=None, metavar="METRIC[:max|min]",
              help="The column that decides the best policy (default total.accesses:max).")
@click.option("--pages/--no-pages", default=True, show_default=True,
              help="Write each run's report.html and plots (drawn by the workers: examples/sweep.toml took a "
                   "third longer with them); index.html links them, or each run's report.json without.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary.")
def sweep(sweep_file, varies, out_dir, scheduler, workers, serial, resume, backend, retries, table_format,
          policy_axis, workload_axis, goal, pages, quiet):
    """Run FILE (a sweep file, or a scenario with --vary axes) for every combination of the axes,
    on a Dask cluster, and write a results table and a comparison report to --out."""
    import attrs

    from memvisor.cli import console as make_console
    from memvisor_sweep import driver
    from memvisor_sweep.spec import load_sweep, parse_vary

    if serial and scheduler:
        raise UserError("--serial and --scheduler: choose one")
    if scheduler is not None and not SCHEDULER.fullmatch(scheduler):
        raise UserError(f"--scheduler {scheduler[:80]!r}: not a scheduler address (tcp://HOST:PORT)")
    spec = load_sweep(sweep_file)
    spec = spec.with_axes([parse_vary(v) for v in varies])
    if backend is not None:
        spec = attrs.evolve(spec, backend=backend)
    goal_metric, better = _goal(goal)
    compare = attrs.evolve(spec.compare, **{k: v for k, v in (("policy", policy_axis), ("workload", workload_axis),
                                                               ("goal", goal_metric), ("better", better))
                                            if v is not None})
    spec = attrs.evolve(spec, compare=compare)
    if not spec.axes:
        raise UserError(f"{sweep_file}: nothing to vary: give --vary PATH=V1,V2 or a sweep file with [vary]")
    names = [a.name for a in spec.axes]
    for option, axis in (("--policy-axis", policy_axis), ("--workload-axis", workload_axis)):
        if axis is not None and axis not in names:
            raise UserError(f"{option}: no axis named {axis[:60]!r} (axes: {', '.join(names)})")
    if not scheduler:  # a cluster's workers may have other plugins than this machine
        from memvisor.host import registries
        from memvisor.plugins import installed_plugins, new_plugin_manager

        spec.check({p.name for p in installed_plugins() if p.error is None},
                   set(registries(new_plugin_manager(None, strict=False))["backend"]))
    else:
        spec.check()
    # Checked before a cluster starts: a mistake costs no worker start-up.
    console = make_console(stderr=True)  # into a pipe: whole lines, never wrapped at 80 columns
    executor = driver.SerialExecutor() if serial else driver.DaskExecutor(scheduler, workers)
    with executor, _progress(console, quiet) as progress:
        if not serial and not quiet:
            where = f"Dask scheduler {scheduler}" if scheduler else f"Dask LocalCluster, {executor.workers} workers"
            link = executor.dashboard_link
            console.print(f"{where}; dashboard: {link or 'none (pip install bokeh to get one)'}")
        task = None

        def on_start(to_run: int, done: int) -> None:
            """The bar counts only the runs still to do."""
            nonlocal task
            task = progress.add_task(spec.name, total=to_run, status=f"{done} already done" if done else "")

        failed = 0

        def on_outcome(outcome) -> None:
            """One step per run, with the failures so far."""
            nonlocal failed
            failed += outcome.status != "ok"
            progress.update(task, advance=1, status=f"[red]{failed} failed[/red]" if failed else "")

        try:
            summary = driver.run_sweep(spec, out_dir, executor, resume=resume, retries=retries,
                                       table_format=table_format, on_start=on_start, on_outcome=on_outcome,
                                       pages=pages)
        except KeyboardInterrupt:
            progress.stop()
            console.print(f"interrupted: finished runs are kept in {out_dir}/runs; continue with --resume")
            raise SystemExit(130) from None
    if not quiet:
        _summary(console, spec, summary)
    if summary.failed:
        raise SystemExit(1)


def _progress(console, quiet: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, disable=quiet or not console.is_terminal, transient=True)


def _summary(console, spec, summary) -> None:
    from memvisor_sweep.compare import best_per_workload
    from memvisor_sweep.table import read_table

    parts = [f"{summary.ok} ok", f"[red]{summary.failed} failed[/red]" if summary.failed else "0 failed"]
    if summary.resumed:
        parts.append(f"{summary.resumed} kept from before")
    console.print(f"sweep {spec.name}: {summary.runs} runs ({', '.join(parts)}) in {summary.seconds:.1f} s")
    for message, count in list(summary.errors.items())[:5]:
        console.print(f"  [red]{count} failed:[/red] {message}")
    if len(summary.errors) > 5:
        console.print(f"  ... and {len(summary.errors) - 5} other errors (see index.html)")
    best = best_per_workload(spec, read_table(summary.table))
    if best:
        console.print(f"best by {spec.compare.goal} ({spec.compare.better}): "
                      + "; ".join(f"{b['workload']} -> {b['best']}" for b in best[:8])
                      + (" ..." if len(best) > 8 else ""))
    console.print(f"results: {summary.table}\nreport: {summary.index}")


class SweepPlugin:
    """Registers ``memvisor sweep``, the ``memvisor bench sweep`` cases, and the command's
    baseline for the CLI matrix."""

    @hookimpl
    def memvisor_register_commands(self, cli):
        """Add ``memvisor sweep``."""
        cli.add_command(sweep)

    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """``memvisor bench sweep``: a 2-worker LocalCluster against serial, and the per-run
        overhead of the machinery."""
        from memvisor_sweep.bench import cases

        for case in cases():
            register("sweep", case)

    @hookimpl
    def memvisor_selftest(self, selftest):
        """A valid `memvisor sweep` (two seeds, serial) for the CLI matrix."""
        selftest.command("sweep", {"sweep_file": "{scenario}", "varies": ["seed=1,2"], "serial": True,
                                   "out_dir": "{out}/sweep", "quiet": True})
