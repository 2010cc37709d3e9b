"""``memvisor bench qemu``: memvisor's side of QEMU's migration stream against QEMU's own paths,
each measured in the same run on the same guest (real QEMU 7.2, TCG).

- ``checkpoint-bytes``: a memvisor checkpoint (zero pages in the map, pages equal to disk
  blocks as references, the rest zstd) against QEMU's ``migrate "exec:cat > FILE"``, for a
  256 MiB guest that copied 64 MiB of its disk into memory (its page cache) and holds 16 MiB
  of data of its own.
- ``lazy-first-marker-1gib``: seconds from the start of a restore until the guest's first
  marker, memvisor's lazy restore against QEMU's eager ``-incoming "exec:cat FILE"``, for a
  1 GiB guest whose working set is 16 MiB among 768 MiB of data.
- ``request-service-p50`` / ``-p99`` / ``-count``: a page request's service time as the
  destination QEMU sees it (its trace events: the fault thread's request to the page placed),
  and how many requests it made, memvisor's lazy restore (background stream in file order)
  against QEMU-to-QEMU post-copy of the same 256 MiB guest (32 MiB working set above 128 MiB
  of data).
- ``migrate-bytes``: bytes on memvisor's link between its two sides against the bytes of
  QEMU-to-QEMU migration (counted by a relay), for the guest of ``checkpoint-bytes``.

Every case needs qemu-system-x86_64 7.2; the cases that use disk references or a lazy restore
need memvisor-diskmap and memvisor-lazy-restore.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np

from memvisor.bench import Baseline, BenchCase
from memvisor.errors import UserError
from memvisor_qemu.guest import GuestLayout
from memvisor_qemu.testing import QemuVM, missing_plugins, unavailable_reason, write_disk

MIB = 1 << 20
CACHE_LAYOUT = GuestLayout(loop_start=1 * MIB, loop_end=9 * MIB, disk_lba=8, disk_sectors=64 * MIB // 512,
                           disk_dest=16 * MIB, fill_start=80 * MIB, fill_end=96 * MIB)
BIG_LAYOUT = GuestLayout(loop_start=1 * MIB, loop_end=17 * MIB, fill_start=32 * MIB, fill_end=800 * MIB)
REQUEST_LAYOUT = GuestLayout(loop_start=192 * MIB, loop_end=224 * MIB, fill_start=8 * MIB, fill_end=136 * MIB)
"""The working set above the data, and the restore's background stream in file order: the guest
asks for its pages while the stream is busy elsewhere (hottest first, it would hardly ask)."""
TRACE = ["-msg", "timestamp=on", "-trace", "postcopy_ram_fault_thread_request", "-trace", "postcopy_place_page",
         "-trace", "postcopy_place_page_zero"]


def _check(*plugins: str) -> None:
    reason = unavailable_reason() or missing_plugins(*plugins)
    if reason:
        raise UserError(f"memvisor bench qemu: {reason}")


@functools.cache
def _folder() -> Path:
    """The benchmark's files (disk images, checkpoints, QEMU's files) in a temporary folder
    (:func:`memvisor.files.temp_dir`), removed at exit, on SIGTERM too, and by the next run if
    this one was killed."""
    from memvisor.files import temp_dir

    folder = temp_dir("bench-qemu")
    atexit.register(folder.cleanup)
    return Path(folder.name)


@functools.cache
def _disk(layout: GuestLayout) -> Path:
    data = np.random.default_rng(11).integers(0, 256, layout.disk_sectors * 512, dtype=np.uint8).tobytes()
    return write_disk(_folder() / f"disk-{hash(layout) & 0xffff:x}.img", layout, data)


def _booted(name: str, layout: GuestLayout, memory_mib: int, **kw) -> QemuVM:
    """A source guest that finished its setup (disk copy, fill) and counts."""
    vm = QemuVM(_folder(), name, _disk(layout), memory_mib=memory_mib, **kw)
    vm.wait_markers(1, timeout=900)
    return vm


def _qemu_to_file(vm: QemuVM, path: Path) -> int:
    """QEMU's own save: ``migrate "exec:cat > FILE"``; its size."""
    vm.monitor.execute("migrate", uri=f"exec:cat > {path}")
    vm.monitor.wait_migration(900)
    return path.stat().st_size


# -- checkpoint bytes -----------------------------------------------------------------------------


def _bytes_setup():
    _check("diskmap")
    vm = _booted("bytes", CACHE_LAYOUT, 256)
    vm.stop()
    return vm


def _paused(vm: QemuVM) -> None:
    """Paused, not "paused after a migration" (QEMU refuses to migrate that again)."""
    if vm.monitor.status() == "postmigrate":
        vm.monitor.execute("cont")
        vm.monitor.execute("stop")


