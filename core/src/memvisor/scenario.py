"""Scenario files (TOML): the host, its VMs and their workloads, the plugins and a timeline.

A scenario is checked completely before anything runs. Every problem is a
:class:`memvisor.errors.ScenarioError` naming the file, the key and what is wrong.
See docs/scenarios.md for the whole format.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from memvisor import PAGE_SIZE
from memvisor.errors import ScenarioError, UserError
from memvisor.host import HostConfig

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "min": 60.0}


def parse_size(value: Any) -> int:
    """Bytes from ``"1GiB"``, ``"512MiB"``, ``"4KiB"`` or a plain integer of bytes (binary units:
    ``GB`` means GiB here, as memory sizes always do)."""
    if isinstance(value, bool):
        raise ValueError("a size, such as \"1GiB\"")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size must not be negative")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"{value!r} is not a size (use e.g. \"1GiB\", \"512MiB\")")


def parse_duration(value: Any) -> float:
    """Seconds from ``"10ms"``, ``"2s"``, ``"1min"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, such as \"10ms\"")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration must not be negative")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value)
        if m and m.group(2) in _TIME_UNITS:
            return float(m.group(1)) * _TIME_UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration (use e.g. \"10ms\", \"2s\")")


class Table:
    """A table of a scenario file with checked access: every error names file and key."""

    def __init__(self, path: Path | str, where: str, data: Mapping[str, Any]):
        if not isinstance(data, Mapping):
            raise ScenarioError(path, where, f"must be a table, got {type(data).__name__}")
        self.path, self.where, self.data = path, where, dict(data)
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        """The dotted name of ``name`` in this table, for error messages."""
        return f"{self.where}.{name}" if self.where else name

    def error(self, name: str, problem: str) -> ScenarioError:
        """A :class:`ScenarioError` about key ``name`` of this table."""
        return ScenarioError(self.path, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """The value of ``name``, which must be of ``kind``; required when no default is given."""
        self._used.add(name)
        if name not in self.data:
            if default is ...:
                raise self.error(name, "is required")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"must be {names}, got {value!r}")
        return value

    def number(self, name: str, default: Any = ..., *, low: float | None = None, high: float | None = None):
        """A number within ``[low, high]``."""
        value = self.get(name, (int, float), default)
        if value is not default and ((low is not None and value < low) or (high is not None and value > high)):
            raise self.error(name, f"must be between {low} and {high}, got {value!r}")
        return value

    def size(self, name: str, default: Any = ...) -> int:
        """A size in bytes (``"1GiB"``)."""
        self._used.add(name)
        if name not in self.data:
            if default is ...:
                raise self.error(name, "is required")
            return default
        try:
            return parse_size(self.data[name])
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def pages(self, name: str, default: Any = ...) -> int:
        """A size that must be a whole, positive number of 4 KiB pages; returns pages."""
        size = self.size(name, default if default is ... else default * PAGE_SIZE)
        if size <= 0 or size % PAGE_SIZE:
            raise self.error(name, f"must be a positive multiple of 4KiB, got {self.data.get(name)!r}")
        return size // PAGE_SIZE

    def duration(self, name: str, default: Any = ...) -> float:
        """A duration in seconds (``"10ms"``)."""
        self._used.add(name)
        if name not in self.data:
            if default is ...:
                raise self.error(name, "is required")
            return default
        try:
            return parse_duration(self.data[name])
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def table(self, name: str, default: Any = ...) -> Table:
        """A nested table."""
        value = self.get(name, dict, {} if default is ... else default)
        return Table(self.path, self.key(name), value)

    def check_unknown(self) -> None:
        """Refuse keys that nothing read: a misspelt key must not be silently ignored."""
        unknown = sorted(set(self.data) - self._used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


@attrs.frozen
class VMSpec:
    """One ``[[vm]]`` table."""

    name: str
    pages: int
    node: int
    large_pages: bool
    contents: Any  # memvisor.contents.ContentSpec or None
    workload: Mapping[str, Any]
    seed: int | None
    disk: Mapping[str, Any] | None = None  # {path | size, contents, page_cache}, checked
    budget: Any = None  # memvisor.budgets.Budget, or None for the host's default


@attrs.frozen
class Scenario:
    """A checked scenario file."""

    path: Path
    name: str
    description: str
    host: HostConfig
    batch: int
    plugins: Mapping[str, Mapping[str, Any]]
    vms: tuple[VMSpec, ...]
    timeline: tuple[Mapping[str, Any], ...]

    def with_backend(self, backend: str) -> Scenario:
        """The same scenario on another backend."""
        return attrs.evolve(self, host=attrs.evolve(self.host, backend=backend))

    def with_seed(self, seed: int) -> Scenario:
        """The same scenario under another seed."""
        return attrs.evolve(self, host=attrs.evolve(self.host, seed=seed))


def _disk(table: Table, vm_pages: int) -> dict[str, Any]:
    """A VM's ``disk`` table: an image ``path`` or a generated disk of ``size`` with
    ``contents``, and ``page_cache``, the fraction of the VM's pages (its last ones) that hold
    copies of disk blocks when the VM starts."""
    from memvisor.contents import ContentSpec

    path = table.get("path", str, None)
    size = table.size("size", None)
    if (path is None) == (size is None):
        raise table.error("size", "give the disk an image path or a size (one of them)")
    if size is not None and (size < PAGE_SIZE or size % PAGE_SIZE):
        raise table.error("size", f"must be a positive multiple of 4KiB, got {table.data.get('size')!r}")
    contents_value = table.get("contents", (str, dict), "text")
    try:
        contents = ContentSpec.parse(contents_value, table.key("contents"))
    except UserError as exc:
        raise ScenarioError(table.path, table.key("contents"), str(exc)) from None
    page_cache = table.number("page_cache", 0.0, low=0.0, high=1.0)
    seed = table.get("seed", int, None)
    table.check_unknown()
    return {"path": path, "blocks": None if size is None else size // PAGE_SIZE, "contents": contents,
            "page_cache": float(page_cache), "seed": seed}


def _budget(table: Table, name: str, base=None):
    """The resource budget in table ``name`` (:class:`memvisor.budgets.Budget`), over ``base``."""
    from memvisor.budgets import Budget

    budgets = table.table(name)
    try:
        return Budget.parse(budgets.data, table.key(name), base)
    except UserError as exc:
        raise UserError(f"{table.path}: {exc}") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    return parse_scenario(data, path)


def parse_scenario(data: Mapping[str, Any], path: str | Path = "<scenario>") -> Scenario:
    """Check a scenario given as a dict (as TOML would give it)."""
    from memvisor.contents import ContentSpec

    top = Table(path, "", data)
    name = top.get("name", str, Path(str(path)).stem)
    description = top.get("description", str, "")
    seed = top.get("seed", int, 0)

    host = top.table("host")
    memory_pages = host.pages("memory")
    numa_nodes = host.get("numa_nodes", int, 1)
    if not 1 <= numa_nodes <= 64:
        raise host.error("numa_nodes", f"must be between 1 and 64, got {numa_nodes}")
    backend = host.get("backend", str, "emulator")
    tick = host.duration("tick", 0.01)
    if tick <= 0:
        raise host.error("tick", "must be positive")
    batch = host.get("batch", int, 65536)
    if batch < 1:
        raise host.error("batch", "must be at least 1")
    low = host.number("low_watermark", 0.02, low=0.0, high=1.0)
    high = host.number("high_watermark", 0.05, low=0.0, high=1.0)
    if high < low:
        raise host.error("high_watermark", f"must not be below low_watermark ({low})")
    costs = host.table("costs").data
    backend_options = dict(host.table("backend_options").data)
    handler_threads = host.get("handler_threads", int, 1)
    if handler_threads < 1:
        raise host.error("handler_threads", "must be at least 1")
    default_budget = _budget(host, "budgets")
    from memvisor.identity import MODELS

    contents_model = host.get("contents", str, None)
    if contents_model is not None and contents_model not in MODELS:
        raise host.error("contents", f"must be one of {', '.join(MODELS)}, got {contents_model!r}")
    host.check_unknown()

    plugins_table = top.table("plugins")
    plugins = {}
    for plugin_name in plugins_table.data:
        plugins[plugin_name] = plugins_table.table(plugin_name).data

    vm_tables = top.get("vm", list, [])
    if not vm_tables:
        raise top.error("vm", "at least one [[vm]] table is required")
    vms, names = [], set()
    for i, raw in enumerate(vm_tables):
        vm = Table(path, f"vm[{i}]", raw)
        vm_name = vm.get("name", str, f"vm{i}")
        if vm_name in names:
            raise vm.error("name", f"two VMs are named {vm_name!r}")
        names.add(vm_name)
        pages = vm.pages("memory")
        node = vm.get("node", int, 0)
        if not 0 <= node < numa_nodes:
            raise vm.error("node", f"must be a NUMA node of the host (0..{numa_nodes - 1}), got {node}")
        large = vm.get("large_pages", bool, False)
        contents_value = vm.get("contents", (str, dict), None)
        try:
            contents = None if contents_value is None else ContentSpec.parse(contents_value, vm.key("contents"))
        except UserError as exc:
            raise ScenarioError(path, vm.key("contents"), str(exc)) from None
        workload = vm.get("workload", dict, {})
        if workload and "kind" not in workload:
            raise vm.error("workload", "needs a kind, e.g. { kind = \"zipf\" }")
        vm_seed = vm.get("seed", int, None)
        disk = _disk(vm.table("disk", None), pages) if "disk" in vm.data else None
        budget = _budget(vm, "budgets", default_budget) if "budgets" in vm.data else None
        vm.check_unknown()
        vms.append(VMSpec(vm_name, pages, node, large, contents, workload, vm_seed, disk, budget))

    timeline = top.get("timeline", list, [])
    for i, step in enumerate(timeline):
        if not isinstance(step, dict) or not isinstance(step.get("do"), str):
            raise ScenarioError(path, f"timeline[{i}].do", "each step needs do = \"ACTION\" (e.g. \"run\")")
    top.check_unknown()

    config = HostConfig(
        memory_pages=memory_pages,
        numa_nodes=numa_nodes,
        backend=backend,
        seed=seed,
        tick_interval=tick,
        low_watermark=low,
        high_watermark=high,
        backend_options={**backend_options, "costs": costs},
        plugin_settings=plugins,
        budget=default_budget,
        handler_threads=handler_threads,
        contents=contents_model,
    )
    return Scenario(Path(str(path)), name, description, config, batch, plugins, tuple(vms), tuple(timeline))
