"""What a host's state costs in memory: the numpy arrays reachable from each part, by owner.

Per-page state is numpy arrays (page tables, flags, fingerprints, ages, samples); this module
finds every array reachable from the backend, the host's own tables, each plugin and the
workloads, and adds up their bytes (an array and its views count once, with their base). The
scale benchmark (``memvisor bench scale``) divides by the emulated guest memory to give memory
per GiB, and lists the owners so a regression names its culprit. Arrays allocated but never
written (``np.zeros`` of a lazily committed machine) count in full: this is what a run may
use, not what the kernel committed so far.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

_SKIP_TYPES = (str, bytes, bytearray, int, float, bool, type(None))


def _arrays(root: Any, seen: set[int], max_depth: int = 8) -> Iterable[np.ndarray]:
    """Every numpy array reachable from ``root`` through attributes, containers and attrs
    fields (each object visited once)."""
    stack = [(root, 0)]
    while stack:
        obj, depth = stack.pop()
        if isinstance(obj, _SKIP_TYPES) or id(obj) in seen or depth > max_depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            yield obj
            continue
        if isinstance(obj, dict):
            children = list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
            if type(obj).__module__.split(".")[0] in ("pluggy", "structlog", "logging", "threading", "click"):
                continue
            children = list(getattr(obj, "__dict__", {}).values())
            children += [getattr(obj, s, None) for s in getattr(type(obj), "__slots__", ())]
        else:
            continue
        stack.extend((child, depth + 1) for child in children)


def _base_bytes(arrays: Iterable[np.ndarray], counted: set[int]) -> int:
    total = 0
    for array in arrays:
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        if id(base) in counted:
            continue
        counted.add(id(base))
        total += base.nbytes
    return total


def array_bytes(host, workloads: dict | None = None) -> dict[str, int]:
    """Bytes of numpy arrays held by each part of ``host``: ``"backend"``, ``"host"`` (the
    core's own per-VM tables), each plugin by name, and ``"workloads"`` (a scenario run's).
    A plugin's arrays that the backend or host hold too count once, with the first owner."""
    seen: set[int] = set()
    counted: set[int] = set()
    out: dict[str, int] = {}
    out["backend"] = _base_bytes(_arrays(host.backend, seen), counted)
    core = {k: v for k, v in vars(host).items() if k not in ("backend", "pm", "hook", "registries")}
    out["host"] = _base_bytes(_arrays(core, seen), counted)
    for name, plugin in host.pm.list_name_plugin():
        if plugin is None or plugin is host.backend:
            continue
        size = _base_bytes(_arrays(plugin, seen), counted)
        if size:
            out[name] = out.get(name, 0) + size
    if workloads:
        out["workloads"] = _base_bytes(_arrays(workloads, seen), counted)
    return out
