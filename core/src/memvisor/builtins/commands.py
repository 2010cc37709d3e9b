"""The core's own subcommands: run, plugins, backends, bench and compare."""

from __future__ import annotations

import click

from memvisor import hookimpl
from memvisor.cli import InputFile, OutputDir, console, json_option, table, write_json
from memvisor.errors import GuestDied, UserError

SEED = click.IntRange(0, 2**63 - 1)
"""A seed on the command line: a whole number that fits in 64 bits."""


@click.command()
@click.argument("scenario", type=InputFile("scenario file"))
@click.option("--out", "out_dir", default="memvisor-report", show_default=True, type=OutputDir(),
              help="Folder for report.json, report.html and the plots.")
@click.option("--backend", default=None, help="Run on this backend instead of the scenario's.")
@click.option("--seed", type=SEED, default=None, help="Override the scenario's seed.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary.")
def run(scenario, out_dir, backend, seed, quiet):
    """Run a SCENARIO file and write its report to --out."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from memvisor.runner import ScenarioRun
    from memvisor.scenario import load_scenario

    spec = load_scenario(scenario)
    if backend is not None:
        spec = spec.with_backend(backend)
    if seed is not None:
        spec = spec.with_seed(seed)
    progress_console = console(stderr=True)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=progress_console,
                  disable=quiet or not progress_console.is_terminal, transient=True) as progress:
        task = progress.add_task(spec.name, total=1.0, status="setting up")
        scenario_run = ScenarioRun(spec, lambda done, status: progress.update(task, completed=done, status=status))
        try:
            report = scenario_run.run()
        except GuestDied as exc:  # the report of what ran, then the one line
            page = exc.report.write(out_dir)
            raise UserError(f"{scenario}: {exc} (the report of what ran: {page})") from None
        progress.update(task, status="writing report")
        page = report.write(out_dir)
    if not quiet:
        _summary(report, page)


def _summary(report, page) -> None:
    """What the run did, as the report's summary says it: the VMs' counters, then each VM's
    headlines and the host's, then where the report is."""
    from rich.markup import escape

    from memvisor.report import time_summary

    d = report.data
    out = console()
    counters = ("accesses", "faults", "traced", "write traps", "remote")
    rows = table("VM", *counters, title=f"{d['scenario']['name']}: {time_summary(d['time'])}", numbers=counters)
    for name, vm in d["vms"].items():
        rows.add_row(name, *(f"{vm.get(k, 0):,}" for k in ("accesses", "faults", "traced", "write_traps", "remote")))
    out.print(rows)
    by_vm: dict = {}
    for section in d["sections"]:
        for headline in section["headlines"]:
            by_vm.setdefault(headline["vm"], []).append(headline["text"])
    for vm in [*d["vms"], *(v for v in by_vm if v is not None and v not in d["vms"]), None]:
        if by_vm.get(vm):
            out.print(f"[bold]{escape(vm) if vm is not None else 'host'}[/bold]")
            for text in by_vm[vm]:
                out.print(f"  - {escape(text[:1].upper() + text[1:])}")
    out.print(f"report: {escape(str(page))}")


def _plugin_rows(show_all: bool, hook: str | None) -> list[dict]:
    from memvisor.plugins import BUILTIN_MODULES, hooks_of, installed_plugins, new_plugin_manager

    pm = new_plugin_manager(None, strict=False)
    rows = []
    if show_all:
        for name in BUILTIN_MODULES:
            rows.append({"name": name, "distribution": "memvisor", "version": _core_version(),
                         "hooks": hooks_of(pm, pm.get_plugin(name)), "builtin": True, "error": None})
    for plugin in installed_plugins():
        registered = pm.get_plugin(plugin.name)
        rows.append({"name": plugin.name, "distribution": plugin.distribution, "version": plugin.version,
                     "hooks": hooks_of(pm, registered) if registered is not None else [], "builtin": False,
                     "error": plugin.error})
    if hook is not None:
        rows = [r for r in rows if hook in r["hooks"]]
    return rows


def _core_version() -> str:
    from memvisor import __version__

    return __version__


@click.command()
@json_option("the list")
@click.option("--all", "show_all", is_flag=True, help="Include the core's built-in plugins.")
@click.option("--hook", default=None, help="Only plugins that implement this hook.")
@click.option("--settings", "settings_of", default=None, metavar="NAME",
              help="The settings plugin NAME declares for its [plugins.NAME] table.")
