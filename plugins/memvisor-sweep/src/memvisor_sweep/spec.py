"""What a sweep varies: sweep files, ``--vary`` options, dotted paths into a scenario, and the
plan of runs (every combination of the axes, each keyed by a hash of its resolved scenario).

A *path* addresses a key of the scenario's TOML:

- ``host.memory``, ``host.costs.dram_remote_ns``, ``name``: tables are followed, missing ones
  created; an integer segment indexes an array (``timeline.0.for``).
- ``vm.NAME.KEY...``: the ``[[vm]]`` named NAME (or its index); ``vm.*.KEY`` every VM.
- ``plugins.NAME.KEY``: a setting of a plugin, which enables it; ``plugins.NAME`` takes a
  table of settings, ``true`` (enable) or ``false`` (disable); ``plugins`` takes the set of
  enabled plugins (``"sharing+numa"``, ``"none"``, a list of names, or a table), keeping the
  base scenario's settings of those it names.
- Shorthands: ``seed`` and ``host.seed`` are the scenario's seed; ``workload`` is
  ``vm.*.workload`` (and ``workload.alpha`` is ``vm.*.workload.alpha``); a workload given as a
  string is its kind (``workload=zipf,uniform``).

Values on the command line are TOML values separated by commas (``0.8,0.99``,
``{kind="zipf"},{kind="scan"}``); a bare word that is not TOML is a string (``64MiB``).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from memvisor.errors import UserError
from memvisor.scenario import check_nesting, parse_scenario, read_toml

Setting = tuple[str, Any]
"""``(dotted path, value)``: one change made to the base scenario."""

MAX_RUNS = 100_000
"""The most runs (combinations of the axes) one sweep may plan."""

_SWEEP_KEYS = {"scenario", "name", "description", "backend", "set", "vary", "variants", "compare"}
_COMPARE_KEYS = {"policy", "workload", "goal", "better", "metrics"}


# ---------------------------------------------------------------------------------------------
# axes and values
# ---------------------------------------------------------------------------------------------

@attrs.frozen
class Axis:
    """One thing a sweep varies: a column of the results table.

    :ivar name: the column's name: the path as written (``vm.*.workload.alpha``) or the name of
        a table of variants (``policy``).
    :ivar labels: each value as text, for plots and error messages.
    :ivar values: each value as the table shows it: a scalar as itself, a table as its label.
    :ivar settings: for each value, the ``(path, value)`` changes it makes to the base scenario.
    """

    name: str
    labels: tuple[str, ...]
    values: tuple[Any, ...]
    settings: tuple[tuple[Setting, ...], ...]

    @classmethod
    def of_path(cls, path: str, values: Sequence[Any]) -> Axis:
        """An axis setting one path to each of ``values``."""
        values = list(values)
        labels = tuple(label(v) for v in values)
        cells = tuple(v if _is_scalar(v) else lab for v, lab in zip(values, labels))
        return cls(path, labels, cells, tuple(((path, v),) for v in values))

    @classmethod
    def of_variants(cls, name: str, variants: Mapping[str, Mapping[str, Any]]) -> Axis:
        """An axis whose values are named bundles of settings (``{"sharing": {"plugins.sharing":
        {}}}``): the table shows the bundle's name."""
        names = tuple(variants)
        settings = tuple(tuple(bundle.items()) for bundle in variants.values())
        return cls(name, names, names, settings)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool))


