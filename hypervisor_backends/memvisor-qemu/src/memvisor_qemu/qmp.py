"""Talking to QEMU through its monitor (QMP), with the QEMU project's own client (qemu.qmp).

Only what memvisor needs: which QEMU and machine type this is, its RAM blocks, its run state,
migration capabilities and parameters, starting an outgoing or incoming migration and
waiting for its end. Every failure is one line (:class:`QemuError`) naming the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from pathlib import Path

import attrs

from memvisor_qemu.stream import QemuError

SUPPORTED = (7, 2)
"""The QEMU version memvisor speaks the migration stream of (Debian 12's qemu-system-x86)."""

_RAMBLOCK = re.compile(r"^\s*(\S+)\s+\d+ \S+\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)", re.M)
"""A line of ``info ramblock``: name, page size, offset, used, total."""


@attrs.frozen
class BlockInfo:
    """A RAM block as ``info ramblock`` shows it: name, bytes used, bytes reserved."""

    name: str
    used: int
    total: int

    def takes(self, length: int) -> bool:
        """Whether a block of ``length`` bytes loads into this one: the same size, or within
        the reserve of a block QEMU resizes (ACPI tables)."""
        return length == self.used or (self.used < self.total and length <= self.total)


class Monitor:
    """A QMP connection to one QEMU.

    :param path: the QMP socket (``-qmp unix:PATH,server=on,wait=off``).
    :param timeout: seconds a command may take.
    """

    def __init__(self, path, timeout: float = 10.0):
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.path = str(path)
        if not Path(self.path).exists():
            raise QemuError(f"{self.path}: no such QMP socket")
        self._qmp = QEMUMonitorProtocol(self.path)
        outcome: list = []

        def connect():
            try:
                outcome.append(self._qmp.connect())
            except Exception as exc:  # qemu.qmp raises its own and OS errors
                outcome.append(exc)

        # QEMU serves one client per QMP socket: a socket another client holds never greets,
        # and the client library would wait for ever.
        worker = threading.Thread(target=connect, daemon=True)
        worker.start()
        worker.join(timeout)
        if not outcome:
            raise QemuError(f"{self.path}: QEMU's monitor did not answer within {timeout:.0f} s (another client "
                            "holds this QMP socket? give memvisor a -qmp socket of its own)")
        if isinstance(outcome[0], Exception):
            raise QemuError(f"{self.path}: cannot connect to QEMU's monitor: {_one_line(outcome[0])}")
        self._qmp.settimeout(timeout)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        qmp, self._qmp = self._qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):  # QEMU may be gone already
                qmp.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def execute(self, command: str, **arguments):
        """Run a QMP command; its return value, or :class:`QemuError` with QEMU's reason."""
        if self._qmp is None:
            raise QemuError(f"{self.path}: monitor connection closed")
        try:
            reply = self._qmp.cmd_raw(command, arguments or None)
        except (Exception, asyncio.CancelledError) as exc:
            raise QemuError(f"{self.path}: {command}: QEMU did not answer ({_one_line(exc)})") from None
        if "error" in reply:
            raise QemuError(f"{self.path}: {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def _answer(self, command: str, read, **arguments):
        """``read(answer)`` of a command's answer; an answer of another shape than QEMU 7.2's
        (a monitor that is not QEMU's, or not this version) is one line, not a traceback."""
        answer = self.execute(command, **arguments)
        try:
            return read(answer)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            raise QemuError(f"{self.path}: {command}: an answer memvisor does not understand: "
                            f"{_one_line(repr(answer))[:120]}") from None

    # -- facts ---------------------------------------------------------------------------------

    def version(self) -> tuple[int, int, int]:
        """QEMU's version (major, minor, micro)."""
        def read(answer):
            v = answer["qemu"]
            return int(v["major"]), int(v["minor"]), int(v["micro"])

        return self._answer("query-version", read)

    def check_version(self) -> str:
        """Refuse a QEMU other than 7.2 (one line); its version as text otherwise."""
        major, minor, micro = self.version()
        if (major, minor) != SUPPORTED:
            raise QemuError(f"{self.path}: QEMU {major}.{minor}.{micro} is not supported: memvisor speaks the "
                            f"migration stream of QEMU {SUPPORTED[0]}.{SUPPORTED[1]} only (tested there)")
        return f"{major}.{minor}.{micro}"

    def machine(self) -> str:
        """The machine type, as the migration stream names it (``pc-i440fx-7.2``)."""
        return self._answer("qom-get", lambda name: name.removesuffix("-machine"), path="/machine", property="type")

    def ram_blocks(self) -> list[BlockInfo]:
        """The VM's RAM blocks (``info ramblock``)."""
        return self._answer("human-monitor-command", lambda text: [
            BlockInfo(m[1], int(m[3], 16), int(m[4], 16)) for m in _RAMBLOCK.finditer(text)],
            **{"command-line": "info ramblock"})

    def status(self) -> str:
        """The run state (``running``, ``paused``, ``inmigrate``, ``postmigrate`` …)."""
        return self._answer("query-status", lambda answer: str(answer["status"]))

    def migration(self) -> dict:
        """``query-migrate``."""
        return self._answer("query-migrate", lambda answer: dict(answer))

    def max_bandwidth(self) -> int:
        """The migration's ``max-bandwidth`` parameter (bytes per second)."""
        return self._answer("query-migrate-parameters", lambda answer: int(answer["max-bandwidth"]))

    def capabilities(self) -> dict[str, bool]:
        """Migration capabilities by name."""
        return self._answer("query-migrate-capabilities",
                            lambda answer: {str(c["capability"]): bool(c["state"]) for c in answer})

    def set_capabilities(self, **states: bool) -> None:
        """Set migration capabilities (names with ``-`` spelled ``_``)."""
        caps = [{"capability": k.replace("_", "-"), "state": v} for k, v in states.items()]
        self.execute("migrate-set-capabilities", capabilities=caps)

    def wait_migration(self, timeout: float, done=("completed",), failed=("failed", "cancelled")) -> dict:
        """Poll ``query-migrate`` until its status is in ``done``; :class:`QemuError` on a
        failed one or after ``timeout`` seconds."""
        limit = time.monotonic() + timeout
        while True:
            info = self.migration()
            status = info.get("status")
            if status in done:
                return info
            if status in failed:
                raise QemuError(f"{self.path}: migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > limit:
                raise QemuError(f"{self.path}: migration still {status} after {timeout:.0f} s")
            time.sleep(0.01)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__
