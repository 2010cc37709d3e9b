"""Write the hostile inputs of docs/reliability.md ("Hostile input") and measure the two that
live inside one process.

    python tools/hostile_inputs.py DIR

writes into DIR:

- ``bomb.csv.zst``: 90 KB of zstd that is 1 GiB of csv (``0`` lines): ``memvisor mrc`` on it;
- ``zero4m.ckpt``: a checkpoint of 4 million one-page zero ranges (64 MB of legal metadata),
  and ``sections.ckpt``: 4 million empty optional sections: ``memvisor checkpoint inspect``;

and prints, measured here:

- the peak RSS of a live migration whose first page record is replaced by one (valid checksum,
  the same pages and sequence number) whose zstd frame declares 1 GiB, and the outcome;
- how 300 migrations end over a link that delivers one earlier intact record again in place of
  another (``memvisor.testing.fuzz.check_link``'s replay; on a build without destination
  verification some end "migrated" with pages that differ).

Measure the files with ``/usr/bin/time -f "%e s, %M KiB"``; the figures in the docs came from
that and this script on the development machine.
"""

from __future__ import annotations

import os
import random
import resource
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import zstandard


def csv_bomb(path: Path, mib: int = 1024) -> None:
    writer = zstandard.ZstdCompressor(level=19).compressobj()
    path.write_bytes(b"".join([writer.compress(b"0\n" * (1 << 19)) for _ in range(mib)] + [writer.flush()]))


def metadata_checkpoint(path: Path, kind: str, n: int = 4_000_000) -> None:
    from memvisor.builtins.checkpoint import layout as L

    file_id = os.urandom(16)
    header = L.pack_header(flags=0, page_size=4096, vm_pages=2 * n + 1, codec=1, level=1, checksum_size=16,
                           block_pages=64, file_id=file_id)
    empty = np.empty(0, L.RANGE_DTYPE)
    zero = empty
    if kind == "zero":
        zero = np.empty(n, L.RANGE_DTYPE)
        zero["start"], zero["count"] = np.arange(n) * 2, 1
    meta = L.pack_metadata(np.empty(0, L.SBLOCK_DTYPE), np.empty(0, L.PBLOCK_DTYPE), empty, zero)
    if kind == "sections":  # distinct tags: one tag twice is refused as a duplicate at once
        meta += b"".join(L.SECTION.pack(b"x" + i.to_bytes(3, "big"), 0, 0) for i in range(n))
    trailer = L.pack_trailer(header=header, meta=meta, meta_offset=L.HEADER_SIZE, file_id=file_id, key64=None)
    path.write_bytes(header + meta + trailer)


def record_bomb(declared: int = 1 << 30) -> str:
    from memvisor.builtins.migration import Link, LiveMigration, MigrationOptions, stream
    from memvisor.testing import small_host

    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(declared))
    replaced = []

    def link(index, wire):
        record = stream.decode(wire)
        if record.kind == "page" and not replaced:
            replaced.append(index)
            return stream.encode("page", record.gpps, bomb, record.seq)
        return wire

    source, destination = small_host(memory_pages=1024), small_host(memory_pages=1024)
    vm = source.create_vm("m", 128)
    source.backend.write(vm, np.arange(16), np.full((16, 4096), 7, np.uint8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        LiveMigration(source, vm, destination, MigrationOptions(zero_pages=False), link=Link(link)).run()
        outcome = "migrated (the bomb refused, asked for again)"
    except Exception as exc:  # noqa: BLE001 - the figure is the outcome, whatever it is
        outcome = f"{type(exc).__name__}: {exc}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (f"a {len(bomb):,}-byte page record declaring {declared >> 20} MiB: peak RSS {peak >> 10} MiB "
            f"(before the migration {before >> 10} MiB): {outcome}")


def replays(runs: int = 300) -> Counter:
    from memvisor.testing import fuzz

    outcomes = Counter()
    for run in range(runs):
        rng = random.Random(run)
        at = rng.randrange(1, 12)
        try:
            outcomes[fuzz.check_link({at: ("replay", rng.randrange(0, at))}, postcopy=run % 2 == 1)] += 1
        except AssertionError:
            outcomes["migrated, pages differ"] += 1
    return outcomes


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    csv_bomb(out / "bomb.csv.zst")
    metadata_checkpoint(out / "zero4m.ckpt", "zero")
    metadata_checkpoint(out / "sections.ckpt", "sections")
    for name in ("bomb.csv.zst", "zero4m.ckpt", "sections.ckpt"):
        print(f"{out / name}: {(out / name).stat().st_size:,} bytes")
    print(record_bomb())
    print(f"300 migrations with one record replayed: {dict(replays())}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hostile-inputs")
