"""Plugin settings: declared once by the plugin, checked by the core.

A plugin declares what its ``[plugins.NAME]`` table may hold as a frozen attrs class whose
fields are made with :func:`setting` (type from the annotation; default, bounds or choices and
a one-line doc from the call), and registers it from :func:`memvisor_register_settings`::

    @attrs.frozen
    class HotCountSettings:
        every: int = setting(64, low=1, high=1 << 20, doc="Trace every N-th page of each VM.")
        window: Duration = setting(0.05, above=0, doc="Seconds between two counts.")

    @hookimpl
    def memvisor_register_settings(self, register):
        register("hotcount", HotCountSettings)

The core checks the table when the scenario is loaded (an unknown key, a value of the wrong type,
out of bounds, NaN or infinite: one line naming the file and the dotted key, exit status 2),
fills the defaults and hands the plugin an instance: ``host.plugin_settings("hotcount")``.
``memvisor plugins --settings hotcount`` prints the declaration; sweep axes
(``--vary plugins.hotcount.every=...``) are checked against it before any run.

Types: ``bool``, ``int``, ``float``, ``str``, :data:`Size` (bytes, written ``"64MiB"``),
:data:`Duration` (seconds, written ``"10ms"``), ``X | None`` (absent means the default, None,
which the plugin resolves), ``tuple[X, ...]`` (a TOML array) and ``Mapping[str, X]`` (a TOML
table of names). Bounds and choices apply to the numbers and strings inside arrays and tables.
A setting whose default or bound depends on the host (its tick, its memory) is declared with
its static bounds and ``host_dependent="..."`` saying what the plugin checks when the host
starts; that check raises :class:`memvisor.errors.UserError` with one line
(``plugins.NAME.KEY: ...``).
"""

from __future__ import annotations

import difflib
import functools
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, NewType

import attrs

from memvisor.errors import UserError

Size = NewType("Size", int)
"""A size in bytes. A scenario writes it in binary units (``"64MiB"``, ``"4KiB"``) or as a
whole number of bytes."""

Duration = NewType("Duration", float)
"""A duration in seconds. A scenario writes it ``"10ms"``, ``"2s"``, ``"1min"`` or as a number
of seconds."""

_KEY = "memvisor.setting"
_INT64 = 2**63 - 1


