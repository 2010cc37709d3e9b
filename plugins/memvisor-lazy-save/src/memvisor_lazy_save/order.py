"""The access-order sidecar: how hot each block of pages was when a checkpoint was saved.

Lazy restore prefetches the hottest blocks first when it finds this file next to a checkpoint
(``vm.ckpt`` -> ``vm.ckpt.order``); without it, it prefetches in file order. The sidecar is a
hint: it never changes what a page holds, only the order in which pages are loaded, so a
missing, stale or damaged sidecar is ignored. docs/checkpoint.md has the layout; the reader
lives in memvisor-lazy-restore (plugins never import each other, the format is the contract).

Layout (little-endian)::

    offset size field
         0    8 magic "MVCKORD\\n"
         8    2 version (1)
        10    2 source: 1 = a plugin's page heat (memvisor_page_heat), 2 = accessed bits
        12    4 window_pages: pages per window (aligned groups of guest pages)
        16   16 file_id of the checkpoint (its header bytes 32..47)
        32    8 vm_pages
        40    8 n_windows = ceil(vm_pages / window_pages)
        48   16 check: BLAKE2b-128 of bytes 0..47 and the heat array (keyed when the
                checkpoint has a key)
        64 4*n  heat: float32 per window, >= 0, higher is hotter
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

from memvisor.files import temp_file

MAGIC = b"MVCKORD\n"
VERSION = 1
SOURCE_PAGE_HEAT = 1
SOURCE_ACCESSED_BITS = 2
HEAD = struct.Struct("<8sHHI16sQQ")
HEADER_SIZE = 64
SUFFIX = ".order"


def sidecar_path(checkpoint) -> Path:
    """Where the sidecar of ``checkpoint`` lives: the same name with ``.order`` appended."""
    p = Path(checkpoint)
    return p.with_name(p.name + SUFFIX)


def check_key(material: bytes | None) -> bytes | None:
    """The key of the sidecar's check, derived from the checkpoint's key material (or None)."""
    if material is None:
        return None
    return hashlib.blake2b(material, digest_size=32, person=b"mvckpt-order-v1").digest()


def checkpoint_file_id(checkpoint) -> bytes:
    """The 16-byte file id in a checkpoint's header (bytes 32..47, docs/checkpoint-format.md)."""
    with open(checkpoint, "rb") as f:
        header = f.read(64)
    return header[32:48]


def write_order(checkpoint, *, file_id: bytes, vm_pages: int, window_pages: int, heat: np.ndarray,
                source: int, key: bytes | None = None) -> Path:
    """Write the sidecar of ``checkpoint`` atomically (temporary file, fsync, rename).

    :param heat: float per window (``ceil(vm_pages / window_pages)`` of them).
    :returns: the sidecar's path.
    """
    heat = np.ascontiguousarray(np.maximum(np.nan_to_num(heat, nan=0.0), 0.0), dtype="<f4")
    n = -(-vm_pages // window_pages)
    if len(heat) != n:
        raise ValueError(f"{len(heat)} heat values for {n} windows")
    head = HEAD.pack(MAGIC, VERSION, source, window_pages, file_id, vm_pages, n)
    digest = hashlib.blake2b(head, digest_size=16, key=check_key(key) or b"")
    digest.update(heat.tobytes())
    out = sidecar_path(checkpoint)
    fd, tmp = temp_file(out)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head + digest.digest() + heat.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def window_heat(page_heat: np.ndarray, window_pages: int) -> np.ndarray:
    """Sum of the heat of the pages of each window (vectorised)."""
    n = len(page_heat)
    windows = -(-n // window_pages)
    padded = np.zeros(windows * window_pages, dtype=np.float64)
    padded[:n] = page_heat
    return padded.reshape(windows, window_pages).sum(axis=1)
