"""``memvisor qemu``: save, restore and migrate QEMU VMs through their migration stream."""

from __future__ import annotations

import json

import click

from memvisor.cli import InputFile, OutputFile, UnixSocket

QMP = UnixSocket("QMP socket")
DISK = InputFile("disk image")
KEY = InputFile("key file")
JSON = OutputFile("JSON file")


def _key(key_file):
    if key_file is None:
        return None
    from memvisor.checkpoint import load_key

    return load_key(key_file)


def _write_json(path, figures) -> None:
    if path:
        from memvisor.files import atomic_write

        atomic_write(path, json.dumps(figures, indent=2) + "\n")


@click.group("qemu")
def qemu():
    """Checkpoints, lazy restore and migration of real QEMU VMs (QEMU 7.2; docs/qemu.md)."""


@qemu.command("save")
@click.argument("out", type=OutputFile("checkpoint"))
@click.option("--qmp", required=True, type=QMP, help="QMP socket of the running QEMU.")
@click.option("--disk", default=None, type=DISK,
              help="The VM's disk image (read-only): pages equal to its blocks become disk references.")
@click.option("--live", is_flag=True, help="Keep the VM running while it is saved (pre-copy rounds).")
@click.option("--key-file", type=KEY, default=None, help="Add a keyed MAC (BLAKE2b).")
@click.option("--level", type=click.IntRange(-7, 22), default=1, show_default=True, help="zstd level.")
@click.option("--json", "json_out", type=JSON, default=None, help="Write the figures as JSON.")
def save_command(out, qmp, disk, live, key_file, level, json_out):
    """Save the VM of the QEMU at --qmp as memvisor checkpoint OUT."""
    from memvisor_qemu.save import save

    result = save(qmp, out, disk=disk, live=live, key=_key(key_file), level=level)
    _write_json(json_out, result.to_json())
    c = result.checkpoint
    click.echo(f"{out}: {result.pages:,} pages ({c['zero_pages']:,} zero, {c['record_pages']:,} disk references) "
               f"from QEMU {result.qemu} {result.machine}; stream {result.stream_bytes / 2**20:.1f} MiB -> "
               f"checkpoint {c['bytes_out'] / 2**20:.1f} MiB in {result.seconds:.2f} s"
               + (f"; {result.pages_resent:,} pages written during the save" if live else ""))


@qemu.command("restore")
@click.argument("checkpoint", type=InputFile("checkpoint"))
@click.option("--qmp", required=True, type=QMP, help="QMP socket of a QEMU started with -incoming defer.")
@click.option("--lazy", is_flag=True,
              help="Post-copy: the VM runs at once, pages come on request and in the background.")
@click.option("--disk", default=None, type=DISK, help="The disk image the checkpoint's disk references name.")
@click.option("--key-file", type=KEY, default=None, help="Refuse a checkpoint without this MAC.")
@click.option("--prefetch", type=click.Choice(["hot", "file"]), default="hot", show_default=True,
              help="Background order of a lazy restore: hottest first (the order sidecar) or file order.")
@click.option("--window-pages", type=click.IntRange(1, 1 << 16), default=512, show_default=True,
              help="Pages a lazy restore sends around each page QEMU asks for.")
@click.option("--json", "json_out", type=JSON, default=None, help="Write the figures as JSON.")
def restore_command(checkpoint, qmp, lazy, disk, key_file, prefetch, window_pages, json_out):
    """Restore CHECKPOINT into the QEMU at --qmp (eager, or --lazy)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from memvisor_qemu.restore import restore

    console = Console(stderr=True)
    columns = (TextColumn("pages sent to QEMU"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        sent = bar.add_task("restore")
        result = restore(checkpoint, qmp, lazy=lazy, disk=disk, key=_key(key_file), prefetch=prefetch,
                         window_pages=window_pages,
                         progress=lambda done, total: bar.update(sent, completed=done, total=total))
    figures = result.to_json()
    _write_json(json_out, figures)
    service = figures["request_service_ms"]
    click.echo(f"{checkpoint}: {result.method} restore of {result.pages:,} pages "
               f"({result.zero_pages_sent:,} zero) in {result.seconds:.2f} s, VM running after "
               f"{result.resumed_s * 1000:.0f} ms"
               + (f"; {result.requests:,} page requests, service p50 {service['p50']:.2f} ms, "
                  f"p99 {service['p99']:.2f} ms" if service else ""))


@qemu.command("migrate")
@click.option("--from", "source", required=True, type=QMP, help="QMP socket of the QEMU whose VM moves.")
@click.option("--to", "target", required=True, type=QMP, help="QMP socket of a QEMU started with -incoming defer.")
@click.option("--disk", default=None, type=DISK,
              help="The disk both share: pages equal to its blocks cross as references.")
@click.option("--json", "json_out", type=JSON, default=None, help="Write the figures as JSON.")
def migrate_command(source, target, disk, json_out):
    """Migrate the running VM of the QEMU at --from to the QEMU at --to through memvisor."""
    from memvisor.errors import UserError
    from memvisor.files import same_file
    from memvisor_qemu.migrate import migrate

    if same_file(source, target):
        raise UserError(f"--to {target}: the same QMP socket as --from; a VM migrates between two QEMUs")
    result = migrate(source, target, disk=disk)
    _write_json(json_out, result.to_json())
    click.echo(f"{source} -> {target}: {result.pages:,} pages in {result.rounds} rounds, {result.pages_sent:,} sent "
               f"({result.zero_pages:,} zero, {result.record_pages:,} disk references, {result.data_pages:,} data), "
               f"{result.pages_verified:,} verified on arrival; QEMU's stream {result.qemu_stream_bytes / 2**20:.1f} "
               f"MiB, memvisor's link {result.link_bytes / 2**20:.1f} MiB in {result.seconds:.2f} s, downtime "
               f"{result.downtime_ms} ms")
