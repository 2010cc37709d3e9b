"""The lazy-restore plugin: takes :func:`memvisor_checkpoint_restore` when a lazy restore is asked for.

A restore in progress is a :class:`LazyRestore`. It opens the checkpoint (three reads: header,
trailer, metadata: the page map and the index of the blocks), makes every page of the VM not
present and lets the VM run. Then:

- a page fault on a page that the checkpoint holds is served by making present the faulting
  page's *window* (``window_pages`` aligned guest pages, 64 by default) and every page block that
  holds a page of it: one read of the storage block (none when it is the one read last), one
  decompression per page block, zero pages filled, other plugins' records resolved; a guest that
  touches its memory in order therefore faults once per window;
- a background prefetcher (:func:`memvisor_tick`) loads whole storage blocks, one read each, in
  file order or hottest first (the access-order sidecar a lazy save writes), keeping the disk
  busy at most ``prefetch_share`` of the time so that faults find it free;
- pages are only ever populated where they are not present: a page the guest already has (it
  faulted it in and wrote it) is never overwritten.

Zero pages cost no I/O: the prefetcher leaves them to faults. When every page that needs I/O is
in, the file is closed.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import numpy as np
import structlog

from memvisor import PAGE_SIZE, hookimpl
from memvisor.backend import Capability
from memvisor.builtins.checkpoint import (
    KIND_DATA,
    KIND_FIRST_RECORD,
    KIND_MISSING,
    KIND_ZERO,
    CheckpointError,
    CheckpointReader,
)
from memvisor.builtins.checkpoint.vm import RestoreJob, load_pages
from memvisor.errors import UserError
from memvisor.report import Column, Figure, Headline, Plot, ReportSection, Table
from memvisor.settings import setting
from memvisor_lazy_restore.order import read_order

NAME = "lazy-restore"
DEFAULT_WINDOW = 64
RECORD_STEP = 4096
"""Record pages resolved per prefetch step."""

log = structlog.get_logger("memvisor.lazy_restore")


class LazyRestoreError(UserError):
    """A lazy restore cannot serve a page correctly (a damaged checkpoint): the VM stops.

    The message is one line naming the VM, the file, the block and its offset.
    """


class LazyRestore:
    """One lazy restore of one VM, from its start until every page that needs I/O is loaded.

    :param plugin: the plugin (its settings).
    :param host: the host.
    :param vm: the VM whose memory is replaced.
    :param request: the restore request (path, key).
    """

    def __init__(self, plugin: LazyRestorePlugin, host, vm, request):
        self.host, self.vm, self.request = host, vm, request
        self.window, self.share = plugin.settings.window_pages, plugin.settings.prefetch_share
        self.virtual = Capability.VIRTUAL_TIME in host.backend.capabilities
        started, self.real_start = host.now, time.perf_counter()
        reader = CheckpointReader(request.path, key=request.key)
        try:
            if reader.vm_pages != vm.pages:
                raise CheckpointError(reader.path,
                                      f"checkpoint of {reader.vm_pages} pages, VM {vm.name!r} has {vm.pages}")
            every = np.arange(vm.pages, dtype=np.int64)
            self.kinds = reader.page_kind(every)
            if np.any(self.kinds == KIND_MISSING):
                first = int(np.flatnonzero(self.kinds == KIND_MISSING)[0])
                raise CheckpointError(reader.path, f"page {first} is not in the checkpoint")
            self.pb_of_page = reader.locate_many(every)  # (records were resolved by the core's check)
            sb_of_pb = np.fromiter((reader.storage_block_of(p) for p in range(reader.page_blocks)), np.int64,
                                   count=reader.page_blocks)
        except BaseException:
            reader.close()
            raise
        self.reader: CheckpointReader | None = reader
        # Data pages grouped by storage block: the prefetcher's unit (one read each).
        data = np.flatnonzero(self.kinds == KIND_DATA)
        sbs = sb_of_pb[self.pb_of_page[data]]
        by_block = np.argsort(sbs, kind="stable")
        self.block_pages = data[by_block]
        self.block_bounds = np.searchsorted(sbs[by_block], np.arange(reader.storage_blocks + 1))
        self.pb_size = np.bincount(self.pb_of_page[data], minlength=reader.page_blocks)
        self.order_source = "file"
        order = np.arange(reader.storage_blocks)
        if plugin.settings.prefetch == "hot":
            hint = read_order(request.path, file_id=reader.file_id, vm_pages=vm.pages, key=request.key)
            if hint is not None:
                heat, source = hint
                score = np.bincount(sbs, weights=heat[data], minlength=reader.storage_blocks)
                order = np.argsort(-score, kind="stable")  # hottest first, file order among equals
                self.order_source = f"hot ({source})"
        self.prefetching = plugin.settings.prefetch != "off"
        self.order = order if self.prefetching else order[:0]
        self.cursor = 0
        self.started = started
        self.sb_of_pb = sb_of_pb
        # Storage blocks a fault has read: one that a later fault needs again after the reader
        # let it go is loaded whole then, so no storage block is read more than twice (random
        # faults over more blocks than the reader keeps re-read each block many times: 6.2 GB
        # read for a 301 MB checkpoint on the Linux backend).
        self.sb_fault_reads = np.zeros(reader.storage_blocks, dtype=np.int64)

    def start(self) -> None:
        """The restore passed its checks: the VM's old memory goes and the restore begins."""
        host, vm, reader = self.host, self.vm, self.reader
        every = np.arange(vm.pages, dtype=np.int64)
        backend = host.backend
        open_seconds = backend.account("disk_read", reader.bytes_read, reader.read_calls)
        # The old memory goes: every page is not present, and the next touch faults. (Dropping
        # the old pages happens off the critical path on a real host: no time is charged.)
        backend.unmap(vm, every)
        if Capability.ACCESSED in backend.capabilities:
            host.take_accessed(vm, "lazy-restore")  # touches count from now on
        host.advance(open_seconds)  # the VM waits only for the page map
        self.pending = np.ones(vm.pages, dtype=bool)  # still to come from the checkpoint
        self.io_left = int(np.count_nonzero(self.kinds != KIND_ZERO))
        self.loaded = np.zeros(vm.pages, dtype=bool)
        self.faulted = np.zeros(vm.pages, dtype=bool)
        self.busy_until = host.now
        self.failed: str | None = None
        self.job = RestoreJob(vm.name, str(self.request.path), "lazy", self.started, resumed=host.now)
        self.counts = {"fault_windows": 0, "fault_pages": 0, "pages_loaded_on_fault": 0, "pages_prefetched": 0,
                       "page_blocks_decoded": 0, "storage_blocks_loaded_whole": 0}
        self.progress: list[tuple[float, int, int]] = [(host.now, 0, 0)]
        self.ended = False
        self._update_stats()

    # -- loading --------------------------------------------------------------------------------

    def _load(self, pages: np.ndarray) -> tuple[int, float]:
        """Make ``pages`` present with the checkpoint's contents where they are still pending and
        not present; charge the reads, decompression and copies. Returns the pages loaded and
        the seconds charged."""
        host, vm, backend = self.host, self.vm, self.host.backend
        pages = pages[self.pending[pages]]
        present = backend.present(vm, pages)
        if present.any():
            # Never overwrite a page the guest already has: one that is present although the
            # checkpoint still owes it was made present by someone else, and is theirs now.
            taken = pages[present]
            self.pending[taken] = False
            self.io_left -= int(np.count_nonzero(self.kinds[taken] != KIND_ZERO))
            pages = pages[~present]
        if not len(pages):
            if self.io_left == 0 and self.reader is not None:
                self._complete()
            return 0, 0.0
        kinds = self.kinds[pages]
        seconds = 0.0
        if self.reader is None and self.io_left > 0:
            # Ended early (the host stopped) with pages still owed: open the file again rather
            # than zero-fill them (found by the all-techniques integration test: a guest read
            # after the host stopped read zeros in place of its data).
            try:
                self.reader = CheckpointReader(self.request.path, key=self.request.key)
            except CheckpointError as exc:
                self._fail(exc)
        if self.reader is None:  # every page that needs I/O is in: only zero pages are left
            backend.populate(vm, pages)
        else:
            r = self.reader
            reads, nbytes = r.read_calls, r.bytes_read
            data = pages[kinds == KIND_DATA]
            blocks = np.unique(self.pb_of_page[data])
            try:
                load_pages(host, vm, r, pages)
            except CheckpointError as exc:
                self._fail(exc)
            if r.read_calls > reads:
                seconds += backend.account("disk_read", r.bytes_read - nbytes, r.read_calls - reads)
            if len(blocks):
                decoded = int(self.pb_size[blocks].sum()) * PAGE_SIZE
                seconds += backend.account("compress", decoded // 3)  # decompression runs about 3x faster
                seconds += backend.account("copy", len(data) * PAGE_SIZE)
                self.counts["page_blocks_decoded"] += len(blocks)
        self.pending[pages] = False
        self.loaded[pages] = True
        self.io_left -= int(np.count_nonzero(kinds != KIND_ZERO))
        if self.io_left == 0 and self.reader is not None:
            self._complete()
        return len(pages), seconds

    def _fail(self, exc: CheckpointError):
        """A block cannot be read correctly: no page of it is loaded, the VM stops."""
        self.failed = f"VM {self.vm.name!r} stopped: lazy restore from {exc}"
        self.job.stats["error"] = self.failed
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        log.error("lazy restore failed", vm=self.vm.name, error=str(exc))
        raise LazyRestoreError(self.failed) from None

    def _complete(self) -> None:
        # complete_s is taken at the next tick: a fault's loads end with its guest batch, whose
        # time is known only after the batch
        self.reader.close()
        self._update_stats()
        self.reader = None

    def serve(self, gpps: np.ndarray) -> np.ndarray | None:
        """Serve the faulting pages that this restore owns; returns them (or None)."""
        own = gpps[self.pending[gpps]]
        if not len(own):
            return None
        if self.failed:
            raise LazyRestoreError(self.failed)
        windows = np.unique(own // self.window)
        span = (windows[:, None] * self.window + np.arange(self.window)).ravel()
        span = span[span < self.vm.pages]
        span = span[self.pending[span]]
        # The page blocks holding pages of the windows come in whole: their storage block is read
        # anyway and their frames are decompressed whole.
        blocks = np.unique(self.pb_of_page[span[self.kinds[span] == KIND_DATA]])
        extra = [self.reader.page_block_pages(int(b)) for b in blocks] if self.reader is not None else []
        if self.reader is not None and len(blocks):
            sbs = np.unique(self.sb_of_pb[blocks])
            again = [sb for sb in sbs if self.sb_fault_reads[sb] and not self.reader.is_cached(sb)]
            extra += [self.block_pages[self.block_bounds[sb] : self.block_bounds[sb + 1]] for sb in again]
            self.sb_fault_reads[sbs] += 1
            self.counts["storage_blocks_loaded_whole"] += len(again)
        pages = np.unique(np.concatenate([span, *extra])) if extra else span
        loaded, _ = self._load(pages)
        self.faulted[own] = True
        self.counts["fault_windows"] += len(windows)  # later touches of a window find it present
        self.counts["fault_pages"] += len(own)
        self.counts["pages_loaded_on_fault"] += loaded
        self._note_progress()
        return own

    def prefetch(self, now: float) -> None:
        """Load storage blocks while the prefetcher has its share of the disk before ``now``."""
        if self.failed or self.reader is None or self.ended or not self.prefetching:
            return
        while self.busy_until < now and self.reader is not None:
            if self.cursor < len(self.order):
                sb = int(self.order[self.cursor])
                self.cursor += 1
                pages = self.block_pages[self.block_bounds[sb] : self.block_bounds[sb + 1]]
            elif self.cursor == len(self.order) and self.io_left:
                pages = np.flatnonzero(self.pending & (self.kinds >= KIND_FIRST_RECORD))[:RECORD_STEP]
                if not len(pages):
                    break  # prefetching is off and only faults load data
            else:
                break
            real = time.perf_counter()
            loaded, seconds = self._load(pages)
            if not self.virtual:  # a real-time backend charges nothing: the work took its real time
                seconds = time.perf_counter() - real
            self.counts["pages_prefetched"] += loaded
            self.busy_until = max(self.busy_until, self.job.resumed) + seconds / self.share
        self._note_progress(now)

    # -- the end ---------------------------------------------------------------------------------

    def end(self) -> None:
        """The restore is over (the run ends, the VM goes or is restored again): close the file
        and count the pages loaded that the guest never touched."""
        if self.ended:
            return
        self.ended = True
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        backend = self.host.backend
        self._note_progress()
        if Capability.ACCESSED in backend.capabilities and self.vm.name in self.host.vms:
            # Pages the guest faulted on are touched; the others tell by their accessed bit
            # (populate clears it), read since the restore began.
            maybe = np.flatnonzero(self.loaded & ~self.faulted)
            touched = self.host.take_accessed(self.vm, "lazy-restore", maybe) if len(maybe) else np.zeros(0, bool)
            self.job.stats["pages_never_touched"] = int(np.count_nonzero(~touched))
        self._update_stats()

    def _note_progress(self, now: float | None = None) -> None:
        """A point of the progress plot (pages loaded on fault and prefetched so far) and the
        job's figures, so that the plot ends where the table does."""
        point = (self.host.now if now is None else now, self.counts["pages_loaded_on_fault"],
                 self.counts["pages_prefetched"])
        if self.progress[-1][1:] != point[1:]:
            self.progress.append(point)
        self._update_stats()

    def _update_stats(self) -> None:
        r = self.reader
        stats = self.job.stats
        if r is not None:
            stats["read_calls"], stats["bytes_read"] = r.read_calls, r.bytes_read
        stats.update(self.counts)
        stats["pages"] = self.vm.pages
        stats["pages_loaded"] = int(np.count_nonzero(self.loaded))
        stats["open_s"] = self.job.resumed - self.job.started
        stats["prefetch_order"] = self.order_source
        stats["real_seconds"] = time.perf_counter() - self.real_start


@attrs.frozen
class LazyRestoreSettings:
    """What ``[plugins.lazy-restore]`` may set (docs/checkpoint.md)."""

    prefetch: str = setting("hot", choices=("hot", "file", "off"),
                            doc="hot: the hottest storage blocks first when the checkpoint has an access-order "
                                "sidecar, else file order; file; or off (faults only).")
    prefetch_share: float = setting(0.5, above=0.0, high=1.0,
                                    doc="At most this fraction of the disk's time goes to prefetching; the rest is "
                                        "left to faults.")
    window_pages: int = setting(DEFAULT_WINDOW, low=1, high=10**6,
                                doc="Pages made present around a faulting page (aligned).")


class LazyRestorePlugin:
    """Lazy checkpoint restore: resume at once, serve faults from the file, prefetch the rest
    (settings: :class:`LazyRestoreSettings`)."""

    def __init__(self) -> None:
        self.restores: dict[str, LazyRestore] = {}
        self.finished: list[LazyRestore] = []
        self.settings = LazyRestoreSettings()

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare ``[plugins.lazy-restore]``."""
        register(NAME, LazyRestoreSettings)

    @hookimpl
    def memvisor_host_started(self, host) -> None:
        """Read the settings and check that the backend can make pages not present."""
        self.settings = host.plugin_settings(NAME)
        host.require(NAME, Capability.FAULT)

    def _end(self, vm) -> None:
        restore = self.restores.pop(vm.name, None)
        if restore is not None:
            restore.end()
            self.finished.append(restore)

    @hookimpl
    def memvisor_restore_starting(self, vm) -> None:
        """A restore of the VM passed its checks: one in progress ends, whoever takes the new
        one (its pages would otherwise be served over the new contents). A refused restore
        does not get here: the one in progress keeps serving its pages."""
        self._end(vm)

    @hookimpl
    def memvisor_checkpoint_restore(self, host, vm, request):
        """Take the restore unless an eager one is asked for (``request.lazy is False``)."""
        if request.lazy is False:
            return None
        restore = LazyRestore(self, host, vm, request)
        restore.start()
        self.restores[vm.name] = restore
        return restore.job

    @hookimpl
    def memvisor_page_fault(self, host, vm, fault):
        """Serve the faulting pages that a lazy restore of ``vm`` still owns."""
        restore = self.restores.get(vm.name)
        return None if restore is None else restore.serve(fault.gpps)

    @hookimpl
    def memvisor_tick(self, host, tick) -> None:
        """Prefetch within each restore's share of the disk."""
        for restore in list(self.restores.values()):
            restore.prefetch(tick.now)
            stats = restore.job.stats
            if restore.reader is None and not restore.failed and "complete_s" not in stats:
                stats["complete_s"] = host.now - restore.job.started  # to the tick (end of the batch round)

    @hookimpl
    def memvisor_vm_destroyed(self, host, vm) -> None:
        """The VM goes: close its checkpoint."""
        self._end(vm)

    @hookimpl
    def memvisor_host_stopping(self, host) -> None:
        """The run ends: close every checkpoint and count the pages never touched."""
        for restore in list(self.restores.values()):
            restore.end()

    @hookimpl
    def memvisor_register_benchmarks(self, register) -> None:
        """``memvisor bench checkpoint``: time to first access, faults of a sequential touch,
        restore of a 10% working set."""
        from memvisor_lazy_restore.bench import cases

        for case in cases():
            register("checkpoint", case)

    @hookimpl
    def memvisor_report(self, host):
        """One section: every lazy restore with its reads, faults, prefetched and untouched pages."""
        restores = self.finished + list(self.restores.values())
        if not restores:
            return None
        jobs: list[dict[str, Any]] = [r.job.to_json() for r in restores]
        series, ends_at = {}, {}
        for i, r in enumerate(restores):
            t, on_fault, prefetched = (list(c) for c in zip(*r.progress))
            for label, values, key in ((f"{r.vm.name} #{i} on fault", on_fault, "pages_loaded_on_fault"),
                                       (f"{r.vm.name} #{i} prefetched", prefetched, "pages_prefetched")):
                series[label] = (t, values)
                ends_at[label] = ("restores", i, key)
        plot = Plot("lazy-restore-progress", "Lazy restore: pages loaded", "time (s)", "pages", series, kind="step",
                    ends_at=ends_at)
        return ReportSection(NAME, "Lazy checkpoint restore", {"restores": jobs}, [plot],
                             headlines=[_headline(i, job) for i, job in enumerate(jobs)], tables=[TABLE],
                             text="The restored VM resumes at once; a page it touches before it is loaded faults "
                                  "and its storage block is read, while the rest is prefetched, hottest first. "
                                  "Fault windows: the faults a guest touching pages one at a time would take (one "
                                  "per window); never touched: pages loaded that the guest did not touch since (a "
                                  "dash, null in report.json: still loading at the end).")


def _headline(i: int, job: dict[str, Any]) -> Headline:
    """How soon the restored VM ran and was served, and what the restore loaded."""
    def at(key: str) -> tuple:
        return ("restores", i, key)

    figures = {"name": Figure(at("checkpoint"), "text"),
               "resume": Figure(at("resume_s"), "s", "lower", "resumed after"),
               "first": Figure(at("first_access_s"), "s", "lower", "first access after"),
               "faults": Figure(at("fault_pages"), "count", "lower", "pages faulted")}
    text = "lazy restore of {name}: resumed after {resume}, first access served after {first}; {faults} pages faulted"
    if job.get("complete_s") is not None:
        figures |= {"loaded": Figure(at("pages_loaded"), "pages"),
                    "complete": Figure(at("complete_s"), "s", "lower", "complete after"),
                    "untouched": Figure(at("pages_never_touched"), "pages", "lower", "loaded, never touched")}
        text += ", all {loaded} loaded after {complete} ({untouched} of it not touched since)"
    return Headline(text, figures, vm=job["vm"], key=f"restore {job['checkpoint']}")


TABLE = Table("Restores", [
    Column("vm", "VM", "text"), Column("checkpoint", "checkpoint", "text"), Column("started_s", "started", "s"),
    Column("resume_s", "resumed after", "s"), Column("first_access_s", "first access after", "s"),
    Column("complete_s", "complete after", "s", "still loading at the end"),
    Column("read_calls", "read calls", "count"), Column("bytes_read", "read", "bytes"),
    Column("fault_windows", "fault windows", "count", help="faults a guest touching pages one at a time would take"),
    Column("fault_pages", "pages faulted", "count"), Column("pages_loaded_on_fault", "loaded on fault", "pages"),
    Column("pages_prefetched", "prefetched", "pages"), Column("pages_never_touched", "never touched", "pages",
                                                             "still loading at the end"),
    Column("prefetch_order", "prefetch order", "text"),
    Column("real_seconds", "work (wall clock)", "s", help="wall-clock time of the restore's own work")],
    rows=("restores",), keys=())
"""Every lazy restore, one row each."""