def label(value: Any) -> str:
    """A short text for a value: ``0.99``, ``64MiB``, ``zipf alpha=0.9`` (a table with a kind),
    ``a+b`` (a list)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, Mapping):
        # A workload reads best kind first: "zipf alpha=0.99".
        head = [label(value["kind"])] if isinstance(value.get("kind"), str) else []
        return " ".join(head + [f"{k}={label(v)}" for k, v in value.items() if not (head and k == "kind")]) or "{}"
    if isinstance(value, (list, tuple)):
        return "+".join(label(v) for v in value) or "[]"
    return str(value)


def parse_values(text: str) -> list[Any]:
    """Values of a ``--vary`` option: TOML values separated by commas; a bare word is a string.

    :raises ValueError: when a value is empty, brackets do not match or values nest too deep.
    """
    from memvisor.limits import MAX_NESTING

    try:  # the common case, and the only way to read tables and arrays: a TOML array
        values = tomllib.loads(f"v = [{text}]")["v"]
        if values:
            check_nesting(values, "--vary")
            return values
    except tomllib.TOMLDecodeError:
        pass  # not a TOML array: bare words, split by hand below
    except (RecursionError, UserError):
        raise ValueError(f"nests deeper than {MAX_NESTING}") from None
    values = []
    for part in _split_commas(text):
        part = part.strip()
        if not part:
            raise ValueError("has an empty value (values are separated by commas)")
        try:
            values.append(tomllib.loads(f"v = {part}")["v"])
            check_nesting(values, "--vary")
        except (RecursionError, UserError):
            raise ValueError(f"nests deeper than {MAX_NESTING}") from None
        except tomllib.TOMLDecodeError:
            if part[0] in "[{\"'":
                raise ValueError(f"{part!r} is not a TOML value") from None
            values.append(part)  # a bare word: 64MiB, zipf, traces/a.npy
    return values


def _split_commas(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise ValueError("has unbalanced brackets or quotes")
    parts.append(text[start:])
    return parts


def parse_vary(text: str) -> Axis:
    """An axis from a ``--vary PATH=V1,V2,...`` option.

    :raises UserError: one line naming the option when it is malformed.
    """
    path, sep, values_text = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise UserError(f"--vary {text!r}: expected PATH=VALUE,VALUE,... (e.g. vm.*.memory=64MiB,128MiB)")
    try:
        _segments(path)
        values = parse_values(values_text)
    except ValueError as exc:
        raise UserError(f"--vary {path}: {exc}") from None
    return Axis.of_path(path, values)


# ---------------------------------------------------------------------------------------------
# paths into a scenario
# ---------------------------------------------------------------------------------------------

def _segments(path: str) -> list[str]:
    segments = path.split(".")
    if any(not s.strip() for s in segments):
        raise ValueError(f"{path!r} is not a dotted path such as vm.web.memory")
    if path in ("seed", "host.seed"):  # the seed sits at the top of a scenario; host.seed reads naturally
        return ["seed"]
    if segments[0] == "workload":
        return ["vm", "*", *segments]
    return segments


def apply_setting(data: dict, path: str, value: Any) -> None:
    """Set ``path`` to ``value`` in the raw scenario ``data`` (a TOML dict), in place.

    :raises ValueError: the problem, for a message that names the axis.
    """
    segments = _segments(path)
    value = copy.deepcopy(value)
    head = segments[0]
    if head == "vm":
        if len(segments) < 3:
            raise ValueError("a VM setting is vm.NAME.KEY or vm.*.KEY")
        vms = data.get("vm")
        if not isinstance(vms, list) or not vms:
            raise ValueError("the base scenario has no [[vm]]")
        names = [t.get("name", f"vm{i}") if isinstance(t, dict) else f"vm{i}" for i, t in enumerate(vms)]
        which = segments[1]
        if which == "*":
            targets = vms
        elif which in names:
            targets = [vms[names.index(which)]]
        elif which.isdigit() and int(which) < len(vms):
            targets = [vms[int(which)]]
        else:
            raise ValueError(f"no VM named {which!r} (VMs: {', '.join(names)})")
        if segments[2:] == ["workload"] and isinstance(value, str):
            value = {"kind": value}  # workload=zipf,scan: a kind alone is the whole workload
        for table in targets:
            _set(table, segments[2:], value)
    elif head == "plugins":
        plugins = data.get("plugins") if isinstance(data.get("plugins"), dict) else {}
        data["plugins"] = plugins
        if len(segments) == 1:
            data["plugins"] = _plugin_set(value, plugins)
        elif len(segments) == 2:
            name = segments[1]
            if value is False:
                plugins.pop(name, None)
            elif value is True:
                plugins.setdefault(name, {})
            elif isinstance(value, dict):
                plugins[name] = value
            else:
                raise ValueError(f"plugins.{name} takes true, false or a table of settings, got {value!r}")
        else:
            _set(plugins.setdefault(segments[1], {}), segments[2:], value)
    else:
        _set(data, segments, value)


def _plugin_set(value: Any, base: Mapping[str, Any]) -> dict:
    """The plugins table for a ``plugins`` axis value: names keep the base's settings."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        names = [] if value.strip() in ("", "none") else [n.strip() for n in value.split("+")]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = value
    else:
        raise ValueError(f"plugins takes names (\"a+b\", \"none\", a list) or a table, got {value!r}")
    if any(not n for n in names):
        raise ValueError(f"{value!r} has an empty plugin name")
    return {name: copy.deepcopy(base.get(name, {})) for name in names}


