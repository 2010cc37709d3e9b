"""What a save, a restore and a migration share: the host they run on, the sockets to QEMU."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from pathlib import Path

from memvisor.errors import UserError
from memvisor.host import VM, Host, HostConfig
from memvisor_qemu.stream import PAGE_SIZE, QemuError

DISKMAP_SETTINGS = {"scan": True, "protect": False, "swap": False}
"""diskmap on the qemu backend: pages found equal to disk blocks by content (there are no disk
reads to watch: QEMU does the guest's I/O); no write protection and no swap (QEMU keeps the
page tables)."""


def require_plugins(*names: str) -> None:
    """One line when a plugin a command needs is not installed (plugins are never imported:
    they are enabled on the host by name)."""
    from memvisor.plugins import installed_plugins

    have = {p.name for p in installed_plugins() if p.error is None}
    for name in names:
        if name not in have:
            raise UserError(f"this needs the plugin {name!r}: pip install memvisor-{name}")


def make_host(pages: int, *, plugins: tuple[str, ...] = (), disk: str | None = None,
              settings: dict | None = None) -> tuple[Host, VM]:
    """A host on the qemu backend with one VM of ``pages`` pages and ``plugins`` enabled (the
    qemu plugin always; diskmap with ``disk`` attached read-only when a disk is given). A VM
    that would not fit in this machine's memory is refused before anything is allocated (its
    size comes from a stream or a checkpoint: input)."""
    from memvisor.limits import check_machine_memory

    try:
        check_machine_memory(pages * PAGE_SIZE, "a VM")
    except ValueError as exc:
        raise QemuError(str(exc)) from None
    names = ["qemu", *plugins]
    plugin_settings = dict(settings or {})
    if disk is not None:
        require_plugins("diskmap")
        names.append("diskmap")
        plugin_settings["diskmap"] = DISKMAP_SETTINGS
    require_plugins(*plugins)
    host = Host(HostConfig(memory_pages=pages + 1, backend="qemu", plugin_settings=plugin_settings,
                           tick_interval=0.01), names)
    vm = host.create_vm("qemu", pages)
    if disk is not None:
        host.attach_disk(vm, disk, writable=False)
    return host, vm


@contextlib.contextmanager
def socket_dir():
    """A private temporary folder for the migration sockets (``memvisor-qemu.PID.*`` in the
    temp folder), removed afterwards, on SIGTERM too, and by the next run if this one was
    killed (:func:`memvisor.files.temp_dir`)."""
    from memvisor.files import temp_dir

    with temp_dir("qemu") as path:
        yield Path(path)


def listen(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def accept(server: socket.socket, timeout: float, what: str) -> socket.socket:
    """The one connection QEMU makes to ``server`` within ``timeout`` seconds."""
    ready, _, _ = select.select([server], [], [], timeout)
    if not ready:
        raise QemuError(f"{what}: QEMU did not connect within {timeout:.0f} s")
    conn, _ = server.accept()
    return conn


def connect(path: Path, timeout: float, what: str) -> socket.socket:
    """Connect to the socket QEMU listens on (``migrate-incoming``), waiting for it to appear."""
    limit = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except OSError as exc:
            sock.close()
            if time.monotonic() > limit:
                raise QemuError(f"{what}: cannot connect to QEMU's incoming socket: {exc.strerror or exc}") from None
            time.sleep(0.01)


class Link:
    """A migration stream memvisor writes to QEMU: every failure is one line, bytes counted."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        self.bytes = 0

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise QemuError(f"{self.name}: connection to QEMU lost ({exc.strerror or exc}): "
                            "QEMU stopped or closed the migration") from None
        self.bytes += len(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