class SettingError(UserError):
    """A plugin's setting that cannot be used: ``key`` is the dotted key
    (``plugins.numa.heuristic``), ``problem`` what is wrong with it."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key}: {problem}")


def setting(default: Any = None, *, doc: str, low: float | None = None, high: float | None = None,
            above: float | None = None, choices: tuple | None = None, min_items: int = 0,
            check: Callable[[Any], str | None] | None = None, host_dependent: str | None = None) -> Any:
    """A field of a settings class: its default, bounds and one-line doc.

    :param default: the value when the table does not give one (sizes in bytes, durations in
        seconds). ``None`` for an ``X | None`` setting whose default the plugin works out.
    :param doc: one line saying what the setting does (shown by ``memvisor plugins --settings``).
    :param low: the smallest value allowed (inclusive).
    :param high: the largest value allowed (inclusive).
    :param above: values must be strictly above this.
    :param choices: the values allowed (strings, usually).
    :param min_items: the fewest items of an array or table.
    :param check: ``check(value)`` returns a problem (one line) or None, for rules the bounds
        cannot say (``"a VM is named in two groups"``).
    :param host_dependent: what the plugin checks against the host when it starts (shown in the
        docs; the plugin raises :class:`UserError` itself).
    """
    if isinstance(default, (list, dict)):
        default = _frozen(default)
    meta = {"doc": doc, "low": low, "high": high, "above": above, "min_items": min_items, "check": check,
            "choices": None if choices is None else tuple(choices), "host_dependent": host_dependent}
    return attrs.field(default=default, metadata={_KEY: meta})


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
    return value


@attrs.frozen
class Setting:
    """One declared setting, as :func:`declared` reads it from a settings class.

    :ivar name: the key in the plugin's table.
    :ivar kind: the type (the field's annotation).
    :ivar default: the default value.
    :ivar doc: the one-line doc.
    """

    name: str
    kind: Any
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    above: float | None = None
    choices: tuple | None = None
    min_items: int = 0
    check: Callable[[Any], str | None] | None = None
    host_dependent: str | None = None

    @property
    def type_name(self) -> str:
        """The type as the docs show it: ``int``, ``size``, ``array of float``, ..."""
        return _type_name(self.kind)

    @property
    def default_text(self) -> str:
        """The default as a scenario would write it (``"50ms"``, ``"64MiB"``, ``true``)."""
        if self.default is None:
            return "(from the host)" if self.host_dependent else "(none)"
        return _shown(_scalar_kind(self.kind), self.default)

    @property
    def allowed_text(self) -> str:
        """The bounds or choices in words (empty when there are none)."""
        scalar = _scalar_kind(self.kind)
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(_shown(scalar, c) for c in self.choices))
        if self.range_text:
            parts.append(self.range_text)
        if self.min_items:
            parts.append(f"at least {self.min_items} item{'s' if self.min_items > 1 else ''}")
        return ", ".join(parts)

    @property
    def range_text(self) -> str:
        """The numeric bounds in words: ``from 0 to 1``, ``above 0``, ``at least 1``."""
        scalar = _scalar_kind(self.kind)
        low = None if self.low is None else _shown(scalar, self.low)
        high = None if self.high is None else _shown(scalar, self.high)
        above = None if self.above is None else _shown(scalar, self.above)
        if above is not None:
            return f"above {above}" + (f" and at most {high}" if high is not None else "")
        if low is not None and high is not None:
            return f"from {low} to {high}"
        if low is not None:
            return f"at least {low}"
        return f"at most {high}" if high is not None else ""

    def to_json(self) -> dict:
        """The declaration as JSON-able values (``memvisor plugins --settings NAME --json``)."""
        return {"name": self.name, "type": self.type_name, "default": _jsonable(self.default),
                "allowed": self.allowed_text, "doc": self.doc, "host_dependent": self.host_dependent}

    def parse(self, value: Any, key: str) -> Any:
        """``value`` from a scenario table, converted and checked; :class:`SettingError` naming
        ``key`` (or the entry of an array or table within it) when it cannot be used."""
        converted = self._convert(self.kind, value, key)
        problem = self.check(converted) if self.check is not None else None
        if problem:
            raise SettingError(key, problem)
        return converted

    def _convert(self, kind: Any, value: Any, key: str) -> Any:
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if origin in (types.UnionType, typing.Union):  # X | None: TOML has no null, so it is X
            (inner,) = [a for a in args if a is not type(None)]
            return self._convert(inner, value, key)
        if origin is tuple:
            if not isinstance(value, list):
                raise SettingError(key, f"must be an array ({_type_name(kind)}), got {_short(value)}")
            if len(value) < self.min_items:
                raise SettingError(key, f"must have at least {self.min_items} item{'s' if self.min_items > 1 else ''}")
            return tuple(self._convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
        if origin in (Mapping, dict, typing.Mapping):
            if not isinstance(value, Mapping):
                raise SettingError(key, f"must be a table ({_type_name(kind)}), got {_short(value)}")
            if len(value) < self.min_items:
                raise SettingError(key, f"must have at least {self.min_items} entr"
                                        f"{'ies' if self.min_items > 1 else 'y'}")
            return types.MappingProxyType({str(k): self._convert(args[1], v, f"{key}.{k}") for k, v in value.items()})
        try:
            return self._scalar(kind, value)
        except ValueError as exc:
            raise SettingError(key, str(exc)) from None

    def _scalar(self, kind: Any, value: Any) -> Any:
        from memvisor.scenario import parse_duration, parse_size

        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {_short(value)}")
            return value
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(f"must be a string, got {_short(value)}")
            if self.choices is not None and value not in self.choices:
                close = difflib.get_close_matches(value, [str(c) for c in self.choices], n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"must be one of {', '.join(map(str, self.choices))}, got {_short(value)}{hint}")
            return value
        if kind is Size:
            number = parse_size(value)
        elif kind is Duration:
            number = parse_duration(value)
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"must be a whole number, got {_short(value)}")
            if abs(value) > _INT64:
                raise ValueError(f"must fit in 64 bits, got a number of {len(str(abs(value)))} digits")
            number = value
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, got {_short(value)}")
            if isinstance(value, float) and not math.isfinite(value) or abs(value) > 1e300:
                raise ValueError(f"must be a finite number, got {value!r}")
            number = float(value)
        else:  # pragma: no cover - declared() refuses other types
            raise TypeError(f"unsupported setting type {kind!r}")
        if self.choices is not None and number not in self.choices:
            raise ValueError(f"must be one of {', '.join(_shown(kind, c) for c in self.choices)}, got {_short(value)}")
        if (self.above is not None and not number > self.above) or (self.low is not None and number < self.low) \
                or (self.high is not None and number > self.high):
            raise ValueError(f"must be {self.range_text}, got {_short(value)}")
        return number


_SCALARS = (bool, int, float, str, Size, Duration)


def _scalar_kind(kind: Any) -> Any:
    """The scalar inside ``X | None``, ``tuple[X, ...]`` and ``Mapping[str, X]``."""
    while typing.get_origin(kind) is not None:
        args = [a for a in typing.get_args(kind) if a is not type(None) and a is not Ellipsis]
        kind = args[-1]
    return kind


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in args if a is not type(None)]
        return _type_name(inner)
    if origin is tuple:
        return f"array of {_type_name(args[0])}"
    if origin in (Mapping, dict, typing.Mapping):
        return f"table of {_type_name(args[1])}"
    return {Size: "size", Duration: "duration"}.get(kind, getattr(kind, "__name__", str(kind)))


def _shown(kind: Any, value: Any) -> str:
    """A value as a scenario writes it."""
    from memvisor.limits import format_bytes

    if isinstance(value, bool):
        return "true" if value else "false"
    if kind is Duration and isinstance(value, (int, float)):
        for unit, scale in (("min", 60.0), ("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
            if value >= scale or unit == "us":
                return f'"{value / scale:g}{unit}"' if value else '"0s"'
    if kind is Size and isinstance(value, int):
        return f'"{format_bytes(value).replace(" ", "")}"' if value % 1024 == 0 or value < 1024 else str(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(kind, v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_shown(kind, v)}" for k, v in value.items()) + "}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:_}"
    return repr(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def declared(cls: type) -> list[Setting]:
    """The settings a settings class declares, in order. Raises ``TypeError`` for a class that
    is not a frozen attrs class of :func:`setting` fields of a supported type."""
    if not attrs.has(cls):
        raise TypeError(f"{cls!r} is not an attrs class (declare settings with @attrs.frozen)")
    attrs.resolve_types(cls)
    out = []
    for field in attrs.fields(cls):
        meta = field.metadata.get(_KEY)
        if meta is None:
            raise TypeError(f"{cls.__name__}.{field.name} is not made with memvisor.settings.setting()")
        if _scalar_kind(field.type) not in _SCALARS:
            raise TypeError(f"{cls.__name__}.{field.name}: unsupported setting type {field.type!r}")
        default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
        out.append(Setting(field.name, field.type, default, **{k: v for k, v in meta.items()}))
    return out


def load(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """An instance of settings class ``cls`` from a scenario table ``data``: every key checked,
    defaults filled. :class:`SettingError` names the dotted key (``where.KEY``) of the first
    problem.

    :param where: the dotted name of the table, ``plugins.NAME``.
    """
    if not isinstance(data, Mapping):
        raise SettingError(where, f"must be a table, got {_short(data)}")
    settings = {s.name: s for s in declared(cls)}
    for key in data:
        if key not in settings:
            close = difflib.get_close_matches(str(key), list(settings), n=1, cutoff=0.6)
            known = ", ".join(settings) or "none: this plugin has no settings"
            raise SettingError(f"{where}.{key}", "unknown setting" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f" (known: {known})")
    values = {name: settings[name].parse(value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def render_markdown(name: str, cls: type) -> str:
    """The settings of plugin ``name`` as a Markdown table (the generated docs)."""
    rows = ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for s in declared(cls):
        doc = s.doc + (f" Host-dependent: {s.host_dependent}" if s.host_dependent else "")
        cells = [f"`{s.name}`", s.type_name, f"`{s.default_text}`", s.allowed_text, doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if len(rows) == 2:
        return f"`[plugins.{name}]` has no settings: an empty table enables the plugin.\n"
    return "\n".join(rows) + "\n"


def installed() -> Mapping[str, type]:
    """The settings class of every installed plugin that declares one, by plugin name (the
    allow- and block-lists apply)."""
    import os

    from memvisor.plugins import ENV_ALLOW, ENV_BLOCK

    return _installed(os.environ.get(ENV_ALLOW), os.environ.get(ENV_BLOCK))


@functools.cache
def _installed(allow: str | None, block: str | None) -> Mapping[str, type]:
    from memvisor.plugins import new_plugin_manager
    from memvisor.registry import SettingsRegistry, fill

    pm = new_plugin_manager(None, strict=False)
    return types.MappingProxyType(dict(fill(pm.hook.memvisor_register_settings, SettingsRegistry(), pm).items()))


def as_json(settings: Any) -> dict:
    """A settings object as JSON-able values (arrays as lists, tables as dicts), for reports."""
    return {s.name: _jsonable(getattr(settings, s.name)) for s in declared(type(settings))}
