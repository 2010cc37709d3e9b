"""Checkpoints in the core: the stop-the-world save and eager restore (``trylast`` defaults
that lazy-save and lazy-restore plugins override), the ``checkpoint`` and ``restore`` timeline
actions, the ``memvisor checkpoint`` command over raw memory images, and the report section."""

from __future__ import annotations

import json

import click

from memvisor import PAGE_SIZE, hookimpl
from memvisor.cli import InputFile, OutputFile, Size
from memvisor.report import ReportSection

# -- timeline actions ---------------------------------------------------------------------------


def _key(step):
    key_file = step.get("key_file", str, None)
    if key_file is None:
        return None
    from memvisor.checkpoint import load_key

    return load_key(key_file)


def _buffer(step) -> int:
    from memvisor.checkpoint.layout import MAX_BUFFER_BYTES

    size = step.size("buffer", 4 << 20)
    if not 1 <= size <= MAX_BUFFER_BYTES:
        raise step.error("buffer", f"must be from 1 byte to {MAX_BUFFER_BYTES >> 20} MiB, got {step.data['buffer']!r}")
    return size


def checkpoint(run, step):
    """``do = "checkpoint"``: save VM ``vm`` as checkpoint ``name`` (kept in the run's work
    folder; a name is letters, digits, ``.``, ``_`` and ``-``); ``lazy`` (default: whatever
    the enabled plugins do) asks for a lazy or a stop-the-world save. A lazy save runs
    alongside the guests: the step runs the guests until it is done. ``block_pages`` (1 to
    8192), ``buffer`` (a size, at most 256 MiB) and ``level`` (zstd, -7 to 22) tune the
    file."""
    from memvisor.checkpoint.layout import MAX_PAGE_BLOCK_BYTES
    from memvisor.checkpoint.writer import MIN_LEVEL
    from memvisor.events import SaveRequest
    from memvisor.files import path_inside

    vm = step.vm()
    name = step.name("name", f"{vm.name}-{step.index}")
    request = SaveRequest(
        str(path_inside(run.workdir, name, ".ckpt")), lazy=step.get("lazy", bool, None),
        block_pages=step.integer("block_pages", 64, low=1, high=MAX_PAGE_BLOCK_BYTES // PAGE_SIZE),
        buffer_bytes=_buffer(step), level=step.integer("level", 1, low=MIN_LEVEL, high=22), key=_key(step),
        time=run.host.now)
    job = run.host.save_checkpoint(vm, request)
    run.checkpoints[name] = request.path
    limit = run.host.now + step.duration("timeout", 600.0)
    while not job.done and job.error is None:  # a lazy save: the guests keep running meanwhile
        if run.host.now >= limit:
            raise step.error("timeout", f"checkpoint {name!r} did not finish in time")
        run.run_guests(seconds=run.host.tick_interval)
    if job.error is not None:
        run.checkpoints.pop(name, None)
        raise step.error("name", f"checkpoint {name!r} failed: {job.error}")


def restore(run, step):
    """``do = "restore"``: replace VM ``vm``'s memory with checkpoint ``name`` (taken earlier
    in the run); ``lazy`` asks for a lazy or an eager restore."""
    from memvisor.events import RestoreRequest

    vm = step.vm()
    name = step.get("name", str)
    if name not in run.checkpoints:
        raise step.error("name", f"no checkpoint named {name[:60]!r} was taken before this step")
    request = RestoreRequest(run.checkpoints[name], lazy=step.get("lazy", bool, None), key=_key(step),
                             time=run.host.now)
    run.host.restore_checkpoint(vm, request)


# -- the command ----------------------------------------------------------------------------------


def _write_json(path, stats) -> None:
    if path:
        from memvisor.files import atomic_write

        atomic_write(path, json.dumps(stats.to_json(), indent=2) + "\n")


def _progress(label: str):
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    progress = Progress(console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task(label, total=None)
    return progress, lambda done, total: progress.update(task, completed=done, total=total)


@click.group("checkpoint")
def checkpoint_command():
    """Checkpoints of raw guest-memory images (Firecracker memory snapshots, QEMU pmemsave dumps)."""


@checkpoint_command.command("save")
@click.argument("image", type=InputFile("memory image"))
@click.argument("out", type=OutputFile("checkpoint"))
@click.option("--block-pages", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Pages per page block (unit of compression and of lazy restore).")
@click.option("--buffer", "buffer_bytes", type=Size(1, 256 << 20), default="4MiB", show_default=True,
              help="Staging buffer (binary units, at most 256MiB): one storage block is written per full buffer.")
@click.option("--level", type=click.IntRange(-7, 22), default=1, show_default=True, help="zstd level.")
@click.option("--key-file", type=InputFile("key file"), default=None, help="Add a keyed MAC (BLAKE2b).")
@click.option("--json", "json_out", type=OutputFile("JSON file"), default=None, help="Write the figures as JSON.")
def save_command(image, out, block_pages, buffer_bytes, level, key_file, json_out):
    """Save a raw memory IMAGE as checkpoint OUT (stop-the-world)."""
    from memvisor.checkpoint import save_image
    from memvisor.files import image_pages

    image_pages(image)
    progress, update = _progress("saving")
    with progress:
        stats = save_image(image, out, progress=update, block_pages=block_pages, buffer_bytes=buffer_bytes,
                           level=level, key=key_file)
    _write_json(json_out, stats)
    click.echo(f"{out}: {stats.pages:,} pages ({stats.zero_pages:,} zero), {stats.bytes_in / 2**20:.1f} MiB "
               f"-> {stats.bytes_out / 2**20:.1f} MiB in {stats.write_calls} writes, {stats.seconds:.2f} s")


@checkpoint_command.command("restore")
@click.argument("ckpt", type=InputFile("checkpoint"))
@click.argument("image", type=OutputFile("memory image"))
@click.option("--key-file", type=InputFile("key file"), default=None, help="Refuse a file without a valid MAC.")
@click.option("--json", "json_out", type=OutputFile("JSON file"), default=None, help="Write the figures as JSON.")
def restore_command(ckpt, image, key_file, json_out):
    """Write checkpoint CKPT back as a raw memory IMAGE, byte for byte (eager)."""
    from memvisor.checkpoint import restore_image

    progress, update = _progress("restoring")
    with progress:
        stats = restore_image(ckpt, image, key=key_file, progress=update)
    _write_json(json_out, stats)
    click.echo(f"{image}: {stats.pages:,} pages restored in {stats.read_calls} reads, {stats.seconds:.2f} s")


@checkpoint_command.command("inspect")
@click.argument("ckpt", type=InputFile("checkpoint"))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_command(ckpt, as_json):
    """Show a checkpoint's header, blocks and page map."""
    from memvisor.checkpoint import CheckpointReader

    with CheckpointReader(ckpt) as r:
        info = {"path": str(ckpt), "version": r.version, "page_size": r.page_size, "vm_pages": r.vm_pages,
                "codec": r.codec, "level": r.level, "block_pages": r.block_pages, "keyed": r.keyed,
                "storage_blocks": r.storage_blocks, "page_blocks": r.page_blocks, "data_pages": r.data_pages,
                "zero_pages": r.zero_pages, "record_pages": r.record_pages, "record_kinds": list(r.record_kinds),
                "file_bytes": r.file_size}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            click.echo(f"{key:>15}: {value}")


@checkpoint_command.command("verify")
@click.argument("ckpt", type=InputFile("checkpoint"))
@click.option("--key-file", type=InputFile("key file"), default=None, help="Check the keyed MAC too.")
def verify_command(ckpt, key_file):
    """Check every block of a checkpoint (checksums, sizes, MAC with --key-file)."""
    from memvisor.checkpoint import CheckpointReader

    with CheckpointReader(ckpt, key=key_file) as r:
        r.verify()
        click.echo(f"{ckpt}: ok ({r.storage_blocks} storage blocks, {r.vm_pages:,} pages"
                   f"{', MAC checked' if r.authenticated else ''})")


class CoreCheckpoints:
    """The core's checkpoint baselines, actions, command and report section."""

    @hookimpl(trylast=True)
    def memvisor_checkpoint_save(self, host, vm, request):
        """Stop-the-world save, unless a plugin took the save."""
        from memvisor.checkpoint.vm import stop_the_world_save

        return stop_the_world_save(host, vm, request)

    @hookimpl(trylast=True)
    def memvisor_checkpoint_restore(self, host, vm, request):
        """Eager restore, unless a plugin took the restore."""
        from memvisor.checkpoint.vm import eager_restore

        return eager_restore(host, vm, request)

    @hookimpl
    def memvisor_register_actions(self, register):
        """checkpoint and restore."""
        register("checkpoint", checkpoint)
        register("restore", restore)

    @hookimpl
    def memvisor_register_commands(self, cli):
        """memvisor checkpoint save | restore | inspect | verify."""
        cli.add_command(checkpoint_command)

    @hookimpl
    def memvisor_report(self, host):
        """One section listing every checkpoint save and restore of the run, one row each;
        headlines for the core's own methods (a plugin's section has its jobs' details)."""
        if not host.checkpoint_jobs:
            return None
        from memvisor.report import Column, Figure, Headline, Table

        jobs = [job.to_json() for job in host.checkpoint_jobs]
        headlines = []
        for i, job in enumerate(jobs):
            def at(key: str, i: int = i) -> tuple:
                return ("jobs", i, key)

            if job["method"] == "stop-the-world" and job["total_s"] is not None:
                headlines.append(Headline("checkpoint {name} saved stop-the-world: the VM stopped for {stop}, "
                                          "{size} written", {"name": Figure(at("checkpoint"), "text"),
                                                            "stop": Figure(at("stop_s"), "s", "lower"),
                                                            "size": Figure(at("bytes_out"), "bytes", "lower")},
                                          vm=job["vm"], key=f"save {job['checkpoint']}"))
            elif job["method"] == "eager":
                headlines.append(Headline("checkpoint {name} restored eagerly: the VM resumed after {resume}",
                                          {"name": Figure(at("checkpoint"), "text"),
                                           "resume": Figure(at("resume_s"), "s", "lower")},
                                          vm=job["vm"], key=f"restore {job['checkpoint']}"))
        table = Table("Saves and restores", [
            Column("vm", "VM", "text"), Column("kind", "job", "text"), Column("checkpoint", "checkpoint", "text"),
            Column("method", "method", "text"), Column("started_s", "started", "s"),
            Column("stop_s", "VM stopped", "s", "a restore", help="how long the VM was stopped for the save"),
            Column("resume_s", "resumed after", "s", "a save", help="time until the restored VM ran again"),
            Column("first_access_s", "first access after", "s", "a save",
                   help="time until the restored VM's first access was served"),
            Column("total_s", "saved after", "s", "a restore, or a save still running"),
            Column("bytes_out", "file", "bytes", "a restore"), Column("bytes_read", "read", "bytes", "a save")],
            rows=("jobs",), keys=())
        return ReportSection("memvisor", "Checkpoints", {"jobs": jobs}, headlines=headlines, tables=[table],
                             text="Every save and restore of the run, whichever method took it: a plugin's "
                                  "section has the details of its own (lazy) jobs. A null figure is one the "
                                  "job does not have (a save's resume time).")


PLUGIN = CoreCheckpoints
