"""``memvisor qemu save``: QEMU migrates its VM to memvisor, which writes a memvisor checkpoint.

1. Through QMP: QEMU 7.2 (else one line), no migration capability that changes the stream.
2. Stop-the-world (default): the VM is stopped, QEMU sends every page once. ``live``: the VM
   runs while QEMU sends pre-copy rounds; pages sent again in later rounds were written
   meanwhile, which is QEMU's dirty tracking, kept as heat for a hottest-first restore.
3. memvisor receives the stream into the qemu backend's memory: the RAM blocks' pages, then
   the device sections and the JSON description kept verbatim.
4. The core's save writes the checkpoint (:func:`memvisor.builtins.checkpoint.vm.write_checkpoint`):
   zero pages in the page map, pages that ``memvisor_describe_pages`` describes as records
   (diskmap's disk references, with ``disk``), the rest compressed by storage block; then the
   ``qemu`` section (:mod:`memvisor_qemu.state`); then the order sidecar when there is heat.
5. The VM is resumed if it was running before. A failure at any step leaves the previous
   checkpoint of that name untouched and the VM running as before.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import numpy as np

from memvisor.builtins.checkpoint import CheckpointReader, CheckpointWriter
from memvisor.builtins.checkpoint.vm import write_checkpoint, writer_stats
from memvisor.events import SaveRequest
from memvisor_qemu import stream as S
from memvisor_qemu.order import sidecar_path, write_order
from memvisor_qemu.qmp import Monitor
from memvisor_qemu.session import accept, listen, make_host, socket_dir
from memvisor_qemu.state import TAG, QemuState

UNSUPPORTED_CAPABILITIES = ("xbzrle", "compress", "multifd", "postcopy-ram", "return-path", "x-ignore-shared",
                            "block", "dirty-bitmaps", "background-snapshot", "rdma-pin-all", "x-colo",
                            "zero-copy-send", "postcopy-preempt", "late-block-activate")
LIVE_BANDWIDTH = 1 << 40
"""max-bandwidth during a live save: the link is a local socket, the limit is for networks."""


@attrs.define
class SaveResult:
    """What a save did: the checkpoint's figures and QEMU's."""

    path: str
    qemu: str
    machine: str
    pages: int
    stream_bytes: int
    pages_received: int
    pages_resent: int
    seconds: float
    checkpoint: dict
    order: str | None = None

    def to_json(self) -> dict:
        return attrs.asdict(self)


def save(qmp: str, out, *, disk: str | None = None, live: bool = False, key: bytes | None = None,
         level: int = 1, timeout: float = 600.0) -> SaveResult:
    """Save the VM of the QEMU behind ``qmp`` as checkpoint ``out`` (see the module)."""
    started = time.perf_counter()
    out = Path(out)
    _check_outputs(out, disk)
    with Monitor(qmp) as mon:
        version = mon.check_version()
        status = mon.status()
        if status not in ("running", "paused"):
            raise S.QemuError(f"{qmp}: the VM is {status}; a save needs a running or paused VM")
        on = [c for c, state in mon.capabilities().items() if state and c in UNSUPPORTED_CAPABILITIES]
        if on:
            raise S.QemuError(f"{qmp}: migration capability {on[0]!r} is on; memvisor reads the plain stream: "
                              "turn it off (migrate-set-capabilities)")
        was_running = status == "running"
        bandwidth = mon.max_bandwidth()
        with socket_dir() as folder:
            server = listen(folder / "save.sock")
            try:
                if not live and was_running:
                    mon.execute("stop")
                if live:
                    mon.execute("migrate-set-parameters", **{"max-bandwidth": LIVE_BANDWIDTH})
                mon.execute("migrate", uri=f"unix:{folder / 'save.sock'}")
                conn = accept(server, 30.0, qmp)
                try:
                    received = _receive(S.StreamReader(conn, f"migration stream from {qmp}"), disk, version,
                                        was_running)
                finally:
                    conn.close()
                mon.wait_migration(timeout)
                result = _write(received, out, key, level)
            finally:
                server.close()
                if live:
                    mon.execute("migrate-set-parameters", **{"max-bandwidth": bandwidth})
                if was_running and mon.status() != "running":
                    mon.execute("cont")
    result.seconds = time.perf_counter() - started
    return result


def _check_outputs(out: Path, disk: str | None) -> None:
    """Refuse, before QEMU is asked for anything, a checkpoint or an order sidecar beside it
    (written by a live save) that cannot be written as a regular file or that is the disk."""
    from memvisor.files import check_output, refuse_same_file

    for path, what in ((out, "checkpoint"), (sidecar_path(out), "order sidecar of the checkpoint")):
        check_output(path, what)
        refuse_same_file(path, [disk], what)


@attrs.define
class _Received:
    state: QemuState
    host: object
    vm: object
    counts: np.ndarray
    stream_bytes: int


def _receive(r: S.StreamReader, disk: str | None, version: str, running: bool) -> _Received:
    """Read a whole precopy stream into a new host's VM memory."""
    header, machine, ram, blocks = S.read_prelude(r)
    index = S.BlockIndex(blocks)
    host, vm = make_host(index.pages, disk=disk)
    counts = np.zeros(index.pages, dtype=np.int32)
    for _ in S.ram_sections(r, ram, S.RamReceiver(index, host.backend.memory(vm), counts)):
        pass
    if np.any(counts == 0):
        raise r.error(f"{int(np.count_nonzero(counts == 0))} pages were never sent")
    devices, description = S.split_tail(r.rest(S.MAX_DEVICE_STATE), r.name)
    state = QemuState(version, machine, ram, index.blocks, header, devices, description, running)
    return _Received(state, host, vm, counts, r.position)


def _write(received: _Received, out: Path, key: bytes | None, level: int) -> SaveResult:
    host, vm, state = received.host, received.vm, received.state
    resent = np.maximum(received.counts - 1, 0)
    host.backend.set_heat(vm, resent)
    writer = CheckpointWriter(out, vm.pages, level=level, key=key)
    try:
        write_checkpoint(host, vm, SaveRequest(str(out), lazy=False, level=level, key=key), writer=writer)
        writer.add_section(TAG, state.encode())
    except BaseException:
        writer.abort()
        raise
    writer.close()
    order = None
    if resent.any():
        heat = host.backend.heat(vm, np.arange(vm.pages))  # what the plugin answers memvisor_page_heat with
        with CheckpointReader(out, key=key) as reader:
            order = str(write_order(out, file_id=reader.file_id, heat=heat, key=key))
    host.stop()
    return SaveResult(str(out), state.qemu, state.machine, vm.pages, received.stream_bytes,
                      int(received.counts.sum()), int(np.count_nonzero(resent)), 0.0, writer_stats(writer), order)
