"""The access-order sidecar (``CKPT.order``) of a QEMU checkpoint, for a hottest-first restore.

The file format is the one docs/checkpoint.md defines (written by memvisor-lazy-save, read by
memvisor-lazy-restore; this package imports neither: the format is the contract). Its heat is
the answer of ``memvisor_page_heat``, which the qemu plugin gives from QEMU's dirty tracking:
how many times a page was sent again in a later pre-copy round, that is, written while it was
saved.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from memvisor.files import atomic_write

SOURCE_PAGE_HEAT = 1
WINDOW_PAGES = 64
_HEAD = struct.Struct("<8sHHI16sQQ")


def sidecar_path(checkpoint) -> Path:
    """Where the sidecar of ``checkpoint`` lives: the same name with ``.order`` appended."""
    return Path(checkpoint).with_name(Path(checkpoint).name + ".order")


def write_order(checkpoint, *, file_id: bytes, heat: np.ndarray, key: bytes | None) -> Path:
    """Write ``checkpoint``'s sidecar from per-page ``heat``, whole or not at all
    (:func:`memvisor.files.atomic_write`); its check is keyed as the checkpoint's MAC is.
    Returns its path."""
    pages = len(heat)
    windows = -(-pages // WINDOW_PAGES)
    padded = np.zeros(windows * WINDOW_PAGES)
    padded[:pages] = np.maximum(np.nan_to_num(heat), 0)
    per_window = np.ascontiguousarray(padded.reshape(windows, WINDOW_PAGES).sum(axis=1), dtype="<f4")
    head = _HEAD.pack(b"MVCKORD\n", 1, SOURCE_PAGE_HEAT, WINDOW_PAGES, file_id, pages, windows)
    check_key = b"" if key is None else hashlib.blake2b(key, digest_size=32, person=b"mvckpt-order-v1").digest()
    digest = hashlib.blake2b(head, digest_size=16, key=check_key)
    digest.update(per_window.tobytes())
    out = sidecar_path(checkpoint)
    # Whole or not at all; a hint, so a sidecar a crash left damaged is ignored by its check.
    atomic_write(out, head + digest.digest() + per_window.tobytes())
    return out
