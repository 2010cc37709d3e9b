"""Figures in the units a person reads: sizes in KiB/MiB/GiB/TiB (binary, as the command line
and scenarios write them), times in µs/ms/s, counts with thousands separators.

:func:`shown` formats a value in one of :data:`UNITS`; :func:`exact` says the same value
without rounding (a tooltip, a JSON reader's check). Reports, ``memvisor compare`` and the
commands' summaries all format through here, so one figure reads the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any

from memvisor import PAGE_SIZE

UNITS = {
    "": "a number as it is (a whole number with separators, else 3 significant digits)",
    "count": "a whole number of things: 2,454",
    "pages": "4 KiB pages, shown as a size: 172 MiB",
    "bytes": "bytes, shown as a size: 52.7 MiB",
    "MiB": "mebibytes, shown as a size: 1.25 GiB",
    "s": "seconds, shown as a duration: 64 µs, 2.6 ms, 1.96 s",
    "fraction": "a share from 0 to 1, shown as a percentage: 99.8 %",
    "ratio": "a ratio, shown with a times sign: 4.77×",
    "per_s": "events per second: 253,000/s",
    "MiB/s": "mebibytes per second, shown as a throughput: 1.2 GiB/s",
    "bytes/s": "bytes per second, shown as a throughput: 64 MiB/s",
    "text": "words, shown as they are",
}
"""The units a report column or headline figure may have, and how each is shown."""

_SIZE_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def _digits(value: float) -> str:
    """``value`` with 3 significant digits, no exponent, no trailing zeros after the point."""
    size = abs(value)
    decimals = 0 if size >= 100 else 1 if size >= 10 else 2
    text = f"{value:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def size(nbytes: float) -> str:
    """A size in binary units: ``"172 MiB"``, ``"1.25 GiB"``, ``"512 bytes"``."""
    for unit, scale in _SIZE_UNITS:
        if abs(nbytes) >= scale:
            return f"{_digits(nbytes / scale)} {unit}"
    return f"{_digits(nbytes)} byte{'' if nbytes == 1 else 's'}"


def duration(seconds: float) -> str:
    """A duration: ``"64 µs"``, ``"2.6 ms"``, ``"1.96 s"`` (seconds beyond a minute too)."""
    size_ = abs(seconds)
    if size_ == 0:
        return "0 s"
    if size_ < 1e-3:
        return f"{_digits(seconds * 1e6)} µs"
    if size_ < 1:
        return f"{_digits(seconds * 1e3)} ms"
    return f"{_digits(seconds)} s"


def count(value: float) -> str:
    """A whole number with separators: ``"2,454"`` (a fraction rounds)."""
    return f"{round(value):,}"


def _rate(value: float) -> str:
    return f"{_digits(value) if value < 1000 else count(value)}/s"


_SHOWN = {
    "count": count,
    "pages": lambda v: size(v * PAGE_SIZE),
    "bytes": size,
    "MiB": lambda v: size(v * (1 << 20)),
    "s": duration,
    "fraction": lambda v: f"{_digits(v * 100)} %",
    "ratio": lambda v: f"{_digits(v)}×",
    "per_s": _rate,
    "MiB/s": lambda v: f"{size(v * (1 << 20))}/s",
    "bytes/s": lambda v: f"{size(v)}/s",
    "": lambda v: count(v) if isinstance(v, int) else _digits(v),
}
"""How :func:`shown` shows a number in each unit."""


def shown(value: Any, unit: str = "") -> str:
    """``value`` as a person reads it in ``unit`` (one of :data:`UNITS`); a missing value
    (None) is a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if unit == "text" or not isinstance(value, (int, float)):
        if isinstance(value, (list, tuple)):
            return ", ".join(f"({shown(v)})" if isinstance(v, (list, tuple)) else shown(v) for v in value)
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return _SHOWN[check_unit(unit)](value)


def _whole(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) or float(value).is_integer() else f"{value:,.9g}"


_EXACT = {
    "pages": lambda v: f"{_whole(v)} pages ({_whole(v * PAGE_SIZE)} bytes)",
    "bytes": lambda v: f"{_whole(v)} bytes",
    "MiB": lambda v: f"{_whole(v)} MiB ({_whole(v * (1 << 20))} bytes)",
    "s": lambda v: f"{v:.9g} s",
    "fraction": lambda v: f"{v:.9g}",
    "per_s": lambda v: f"{v:.9g} per second",
    "MiB/s": lambda v: f"{v:.9g} MiB/s",
    "bytes/s": lambda v: f"{v:.9g} bytes/s",
}
"""How :func:`exact` says a number in the units it has a unit word for (else: the number)."""


def exact(value: Any, unit: str = "") -> str:
    """``value`` unrounded, in the unit it is counted in (``"44,032 pages (180,355,072
    bytes)"``): what a tooltip shows beside :func:`shown`."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return shown(value, unit)
    return _EXACT.get(check_unit(unit), _whole)(value)


def check_unit(unit: str) -> str:
    """``unit`` if it is one of :data:`UNITS`; ValueError otherwise."""
    if unit not in UNITS:
        raise ValueError(f"no unit {unit!r} (units: {', '.join(u for u in UNITS if u)})")
    return unit
