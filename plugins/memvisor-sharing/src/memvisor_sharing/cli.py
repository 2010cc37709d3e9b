"""``memvisor sharing``: the estimate over real memory, from the command line."""

from __future__ import annotations

import click

from memvisor import PAGE_SIZE
from memvisor.cli import InputFile, Size, json_option, write_json
from memvisor.errors import UserError

PROGRESS_BYTES = 256 << 20
"""Inputs at least this large get a progress bar (on a terminal)."""


def _large_page_bytes(size: int) -> int:
    if size % PAGE_SIZE:
        raise UserError(f"--large-page: {size:,} bytes is not a multiple of {PAGE_SIZE} bytes")
    return size


@click.group()
def sharing() -> None:
    """Page sharing: what it could reclaim on real memory."""


@sharing.command()
@click.argument("images", nargs=-1, type=InputFile("memory image"))
@click.option("--pid", "pids", type=click.IntRange(1, 2**22), multiple=True,
              help="Also read this live process's resident memory (read-only; repeatable).")
@click.option("--large-page", type=Size(PAGE_SIZE, 1 << 30), default="2MiB", show_default=True,
              help="Large-page size for the per-region figures (a size as in scenarios: 2MiB, 1GiB).")
@click.option("--across", is_flag=True, help="Share across images and processes (default: within each only; "
                                              "zero pages are shared across always).")
@json_option()
def estimate(images, pids, large_page, across, json_out):
    """Estimate the memory that page sharing would reclaim in raw memory IMAGES (QEMU pmemsave
    dumps, Firecracker memory files) and/or live processes (--pid)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from memvisor_sharing.estimate import estimate as run_estimate
    from memvisor_sharing.sources import ImageSource, ProcessSource

    if not images and not pids:
        raise UserError("sharing estimate: give at least one IMAGE or --pid")
    size = _large_page_bytes(large_page)
    sources = [ImageSource(path, size) for path in images] + [ProcessSource(pid, size) for pid in pids]
    total = sum(s.nbytes for s in sources)
    console = Console(stderr=True)
    try:
        with Progress(TextColumn("[bold]hashing"), BarColumn(), DownloadColumn(binary_units=True),
                      TransferSpeedColumn(), console=console, transient=True,
                      disable=not console.is_terminal or total < PROGRESS_BYTES) as progress:
            task = progress.add_task("hashing", total=total)
            result = run_estimate(sources, across=across, progress=lambda n: progress.advance(task, n))
    finally:
        for source in sources:
            if hasattr(source, "close"):
                source.close()
    write_json(json_out, result)
    if json_out != "-":
        _summary(result)


def _summary(r: dict) -> None:
    from memvisor.cli import console, table
    from memvisor.units import shown

    out = table("figure", "pages", "size", title="sharing estimate", numbers=("pages", "size"))
    for key in ("pages", "zero_pages", "duplicate_pages", "reclaimable_pages"):
        out.add_row(key.replace("_", " "), f"{r[key]:,}", shown(r[key], "pages"))
    out.add_row("large pages", f"{r['large_pages']:,}", "–")  # counts of large pages: no size of their own here
    out.add_row("large pages with opportunity", f"{r['large_pages_with_opportunity']:,}", "–")
    terminal = console()
    terminal.print(out)
    pages = r["pages"] or 1
    rate = shown(r["pages"] * PAGE_SIZE / max(r["seconds"], 1e-9), "bytes/s")
    terminal.print(f"sharing would reclaim {shown(r['reclaimable_pages'] / pages, 'fraction')} of the memory "
                   f"({shown(r['seconds'], 's')}, {rate})")
