"""The checkpoint file format: a VM's memory saved as compressed blocks plus a page map.

A checkpoint file (docs/checkpoint-format.md) holds a header, the storage blocks, and at the end
the metadata (index of the blocks and page map) and a fixed-size trailer pointing to it, so that
a writer streams blocks and never seeks back. Two levels of blocks:

- a **page block** is a group of pages (typically 64 non-zero pages) compressed on its own: the
  unit of decompression, and what a lazy restore copies into guest memory on a fault;
- a **storage block** is several page blocks' frames written together (about ``buffer_bytes``,
  4 MiB by default): the unit of I/O (one write, one read) and of integrity (one checksum).

Pages not stored as data are in the page map: zero pages, and *records* — pages that another
plugin describes more cheaply, as a kind name and an opaque payload per page.

- :class:`CheckpointWriter` writes a file (lazy save, other plugins' records);
- :class:`CheckpointReader` validates and reads one (lazy restore: :meth:`~CheckpointReader.locate`
  then :meth:`~CheckpointReader.read_page_block`, one read call);
- :func:`save_image` / :func:`restore_image` are the stop-the-world save and the eager restore of
  raw memory images (Firecracker snapshots, QEMU ``pmemsave`` dumps);
- :class:`CheckpointError` (a :class:`~memvisor.errors.UserError`) is raised for every problem
  with a file, with one line naming the file, the block and the offset.
"""

from memvisor.builtins.checkpoint.image import RestoreStats, SaveStats, restore_image, save_image
from memvisor.builtins.checkpoint.layout import VERSION, CheckpointError, load_key
from memvisor.builtins.checkpoint.reader import (
    KIND_DATA,
    KIND_FIRST_RECORD,
    KIND_MISSING,
    KIND_ZERO,
    CheckpointReader,
    RecordSet,
)
from memvisor.builtins.checkpoint.writer import CheckpointWriter

__all__ = [
    "KIND_DATA",
    "KIND_FIRST_RECORD",
    "KIND_MISSING",
    "KIND_ZERO",
    "VERSION",
    "CheckpointError",
    "CheckpointReader",
    "CheckpointWriter",
    "RecordSet",
    "RestoreStats",
    "SaveStats",
    "load_key",
    "restore_image",
    "save_image",
]
