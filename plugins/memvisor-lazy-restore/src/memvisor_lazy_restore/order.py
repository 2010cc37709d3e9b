"""Reading the access-order sidecar that a lazy save writes next to a checkpoint.

The layout is documented in docs/checkpoint.md (and written by memvisor-lazy-save, which this
package does not import: the file format is the contract between the two). The sidecar is a
hint that orders prefetching and never changes what a page holds, so anything wrong with it
(missing, another checkpoint's, damaged, a bad check) makes :func:`read_order` return None and
the restore prefetches in file order.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MVCKORD\n"
VERSION = 1
HEAD = struct.Struct("<8sHHI16sQQ")
HEADER_SIZE = 64
SUFFIX = ".order"
SOURCES = {1: "page_heat", 2: "accessed_bits"}


def sidecar_path(checkpoint) -> Path:
    """Where the sidecar of ``checkpoint`` lives: the same name with ``.order`` appended."""
    p = Path(checkpoint)
    return p.with_name(p.name + SUFFIX)


def _check_key(material: bytes | None) -> bytes:
    if material is None:
        return b""
    return hashlib.blake2b(material, digest_size=32, person=b"mvckpt-order-v1").digest()


def read_order(checkpoint, *, file_id: bytes, vm_pages: int, key: bytes | None = None) -> tuple[np.ndarray, str] | None:
    """Per-page heat (float64, ``vm_pages`` of them) and its source from the sidecar of
    ``checkpoint``, or None when there is no usable sidecar for this very checkpoint."""
    from memvisor.errors import UserError
    from memvisor.files import open_regular

    path = sidecar_path(checkpoint)
    try:
        fd = open_regular(path, "order sidecar")  # a FIFO in its place must not block the restore
    except UserError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                return None
            magic, version, source, window, fid, pages, n = HEAD.unpack_from(head, 0)
            if (magic != MAGIC or version != VERSION or source not in SOURCES or window < 1 or fid != file_id
                    or pages != vm_pages or n != -(-vm_pages // window) or size != HEADER_SIZE + 4 * n):
                return None  # checked against the file size before anything is allocated
            raw = f.read(4 * n)
    except OSError:
        return None
    digest = hashlib.blake2b(head[:48], digest_size=16, key=_check_key(key))
    digest.update(raw)
    if digest.digest() != head[48:64]:
        return None
    heat = np.frombuffer(raw, "<f4").astype(np.float64)
    if not np.isfinite(heat).all() or (heat < 0).any():
        return None
    # Every page of a window gets the window's heat: prefetching is by storage block, whose
    # score adds up the heat of the pages it holds.
    return np.repeat(heat / window, window)[:vm_pages], SOURCES[source]
