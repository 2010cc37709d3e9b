"""Bounds on what input may make memvisor do: every number finite and within a documented
limit, every size within this machine's memory, every decompression checked before it starts.

Everything from outside (scenario values, command-line values, checkpoint files, migration
records, traces) is checked here or against these limits before memvisor allocates, loops or
decompresses on its word. docs/reliability.md lists the limits.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import IO, Any

import zstandard

MAX_SIZE_BYTES = 1 << 50
"""The largest size any input may state (1 PiB): checkpoint VMs, sizes in scenarios."""

MAX_DURATION_S = 7 * 86400.0
"""The longest duration a scenario may state (a week of virtual or real time)."""

MIN_TICK_S = 1e-6
"""The shortest tick interval (1 µs): shorter ones make a run of any length fire billions of
ticks."""

MAX_TICKS = 10**8
"""The most ticks one run step may fire (its duration divided by the tick interval)."""

MAX_BATCH = 1 << 24
"""The most accesses in one guest batch (``[host] batch``): 16 Mi accesses, 144 MiB of arrays."""

MAX_VMS = 1024
"""The most VMs a scenario may create."""

MAX_TIMELINE_STEPS = 100_000
"""The most steps of a scenario's timeline."""

MAX_HANDLER_THREADS = 1024
"""The most trap handler threads of a host."""

MAX_SCENARIO_BYTES = 16 << 20
"""The largest scenario (or sweep) file read."""

MAX_REPORT_BYTES = 64 << 20
"""The largest report.json ``memvisor compare`` reads (the demo's is 1 MiB)."""

MAX_NESTING = 100
"""How deep tables and arrays of a scenario file may nest."""

MAX_INTEGER = 2**63 - 1
"""The largest whole number a scenario value may be (an int64)."""


def _fmt(nbytes: float) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{int(nbytes)} byte{'' if nbytes == 1 else 's'}"


format_bytes = _fmt
"""``format_bytes(n)``: ``"1.5 GiB"``, for error messages."""


@functools.cache
def machine_memory() -> int:
    """Bytes of physical memory of this machine."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - every Linux has both
        return 1 << 40


def available_memory() -> int:
    """Bytes of memory this machine can give a process now (``MemAvailable``), at most
    :func:`machine_memory`."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return min(machine_memory(), int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return machine_memory()


def memory_budget() -> int:
    """Bytes one input may make memvisor allocate to read it (a trace, a checkpoint's
    metadata): half of what the machine has available now."""
    return available_memory() // 2


def check_machine_memory(nbytes: int, what: str) -> None:
    """Refuse (``ValueError``, the message says what and how much) a size larger than this
    machine's physical memory: a host, a VM or a generated disk that could never be backed."""
    if nbytes > machine_memory():
        raise ValueError(f"{what} of {_fmt(nbytes)} is larger than this machine's memory ({_fmt(machine_memory())})")


def check_budget(nbytes: int, what: str) -> None:
    """Refuse (``ValueError``) reading work that would allocate more than :func:`memory_budget`."""
    budget = memory_budget()
    if nbytes > budget:
        raise ValueError(f"{what} needs about {_fmt(nbytes)} of memory; this machine can give {_fmt(budget)} now")


def finite(value: Any, what: str = "a number") -> float:
    """``value`` as a float when it is a finite int or float (not a bool); else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError(f"{what} must be a finite number, got an integer of {len(str(abs(value)))} digits") from None
    if not math.isfinite(as_float):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return as_float


# -- decompression ------------------------------------------------------------------------------

Error = Callable[[str], Exception]
"""``error(problem) -> exception`` to raise: each reader names its own input."""

ZSTD_MAX_WINDOW = 1 << 27
"""Largest zstd window a reader of input accepts (128 MiB: zstd's default limit)."""


def decompress_frame(frame, expected: int, error: Error, decompressor=None) -> bytes:
    """Exactly ``expected`` bytes from one zstd frame, or ``error``: the frame must declare that
    size, which is checked before anything is decompressed, and output stops there, so a
    hostile frame costs at most ``expected`` bytes of memory."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise error(f"bad zstd frame: {exc}") from None
    if declared != expected:
        what = "no size" if declared < 0 or declared == zstandard.CONTENTSIZE_UNKNOWN else f"{declared} bytes"
        raise error(f"zstd frame declares {what}, expected {expected} bytes")
    if decompressor is None:
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    try:
        raw = decompressor.decompress(frame, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise error(f"zstd: {exc}") from None
    if len(raw) != expected:
        raise error(f"decompressed to {len(raw)} bytes, expected {expected}")
    return raw


class BoundedZstdReader:
    """A file-like reader of zstd data (concatenated frames read as one stream) that refuses,
    with ``error``, input that ends inside a frame or decompresses to more than ``limit`` bytes:
    the output is counted as it is made, never after.

    python-zstandard's ``stream_reader`` returns a truncated frame's data without complaint,
    hence this reader.
    """

    _INPUT_CHUNK = 1 << 16  # small: zstd expands 100x and more on page traces

    def __init__(self, raw: IO[bytes], limit: int, error: Error, max_window: int = ZSTD_MAX_WINDOW):
        self._raw, self._limit, self._error = raw, int(limit), error
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=max_window)
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")
        self.produced = 0

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            # zstd makes at most 128 KiB of one 3-byte block header (an RLE block): feed no
            # more input than the limit leaves room for, so the limit is overshot by one block.
            step = max(1, (self._limit - self.produced) >> 17)
            piece = self._frame.decompress(data[:step])
            data = data[step:]
            self.produced += len(piece)
            if self.produced > self._limit:
                raise self._error(f"decompresses to more than {_fmt(self._limit)}, the most it may take to read here")
            out.append(piece)
            self._in_frame = not self._frame.eof
            if self._frame.eof:  # the next frame starts with what this one left
                data = self._frame.unused_data + data
                self._frame = self._decompressor.decompressobj()
        return b"".join(out)

    def _more(self) -> bool:
        """Decompress more input into ``_pending``; False at the end of the data."""
        while True:
            data = self._raw.read(self._INPUT_CHUNK)
            if not data:
                if self._in_frame:
                    raise self._error("truncated: the zstd data ends in the middle of a frame")
                return False
            joined = self._decompress(data)
            if joined:
                self._pending = memoryview(joined)
                return True

    def readinto(self, buffer: memoryview) -> int:
        """Copy up to ``len(buffer)`` bytes into ``buffer``; 0 only at the end of the data."""
        if not self._pending and not self._more():
            return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all the rest if negative); fewer only at the end of the data."""
        if size < 0:
            parts = [bytes(self._pending)]
            self._pending = memoryview(b"")
            while self._more():
                parts.append(bytes(self._pending))
                self._pending = memoryview(b"")
            return b"".join(parts)
        buffer = bytearray(size)
        view, done = memoryview(buffer), 0
        while done < size:
            got = self.readinto(view[done:])
            if not got:
                break
            done += got
        return bytes(buffer[:done])