def _bytes_memvisor(vm: QemuVM) -> float:
    from memvisor_qemu.save import save

    _paused(vm)
    out = _folder() / "bytes.ckpt"
    save(str(vm.qmp_path), out, disk=str(_disk(CACHE_LAYOUT)))
    return float(out.stat().st_size)


def _bytes_qemu(vm: QemuVM) -> float:
    _paused(vm)
    return float(_qemu_to_file(vm, _folder() / "bytes.qemu"))


# -- lazy restore: time to the first marker -------------------------------------------------------


@functools.cache
def _big_files() -> tuple[Path, Path]:
    """A live memvisor checkpoint and a live QEMU file of the 1 GiB guest."""
    from memvisor_qemu.save import save

    with _booted("big", BIG_LAYOUT, 1024) as vm:
        ckpt, qemu_file = _folder() / "big.ckpt", _folder() / "big.qemu"
        save(str(vm.qmp_path), ckpt, live=True)
        vm.monitor.execute("cont")  # a live save left it running; QEMU's file is also taken live
        _qemu_to_file(vm, qemu_file)
    return ckpt, qemu_file


def _first_marker_setup():
    _check("lazy-restore")
    return _big_files()


def _until_first_marker(vm: QemuVM, start) -> float:
    started = time.perf_counter()
    worker = threading.Thread(target=start, daemon=True)
    worker.start()
    while vm.markers() < 1:
        if time.perf_counter() - started > 900:
            raise UserError("memvisor bench qemu: the restored guest did not run")
        time.sleep(0.0005)
    seconds = time.perf_counter() - started
    worker.join(900)
    return seconds


def _first_marker_lazy(files) -> float:
    from memvisor_qemu.restore import restore

    with QemuVM(_folder(), "big-lazy", _disk(BIG_LAYOUT), memory_mib=1024, incoming=True) as vm:
        return _until_first_marker(vm, lambda: restore(files[0], str(vm.qmp_path), lazy=True))


def _first_marker_eager(files) -> float:
    with QemuVM(_folder(), "big-eager", _disk(BIG_LAYOUT), memory_mib=1024, incoming=True) as vm:
        return _until_first_marker(vm, lambda: (vm.monitor.execute("migrate-incoming", uri=f"exec:cat {files[1]}"),
                                                vm.monitor.wait_migration(900)))


# -- page-request service time ----------------------------------------------------------------------

_REQUEST = re.compile(rb"@(\d+\.\d+):postcopy_ram_fault_thread_request Request for HVA=0x([0-9a-f]+)")
_PLACED = re.compile(rb"@(\d+\.\d+):postcopy_place_page(?:_zero)? host=0x([0-9a-f]+)")


def service_times(trace: Path) -> np.ndarray:
    """Milliseconds from each page request of the destination's fault thread to that page being
    placed, from QEMU's trace (``-msg timestamp=on``)."""
    text = trace.read_bytes()
    placed = {int(m[2], 16): float(m[1]) for m in _PLACED.finditer(text)}
    out = [(placed[hva] - float(t)) * 1000 for t, h in _REQUEST.findall(text)
           if (hva := int(h, 16)) in placed and placed[hva] >= float(t)]
    return np.array(out)


@functools.cache
def _request_context() -> dict:
    """The checkpoint of the request cases, and the service times of the last run of each path
    (the p99 and count cases read the run of the p50 case)."""
    from memvisor_qemu.save import save

    with _booted("req-src", REQUEST_LAYOUT, 256) as vm:
        ckpt = _folder() / "req.ckpt"
        save(str(vm.qmp_path), ckpt, live=True)
    return {"ckpt": ckpt, "memvisor": None, "qemu": None}


def _request_setup():
    _check("lazy-restore")
    return _request_context()


def _traced_destination(name: str) -> QemuVM:
    trace = _folder() / f"{name}.trace"
    with contextlib.suppress(FileNotFoundError):
        trace.unlink()
    vm = QemuVM(_folder(), name, _disk(REQUEST_LAYOUT), memory_mib=256, incoming=True,
                extra=[*TRACE, "-D", str(trace)])
    vm.trace = trace
    return vm


def _times_memvisor(context: dict) -> np.ndarray:
    from memvisor_qemu.restore import restore

    with _traced_destination("req-memvisor") as dst:
        restore(context["ckpt"], str(dst.qmp_path), lazy=True, prefetch="file")
        context["memvisor"] = service_times(dst.trace)
    return context["memvisor"]


