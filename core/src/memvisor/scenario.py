"""Scenario files (TOML): the host, its VMs and their workloads, the plugins and a timeline.

A scenario is checked completely before anything runs. Every problem is a
:class:`memvisor.errors.ScenarioError` naming the file, the key and what is wrong.
See docs/scenarios.md for the whole format.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs

from memvisor import PAGE_SIZE
from memvisor.errors import ScenarioError, UserError
from memvisor.host import HostConfig
from memvisor.limits import MAX_INTEGER


def _shown(value: Any) -> str:
    """A value for an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "t": 1 << 40, "tib": 1 << 40}
_DECIMAL_UNITS = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB"}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "min": 60.0}
_NUMBER = re.compile(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([a-zA-Z]*)\s*")


def _amount(text: str) -> tuple[Decimal | None, str]:
    """The number (exact) and the unit of ``"1.5GiB"``-like text of at most 80 characters;
    ``(None, "")`` when it is not one."""
    m = _NUMBER.fullmatch(text) if len(text) <= 80 else None
    return (Decimal(m.group(1)), m.group(2)) if m else (None, "")


def _within(value: Any, amount, what: str, limit: float, beyond: str):
    """``amount`` (read from ``value``) when it is from 0 to ``limit``; else ``ValueError``."""
    if amount < 0:
        raise ValueError(f"{what} must not be negative")
    if amount > limit:
        raise ValueError(f"{str(value)[:40]!r} is {beyond}")
    return amount


def parse_size(value: Any) -> int:
    """Bytes from ``"1GiB"``, ``"512MiB"``, ``"4KiB"`` (or ``"4K"``), or a plain integer of bytes;
    at most :data:`memvisor.limits.MAX_SIZE_BYTES`. Binary units only: ``"1GB"`` is refused (it
    would mean 10^9 bytes, and memory sizes are binary) with a hint."""
    from memvisor.limits import MAX_SIZE_BYTES, format_bytes

    if isinstance(value, bool):
        raise ValueError("a size, such as \"1GiB\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        number, unit = _amount(value)
        if unit.lower() in _DECIMAL_UNITS:
            raise ValueError(f"{value!r}: {unit} is a decimal unit; memory sizes use binary units "
                             f"(\"{number}{_DECIMAL_UNITS[unit.lower()]}\")")
        if number is None or unit.lower() not in _UNITS:
            raise ValueError(f"{value[:40]!r} is not a size (use e.g. \"1GiB\", \"512MiB\")")
        exact = number * _UNITS[unit.lower()]
        if exact != exact.to_integral_value():
            raise ValueError(f"{value!r} is not a whole number of bytes")
        size = int(exact)
    else:
        raise ValueError(f"{value!r} is not a size (use e.g. \"1GiB\", \"512MiB\")")
    return _within(value, size, "a size", MAX_SIZE_BYTES, f"larger than the limit of {format_bytes(MAX_SIZE_BYTES)}")


def parse_duration(value: Any) -> float:
    """Seconds from ``"10ms"``, ``"2s"``, ``"1min"`` or a plain number of seconds: finite, not
    negative and at most :data:`memvisor.limits.MAX_DURATION_S`."""
    from memvisor.limits import MAX_DURATION_S, finite

    if isinstance(value, bool):
        raise ValueError("a duration, such as \"10ms\"")
    if isinstance(value, (int, float)):
        seconds = finite(value, "a duration")
    elif isinstance(value, str):
        number, unit = _amount(value)
        if number is None or unit not in _TIME_UNITS:
            raise ValueError(f"{value[:40]!r} is not a duration (use e.g. \"10ms\", \"2s\")")
        seconds = float(number * Decimal(repr(_TIME_UNITS[unit])))
    else:
        raise ValueError(f"{value!r} is not a duration (use e.g. \"10ms\", \"2s\")")
    return _within(value, seconds, "a duration", MAX_DURATION_S,
                   f"longer than the limit of {MAX_DURATION_S:g} s (a week)")


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
        """The value of ``name``, which must be of ``kind``; required when no default is given.
        A number must be finite and a whole number fit in 64 bits, whatever the key."""
        self._used.add(name)
        if name not in self.data:
            if default is ...:
                raise self._missing(name)
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(name, f"must be {names}, got {_shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(name, f"must be a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
            raise self.error(name, f"must fit in 64 bits, got a number of {len(str(abs(value)))} digits")
        return value

    def _missing(self, name: str) -> ScenarioError:
        """The error for a required key that is absent: a misspelling of it is named first."""
        unknown = sorted(set(self.data) - self._used)
        close = difflib.get_close_matches(name, unknown, n=1, cutoff=0.6)
        if close:
            return self.error(close[0], f"unknown key (did you mean {name!r}?)")
        return self.error(name, "is required")

    def number(self, name: str, default: Any = ..., *, low: float | None = None, high: float | None = None):
        """A finite number within ``[low, high]``."""
        value = self.get(name, (int, float), default)
        if value is not default and ((low is not None and value < low) or (high is not None and value > high)):
            raise self.error(name, f"must be between {low} and {high}, got {value!r}")
        return value

    def integer(self, name: str, default: Any = ..., *, low: int, high: int) -> int:
        """A whole number within ``[low, high]`` (every integer a scenario gives has bounds)."""
        value = self.get(name, int, default)
        if value is not default and not low <= value <= high:
            raise self.error(name, f"must be a whole number from {low:,} to {high:,}, got {value!r}")
        return value

    def name(self, name: str, default: Any = ...) -> str:
        """A name that becomes a file name or a path segment (:func:`memvisor.files.safe_name`)."""
        from memvisor.files import safe_name

        value = self.get(name, str, default)
        if value is not default:
            try:
                safe_name(value, "the name")
            except ValueError as exc:
                raise self.error(name, str(exc)) from None
        return value

    def size(self, name: str, default: Any = ...) -> int:
        """A size in bytes (``"1GiB"``)."""
        self._used.add(name)
        if name not in self.data:
            if default is ...:
                raise self._missing(name)
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
                raise self._missing(name)
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
            close = difflib.get_close_matches(unknown[0], sorted(self._used), n=1, cutoff=0.6)
            raise self.error(unknown[0], "unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))


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
    if size is not None:  # a generated disk lives in memory
        from memvisor.limits import check_machine_memory

        try:
            check_machine_memory(size, "a generated disk")
        except ValueError as exc:
            raise table.error("size", str(exc)) from None
    contents_value = table.get("contents", (str, dict), "text")
    try:
        contents = ContentSpec.parse(contents_value, table.key("contents"))
    except UserError as exc:
        raise ScenarioError.within(table.path, exc) from None
    page_cache = table.number("page_cache", 0.0, low=0.0, high=1.0)
    seed = table.integer("seed", None, low=0, high=MAX_INTEGER)
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
        raise ScenarioError.within(table.path, exc) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file."""
    path = Path(path)
    return parse_scenario(read_toml(path, "scenario file"), path)


def read_toml(path: Path, what: str) -> dict:
    """The table of a TOML file from outside: a regular file of at most
    :data:`~memvisor.limits.MAX_SCENARIO_BYTES` of UTF-8 text, nested at most
    :data:`~memvisor.limits.MAX_NESTING` deep. Every problem is a one-line :class:`UserError`."""
    from memvisor.files import read_regular
    from memvisor.limits import MAX_SCENARIO_BYTES

    raw = read_regular(path, what, MAX_SCENARIO_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file: byte {exc.start} is not UTF-8 (a {what} is TOML text)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply") from None
    check_nesting(data, path)
    return data


def check_nesting(data: Any, path: Path | str) -> None:
    """:class:`UserError` when tables and arrays nest deeper than
    :data:`~memvisor.limits.MAX_NESTING` (walked without recursion)."""
    from memvisor.limits import MAX_NESTING

    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise UserError(f"{path}: tables or arrays nested more than {MAX_NESTING} deep")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def parse_scenario(data: Mapping[str, Any], path: str | Path = "<scenario>") -> Scenario:
    """Check a scenario given as a dict (as TOML would give it)."""
    from memvisor.contents import ContentSpec
    from memvisor.limits import (
        MAX_BATCH,
        MAX_DURATION_S,
        MAX_HANDLER_THREADS,
        MAX_TIMELINE_STEPS,
        MAX_VMS,
        MIN_TICK_S,
        check_machine_memory,
        format_bytes,
        machine_memory,
    )
    from memvisor.settings import SettingError
    from memvisor.settings import installed as installed_settings
    from memvisor.settings import load as load_settings

    check_nesting(data, path)
    top = Table(path, "", data)
    name = top.get("name", str, Path(str(path)).stem)
    description = top.get("description", str, "")
    seed = top.integer("seed", 0, low=0, high=MAX_INTEGER)

    from memvisor.identity import IDENTITY_PAGE_BYTES, MODELS, auto_model, host_memory_bytes

    host = top.table("host")
    memory_pages = host.pages("memory")
    contents_model = host.get("contents", str, None)
    if contents_model is not None and contents_model not in MODELS:
        raise host.error("contents", f"must be one of {', '.join(MODELS)}, got {contents_model!r}")
    if (contents_model or auto_model(memory_pages)) == "bytes":
        try:
            check_machine_memory(memory_pages * PAGE_SIZE, "a host")
        except ValueError as exc:
            raise host.error("memory", str(exc)) from None
    elif host_memory_bytes(memory_pages, "identity") > machine_memory():
        raise host.error("memory", f"a host of {format_bytes(memory_pages * PAGE_SIZE)} by content identity needs "
                                   f"about {format_bytes(host_memory_bytes(memory_pages, 'identity'))} "
                                   f"({IDENTITY_PAGE_BYTES} bytes a page), more than this machine's memory "
                                   f"({format_bytes(machine_memory())})")
    numa_nodes = host.integer("numa_nodes", 1, low=1, high=64)
    backend = host.get("backend", str, "emulator")
    tick = host.duration("tick", 0.01)
    if not MIN_TICK_S <= tick <= MAX_DURATION_S:
        raise host.error("tick", f"must be from {MIN_TICK_S * 1e6:g} us to a week, got {host.data['tick']!r}")
    batch = host.integer("batch", 65536, low=1, high=MAX_BATCH)
    low = host.number("low_watermark", 0.02, low=0.0, high=1.0)
    high = host.number("high_watermark", 0.05, low=0.0, high=1.0)
    if high < low:
        raise host.error("high_watermark", f"must not be below low_watermark ({low})")
    costs = host.table("costs").data
    backend_options = dict(host.table("backend_options").data)
    handler_threads = host.integer("handler_threads", 1, low=1, high=MAX_HANDLER_THREADS)
    default_budget = _budget(host, "budgets")
    host.check_unknown()

    plugins_table = top.table("plugins")
    plugins = {}
    declared = installed_settings()
    for plugin_name in plugins_table.data:
        plugins[plugin_name] = plugins_table.table(plugin_name).data
        if plugin_name in declared:  # an unknown plugin is named when the host is built
            try:
                load_settings(declared[plugin_name], plugins[plugin_name], plugins_table.key(plugin_name))
            except SettingError as exc:
                raise ScenarioError(path, exc.key, exc.problem) from None

    vm_tables = top.get("vm", list, [])
    if not vm_tables:
        raise top.error("vm", "at least one [[vm]] table is required")
    if len(vm_tables) > MAX_VMS:
        raise top.error("vm", f"{len(vm_tables):,} VMs; a scenario has at most {MAX_VMS:,}")
    vms, names = [], set()
    for i, raw in enumerate(vm_tables):
        vm = Table(path, f"vm[{i}]", raw)
        vm_name = vm.name("name", f"vm{i}")
        if vm_name in names:
            raise vm.error("name", f"two VMs are named {vm_name!r}")
        names.add(vm_name)
        pages = vm.pages("memory")
        if pages > memory_pages:
            raise vm.error("memory", f"VM {vm_name!r} of {pages * PAGE_SIZE >> 20} MiB is larger than the host's "
                                     f"{memory_pages * PAGE_SIZE >> 20} MiB")
        node = vm.integer("node", 0, low=0, high=numa_nodes - 1)
        large = vm.get("large_pages", bool, False)
        contents_value = vm.get("contents", (str, dict), None)
        try:
            contents = None if contents_value is None else ContentSpec.parse(contents_value, vm.key("contents"))
        except UserError as exc:
            raise ScenarioError.within(path, exc) from None
        workload = vm.get("workload", dict, {})
        if workload and "kind" not in workload:
            raise vm.error("workload", "needs a kind, e.g. { kind = \"zipf\" }")
        vm_seed = vm.integer("seed", None, low=0, high=MAX_INTEGER)
        disk = _disk(vm.table("disk", None), pages) if "disk" in vm.data else None
        budget = _budget(vm, "budgets", default_budget) if "budgets" in vm.data else None
        vm.check_unknown()
        vms.append(VMSpec(vm_name, pages, node, large, contents, workload, vm_seed, disk, budget))

    timeline = top.get("timeline", list, [])
    if len(timeline) > MAX_TIMELINE_STEPS:
        raise top.error("timeline", f"{len(timeline):,} steps; a timeline has at most {MAX_TIMELINE_STEPS:,}")
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
