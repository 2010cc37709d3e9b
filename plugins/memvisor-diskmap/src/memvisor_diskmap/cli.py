"""``memvisor diskmap scan``: how many pages of a raw memory image are identical to a 4 KiB
block of a raw disk image."""

from __future__ import annotations

import click

from memvisor.cli import InputFile, json_option, write_json
from memvisor.units import shown


@click.group("diskmap")
def diskmap():
    """Guest pages identical to disk blocks."""


@diskmap.command("scan")
@click.argument("image", type=InputFile("memory image"))
@click.option("--disk", "disk", required=True, type=InputFile("disk image"), help="The raw disk image.")
@json_option()
def scan(image, disk, json_out):
    """Count the pages of a raw memory IMAGE identical to a 4 KiB-aligned block of --disk
    (zero pages counted apart): {"pages", "disk_blocks", "pages_on_disk", "zero_pages", "seconds"}."""
    from memvisor.files import image_pages
    from memvisor_diskmap.index import scan_image

    image_pages(image)  # a memory image is whole pages: never silently cut
    result = scan_image(image, disk)
    write_json(json_out, result.to_json())
    if json_out == "-":
        return
    nonzero = result.pages - result.zero_pages
    share = result.pages_on_disk / nonzero if nonzero else 0.0
    rate = f", {shown(result.pages * 4096 / result.seconds, 'bytes/s')}" if result.seconds else ""
    click.echo(f"{image}: {result.pages:,} pages, {result.zero_pages:,} zero, {result.pages_on_disk:,} on disk "
               f"({shown(share, 'fraction')} of non-zero pages) against {result.disk_blocks:,} blocks; "
               f"{shown(result.seconds, 's')}{rate}, index {shown(result.index_seconds, 's')}")