def plugins(json_out, show_all, hook, settings_of):
    """List installed plugins, their versions and the hooks each implements (or, with
    --settings NAME, the settings of one plugin)."""
    from rich.markup import escape

    from memvisor.hookspecs import HOOK_NAMES

    if settings_of is not None:
        _settings_table(settings_of, json_out)
        return
    if hook is not None and hook not in HOOK_NAMES:
        raise UserError(f"--hook: no hook named {hook[:80]!r}")
    rows = _plugin_rows(show_all, hook)
    write_json(json_out, rows)
    if json_out == "-":
        return
    out = table("name", "distribution", "version", "hooks")
    for r in rows:
        out.add_row(r["name"], r["distribution"], r["version"],
                    f"[red]failed to load: {escape(r['error'])}[/red]" if r["error"] else ", ".join(r["hooks"]))
    console().print(out)


def _settings_table(name: str, json_out: str | None) -> None:
    """Print the settings that plugin ``name`` declares (one line when it is not installed),
    and write them as JSON to ``json_out`` (``--json``'s value)."""
    from memvisor.plugins import installed_plugins, left_out
    from memvisor.settings import declared, installed

    classes = installed()
    if name not in classes:
        names = {p.name for p in installed_plugins()}
        if name in names:
            raise UserError(f"--settings: plugin {name!r} declares no settings (its table is passed to it unchecked)")
        reason = left_out(name)
        raise UserError(f"--settings: plugin {name[:60]!r}: {reason}" if reason else
                        f"--settings: no plugin named {name[:60]!r} (installed: {', '.join(sorted(names)) or 'none'})")
    rows = [s.to_json() for s in declared(classes[name])]
    write_json(json_out, rows)
    if json_out == "-":
        return
    from rich.markup import escape

    out = table("key", "type", "default", "allowed", "what it does", title=escape(f"[plugins.{name}]"))
    for setting in declared(classes[name]):
        doc = setting.doc + (f" Host-dependent: {setting.host_dependent}"
                             if setting.host_dependent else "")
        out.add_row(*(escape(c) for c in (setting.name, setting.type_name, setting.default_text,
                                          setting.allowed_text, doc)))
    console().print(out if rows else escape(f"[plugins.{name}] has no settings: an empty table enables the plugin."))


