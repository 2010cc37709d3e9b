"""Checkpoints in the core: the stop-the-world save and eager restore (``trylast`` defaults
that lazy-save and lazy-restore plugins override), the ``checkpoint`` and ``restore`` timeline
actions, the ``memvisor checkpoint`` command over raw memory images, and the report section."""

from __future__ import annotations

import click

from memvisor import PAGE_SIZE, hookimpl
from memvisor.cli import InputFile, OutputFile, Size, console, json_option, table, write_json
from memvisor.report import ReportSection
from memvisor.units import shown

# -- timeline actions ---------------------------------------------------------------------------


def _key(step):
    key_file = step.get("key_file", str, None)
    if key_file is None:
        return None
    from memvisor.builtins.checkpoint import load_key

    return load_key(key_file)


def _buffer(step) -> int:
    from memvisor.builtins.checkpoint.layout import MAX_BUFFER_BYTES

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
    from memvisor.builtins.checkpoint.layout import MAX_PAGE_BLOCK_BYTES
    from memvisor.builtins.checkpoint.writer import MIN_LEVEL
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


def _progress(label: str):
    from rich.progress import Progress

    err = console(stderr=True)
    progress = Progress(console=err, transient=True, disable=not err.is_terminal)
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
@json_option()
def save_command(image, out, block_pages, buffer_bytes, level, key_file, json_out):
    """Save a raw memory IMAGE as checkpoint OUT (stop-the-world)."""
    from memvisor.builtins.checkpoint import save_image
    from memvisor.files import image_pages

    image_pages(image)
    progress, update = _progress("saving")
    with progress:
        stats = save_image(image, out, progress=update, block_pages=block_pages, buffer_bytes=buffer_bytes,
                           level=level, key=key_file)
    write_json(json_out, stats.to_json())
    if json_out != "-":
        click.echo(f"{out}: {stats.pages:,} pages ({stats.zero_pages:,} zero), {shown(stats.bytes_in, 'bytes')} "
                   f"-> {shown(stats.bytes_out, 'bytes')} in {stats.write_calls:,} "
                   f"write{'' if stats.write_calls == 1 else 's'}, {shown(stats.seconds, 's')}")


@checkpoint_command.command("restore")
@click.argument("ckpt", type=InputFile("checkpoint"))
@click.argument("image", type=OutputFile("memory image"))
@click.option("--key-file", type=InputFile("key file"), default=None, help="Refuse a file without a valid MAC.")
@json_option()
def restore_command(ckpt, image, key_file, json_out):
    """Write checkpoint CKPT back as a raw memory IMAGE, byte for byte (eager)."""
    from memvisor.builtins.checkpoint import restore_image

    progress, update = _progress("restoring")
    with progress:
        stats = restore_image(ckpt, image, key=key_file, progress=update)
    write_json(json_out, stats.to_json())
    if json_out != "-":
        click.echo(f"{image}: {stats.pages:,} pages restored in {stats.read_calls:,} reads, "
                   f"{shown(stats.seconds, 's')}")


@checkpoint_command.command("inspect")
@click.argument("ckpt", type=InputFile("checkpoint"))
@click.option("--rows", type=click.IntRange(1, 10**9), default=20, show_default=True,
              help="Storage blocks and page-map runs listed at most, in the table and in --json (a checkpoint "
                   "may have millions of runs).")
@json_option("the header, the storage blocks and the page map")
def inspect_command(ckpt, rows, json_out):
    """Show a checkpoint's header, its storage blocks and its page map (which pages are data,
    zero or records, and the storage block of each run of data pages). Reads the file's
    metadata only; 'checkpoint verify' reads every block."""
    from memvisor.builtins.checkpoint import CheckpointReader

    with CheckpointReader(ckpt) as r:
        info = {"path": str(ckpt), "version": r.version, "page_size": r.page_size, "vm_pages": r.vm_pages,
                "codec": r.codec, "level": r.level, "block_pages": r.block_pages, "keyed": r.keyed,
                "contents": r.contents_model,
                "storage_blocks": r.storage_blocks, "page_blocks": r.page_blocks, "data_pages": r.data_pages,
                "zero_pages": r.zero_pages, "record_pages": r.record_pages, "record_kinds": list(r.record_kinds),
                "file_bytes": r.file_size}
        blocks, runs, names = r.storage_block_table(), r.page_map(), r.kind_names
    # The first --rows blocks and runs, and how many there are: a 64 MiB checkpoint may hold 4
    # million runs, which as JSON took 5.7 GiB of memory and 2 minutes.
    info["page_map_runs"] = len(runs["start"])
    info["storage_block_table"] = [{k: int(v[i]) for k, v in blocks.items()}
                                   for i in range(min(len(blocks["offset"]), rows))]
    info["page_map"] = [{"first": int(runs["start"][i]), "last": int(runs["end"][i]) - 1,
                         "kind": names[runs["kind"][i]],
                         "storage_block": int(runs["storage_block"][i]) if runs["storage_block"][i] >= 0 else None}
                        for i in range(min(info["page_map_runs"], rows))]
    write_json(json_out, info)
    if json_out != "-":
        _inspect_summary(info, rows)