def _set(table: Any, segments: list[str], value: Any) -> None:
    node = table
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        where = ".".join(segments[: i + 1])
        if isinstance(node, list):
            if not segment.isdigit() or int(segment) >= len(node):
                raise ValueError(f"{where}: index out of range (the array has {len(node)} items)")
            index = int(segment)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[segment] = value
            else:
                child = node.get(segment)
                if child is None:
                    child = node[segment] = {}
                elif not isinstance(child, (dict, list)):
                    raise ValueError(f"{where} is {child!r}, not a table")
                node = child
        else:
            raise ValueError(f"{'.'.join(segments[:i])} is {node!r}, not a table")


# ---------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------

@attrs.frozen
class Compare:
    """How index.html compares runs.

    :ivar policy: the axis whose values are the policies compared (None: the first axis).
    :ivar workload: the axis whose values are the workloads (None: none).
    :ivar goal: the metric that decides the best policy (a column of the table).
    :ivar better: ``"max"`` or ``"min"``: which way the goal is better.
    :ivar metrics: columns to plot (empty: the metrics that vary across runs).
    """

    policy: str | None = None
    workload: str | None = None
    goal: str = "total.accesses"
    better: str = "max"
    metrics: tuple[str, ...] = ()


@attrs.frozen
class PlannedRun:
    """One combination of axis values.

    :ivar key: hash of the resolved scenario (and backend): the run's identity and folder name.
    :ivar axes: axis name -> the value as the table shows it.
    :ivar data: the resolved scenario, as TOML would give it.
    """

    key: str
    axes: Mapping[str, Any]
    data: Mapping[str, Any]


