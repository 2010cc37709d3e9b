"""Live migration and memory errors in the core: the ``migrate`` and ``memory_error`` timeline
actions, the ``memvisor migrate`` command and the report section."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from memvisor import PAGE_SIZE, hookimpl
from memvisor.cli import InputFile, OutputDir, json_option
from memvisor.identity import rows_equal
from memvisor.report import ReportSection

# -- timeline actions ---------------------------------------------------------------------------


def _options(step):
    from memvisor.builtins.migration import MigrationOptions

    return MigrationOptions(
        max_rounds=step.integer("max_rounds", 30, low=1, high=1000),
        stop_pages=step.integer("stop_pages", 256, low=0, high=2**40), postcopy=step.get("postcopy", bool, False),
        records=step.get("records", bool, True), zero_pages=step.get("zero_pages", bool, True),
        level=step.integer("level", 1, low=-7, high=22) if step.get("compress", bool, True) else None)


def migrate(run, step):
    """``do = "migrate"``: live-migrate VM ``vm`` to a fresh destination host with the same
    configuration and plugins. Pre-copy rounds run while the guests keep running; then
    stop-and-copy, or with ``postcopy = true`` the destination resumes at once, runs the VM's
    workload for ``postcopy_for`` (default 10ms) pulling missing pages on fault, and pulls the
    rest. Options: ``max_rounds``, ``stop_pages``, ``records`` (let plugins describe pages),
    ``zero_pages``, ``compress``, ``level``, ``verify`` (default true: the destination's memory
    is compared with the source's at switch-over). The destination is discarded afterwards and
    the VM keeps running on the source: the step measures what the migration costs."""
    from memvisor.builtins.migration import LiveMigration
    from memvisor.host import Host

    vm = step.vm()
    options = _options(step)
    postcopy_for = step.span("postcopy_for", 0.01)
    verify = step.get("verify", bool, True)
    source = run.host
    destination = Host(source.config, list(run.scenario.plugins))
    migration = LiveMigration(source, vm, destination, options)
    try:
        record = _migrate(run, migration, options, postcopy_for, verify)
    finally:
        destination.stop()
    source.migrations.append(record)
    source.metrics.event(source.now, "migration", vm=vm.name, total_s=record["total_s"],
                         downtime_s=record["downtime_s"], bytes_sent=record["bytes_sent"])


def _migrate(run, migration, options, postcopy_for: float, verify: bool) -> dict:
    """Run ``migration`` (post-copy: the VM's workload on the destination for ``postcopy_for``)
    and return its figures, checked against the source at switch-over when ``verify``."""
    from memvisor.builtins.checkpoint.vm import make_present

    source, destination, vm = migration.source, migration.destination, migration.vm
    migration.run(lambda seconds: run.run_guests(seconds=seconds))
    snapshot = None
    if verify:
        make_present(source, vm)
        snapshot = source.backend.contents(vm, np.arange(vm.pages))
    destination.backend.take_dirty(migration.dest_vm)
    if options.postcopy:
        workload = run.workloads.get(vm.name)
        end = destination.now + postcopy_for
        while workload is not None and destination.now < end:
            batch = workload.next_batch(run.scenario.batch)
            if batch is None:
                break
            if hasattr(workload, "take_io"):
                workload.take_io()  # the destination's guest I/O is not modelled here
            result = destination.access(migration.dest_vm, batch[0], batch[1])
            destination.advance(result.seconds)
        migration.finish_postcopy()
    record = migration.result.to_json()
    if snapshot is not None:
        written = destination.backend.take_dirty(migration.dest_vm)
        make_present(destination, migration.dest_vm)
        same = rows_equal(destination.backend.contents(migration.dest_vm, np.arange(vm.pages)), snapshot)
        # Pages a guest driver took (balloon pages) hold nothing the guest reads: not compared.
        compared = ~written & ~source.guest_pinned(vm)
        record["verified"] = bool(same[compared].all())
        if not record["verified"]:
            differ = np.flatnonzero(compared & ~same)
            raise AssertionError(f"migration of VM {vm.name!r}: {len(differ)} pages of the destination differ "
                                 f"from the source at switch-over (first: {differ[:8].tolist()})")
    return record


def memory_error(run, step):
    """``do = "memory_error"``: an uncorrectable error flips ``bits`` (default 1) random bits in
    each of ``pages`` (default 16) random present pages of VM ``vm`` (``seed`` picks them).
    The flips are written with ``backend.write``, as the hardware would (no guest trap; a shared
    page gets a private copy first). Plugins repair what they can
    (:func:`memvisor_memory_error`); the others are reported to the guest as lost."""
    vm = step.vm()
    count = step.integer("pages", 16, low=0, high=vm.pages)
    bits = step.integer("bits", 1, low=1, high=PAGE_SIZE * 8)
    rng = np.random.default_rng(step.integer("seed", step.index, low=0, high=2**63 - 1))
    host = run.host
    present = np.flatnonzero(host.backend.present(vm))
    pages = np.sort(rng.choice(present, size=min(count, len(present)), replace=False))
    if not len(pages):
        return
    data = host.backend.read(vm, pages)
    for row in range(len(pages)):
        flips = rng.choice(PAGE_SIZE * 8, size=bits, replace=False)
        data[row, flips // 8] ^= (1 << (flips % 8)).astype(np.uint8)
    host.backend.write(vm, pages, data)
    host.memory_error(vm, pages)


# -- the command ----------------------------------------------------------------------------------


def _table(rows: list[dict]) -> None:
    from memvisor.cli import console, table
    from memvisor.units import shown

    numbers = ("rounds", "total", "downtime", "sent", "pages re-sent", "refused")
    out = table("VM", "method", "rounds", "total", "downtime", "sent", "pages re-sent", "records (pages by kind)",
                "refused", title="Live migrations", numbers=numbers)
    for r in rows:
        out.add_row(r["vm"], r["method"], str(r["rounds"]), shown(r["total_s"], "s"), shown(r["downtime_s"], "s"),
                    shown(r["bytes_sent"], "bytes"), f"{r['pages_resent']:,}",
                    ", ".join(f"{k}={v:,}" for k, v in r["records"].items()), str(r["refused"]))
    console().print(out)


def describing_plugins() -> list[str]:
    """Installed plugins that describe pages more cheaply than by their bytes
    (:func:`memvisor_describe_pages`): those that can send an image's pages as references to
    its disk."""
    from memvisor.plugins import hooks_of, installed_plugins, new_plugin_manager

    pm = new_plugin_manager(None, strict=False)
    return [p.name for p in installed_plugins() if p.error is None and pm.get_plugin(p.name) is not None
            and "memvisor_describe_pages" in hooks_of(pm, pm.get_plugin(p.name))]


def migrate_image(image: str, disk: str | None, plugins: list[str], settings: dict, options) -> dict:
    """Migrate a raw memory image (a VM that does not run) with its raw disk image attached
    read-only; returns the migration's figures, with ``describers``: the plugins enabled because
    they describe pages (:func:`describing_plugins`: naming a disk asks for references to it)."""
    from memvisor.builtins.migration import LiveMigration
    from memvisor.errors import UserError
    from memvisor.files import image_pages
    from memvisor.host import Host, HostConfig
    from memvisor.limits import format_bytes, machine_memory

    describers = [name for name in describing_plugins() if name not in plugins] if disk and options.records else []
    plugins = [*plugins, *describers]
    path = Path(image)
    pages = image_pages(path)
    host_bytes = (pages + 1024) * PAGE_SIZE
    if 2 * host_bytes > machine_memory():  # the source and the destination each hold the image
        raise UserError(f"{image}: migrating it takes two hosts of {format_bytes(host_bytes)}, more than this "
                        f"machine's memory ({format_bytes(machine_memory())})")
    config = HostConfig(memory_pages=pages + 1024, plugin_settings=settings)
    try:
        source, destination = Host(config, plugins), Host(config, plugins)
    except UserError as exc:
        raise UserError(f"--plugin/--set: {exc}") from None
    vm = source.create_vm("image", pages)
    memory = np.memmap(path, dtype=np.uint8, mode="r", shape=(pages, PAGE_SIZE))
    for start in range(0, pages, 16384):
        gpps = np.arange(start, min(pages, start + 16384), dtype=np.int64)
        source.backend.write(vm, gpps, memory[gpps])
    if disk:
        source.attach_disk(vm, disk, writable=False)
    migration = LiveMigration(source, vm, destination, options)
    migration.run()
    if options.postcopy:
        migration.finish_postcopy()
    return {**migration.result.to_json(), "describers": describers}


def _settings(pairs: tuple[str, ...]) -> dict:
    from memvisor.errors import UserError

    out: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        plugin, dot, name = key.partition(".")
        if not sep or not dot or not plugin or not name:
            raise UserError(f"--set {pair!r}: expected PLUGIN.KEY=VALUE")
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            parsed = value
        out.setdefault(plugin, {})[name] = parsed
    return out


@click.command("migrate")
@click.argument("scenario", required=False, type=InputFile("scenario file"))
@click.option("--image", default=None, type=InputFile("memory image"), help="Migrate a raw memory image instead.")
@click.option("--disk", default=None, type=InputFile("disk image"), help="The raw disk image of --image.")
@click.option("--plugin", "plugins", multiple=True, help="Enable a plugin for --image (repeatable).")
@click.option("--set", "settings", multiple=True, help="A plugin setting for --image: PLUGIN.KEY=VALUE.")
@click.option("--postcopy", is_flag=True, help="--image: switch over at once and pull the rest.")
@click.option("--no-records", is_flag=True, help="--image: do not let plugins describe pages.")
@json_option()
@click.option("--out", "out_dir", default=None, type=OutputDir(), help="Write the report here.")
def migrate_command(scenario, image, disk, plugins, settings, postcopy, no_records, json_out, out_dir):
    """Run a migration SCENARIO and print its migrations, or migrate a raw memory --image
    with its --disk image: {"bytes_sent": B, "records": {KIND: pages}, ...}."""
    from memvisor.builtins.migration import MigrationOptions
    from memvisor.cli import write_json
    from memvisor.errors import UserError

    if (scenario is None) == (image is None):
        raise UserError("give a SCENARIO or --image IMAGE (one of them)")
    if image is None and (disk or plugins or settings or postcopy or no_records):
        raise UserError("--disk, --plugin, --set, --postcopy and --no-records go with --image (a scenario has its own)")
    if image is not None:
        options = MigrationOptions(postcopy=postcopy, records=not no_records)
        figures = migrate_image(image, disk, list(plugins), _settings(settings), options)
        if disk and not no_records and not figures["describers"] and not plugins:
            click.echo(f"memvisor migrate: --disk {disk}: no installed plugin describes pages (memvisor plugins "
                       f"--hook memvisor_describe_pages lists them); every page was sent as data", err=True)
        write_json(json_out, figures)
        if json_out == "-":
            return
        if disk and figures["describers"]:
            click.echo(f"pages that may equal blocks of {disk}: described by plugin(s) "
                       f"{', '.join(figures['describers'])}; records by kind below")
        _table([figures])
        return
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import load_scenario

    scenario_run = ScenarioRun(load_scenario(scenario))
    report = scenario_run.run()
    rows = scenario_run.host.migrations
    if out_dir:
        report.write(out_dir)
    if not rows:
        raise UserError(f"{scenario}: the timeline has no migrate step")
    write_json(json_out, {"migrations": rows})
    if json_out != "-":
        _table(rows)


class CoreMigration:
    """The core's live migration and memory-error actions, command and report section."""

    @hookimpl
    def memvisor_register_actions(self, register):
        """migrate and memory_error."""
        register("migrate", migrate)
        register("memory_error", memory_error)

    @hookimpl
    def memvisor_register_commands(self, cli):
        """memvisor migrate."""
        cli.add_command(migrate_command)

    @hookimpl
    def memvisor_report(self, host):
        """One section with every migration and memory error of the run."""
        if not host.migrations and not host.memory_errors:
            return None
        errors = [{**e, "pages_hit": len(e["pages"]), "pages_repaired": len(e["repaired"]),
                   "pages_lost": len(e["lost"])} for e in host.memory_errors]
        metrics = {
            "migrations": list(host.migrations),
            "memory_error_pages": sum(e["pages_hit"] for e in errors),
            "memory_error_repaired": sum(e["pages_repaired"] for e in errors),
            "memory_error_lost": sum(e["pages_lost"] for e in errors),
            "memory_errors": errors,
        }
        return ReportSection("memvisor", "Live migrations and memory errors", metrics,
                             headlines=_headlines(metrics), tables=_tables(metrics),
                             text="Each migration: total time, downtime, bytes and pages by record kind, rounds. "
                                  "Memory errors: pages hit, repaired by a plugin, and lost (reported to the guest).")


def _headlines(metrics: dict) -> list:
    from memvisor.report import Figure, Headline

    out = []
    for i, m in enumerate(metrics["migrations"]):
        figures = {"method": Figure(("migrations", i, "method"), "text"),
                   "total": Figure(("migrations", i, "total_s"), "s", "lower"),
                   "downtime": Figure(("migrations", i, "downtime_s"), "s", "lower"),
                   "sent": Figure(("migrations", i, "bytes_sent"), "bytes", "lower")}
        text = "migrated live ({method}) in {total} with {downtime} of downtime, sending {sent}"
        if "verified" in m:
            figures["verified"] = Figure(("migrations", i, "verified"), "text")
            text += "; the destination checked equal: {verified}"
        out.append(Headline(text, figures, vm=m["vm"], key="migration"))
    if metrics["memory_errors"]:
        out.append(Headline("memory errors hit {hit} pages: {repaired} repaired, {lost} reported lost to the guest",
                            {"hit": Figure(("memory_error_pages",), "count"),
                             "repaired": Figure(("memory_error_repaired",), "count", "higher"),
                             "lost": Figure(("memory_error_lost",), "count", "lower")}, key="memory errors"))
    return out


def _tables(metrics: dict) -> list:
    from memvisor.report import Column, Table

    kinds = sorted({k for m in metrics["migrations"] for k in m.get("bytes_by_kind", {})})
    return [
        Table("Live migrations", [
            Column("vm", "VM", "text"), Column("method", "method", "text"), Column("started", "started", "s"),
            Column("total_s", "total", "s"), Column("downtime_s", "downtime", "s"), Column("rounds", "rounds", "count"),
            Column("pages_sent", "pages sent", "count"), Column("pages_resent", "pages re-sent", "count"),
            Column("bytes_sent", "sent", "bytes"), Column("refused", "records refused", "count"),
            Column("fallbacks", "fallbacks", "count"), Column("postcopy_faults", "post-copy faults", "count"),
            Column("postcopy_background", "post-copy background pages", "count"),
            Column("verified", "destination checked equal", "text", "not checked")], rows=("migrations",), keys=()),
        Table("Bytes sent by record kind", [Column("vm", "VM", "text")] + [
            Column(("bytes_by_kind", k), k, "bytes") for k in kinds], rows=("migrations",), keys=()),
        Table("Memory errors", [
            Column("vm", "VM", "text"), Column("time", "time", "s"), Column("pages_hit", "pages hit", "count"),
            Column("pages_repaired", "repaired", "count"), Column("pages_lost", "lost", "count")],
            rows=("memory_errors",), keys=()),
    ]


PLUGIN = CoreMigration
