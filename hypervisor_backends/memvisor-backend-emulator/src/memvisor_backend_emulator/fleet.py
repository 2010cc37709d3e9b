"""The fleet host (examples/fleet-host.toml) as package data, and scaled to any host size.

``memvisor bench scale`` and the tests run the same scenario as the example, with every size
(machine memory, VMs, disks, the memory a pressure step frees) and the sharing scan rate
multiplied by one factor: the same mix of VMs, contents, workloads and techniques on a host
of 4 GiB, where the bytes model fits, or of 256 GiB.
"""

from __future__ import annotations

import copy
import tomllib
from importlib import resources
from typing import Any

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.scenario import parse_duration, parse_size

FLEET_GIB = 1024
"""Machine memory of the fleet host as written."""

_SIZE_KEYS = ("memory", "size", "target_free")


def fleet_text() -> str:
    """The fleet scenario as written (the same bytes as examples/fleet-host.toml)."""
    return resources.files("memvisor_backend_emulator").joinpath("fleet-host.toml").read_text()


def fleet_scenario(host_gib: float = FLEET_GIB, contents: str | None = None, run_factor: float = 1.0) -> dict[str, Any]:
    """The fleet scenario as a dict (what :func:`memvisor.scenario.parse_scenario` takes), for a
    host of ``host_gib`` GiB: every size scaled alike, rounded to whole 2 MiB large pages;
    ``contents`` overrides the machine model (``"bytes"`` or ``"identity"``); ``run_factor``
    shortens (or lengthens) every ``run`` step (tests run the fleet for less time)."""
    data = tomllib.loads(fleet_text())
    factor = host_gib / FLEET_GIB
    out = copy.deepcopy(data)
    out["name"] = f"{data['name']}-{host_gib:g}gib"
    tables = [out["host"], *out["vm"], *(vm["disk"] for vm in out["vm"] if "disk" in vm), *out["timeline"]]
    for table in tables:
        for key in _SIZE_KEYS:
            if isinstance(table.get(key), str):
                table[key] = _scaled(table[key], factor)
    sharing = out.get("plugins", {}).get("sharing")
    if sharing and "pages_per_tick" in sharing:
        sharing["pages_per_tick"] = max(1024, int(sharing["pages_per_tick"] * factor))
    if contents is not None:
        out["host"]["contents"] = contents
    for step in out["timeline"]:
        if step["do"] == "run" and run_factor != 1.0:
            step["for"] = f"{parse_duration(step['for']) * run_factor:g}s"
    return out


def _scaled(size: str, factor: float) -> str:
    """A size multiplied by ``factor``, in whole large pages (at least one), as MiB."""
    large = LARGE_PAGE_PAGES * PAGE_SIZE
    scaled = max(large, int(parse_size(size) * factor) // large * large)
    return f"{scaled >> 20}MiB"


def guest_gib(scenario: dict[str, Any]) -> float:
    """GiB of guest memory of every VM of a scenario (those created on the timeline too)."""
    vms = [*scenario["vm"], *(s for s in scenario.get("timeline", ()) if s.get("do") == "create_vm")]
    return sum(parse_size(vm["memory"]) for vm in vms) / 2**30