def run_key(data: Mapping[str, Any], backend: str | None) -> str:
    """The key of a run: a hash of its full resolved scenario and backend (same inputs, same key)."""
    canonical = json.dumps({"scenario": data, "backend": backend}, sort_keys=True, separators=(",", ":"),
                           default=str, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@attrs.frozen
class SweepSpec:
    """A checked sweep: a base scenario, the axes and how to compare.

    :ivar name: the sweep's name (titles).
    :ivar description: a sentence for index.html.
    :ivar source: the file the sweep came from (a sweep file or the scenario), for messages.
    :ivar base_path: the base scenario's file.
    :ivar base: the base scenario as TOML gives it.
    :ivar axes: the axes, in order (a later axis wins where two set the same path).
    :ivar backend: the backend every run uses instead of the scenario's, or None.
    :ivar compare: how index.html compares the runs.
    :ivar fixed: settings applied to every run before the axes (a sweep file's ``[set]``).
    """

    name: str
    description: str
    source: Path
    base_path: Path
    base: Mapping[str, Any]
    axes: tuple[Axis, ...]
    backend: str | None = None
    compare: Compare = Compare()
    fixed: tuple[Setting, ...] = ()

    def _base(self) -> dict:
        """The base scenario with the fixed settings applied."""
        data = copy.deepcopy(dict(self.base))
        for path, value in self.fixed:
            try:
                apply_setting(data, path, value)
            except ValueError as exc:
                raise UserError(f"{self.source}: set.{path}: {exc}") from None
        return data

    def with_axes(self, axes: Sequence[Axis]) -> SweepSpec:
        """The same sweep with more axes (``--vary`` options after a sweep file's)."""
        return attrs.evolve(self, axes=self.axes + tuple(axes))

    def resolve(self, choice: Sequence[int]) -> dict:
        """The scenario of one combination: value ``choice[i]`` of axis ``i``."""
        data = self._base()
        # Runs keep the base's name wherever their scenario is written down.
        data.setdefault("name", self.base_path.stem)
        for axis, index in zip(self.axes, choice):
            for path, value in axis.settings[index]:
                try:
                    apply_setting(data, path, value)
                except ValueError as exc:
                    raise UserError(f"{self.source}: axis {axis.name}={axis.labels[index]}: {path}: {exc}") from None
        return data

    def plan(self) -> list[PlannedRun]:
        """Every combination, in order (the last axis varies fastest); at most
        :data:`MAX_RUNS` of them."""
        count = math.prod(len(a.labels) for a in self.axes)
        if count > MAX_RUNS:
            raise UserError(f"{self.source}: {count:,} combinations; a sweep runs at most {MAX_RUNS:,}")
        runs = []
        for choice in itertools.product(*(range(len(a.labels)) for a in self.axes)):
            data = self.resolve(choice)
            axes = {a.name: a.values[i] for a, i in zip(self.axes, choice)}
            runs.append(PlannedRun(run_key(data, self.backend), axes, data))
        return runs

    def check(self, installed_plugins: set[str] | None = None,
              installed_backends: set[str] | None = None) -> list[PlannedRun]:
        """Check every axis value and every combination before anything runs; return the plan.

        Each value is first checked alone, so that a mistake names its axis and value.

        :param installed_plugins: names that ``plugins`` settings may use (None: not checked).
        :param installed_backends: backends the runs may name (None: not checked).
        :raises UserError: one line naming the sweep file, the axis and the problem.
        """
        self._check_scenario(copy.deepcopy(dict(self.base)), "base scenario", installed_plugins)
        if self.fixed:
            self._check_scenario(self._base(), "set", installed_plugins)
        names = [a.name for a in self.axes]
        for key in ("policy", "workload"):
            chosen = getattr(self.compare, key)
            if chosen is not None and chosen not in names:
                raise UserError(f"{self.source}: compare.{key}: no axis named {chosen!r} (axes: {', '.join(names)})")
        for name in names:
            if names.count(name) > 1:
                raise UserError(f"{self.source}: axis {name} is given twice")
        for i, axis in enumerate(self.axes):
            if not axis.labels:
                raise UserError(f"{self.source}: axis {axis.name} has no values")
            for j, value_label in enumerate(axis.labels):
                choice = [0] * len(self.axes)
                choice[i] = j
                alone = self._base()
                for path, value in axis.settings[j]:
                    try:
                        apply_setting(alone, path, value)
                    except ValueError as exc:
                        raise UserError(f"{self.source}: axis {axis.name}={value_label}: {path}: {exc}") from None
                self._check_scenario(alone, f"axis {axis.name}={value_label}", installed_plugins)
        plan = self.plan()
        for run in plan:
            where = "run " + ", ".join(f"{k}={label(v)}" for k, v in run.axes.items())
            self._check_scenario(dict(run.data), where, installed_plugins)
        self._check_goal(plan)
        if installed_backends is not None:
            for run in plan:
                backend = self.backend
                if backend is None:
                    backend = run.data.get("host", {}).get("backend", "emulator")
                if backend not in installed_backends:
                    known = ", ".join(sorted(installed_backends))
                    raise UserError(f"{self.source}: unknown backend {str(backend)[:60]!r} (installed: {known})")
        return plan

    def _check_goal(self, plan: Sequence[PlannedRun]) -> None:
        """The goal must be a column some run can have: a core column exactly, or a metric of a
        plugin some run enables (its own keys are known only from its report)."""
        from memvisor_sweep.table import column_problem

        vm_names = {str(vm.get("name", f"vm{i}")) for run in plan for i, vm in enumerate(run.data.get("vm", []))}
        plugins = {name for run in plan for name in run.data.get("plugins", {})}
        problem = column_problem(self.compare.goal, vm_names, plugins)
        if problem:
            raise UserError(f"{self.source}: goal {self.compare.goal[:80]!r}: {problem}")

    def _check_scenario(self, data: dict, where: str, installed: set[str] | None) -> None:
        try:
            parse_scenario(data, self.base_path)
        except UserError as exc:
            # The base scenario's errors name it; the sweep's file is not named twice.
            message = str(exc).removeprefix(f"{self.base_path}: ") if self.source == self.base_path else str(exc)
            raise UserError(f"{self.source}: {where}: {message}") from None
        if installed is not None:
            for name in data.get("plugins", {}):
                if name not in installed:
                    known = ", ".join(sorted(installed)) or "none"
                    raise UserError(f"{self.source}: {where}: unknown plugin {name!r} (installed: {known})")


def _read_toml(path: Path, what: str) -> dict:
    return read_toml(path, what)


def _check_base(path: Path, data: dict) -> None:
    parse_scenario(data, path)  # a broken base is reported once, as `memvisor run` would


def sweep_from_scenario(path: str | Path, axes: Sequence[Axis] = (), backend: str | None = None,
                        compare: Compare | None = None) -> SweepSpec:
    """A sweep of the scenario file ``path`` over ``axes`` (from ``--vary`` options)."""
    path = Path(path)
    data = _read_toml(path, "scenario file")
    _check_base(path, data)
    return SweepSpec(name=data.get("name", path.stem), description=data.get("description", ""), source=path,
                     base_path=path, base=data, axes=tuple(axes), backend=backend, compare=compare or Compare())


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file, or take a scenario file as a sweep with no axes yet.

    A sweep file::

        scenario = "demo.toml"              # the base scenario, relative to this file,
                                            # or a [scenario] table holding it
        [set]                               # applied to every run
        "timeline.0.for" = "0.1s"
        [vary]                              # one axis per path: a list of values
        "vm.*.workload.alpha" = [0.8, 0.99]
        seed = [1, 2, 3]
        [variants.policy.sharing]           # an axis "policy": each table is one value
        "plugins.sharing.pages_per_tick" = 4096
        [compare]
        policy = "policy"
        workload = "vm.*.workload.alpha"

    :raises UserError: one line naming the file and the key.
    """
    path = Path(path)
    data = _read_toml(path, "sweep file")
    if not isinstance(data.get("scenario"), (str, dict)):
        if "vm" in data or "host" in data:
            return sweep_from_scenario(path)
        raise UserError(f"{path}: scenario: is required (the base scenario: a file relative to this one, "
                        "or a [scenario] table)")
    unknown = sorted(set(data) - _SWEEP_KEYS)
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: unknown key (a sweep file has {', '.join(sorted(_SWEEP_KEYS))})")
    if isinstance(data["scenario"], dict):
        # The base scenario inline: the sweep file stands alone, whatever other examples become.
        base_path, base = path, data["scenario"]
    else:
        base_path = path.parent / data["scenario"]
        base = _read_toml(base_path, "scenario file")
    _check_base(base_path, base)
    axes: list[Axis] = []
    vary = data.get("vary", {})
    if not isinstance(vary, dict):
        raise UserError(f"{path}: vary: must be a table of PATH = [values]")
    for axis_path, values in _flatten_vary(vary, ""):
        if not isinstance(values, list):
            raise UserError(f"{path}: vary.{axis_path}: must be a list of values, got {values!r}")
        try:
            _segments(axis_path)
        except ValueError as exc:
            raise UserError(f"{path}: vary.{axis_path}: {exc}") from None
        axes.append(Axis.of_path(axis_path, values))
    variants = data.get("variants", {})
    if not isinstance(variants, dict):
        raise UserError(f"{path}: variants: must be a table of axes, each a table of named bundles")
    for axis_name, bundles in variants.items():
        if not isinstance(bundles, dict) or not all(isinstance(b, dict) for b in bundles.values()):
            raise UserError(f"{path}: variants.{axis_name}: must hold one table of settings per value")
        axes.append(Axis.of_variants(axis_name, bundles))
    fixed = data.get("set", {})
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: set: must be a table of PATH = value")
    for key in fixed:
        try:
            _segments(key)
        except ValueError as exc:
            raise UserError(f"{path}: set.{key}: {exc}") from None
    compare = _compare(path, data.get("compare", {}))
    backend = data.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise UserError(f"{path}: backend: must be a string, got {backend!r}")
    return SweepSpec(name=data.get("name", path.stem), description=data.get("description", base.get("description", "")),
                     source=path, base_path=base_path, base=base, axes=tuple(axes), backend=backend, compare=compare,
                     fixed=tuple(fixed.items()))


def _flatten_vary(table: Mapping[str, Any], prefix: str):
    """``vm.web.memory = [...]`` unquoted is nested tables in TOML: walk down to the lists."""
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten_vary(value, path + ".")
        else:
            yield path, value


def _compare(path: Path, raw: Any) -> Compare:
    if not isinstance(raw, dict):
        raise UserError(f"{path}: compare: must be a table")
    unknown = sorted(set(raw) - _COMPARE_KEYS)
    if unknown:
        raise UserError(f"{path}: compare.{unknown[0]}: unknown key (known: {', '.join(sorted(_COMPARE_KEYS))})")
    for key in ("policy", "workload", "goal"):
        if key in raw and not isinstance(raw[key], str):
            raise UserError(f"{path}: compare.{key}: must be a string")
    better = raw.get("better", "max")
    if better not in ("max", "min"):
        raise UserError(f"{path}: compare.better: must be \"max\" or \"min\", got {better!r}")
    metrics = raw.get("metrics", [])
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise UserError(f"{path}: compare.metrics: must be a list of column names")
    return Compare(raw.get("policy"), raw.get("workload"), raw.get("goal", "total.accesses"), better, tuple(metrics))


def is_finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (nor a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
