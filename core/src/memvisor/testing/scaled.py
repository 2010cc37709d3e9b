"""A scenario shortened and shrunk for a test: every ``for`` of its timeline and every
``phase_accesses`` times a factor, every memory size (host, VMs, disks, ``create_vm`` and
``pressure`` steps, ``stop_pages``) times the same factor, in whole 2 MiB, so that it keeps its
shape at a fraction of its cost (the examples' figures test runs each example at a quarter).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

LARGE_PAGE = 2 << 20


def _memory(value, factor: float) -> int:
    from memvisor.scenario import parse_size

    return max(LARGE_PAGE, int(parse_size(value) * factor) // LARGE_PAGE * LARGE_PAGE)


def _workload(spec, factor: float) -> None:
    if isinstance(spec, dict) and "phase_accesses" in spec:
        spec["phase_accesses"] = max(1, int(spec["phase_accesses"] * factor))


def scaled(data: Mapping, factor: float, memory: float | None = None) -> dict:
    """A scenario (as TOML gives it) shortened and shrunk by ``factor`` (its memory sizes by
    ``memory`` when given); a copy, ``data`` is left as it was."""
    from memvisor.scenario import parse_duration

    data = copy.deepcopy(dict(data))
    memory = factor if memory is None else memory
    if factor == 1 and memory == 1:
        return data
    host = data.get("host", {})
    if "memory" in host:
        host["memory"] = _memory(host["memory"], memory)
    for vm in data.get("vm", []):
        vm["memory"] = _memory(vm["memory"], memory)
        if isinstance(vm.get("disk"), dict) and "size" in vm["disk"]:
            vm["disk"]["size"] = _memory(vm["disk"]["size"], memory)
        _workload(vm.get("workload"), factor)
    for step in data.get("timeline", []):
        if "for" in step:
            step["for"] = parse_duration(step["for"]) * factor
        for key in ("memory", "target_free"):
            if key in step:
                step[key] = _memory(step[key], memory)
        if "stop_pages" in step:
            step["stop_pages"] = max(1, int(step["stop_pages"] * memory))
        _workload(step.get("workload"), factor)
    return data