def _inspect_summary(info: dict, rows: int) -> None:
    """The header in two lines, then the storage blocks and the page map (``rows`` at most)."""
    from rich.markup import escape

    out = console()
    missing = info["vm_pages"] - info["data_pages"] - info["zero_pages"] - info["record_pages"]
    out.print(f"{escape(info['path'])}: checkpoint format {info['version']}, {info['vm_pages']:,} pages of "
              f"{shown(info['page_size'], 'bytes')} ({shown(info['vm_pages'] * info['page_size'], 'bytes')}), "
              f"{info['codec']} level {info['level']}, {info['block_pages']} pages per page block, "
              f"{'keyed (MAC)' if info['keyed'] else 'no MAC'}, file {shown(info['file_bytes'], 'bytes')}")
    kinds = ", ".join(info["record_kinds"]) or "none"
    out.print(f"pages: {info['data_pages']:,} data in {info['page_blocks']:,} page blocks and "
              f"{info['storage_blocks']:,} storage blocks, {info['zero_pages']:,} zero, {info['record_pages']:,} "
              f"records (kinds: {escape(kinds)}), {missing:,} missing")
    blocks = table("storage block", "offset", "stored", "page blocks", "pages", title="Storage blocks",
                   numbers=("storage block", "offset", "stored", "page blocks", "pages"))
    for i, b in enumerate(info["storage_block_table"][:rows]):
        blocks.add_row(str(i), f"{b['offset']:,}", shown(b["stored_bytes"], "bytes"), f"{b['page_blocks']:,}",
                       f"{b['pages']:,}")
    out.print(blocks)
    _more(out, info["storage_blocks"], rows, "storage blocks")
    page_map = table("pages", "count", "kind", "storage block", title="Page map", numbers=("count", "storage block"))
    for run in info["page_map"][:rows]:
        span = f"{run['first']:,}" if run["first"] == run["last"] else f"{run['first']:,}-{run['last']:,}"
        block = "-" if run["storage_block"] is None else str(run["storage_block"])
        page_map.add_row(span, f"{run['last'] - run['first'] + 1:,}", escape(run["kind"]), block)
    out.print(page_map)
    _more(out, info["page_map_runs"], rows, "runs")


def _more(out, total: int, shown_rows: int, what: str) -> None:
    if total > shown_rows:
        out.print(f"... {total - shown_rows:,} more {what} (--rows N lists more)")


@checkpoint_command.command("verify")
@click.argument("ckpt", type=InputFile("checkpoint"))
@click.option("--key-file", type=InputFile("key file"), default=None, help="Check the keyed MAC too.")
def verify_command(ckpt, key_file):
    """Check every block of a checkpoint (checksums, sizes, MAC with --key-file)."""
    from memvisor.builtins.checkpoint import CheckpointReader

    with CheckpointReader(ckpt, key=key_file) as r:
        r.verify()
        click.echo(f"{ckpt}: ok ({r.storage_blocks} storage blocks, {r.vm_pages:,} pages"
                   f"{', MAC checked' if r.authenticated else ''})")


class CoreCheckpoints:
    """The core's checkpoint baselines, actions, command and report section."""

    @hookimpl(trylast=True)
    def memvisor_checkpoint_save(self, host, vm, request):
        """Stop-the-world save, unless a plugin took the save."""
        from memvisor.builtins.checkpoint.vm import stop_the_world_save

        return stop_the_world_save(host, vm, request)

    @hookimpl(trylast=True)
    def memvisor_checkpoint_restore(self, host, vm, request):
        """Eager restore, unless a plugin took the restore."""
        from memvisor.builtins.checkpoint.vm import eager_restore

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
                figures = {"name": Figure(at("checkpoint"), "text"),
                           "stop": Figure(at("stop_s"), "s", "lower", "VM stopped"),
                           "size": Figure(at("bytes_out"), "bytes", "lower", "file size")}
                headlines.append(Headline("checkpoint {name} saved stop-the-world: the VM stopped for {stop}, "
                                          "{size} written", figures, vm=job["vm"], key=f"save {job['checkpoint']}"))
            elif job["method"] == "eager":
                headlines.append(Headline("checkpoint {name} restored eagerly: the VM resumed after {resume}",
                                          {"name": Figure(at("checkpoint"), "text"),
                                           "resume": Figure(at("resume_s"), "s", "lower", "resumed after")},
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
