"""Checkpoints of a running VM: the core's stop-the-world save and eager restore.

These are the baselines and the ``trylast`` defaults of :func:`memvisor_checkpoint_save` and
:func:`memvisor_checkpoint_restore`: lazy save and lazy restore are plugins that take the job
instead. Both sides speak the one file format of this package, so a checkpoint written by
either restores with either.

Time: the VM is stopped for the whole of a stop-the-world save and of an eager restore. Their
cost in time is charged to the backend (``account``): reading guest memory is free, compressing
and writing (or reading and decompressing) cost what the cost model says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from memvisor import PAGE_SIZE
from memvisor.backend import Capability
from memvisor.builtins.checkpoint.layout import CheckpointError
from memvisor.builtins.checkpoint.reader import KIND_DATA, KIND_FIRST_RECORD, KIND_MISSING, KIND_ZERO, CheckpointReader
from memvisor.builtins.checkpoint.writer import CheckpointWriter
from memvisor.errors import BackendError
from memvisor.events import FaultBatch, PageRecords
from memvisor.identity import concat, is_identities, zero_rows

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.events import RestoreRequest, SaveRequest
    from memvisor.host import VM, Host

CHUNK_PAGES = 16384
"""Pages read from or loaded into guest memory at a time (64 MiB)."""
IDENTITY_CHUNK_PAGES = 1 << 20
"""Pages of identities (:mod:`memvisor.identity`) read or loaded at a time (12 MiB)."""


def checkpoint_name(path: str) -> str:
    """A checkpoint's name as the scenario gave it (its file name without ``.ckpt``): what a
    report shows, where the file itself lived in the run's temporary folder."""
    name = Path(path).name
    return name[: -len(".ckpt")] if name.endswith(".ckpt") else name


@attrs.define
class SaveJob:
    """A checkpoint save, done or still running (a lazy save finishes later).

    :ivar vm: the VM's name.
    :ivar path: the checkpoint file.
    :ivar method: ``"stop-the-world"``, ``"lazy"`` or another plugin's name for its method.
    :ivar started: time when the save began.
    :ivar stop_seconds: how long the VM was stopped for it.
    :ivar finished: time when the file was complete, or None while running.
    :ivar stats: counters of the writer (pages, zero_pages, record_pages, bytes_in, bytes_out,
        write_calls, ...), filled in when done.
    :ivar error: one line saying why a save that runs on its own (lazy) failed (disk full):
        the file at :attr:`path` is then the previous one, untouched; None otherwise.
    :ivar flush: for a save that runs on its own, a function that finishes it now; the core
        calls it before the VM's memory is replaced (``host.restore_checkpoint``), so that the
        file holds the memory the save began with. None for a save that is done when returned.
    """

    vm: str
    path: str
    method: str
    started: float
    stop_seconds: float = 0.0
    finished: float | None = None
    stats: dict[str, Any] = attrs.field(factory=dict)
    error: str | None = None
    flush: Callable[[], None] | None = attrs.field(default=None, repr=False)

    @property
    def done(self) -> bool:
        """Whether the checkpoint file is complete."""
        return self.finished is not None

    def to_json(self) -> dict[str, Any]:
        """The job as report values."""
        total = None if self.finished is None else self.finished - self.started
        return {
            "vm": self.vm,
            "kind": "save",
            "checkpoint": checkpoint_name(self.path),
            "path": self.path,
            "method": self.method,
            "started_s": self.started,
            "stop_s": self.stop_seconds,
            "total_s": total,
            **self.stats,
        }


