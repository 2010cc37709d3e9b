"""The lazy-save plugin: takes :func:`memvisor_checkpoint_save` when a lazy save is asked for.

A save in progress is a :class:`LazySave`. Its unit of work is a *window*: ``block_pages``
consecutive guest pages, aligned (the page block of the request). A window is saved whole, in
one call of the core's :func:`memvisor.builtins.checkpoint.vm.write_checkpoint` (zero pages to the page
map, pages that other plugins describe as their records, the rest compressed into the writer's
staging buffer, which writes one storage block per full buffer). Windows are saved

- in the background, from :func:`memvisor_tick`, in page order, as long as the background
  saver is not busy: each batch of windows keeps it busy for the cost model's time of
  compressing and writing it, so the save runs at the modelled disk and compression speed;
- at once when the guest is about to write a page of an unsaved window
  (:func:`memvisor_write_trap` arrives before the write lands): copy before write. The window's
  pages are copied into a bounded side buffer (the guest waits for a memory copy) that the
  background saver compresses first; when the side buffer is full the window is compressed in
  the trap (the guest waits for the compression).
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import numpy as np
import structlog

from memvisor import PAGE_SIZE, hookimpl
from memvisor.backend import Capability
from memvisor.builtins.checkpoint import CheckpointError
from memvisor.builtins.checkpoint.vm import SaveJob, new_writer, write_checkpoint, writer_stats
from memvisor.events import FaultBatch
from memvisor.identity import zero_rows
from memvisor.report import Column, Figure, Headline, Plot, ReportSection, Table
from memvisor.settings import setting
from memvisor_lazy_save import order

NAME = "lazy-save"
PTE_BYTES = 8
"""Bytes of page-table entry per page: write-protecting every page is modelled as one pass over
the VM's entries at the cost model's memory-copy rate (the save's only stop)."""


@attrs.frozen
class LazySaveSettings:
    """What ``[plugins.lazy-save]`` may set (docs/checkpoint.md)."""

    step_pages: int = setting(2048, low=1, high=10**9,
                              doc="Guest pages per background step (2048: 8 MiB of guest memory).")
    record_order: bool = setting(True, doc="Write the access-order sidecar that a lazy restore prefetches by "
                                           "(needs accessed bits).")
    page_at_a_time: bool = setting(False, doc="The page-at-a-time baseline: one page per page block and per "
                                              "storage block (one write per page).")
    side_buffer_pages: int = setting(16384, low=0, high=10**9,
                                     doc="Pages that copy before write may hold uncompressed for the background "
                                         "saver (16384: 64 MiB); beyond it the guest waits for the compression.")

log = structlog.get_logger("memvisor.lazy_save")


class LazySave:
    """One lazy save of one VM, from its start until its file is complete.

    :param plugin: the plugin (its settings).
    :param host: the host.
    :param vm: the VM being saved.
    :param request: the save request (path, block_pages, buffer_bytes, level, key).
    """

    def __init__(self, plugin: LazySavePlugin, host, vm, request):
        self.host, self.vm, self.request = host, vm, request
        backend = host.backend
        self.virtual = Capability.VIRTUAL_TIME in backend.capabilities
        self.window = max(1, int(request.block_pages))
        self.windows = -(-vm.pages // self.window)
        self.step_windows = max(1, plugin.settings.step_pages // self.window)
        self.saved = np.zeros(self.windows, dtype=bool)
        self.cursor = 0  # every window below it is saved
        started, real = host.now, time.perf_counter()
        self.real_start = real
        self.writer = new_writer(host, vm, attrs.evolve(request, block_pages=self.window))
        # Pages this save protects (those not protected already) are the ones it unprotects
        # again once saved: protection that another plugin set stays.
        self.ours = ~backend.protected(vm)
        # Accessed bits before and during the save give the order hint for a lazy restore.
        self.record_order = plugin.settings.record_order and Capability.ACCESSED in backend.capabilities
        self.accessed_before = host.take_accessed(vm, "lazy-save") if self.record_order else None
        backend.protect(vm, np.arange(vm.pages, dtype=np.int64))
        stop = backend.account("copy", vm.pages * PTE_BYTES)
        host.advance(stop)  # the VM is stopped only while every page is write-protected
        self.job = SaveJob(vm.name, str(request.path), "lazy", started, stop_seconds=stop)
        self.busy_until = host.now  # when the background saver is free again
        self.deferred_io = [0, 0]  # bytes and calls of writes done inside traps, charged at the next tick
        self.closed = False
        self.cow_windows = self.cow_pages = self.background_windows = 0
        self.cow_seconds = 0.0  # guest time spent on copy before write
        self.cow_copied_windows = 0  # of cow_windows, those that went through the side buffer
        self.copied: list[tuple[np.ndarray, Any]] = []  # the side buffer: (pages, contents)
        self.copied_pages = 0
        self.side_pages = plugin.settings.side_buffer_pages
        self.progress: list[tuple[float, int]] = [(host.now, 0)]
        self.job.stats = {"stop_s": stop, "pages": vm.pages}
        try:
            self.background(host.now + host.tick_interval)  # the saver starts with the VM
        except CheckpointError as exc:  # nothing could be written: the caller gets the error
            self.fail(exc)
            raise

    # -- saving windows -------------------------------------------------------------------------

    def _pages_of(self, windows: np.ndarray) -> np.ndarray:
        pages = (windows[:, None] * self.window + np.arange(self.window)).ravel()
        return pages[pages < self.vm.pages]

    def save_windows(self, windows: np.ndarray, *, in_trap: bool) -> float:
        """Save ``windows`` (sorted, unsaved) now; returns the seconds charged.

        In a trap the guest waits for the compression (charged to its batch); the write of a
        full buffer goes to the background saver (charged at the next tick), as an I/O thread
        would take it.
        """
        host, vm, backend, w = self.host, self.vm, self.host.backend, self.writer
        pages = self._pages_of(windows)
        missing = pages[~backend.present(vm, pages)]
        if len(missing):
            # Not present (a lazy restore in progress, a balloon): its owner serves it, as the
            # guest touching it would see it; that is its content as of the save's start.
            host.deliver_faults(vm, FaultBatch(missing, np.zeros(len(missing), dtype=bool), host.now))
        bytes_in, bytes_out, calls = w.bytes_in, w.bytes_out, w.write_calls
        write_checkpoint(host, vm, self.request, pages, w)
        self.saved[windows] = True
        seconds = backend.account("compress", w.bytes_in - bytes_in)
        if in_trap:
            self.deferred_io[0] += w.bytes_out - bytes_out
            self.deferred_io[1] += w.write_calls - calls
        elif w.write_calls > calls:
            seconds += backend.account("disk_write", w.bytes_out - bytes_out, w.write_calls - calls)
        return seconds

    def copy_before_write(self, gpps: np.ndarray) -> None:
        """The guest is about to write ``gpps``: save their windows first if they are not saved.

        The windows' pages are copied as they are into a side buffer (the guest waits for a
        memory copy only) that the background saver compresses into the staging buffer before
        anything else; when the side buffer is full, the windows are compressed at once and
        the guest waits for that.
        """
        windows = np.unique(gpps // self.window)
        windows = windows[~self.saved[windows]]
        if not len(windows):
            return
        self.cow_windows += len(windows)
        self.cow_pages += int(np.count_nonzero(~self.saved[gpps // self.window]))
        host, vm, backend = self.host, self.vm, self.host.backend
        room = max(0, self.side_pages - self.copied_pages) // self.window
        if room < len(windows):  # the side buffer is full: the rest is compressed right here
            self.cow_seconds += self.save_windows(windows[room:], in_trap=True)
            windows = windows[:room]
            if not len(windows):
                return
        pages = self._pages_of(windows)
        missing = pages[~backend.present(vm, pages)]
        if len(missing):
            host.deliver_faults(vm, FaultBatch(missing, np.zeros(len(missing), dtype=bool), host.now))
        self.cow_copied_windows += len(windows)
        self.copied.append((pages, backend.contents(vm, pages)))
        self.copied_pages += len(pages)
        self.saved[windows] = True
        self.cow_seconds += backend.account("copy", len(pages) * PAGE_SIZE)

    def _write_copied(self) -> float:
        """Compress the oldest side-buffer copy into the staging buffer (background); returns
        the seconds charged. Copied pages are stored as their bytes (zero pages to the page
        map): other plugins' records describe pages as they are now, not as they were."""
        pages, data = self.copied.pop(0)
        self.copied_pages -= len(pages)
        w, backend = self.writer, self.host.backend
        bytes_in, bytes_out, calls = w.bytes_in, w.bytes_out, w.write_calls
        nonzero = ~zero_rows(data)
        w.add_zero_pages(pages[~nonzero])
        if nonzero.any():
            w.add_pages(pages[nonzero], data[nonzero])
        seconds = backend.account("compress", w.bytes_in - bytes_in)
        if w.write_calls > calls:
            seconds += backend.account("disk_write", w.bytes_out - bytes_out, w.write_calls - calls)
        return seconds

    def _next_windows(self) -> np.ndarray:
        saved = self.saved
        while self.cursor < self.windows and saved[self.cursor]:
            # skip a run of windows that copy-before-write saved, a slice at a time
            run = saved[self.cursor : self.cursor + 4096]
            free = np.flatnonzero(~run)
            self.cursor += int(free[0]) if len(free) else len(run)
        span = saved[self.cursor : self.cursor + 4 * self.step_windows]
        return (np.flatnonzero(~span)[: self.step_windows] + self.cursor).astype(np.int64)

    def background(self, until: float) -> None:
        """Save windows while the background saver has time left before ``until``.

        The saver is called once per tick and works one tick ahead (``until`` is the next
        tick): the windows it saves in the coming interval are taken at its start, so guest
        writes in the interval do not copy them again.
        """
        backend = self.host.backend
        if self.deferred_io[1]:
            self.busy_until += backend.account("disk_write", *self.deferred_io)
            self.deferred_io = [0, 0]
        self.busy_until = max(self.busy_until, self.job.started + self.job.stop_seconds)
        done_before = int(np.count_nonzero(self.saved))
        while self.busy_until < until and not self.closed:
            real = time.perf_counter()
            if self.copied:  # copies made for the guest's writes go first: they hold memory
                seconds = self._write_copied()
            else:
                windows = self._next_windows()
                if not len(windows):
                    self._close()
                    break
                seconds = self.save_windows(windows, in_trap=False)
                self.background_windows += len(windows)
            # a real-time backend charges nothing: the work took its real time
            self.busy_until += seconds if self.virtual else time.perf_counter() - real
        self._unprotect_saved(done_before)
        self.progress.append((self.host.now, min(self.vm.pages, int(np.count_nonzero(self.saved)) * self.window)))

    def _unprotect_saved(self, done_before: int) -> None:
        # Saved pages need no protection any more: a later write must not trap for nothing.
        if int(np.count_nonzero(self.saved)) == done_before and not self.closed:
            return
        pages = self._pages_of(np.flatnonzero(self.saved))
        pages = pages[self.ours[pages]]
        self.ours[pages] = False
        if len(pages):
            self.host.backend.unprotect(self.vm, pages)

    def _close(self) -> None:
        """Every window is saved: last storage block, metadata and trailer, rename."""
        w = self.writer
        bytes_out, calls = w.bytes_out, w.write_calls
        w.close()
        self.busy_until += self.host.backend.account("disk_write", w.bytes_out - bytes_out, w.write_calls - calls)
        self.closed = True

    def flush(self) -> None:
        """Save everything that is left now (the VM is about to be restored or destroyed)."""
        if not self.closed:
            while self.copied:
                self.busy_until += self._write_copied()
            left = np.flatnonzero(~self.saved).astype(np.int64)
            if len(left):
                self.busy_until += self.save_windows(left, in_trap=False)
            if self.deferred_io[1]:
                self.busy_until += self.host.backend.account("disk_write", *self.deferred_io)
                self.deferred_io = [0, 0]
            self._close()
        self.busy_until = max(self.busy_until, self.host.now)
        self.finish()

    def finish(self) -> None:
        """The file is complete: fill in the job, write the order hint, drop protection."""
        self._unprotect_saved(-1)
        job, w = self.job, self.writer
        job.finished = self.busy_until
        total = job.finished - job.started
        job.stats = {
            **writer_stats(w),
            "stop_s": job.stop_seconds,
            "total_s": total,
            "throughput_mib_per_s": (self.vm.pages * PAGE_SIZE / 2**20) / total if total > 0 else None,
            "cow_windows": self.cow_windows,
            "cow_pages": self.cow_pages,
            "cow_seconds": self.cow_seconds,
            "cow_copied_windows": self.cow_copied_windows,
            "background_windows": self.background_windows,
            "window_pages": self.window,
            "real_seconds": time.perf_counter() - self.real_start,
        }
        self.progress.append((job.finished, self.vm.pages))
        job.stats["order"] = self._write_order()

    def abort(self) -> None:
        """Give up (the VM is gone): remove the temporary file, keep the old checkpoint."""
        self.writer.abort()
        self.job.stats["aborted"] = True

    def fail(self, exc: CheckpointError) -> None:
        """The file cannot be written (disk full, short writes that end in an error): give up
        the save, not the VM. The temporary file goes, the previous checkpoint at the path is
        untouched, the pages this save protected are unprotected, and the job says why
        (``job.error``). Before, the error escaped from the guest's write trap and every
        later write trapped into the broken writer again (found by the fault-injection tests)."""
        self.writer.abort()
        self.closed = True
        self.copied.clear()
        pages = np.flatnonzero(self.ours)
        self.ours[:] = False
        if len(pages):
            self.host.backend.unprotect(self.vm, pages)
        self.job.error = str(exc)
        self.job.stats["error"] = str(exc)
        log.error("lazy save failed", vm=self.vm.name, error=str(exc))

    def _write_order(self) -> str | None:
        """Write the access-order sidecar; returns its source, or None when there is no hint."""
        if not self.record_order:
            return None
        host, vm = self.host, self.vm
        heat = host.hook.memvisor_page_heat(host=host, vm=vm, gpps=np.arange(vm.pages, dtype=np.int64))
        if heat is not None:
            source, page_heat = order.SOURCE_PAGE_HEAT, np.asarray(heat, dtype=np.float64)
        else:
            # Pages touched during the save are the working set now; pages touched before it
            # (since the previous save, or since any reader of accessed bits asked) come next.
            during = host.take_accessed(vm, "lazy-save")
            source, page_heat = order.SOURCE_ACCESSED_BITS, 2.0 * during + self.accessed_before
        if not page_heat.any():
            return None
        try:
            order.write_order(self.request.path, file_id=order.checkpoint_file_id(self.request.path),
                              vm_pages=vm.pages, window_pages=self.window,
                              heat=order.window_heat(page_heat, self.window), source=source, key=self.request.key)
        except OSError as exc:  # only a hint: the checkpoint itself is complete
            log.warning("cannot write the access-order sidecar", path=str(self.request.path), error=str(exc))
            return None
        return "page_heat" if source == order.SOURCE_PAGE_HEAT else "accessed_bits"


class LazySavePlugin:
    """Lazy checkpoint save: the VM keeps running; copy before write keeps the file consistent
    (settings: :class:`LazySaveSettings`)."""

    def __init__(self) -> None:
        self.saves: dict[str, LazySave] = {}
        self.finished: list[LazySave] = []
        self.settings = LazySaveSettings()

    @hookimpl
    def memvisor_register_hookspecs(self, register):
        """Declare ``memvisor_page_heat``, which the access-order sidecar is made from."""
        from memvisor_lazy_save import hookspecs

        register(hookspecs)

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare ``[plugins.lazy-save]``."""
        register(NAME, LazySaveSettings)

    @hookimpl
    def memvisor_host_started(self, host) -> None:
        """Read the settings and check that the backend can write-protect pages."""
        self.settings = host.plugin_settings(NAME)
        host.require(NAME, Capability.WRITE_PROTECT)

    @hookimpl
    def memvisor_checkpoint_save(self, host, vm, request):
        """Take the save unless a stop-the-world save is asked for (``request.lazy is False``)."""
        if request.lazy is False:
            return None
        previous = self.saves.pop(vm.name, None)
        if previous is not None:  # one save of a VM at a time: finish the earlier one first
            previous.flush()
            self.finished.append(previous)
        if self.settings.page_at_a_time:
            request = attrs.evolve(request, block_pages=1, buffer_bytes=1)
        save = LazySave(self, host, vm, request)
        if self.settings.page_at_a_time:
            save.job.method = "page-at-a-time"
        self.saves[vm.name] = save
        save.job.flush = lambda: self._flush(vm.name)  # the core calls it before a restore of the VM
        return save.job

    def _flush(self, name: str) -> None:
        """Finish the save of VM ``name`` now, if it still runs."""
        save = self.saves.pop(name, None)
        if save is not None:
            save.flush()
            self.finished.append(save)

    @hookimpl
    def memvisor_write_trap(self, vm, write) -> None:
        """Copy before write: save the windows of written pages that are not saved yet."""
        save = self.saves.get(vm.name)
        if save is not None and not save.closed:
            try:
                save.copy_before_write(write.gpps)
            except CheckpointError as exc:
                save.fail(exc)
                self.finished.append(self.saves.pop(vm.name))

    @hookimpl
    def memvisor_tick(self, host, tick) -> None:
        """Background saving within the time the cost model gives the saver."""
        for name, save in list(self.saves.items()):
            try:
                save.background(tick.now + host.tick_interval)
            except CheckpointError as exc:
                save.fail(exc)
                self.finished.append(self.saves.pop(name))
                continue
            if save.closed and save.busy_until <= tick.now:
                save.finish()
                self.finished.append(self.saves.pop(name))


    @hookimpl
    def memvisor_vm_destroyed(self, host, vm) -> None:
        """The VM's memory is still mapped: finish its save."""
        self._flush(vm.name)

    @hookimpl
    def memvisor_host_stopping(self, host) -> None:
        """The run ends: finish every save still running, so no file is left half written."""
        for name in list(self.saves):
            save = self.saves.pop(name)
            save.flush()
            self.finished.append(save)

    @hookimpl
    def memvisor_register_benchmarks(self, register) -> None:
        """``memvisor bench checkpoint``: save-1gib and the lazy save's stop and total time."""
        from memvisor_lazy_save.bench import cases

        for case in cases():
            register("checkpoint", case)

    @hookimpl
    def memvisor_report(self, host):
        """One section: every lazy save with its stop time, total time, calls and bytes."""
        if not self.finished and not self.saves:
            return None
        jobs: list[dict[str, Any]] = [s.job.to_json() for s in self.finished + list(self.saves.values())]
        series = {f"{s.vm.name} #{i}": tuple(zip(*s.progress)) for i, s in enumerate(self.finished)}
        plots = [Plot("lazy-save-progress", "Lazy save: pages saved", "time (s)", "pages", series, kind="step",
                      ends_at={label: ("saves", i, "pages") for i, label in enumerate(series)})] if series else []
        return ReportSection(NAME, "Lazy checkpoint save", {"saves": jobs}, plots,
                             headlines=[_headline(i, job) for i, job in enumerate(jobs)], tables=[TABLE],
                             text="Stop time (write-protecting every page) apart from the total save time; "
                                  "write calls, bytes, compression ratio and throughput; copy-before-write saves.")


def _headline(i: int, job: dict[str, Any]) -> Headline:
    """How long the VM stopped, what the save wrote and how many writes it had to copy first."""
    def at(key: str) -> tuple:
        return ("saves", i, key)

    figures = {"name": Figure(at("checkpoint"), "text"), "stop": Figure(at("stop_s"), "s", "lower", "VM stopped")}
    if job.get("total_s") is None:
        return Headline("lazy save of {name}: the VM stopped for {stop}; still saving at the end", figures,
                        vm=job["vm"], key=f"save {job['checkpoint']}")
    figures |= {"data": Figure(at("bytes_in"), "bytes", label="data"),
                "file": Figure(at("bytes_out"), "bytes", "lower", "file size"),
                "total": Figure(at("total_s"), "s", "lower", "saved after"),
                "cow": Figure(at("cow_pages"), "count", "lower", "copy-before-write saves")}
    return Headline("lazy save of {name}: the VM stopped for {stop}, then {data} saved as {file} in {total} while "
                    "it ran; {cow} copy-before-write saves", figures, vm=job["vm"], key=f"save {job['checkpoint']}")


TABLE = Table("Saves", [
    Column("vm", "VM", "text"), Column("checkpoint", "checkpoint", "text"), Column("started_s", "started", "s"),
    Column("stop_s", "VM stopped", "s"), Column("total_s", "saved after", "s", "still saving at the end"),
    Column("pages", "memory", "pages"), Column("zero_pages", "zero pages", "count"),
    Column("record_pages", "pages as records", "count"), Column("bytes_in", "data", "bytes"),
    Column("bytes_out", "file", "bytes"), Column("compression_ratio", "compression", "ratio"),
    Column("throughput_mib_per_s", "throughput", "MiB/s"), Column("write_calls", "write calls", "count"),
    Column("storage_blocks", "storage blocks", "count"),
    Column("cow_pages", "copy-before-write saves", "count", help="pages copied before a guest write"),
    Column("cow_windows", "copied windows", "count"), Column("cow_seconds", "copy time", "s"),
    Column("order", "order", "text"),
    Column("real_seconds", "work (wall clock)", "s", help="wall-clock time of the save's own work")],
    rows=("saves",), keys=())
"""Every lazy save, one row each."""
