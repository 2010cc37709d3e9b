"""``memvisor qemu``: save, restore and migrate QEMU VMs through their migration stream."""

from __future__ import annotations

import click

from memvisor.cli import InputFile, OutputFile, UnixSocket, json_option, write_json
from memvisor.units import shown

QMP = UnixSocket("QMP socket")
DISK = InputFile("disk image")
KEY = InputFile("key file")


def _key(key_file):
    if key_file is None:
        return None
    from memvisor.builtins.checkpoint import load_key

    return load_key(key_file)


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
@json_option()
def save_command(out, qmp, disk, live, key_file, level, json_out):
    """Save the VM of the QEMU at --qmp as memvisor checkpoint OUT."""
    from memvisor_qemu.save import save

    result = save(qmp, out, disk=disk, live=live, key=_key(key_file), level=level)
    write_json(json_out, result.to_json())
    if json_out == "-":
        return
    c = result.checkpoint
    click.echo(f"{out}: {result.pages:,} pages ({c['zero_pages']:,} zero, {c['record_pages']:,} disk references) "
               f"from QEMU {result.qemu} {result.machine}; stream {shown(result.stream_bytes, 'bytes')} -> "
               f"checkpoint {shown(c['bytes_out'], 'bytes')} in {shown(result.seconds, 's')}"
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
@json_option()
def restore_command(checkpoint, qmp, lazy, disk, key_file, prefetch, window_pages, json_out):
    """Restore CHECKPOINT into the QEMU at --qmp (eager, or --lazy)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from memvisor.cli import console as make_console
    from memvisor_qemu.restore import restore

    console = make_console(stderr=True)
    columns = (TextColumn("pages sent to QEMU"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        sent = bar.add_task("restore")
        result = restore(checkpoint, qmp, lazy=lazy, disk=disk, key=_key(key_file), prefetch=prefetch,
                         window_pages=window_pages,
                         progress=lambda done, total: bar.update(sent, completed=done, total=total))
    figures = result.to_json()
    write_json(json_out, figures)
    if json_out == "-":
        return
    service = figures["request_service_ms"]
    click.echo(f"{checkpoint}: {result.method} restore of {result.pages:,} pages "
               f"({result.zero_pages_sent:,} zero) in {shown(result.seconds, 's')}, VM running after "
               f"{shown(result.resumed_s, 's')}"
               + (f"; {result.requests:,} page requests, service p50 {shown(service['p50'] / 1000, 's')}, "
                  f"p99 {shown(service['p99'] / 1000, 's')}" if service else ""))


@qemu.command("migrate")
@click.option("--from", "source", required=True, type=QMP, help="QMP socket of the QEMU whose VM moves.")
@click.option("--to", "target", required=True, type=QMP, help="QMP socket of a QEMU started with -incoming defer.")
@click.option("--disk", default=None, type=DISK,
              help="The disk both share: pages equal to its blocks cross as references.")
@json_option()
def migrate_command(source, target, disk, json_out):
    """Migrate the running VM of the QEMU at --from to the QEMU at --to through memvisor."""
    from memvisor.errors import UserError
    from memvisor.files import same_file
    from memvisor_qemu.migrate import migrate

    if same_file(source, target):
        raise UserError(f"--to {target}: the same QMP socket as --from; a VM migrates between two QEMUs")
    result = migrate(source, target, disk=disk)
    write_json(json_out, result.to_json())
    if json_out == "-":
        return
    downtime = None if result.downtime_ms is None else result.downtime_ms / 1000  # a dash when QEMU said none
    click.echo(f"{source} -> {target}: {result.pages:,} pages in {result.rounds} rounds, {result.pages_sent:,} sent "
               f"({result.zero_pages:,} zero, {result.record_pages:,} disk references, {result.data_pages:,} data), "
               f"{result.pages_verified:,} verified on arrival; QEMU's stream "
               f"{shown(result.qemu_stream_bytes, 'bytes')}, memvisor's link {shown(result.link_bytes, 'bytes')} in "
               f"{shown(result.seconds, 's')}, downtime {shown(downtime, 's')}")