@click.command()
@json_option("the list")
def backends(json_out):
    """List the hypervisor backends that installed plugins register."""
    from memvisor.host import registries
    from memvisor.plugins import new_plugin_manager

    pm = new_plugin_manager(None, strict=False)
    registry = registries(pm)["backend"]
    rows = [
        {"name": name, "plugin": registry.owner(name), "capabilities": sorted(getattr(factory, "capabilities", ())),
         "description": (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""}
        for name, factory in registry.items()
    ]
    write_json(json_out, rows)
    if json_out == "-":
        return
    out = table("name", "plugin", "capabilities", "description")
    for r in rows:
        out.add_row(r["name"], r["plugin"], ", ".join(r["capabilities"]), r["description"])
    console().print(out)


@click.command()
@click.argument("groups", nargs=-1)
@json_option('the results ({"cases": [...]})')
@click.option("--runs", type=click.IntRange(1, 100), default=None, help="Runs per case (median is reported).")
@click.option("--case", "cases", multiple=True, help="Only these cases (repeatable).")
def bench(groups, json_out, runs, cases):
    """Run the benchmark GROUPS (all groups are listed when none is given)."""
    from memvisor.bench import run_case
    from memvisor.plugins import new_plugin_manager
    from memvisor.registry import GroupedRegistry, fill

    pm = new_plugin_manager(None, strict=False)
    registry = fill(pm.hook.memvisor_register_benchmarks, GroupedRegistry("benchmark"), pm)
    available = registry.groups()
    if not groups:
        for group, members in sorted(available.items()):
            click.echo(f"{group}: {', '.join(c.name for c in members)}")
        return
    selected = []
    for group in groups:
        if group not in available:
            raise UserError(f"no benchmark group {group!r} (groups: {', '.join(sorted(available)) or 'none'})")
        selected.extend(c for c in available[group] if not cases or c.name in cases)
    if cases and not selected:
        raise UserError(f"--case: no case named {cases[0]!r} in {', '.join(groups)}")
    progress = console(stderr=True)
    results = []
    for case in selected:
        if progress.is_terminal:
            progress.print(f"running {case.name} ...")
        results.append(run_case(case, runs))
    write_json(json_out, {"cases": results})
    if json_out == "-":
        return
    out = table("case", "metric", "value", "baseline", "ratio", "runs", "goal", numbers=("value", "ratio", "runs"))
    for r in results:
        base = r["baseline"]
        out.add_row(r["name"], f"{r['metric']} ({r['unit']})", f"{r['value']:.4g}",
                    f"{base['name']}: {base['value']:.4g}" if base else "-",
                    f"{r['ratio']:.3g}" if r["ratio"] is not None else "-", str(r["runs"]), r["goal"])
    console().print(out)


class ReportInput(InputFile):
    """A run's report: a folder holding report.json (what ``memvisor run --out`` writes), or
    the report.json file itself."""

    def __init__(self):
        super().__init__("report")

    def convert(self, value, param, ctx):
        from memvisor.compare import report_file

        return super().convert(str(report_file(value)) if value else value, param, ctx)


@click.command("compare")
@click.argument("reports", nargs=-1, required=True, type=ReportInput(), metavar="RUN_A RUN_B [RUN...]")
@click.option("--out", "out_dir", default=None, type=OutputDir(),
              help="Write compare.html (the figures side by side, the plots overlaid) and compare.json here.")
@json_option("every paired figure")
def compare_command(reports, out_dir, json_out):
    """Two runs (or more) of a scenario side by side: every headline figure of each run beside
    the first run's, the difference and whether it is better or worse; the settings that differ;
    with --out, a page with every plot overlaid. Each RUN is a report folder (memvisor run
    --out) or its report.json."""
    from memvisor import compare

    if len(reports) < 2:
        raise UserError("compare: give two reports or more (RUN_A RUN_B ...)")
    runs = compare.load_runs(reports)
    names = sorted({r.data["scenario"]["name"] for r in runs})
    rows = compare.compare(runs)
    if not rows:
        raise UserError(f"{reports[0]}: no headline figures to compare (reports of memvisor before its headlines; "
                        "run the scenarios again)")
    page = compare.write_page(runs, rows, out_dir) if out_dir else None
    write_json(json_out, compare.summary(runs, rows))
    if json_out == "-":
        return
    _compare_summary(runs, rows, names)
    if page is not None:
        console().print(f"page: {page}")


def _compare_summary(runs, rows, names: list[str]) -> None:
    """A table per section: each figure of each run, the differences from the first run."""
    from rich.markup import escape

    from memvisor.compare import difference_shown, differences
    from memvisor.units import shown

    out = console()
    if len(names) > 1:
        out.print(f"note: these are runs of different scenarios ({', '.join(map(escape, names))})")
    for d in differences(runs):
        out.print(f"{escape(d['setting'])}: " + ", ".join(f"{escape(r.label)} {escape(shown(v))}"
                                                        for r, v in zip(runs, d["values"])))
    colour = {"better": "green", "worse": "red"}
    labels = [r.label for r in runs]
    changes = [f"{label} - {labels[0]}" for label in labels[1:]]
    for section in dict.fromkeys(row["section"] for row in rows):
        rows_table = table("VM", "figure", *labels, *changes, title=section, numbers=(*labels, *changes))
        for row in (r for r in rows if r["section"] == section):
            cells = []
            for change in row["changes"]:
                text = escape(difference_shown(change, row["unit"]))
                direction = change["direction"]
                if direction in colour:
                    text = f"[{colour[direction]}]{text} {direction}[/{colour[direction]}]"
                cells.append(text)
            rows_table.add_row(escape(row["vm"] or "host"), escape(row["figure"]), *map(escape, row["shown"]), *cells)
        out.print(rows_table)


class CoreCommands:
    """Registers run, plugins, backends, bench and compare."""

    @hookimpl
    def memvisor_register_commands(self, cli):
        """Add the core's subcommands to ``memvisor``."""
        for command in (run, plugins, backends, bench, compare_command):
            cli.add_command(command)


PLUGIN = CoreCommands