@attrs.define
class RestoreJob:
    """A restore of a VM's memory from a checkpoint.

    :ivar vm: the VM's name.
    :ivar path: the checkpoint file.
    :ivar method: ``"eager"``, ``"lazy"`` or another plugin's name for its method.
    :ivar started: time when the restore began.
    :ivar resumed: time when the VM could run again.
    :ivar first_access_s: time from ``started`` until the guest's first access was served
        (measured by the core right after the restore).
    :ivar stats: counters (pages, read_calls, bytes_read, faults_served, pages_loaded, ...).
    """

    vm: str
    path: str
    method: str
    started: float
    resumed: float
    first_access_s: float | None = None
    stats: dict[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The job as report values."""
        return {
            "vm": self.vm,
            "kind": "restore",
            "checkpoint": checkpoint_name(self.path),
            "path": self.path,
            "method": self.method,
            "started_s": self.started,
            "resume_s": self.resumed - self.started,
            "first_access_s": self.first_access_s,
            **self.stats,
        }


def make_present(host: Host, vm: VM) -> None:
    """Bring every page of ``vm`` into memory through the fault hook, as the guest touching it
    would: a page that is not present may still belong to someone (a lazy restore in progress,
    a page dropped under pressure), and its owner serves it."""
    missing = np.flatnonzero(~host.backend.present(vm))
    if len(missing):
        host.deliver_faults(vm, FaultBatch(missing, np.zeros(len(missing), bool), host.now))


def describe(host: Host, vm: VM, gpps: np.ndarray, purpose: str) -> list[PageRecords]:
    """Records that plugins offer for ``gpps`` (each page claimed once, first claim wins)."""
    claimed = np.zeros(len(gpps), dtype=bool)
    out = []
    for records in host.hook.memvisor_describe_pages(host=host, vm=vm, gpps=gpps, purpose=purpose):
        if records is None or not len(records.gpps):
            continue
        where = np.searchsorted(gpps, records.gpps)
        if np.any(where >= len(gpps)) or np.any(gpps[np.minimum(where, len(gpps) - 1)] != records.gpps):
            raise BackendError(f"records of kind {records.kind!r} name pages that were not offered")
        fresh = ~claimed[where]
        claimed[where] = True
        payloads = records.payloads
        if not fresh.all():
            payloads = (
                np.asarray(payloads)[fresh]
                if isinstance(payloads, np.ndarray)
                else [p for p, keep in zip(payloads, fresh) if keep]
            )
        out.append(PageRecords(records.kind, records.gpps[fresh], payloads))
    return out


def write_checkpoint(
    host: Host, vm: VM, request: SaveRequest, pages: np.ndarray | None = None, writer: CheckpointWriter | None = None
) -> CheckpointWriter:
    """Write ``pages`` (all when None) of ``vm`` into a checkpoint writer: zero pages to the page
    map, pages other plugins describe as records, the rest as compressed page blocks."""
    backend = host.backend
    pages = np.arange(vm.pages, dtype=np.int64) if pages is None else pages
    w = writer or new_writer(host, vm, request)
    chunk_pages = CHUNK_PAGES if backend.contents_model == "bytes" else IDENTITY_CHUNK_PAGES
    try:
        for start in range(0, len(pages), chunk_pages):
            chunk = pages[start : start + chunk_pages]
            data = backend.contents(vm, chunk)
            nonzero = ~zero_rows(data)
            w.add_zero_pages(chunk[~nonzero])
            candidates = chunk[nonzero]
            taken = np.zeros(len(chunk), dtype=bool)
            for records in describe(host, vm, candidates, "checkpoint"):
                w.add_records(records.kind, records.gpps, records.payloads)
                taken[np.searchsorted(chunk, records.gpps)] = True
            keep = nonzero & ~taken
            if keep.any():
                w.add_pages(chunk[keep], data[keep])
    except BaseException:
        # A failed write (disk full, short writes) removes the temporary file now, not when the
        # writer is collected; the previous checkpoint at the path is untouched.
        if writer is None:
            w.abort()
        raise
    return w


def new_writer(host: Host, vm: VM, request: SaveRequest, **options) -> CheckpointWriter:
    """A checkpoint writer for ``vm`` as ``request`` asks, of the host's machine model (an
    identity-model VM's checkpoint holds identities and says so)."""
    return CheckpointWriter(request.path, vm.pages, level=request.level, block_pages=request.block_pages,
                            buffer_bytes=request.buffer_bytes, key=request.key, threads=1,
                            contents=host.backend.contents_model, **options)


def check_model(host: Host, reader: CheckpointReader) -> None:
    """Refuse a checkpoint of the other machine model: a checkpoint of identities restores only
    onto an identity-model host, one of bytes only onto a bytes-model host."""
    model = host.backend.contents_model
    if reader.contents_model != model:
        raise CheckpointError(reader.path, f"holds pages as {reader.contents_model}: it restores only onto a host "
                                           f"with contents = \"{reader.contents_model}\" (this one has \"{model}\")")


def writer_stats(w: CheckpointWriter) -> dict[str, Any]:
    """The writer's counters as report values (``bytes_out``: what the bytes model writes, the
    modelled size of identity page blocks included; ``file_bytes``: the file's size)."""
    return {
        "pages": w.pages,
        "zero_pages": w.zero_pages,
        "record_pages": w.record_pages,
        "data_pages": w.data_pages,
        "bytes_in": w.bytes_in,
        "bytes_out": w.bytes_out,
        "file_bytes": w.file_bytes_out,
        "write_calls": w.write_calls,
        "storage_blocks": w.storage_blocks,
        "compression_ratio": (w.bytes_in / w.bytes_out) if w.bytes_out else None,
    }


def stop_the_world_save(host: Host, vm: VM, request: SaveRequest) -> SaveJob:
    """Stop the VM, write every page, resume: the baseline save."""
    started, real = host.now, time.perf_counter()
    make_present(host, vm)
    w = write_checkpoint(host, vm, request)
    w.close()
    backend = host.backend
    seconds = backend.account("compress", w.bytes_in) + backend.account("disk_write", w.bytes_out, w.write_calls)
    if Capability.VIRTUAL_TIME not in backend.capabilities:
        seconds = time.perf_counter() - real  # real time: the work took what it took
    host.advance(seconds)  # the guest is stopped all along: time passes without it
    job = SaveJob(vm.name, str(request.path), "stop-the-world", started, stop_seconds=seconds, finished=host.now)
    job.stats = {**writer_stats(w), "real_seconds": time.perf_counter() - real}
    return job


def resolve(
    host: Host, vm: VM, reader: CheckpointReader, kind: str, gpps: np.ndarray | None = None, *,
    cached: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of the pages a checkpoint stores as records of ``kind`` (those among ``gpps``, or
    all), through :func:`memvisor_resolve_records` (or from what :func:`check_restorable`
    resolved for the restore under way, unless not ``cached``)."""
    cached = host.restore_records.get(vm.name) if cached else None
    if cached is not None and cached[0] == str(reader.path) and kind in cached[1]:
        # Resolved once by check_restorable before the restore began: the bytes as they were
        # then, each record resolved once.
        pages, data = cached[1][kind]
        if gpps is None:
            return pages, data
        idx = np.flatnonzero(np.isin(pages, gpps))
        return pages[idx], data[idx]
    record_set = reader.records(kind)
    idx = np.arange(len(record_set.gpps)) if gpps is None else np.flatnonzero(np.isin(record_set.gpps, gpps))
    if record_set.width is not None:  # fixed width: hand the plugin an (n, width) array
        pages, payloads = record_set.gpps[idx], record_set.as_array()[idx]
    else:
        pages, payloads = record_set.select(idx)
    data = host.hook.memvisor_resolve_records(host=host, vm=vm, records=PageRecords(kind, pages, payloads))
    if data is None:
        raise BackendError(f"{reader.path}: no plugin resolves records of kind {kind!r}")
    if is_identities(data):
        return pages, data
    return pages, np.asarray(data, dtype=np.uint8).reshape(len(pages), PAGE_SIZE)


def load_pages(host: Host, vm: VM, reader: CheckpointReader, gpps: np.ndarray) -> None:
    """Make ``gpps`` (not present) present with the checkpoint's contents."""
    kinds = reader.page_kind(gpps)
    backend = host.backend
    if np.any(kinds == KIND_MISSING):
        first = int(gpps[kinds == KIND_MISSING][0])
        raise CheckpointError(reader.path, f"page {first} is not in the checkpoint")
    zero = gpps[kinds == KIND_ZERO]
    if len(zero):
        backend.populate(vm, zero)
    for code in np.unique(kinds[kinds >= KIND_FIRST_RECORD]):
        pages, data = resolve(host, vm, reader, reader.kind_names[code], gpps[kinds == code])
        backend.populate(vm, pages, data)
    data_pages = np.sort(gpps[kinds == KIND_DATA])
    loaded: dict[bool, tuple[list, list]] = {}  # by form (identities or bytes): pages, contents
    for pblock in np.unique(reader.locate_many(data_pages)):
        pages, data = reader.read_page_block(int(pblock))
        at = np.minimum(np.searchsorted(data_pages, pages), len(data_pages) - 1)
        wanted = data_pages[at] == pages
        form = loaded.setdefault(is_identities(data), ([], []))
        form[0].append(pages[wanted])
        form[1].append(data[wanted])
    for pages, data in loaded.values():  # one populate per form, not one per page block
        backend.populate(vm, np.concatenate(pages), concat(data))


def eager_restore(host: Host, vm: VM, request: RestoreRequest) -> RestoreJob:
    """Stop the VM, replace every page with the checkpoint's, resume: the baseline restore
    (``host.restore_checkpoint`` has checked it with :func:`check_restorable` already)."""
    started, real = host.now, time.perf_counter()
    with CheckpointReader(request.path, key=request.key) as reader:
        if reader.vm_pages != vm.pages:
            raise BackendError(f"{request.path}: checkpoint of {reader.vm_pages} pages, VM {vm.name!r} has {vm.pages}")
        chunk_pages = CHUNK_PAGES if reader.contents_model == "bytes" else IDENTITY_CHUNK_PAGES
        backend = host.backend
        backend.unmap(vm, np.arange(vm.pages))
        for start in range(0, vm.pages, chunk_pages):
            load_pages(host, vm, reader, np.arange(start, min(vm.pages, start + chunk_pages)))
        read_calls, bytes_read = reader.read_calls, reader.bytes_read
    seconds = backend.account("disk_read", bytes_read, read_calls) + backend.account(
        "compress", vm.pages * PAGE_SIZE // 3
    )  # decompression runs about 3x faster than compression
    if Capability.VIRTUAL_TIME not in backend.capabilities:
        seconds = time.perf_counter() - real
    host.advance(seconds)
    job = RestoreJob(vm.name, str(request.path), "eager", started, resumed=host.now)
    job.stats = {
        "pages": vm.pages,
        "read_calls": read_calls,
        "bytes_read": bytes_read,
        "pages_loaded": vm.pages,
        "real_seconds": time.perf_counter() - real,
    }
    return job


class RestoreRefused(CheckpointError, BackendError):
    """A restore refused before anything of the VM changed (records that no longer resolve).
    A :class:`CheckpointError` for people and callers of the checkpoint API; also a
    :class:`BackendError`, which is what resolving such records raised before the check."""


def check_restorable(host: Host, vm: VM, request: RestoreRequest) -> dict[str, np.ndarray]:
    """Refuse, before anything of ``vm`` changes, a restore that could not finish: a file that
    does not open (structure, MAC), a checkpoint of another size, a page it does not hold, or
    plugin records that no longer resolve (a ``disk-ref`` to a block written since the save).

    A restore that failed half-way would leave pages not present that nobody serves, which
    the core's default would zero-fill: a wrong page (found by the all-techniques integration
    test: a checkpoint with disk references, the disk written afterwards). The records resolved
    here are kept in ``host.restore_records`` for the restore: each record is resolved once; a
    lazy restore holds the bytes of its record pages (not its data pages) until the next
    restore. Raises :class:`RestoreRefused` (a :class:`CheckpointError`).

    A refused restore leaves a restore still under way untouched, its records kept: a restore
    under way ends only once the next one passed this check (ending it first orphaned its
    pages, which the core then zero-filled — found by ``memvisor selftest``: a lazy restore,
    the disk written, a second restore of the same file refused).

    Returns the pages the checkpoint stores as plugin records, by record kind."""
    with CheckpointReader(request.path, key=request.key) as reader:
        if reader.vm_pages != vm.pages:
            raise CheckpointError(reader.path, f"checkpoint of {reader.vm_pages} pages, VM {vm.name!r} has {vm.pages}")
        check_model(host, reader)
        kinds = reader.page_kind(np.arange(vm.pages, dtype=np.int64))
        if np.any(kinds == KIND_MISSING):
            first = int(np.flatnonzero(kinds == KIND_MISSING)[0])
            raise CheckpointError(reader.path, f"page {first} is not in the checkpoint")
        resolved = {}
        for kind in reader.record_kinds:
            try:
                resolved[kind] = resolve(host, vm, reader, kind, cached=False)
            except BackendError as exc:
                raise RestoreRefused(reader.path, f"records of kind {kind!r} cannot be restored: {exc}") from None
        host.restore_records.pop(vm.name, None)
        if resolved:  # kept for the restore itself (resolve() serves them from here)
            host.restore_records[vm.name] = (str(reader.path), resolved)
    return {kind: pages for kind, (pages, _) in resolved.items()}