def _times_qemu(context: dict) -> np.ndarray:
    with _booted("req-qemu-src", REQUEST_LAYOUT, 256) as src, _traced_destination("req-qemu") as dst:
        for vm in (src, dst):
            vm.monitor.set_capabilities(postcopy_ram=True)
        sock = _folder() / "req-qemu.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        dst.monitor.execute("migrate-incoming", uri=f"unix:{sock}")
        src.monitor.execute("migrate", uri=f"unix:{sock}")
        while src.monitor.migration().get("status") == "setup":
            time.sleep(0.001)
        src.monitor.execute("migrate-start-postcopy")
        src.monitor.wait_migration(900)
        dst.monitor.wait_migration(900)
        context["qemu"] = service_times(dst.trace)
    return context["qemu"]


def _service(path: str, figure: str):
    """A figure of one path's service times: ``p50`` runs the path, ``p99`` and ``count`` read
    that run's times."""
    run = _times_memvisor if path == "memvisor" else _times_qemu

    def measure(context: dict) -> float:
        times = run(context) if figure == "p50" or context[path] is None else context[path]
        if figure == "count":
            return float(len(times))
        return float(np.percentile(times, int(figure[1:]))) if len(times) else float("nan")

    return measure


# -- migration bytes --------------------------------------------------------------------------------


def _migrate_setup():
    _check("diskmap")
    _disk(CACHE_LAYOUT)


def _migrate_memvisor(_) -> float:
    from memvisor_qemu.migrate import migrate

    with _booted("mig-src", CACHE_LAYOUT, 256) as src, \
            QemuVM(_folder(), "mig-dst", _disk(CACHE_LAYOUT), memory_mib=256, incoming=True) as dst:
        result = migrate(str(src.qmp_path), str(dst.qmp_path), disk=str(_disk(CACHE_LAYOUT)))
    return float(result.link_bytes)


def _migrate_qemu(_) -> float:
    with _booted("mig-src", CACHE_LAYOUT, 256) as src, \
            QemuVM(_folder(), "mig-dst", _disk(CACHE_LAYOUT), memory_mib=256, incoming=True) as dst:
        relay = _CountingRelay(_folder() / "relay-in.sock", _folder() / "relay-out.sock")
        dst.monitor.execute("migrate-incoming", uri=f"unix:{relay.target}")
        relay.start()
        src.monitor.execute("migrate", uri=f"unix:{relay.listen_path}")
        src.monitor.wait_migration(900)
        dst.monitor.wait_migration(900)
        return float(relay.join())


class _CountingRelay:
    """Bytes from a source QEMU to a destination QEMU, passed on unchanged and counted."""

    def __init__(self, listen_path: Path, target: Path):
        for p in (listen_path, target):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.listen_path, self.target = listen_path, target
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(listen_path))
        self.server.listen(1)
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        src, _ = self.server.accept()
        dst = socket.socket(socket.AF_UNIX)
        dst.connect(str(self.target))
        back = threading.Thread(target=self._pipe, args=(dst, src, False), daemon=True)
        back.start()
        self._pipe(src, dst, True)
        back.join(60)

    def _pipe(self, a, b, count: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := a.recv(1 << 20):
                b.sendall(chunk)
                if count:
                    self.count += len(chunk)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def join(self) -> int:
        self.thread.join(900)
        self.server.close()
        return self.count


def cases() -> list[BenchCase]:
    """The cases of ``memvisor bench qemu``."""
    return [
        BenchCase("checkpoint-bytes", "checkpoint_bytes", "bytes", _bytes_memvisor, _bytes_setup,
                  Baseline('QEMU migrate "exec:cat > FILE"', _bytes_qemu), higher_is_better=False, runs=1, warmup=0,
                  goal="<= 0.3 of QEMU's file"),
        BenchCase("lazy-first-marker-1gib", "seconds_to_first_marker", "s", _first_marker_lazy, _first_marker_setup,
                  Baseline('QEMU -incoming "exec:cat FILE" (eager)', _first_marker_eager), higher_is_better=False,
                  runs=3, warmup=0, goal=">= 5x sooner (ratio <= 0.2)"),
        *(BenchCase(f"request-service-{figure}", "page_requests" if figure == "count" else "page_request_ms",
                    "requests" if figure == "count" else "ms", _service("memvisor", figure), _request_setup,
                    Baseline("QEMU-to-QEMU post-copy", _service("qemu", figure)), higher_is_better=False, runs=1,
                    warmup=0, goal="informative") for figure in ("p50", "p99", "count")),
        BenchCase("migrate-bytes", "bytes_on_the_wire", "bytes", _migrate_memvisor, _migrate_setup,
                  Baseline("QEMU-to-QEMU (counted by a relay)", _migrate_qemu), higher_is_better=False, runs=1,
                  warmup=0, goal="far below QEMU's"),
    ]

