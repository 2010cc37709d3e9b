"""Live migration of a VM between two hosts in one process: pre-copy, stop-and-copy, post-copy.

Pre-copy sends every page in a first round while the guest keeps running on the source, then
the pages the guest dirtied meanwhile (``backend.take_dirty``), round after round, until few
enough are left (``stop_pages``) or ``max_rounds`` is reached. Then the VM stops and the rest
is sent (stop-and-copy); the time this takes is the downtime. With post-copy, the destination
resumes at once instead and pulls each page still missing when the guest touches it (a page
fault on the destination, served by a ``tryfirst`` fault handler that this module registers
there), and the rest in the background.

Pages travel as records (:mod:`memvisor.builtins.migration.stream`): all-zero pages as ``zero``
records, pages that a plugin describes (:func:`memvisor_describe_pages`, purpose
``"migration"``) as that plugin's records, the rest as zstd-compressed ``page`` records —
or, between identity-model hosts (:mod:`memvisor.identity`), as ``identity`` records counted
as the ``page`` records they stand for (the bytes, time and record counts of the bytes model;
``identity_wire_bytes`` is what really went over the link). The destination
(:class:`Destination`) checks every record's CRC, takes each sequence number once and in
order, and knows the pages it is owed: each round begins with a ``round`` record naming them,
a record (``identity`` ones too) may carry only pages still owed, and the next round or the
switch-over verifies that none is left. A damaged record is refused and asked for again; a
record replayed, duplicated, reordered or not owed, or a round left short, aborts the
migration with the source running — never a silent difference. A plugin record that no
plugin on the destination resolves, or whose resolution is
refused (a disk block changed), is asked for again in halves, down to single pages that are
then sent as page data.

Time: each batch of records costs ``backend.account("network", bytes, 1)`` (one message
latency per batch: the stream is pipelined) and ``account("compress", bytes of page data)``;
the two overlap, as do the source's other work (reading back pages that a plugin dropped) and
the destination's (reading disk blocks to resolve records), so a batch takes the longest of
these — and at least ``bytes / migration_bandwidth`` when the VM has a migration bandwidth
budget (:mod:`memvisor.budgets`). During pre-copy rounds the guests keep running for that
long (the ``run_guests`` callback); downtime is the stop-and-copy batch alone. Disks are on
shared storage: the destination VM is attached to the same disk objects.
"""

from __future__ import annotations

import contextlib
import time as wallclock
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import numpy as np
import zstandard

from memvisor import PAGE_SIZE, hookimpl
from memvisor.builtins.checkpoint.vm import describe
from memvisor.builtins.migration import stream
from memvisor.errors import BackendError, UserError
from memvisor.events import FaultBatch, MigrationPhase, PageRecords
from memvisor.identity import is_identities, materialise, zero_rows

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.host import VM, Host


class MigrationAborted(UserError, BackendError):
    """A live migration failed (the link dropped, the destination refused a record it was not
    owed), before the switch-over or during post-copy: the destination VM and its fault
    handler are gone, the source VM runs on unharmed."""


@attrs.frozen
class MigrationOptions:
    """How to migrate.

    :ivar max_rounds: pre-copy rounds at most (the first sends every page).
    :ivar stop_pages: stop-and-copy once at most this many pages are dirty.
    :ivar postcopy: resume on the destination at the stop instead of sending the dirty pages;
        they are pulled on fault (and in the background).
    :ivar records: ask plugins to describe pages (disk references and the like).
    :ivar zero_pages: send all-zero pages as ``zero`` records (no data).
    :ivar level: zstd level of page data; ``None`` sends raw pages.
    :ivar chunk_pages: pages per ``page`` record.
    :ivar max_retries: times a damaged record is asked for again before the migration fails.
    """

    max_rounds: int = 30
    stop_pages: int = 256
    postcopy: bool = False
    records: bool = True
    zero_pages: bool = True
    level: int | None = 1
    chunk_pages: int = 64
    max_retries: int = 5


@attrs.define
class MigrationResult:
    """Figures of one migration.

    :ivar vm: the VM's name.
    :ivar method: ``"precopy"`` or ``"precopy+postcopy"``.
    :ivar started: time on the source when the migration began.
    :ivar total_s: from start until every page is on the destination.
    :ivar downtime_s: time the VM ran nowhere (stop-and-copy, or the switch-over of post-copy).
    :ivar rounds: pre-copy rounds.
    :ivar pages_sent: pages carried by the stream, re-sent ones included.
    :ivar pages_resent: pages sent again because the guest dirtied them.
    :ivar bytes_sent: bytes on the link (headers included, refused records too).
    :ivar bytes_by_kind: bytes per record kind.
    :ivar records: pages carried by records of each kind.
    :ivar refused: records refused for a bad checksum (each asked for again).
    :ivar fallbacks: pages of plugin records that could not be resolved, re-sent as data.
    :ivar postcopy_faults: pages the destination pulled on a fault.
    :ivar postcopy_background: pages the destination pulled in the background.
    :ivar real_seconds: wall-clock time of the migration.
    :ivar identity_wire_bytes: bytes of ``identity`` records really sent (identity-model hosts;
        they are counted in ``bytes_sent`` as the ``page`` records they stand for).
    """

    vm: str
    method: str
    started: float
    total_s: float = 0.0
    downtime_s: float = 0.0
    rounds: int = 0
    pages_sent: int = 0
    pages_resent: int = 0
    bytes_sent: int = 0
    bytes_by_kind: dict = attrs.field(factory=Counter)
    records: dict = attrs.field(factory=Counter)
    refused: int = 0
    fallbacks: int = 0
    postcopy_faults: int = 0
    postcopy_background: int = 0
    real_seconds: float = 0.0
    identity_wire_bytes: int = 0

    def to_json(self) -> dict:
        """The figures as report values."""
        out = attrs.asdict(self)
        out["bytes_by_kind"] = dict(sorted(self.bytes_by_kind.items()))
        out["records"] = dict(sorted(self.records.items()))
        return out


class Link:
    """The network between the hosts. Its time is the backend's ``"network"`` cost.

    :param corrupt: ``corrupt(index, wire) -> wire``, called for every record sent (``index``
        counts them from 0): fault injection for tests; the default leaves records intact.
    """

    def __init__(self, corrupt: Callable[[int, bytes], bytes] | None = None):
        self.corrupt = corrupt
        self.sent = 0

    def transmit(self, wire: bytes) -> bytes:
        """What arrives of ``wire`` at the other end."""
        index, self.sent = self.sent, self.sent + 1
        return self.corrupt(index, wire) if self.corrupt else wire


class _PostCopyFaults:
    """Registered on the destination during post-copy: a fault on a page still missing pulls it
    from the source."""

    def __init__(self, migration: LiveMigration):
        self.migration = migration

    @hookimpl(tryfirst=True)
    def memvisor_page_fault(self, host, vm, fault):
        """Pull the missing pages of the migrated VM from the source."""
        m = self.migration
        if vm is not m.dest_vm:
            return None
        wanted = fault.gpps[m.missing[fault.gpps]]
        if not len(wanted):
            return None
        m.pull(wanted, host.backend)
        m.result.postcopy_faults += len(wanted)
        return wanted


class Destination:
    """The destination's end of a migration: it installs a record only when it is intact, the
    next in sequence and made of pages it is owed.

    :param opaque: kinds of records that carry no pages and that the caller uses itself (a
        transport's own bytes, such as a QEMU migration stream a backend passes on);
        :meth:`take` checks their place in the sequence and hands them back.
    :ivar missing: per page, whether the destination VM still lacks it.
    :ivar owed: per page, whether the current round (or post-copy request) still owes it.
    """

    def __init__(self, host: Host, vm: VM, compressed: bool, opaque: tuple[str, ...] = ()):
        self.host, self.vm = host, vm
        self.missing = np.ones(vm.pages, dtype=bool)
        self.owed = np.zeros(vm.pages, dtype=bool)
        self.next_seq = 0
        self.round = 0
        self.switched = False
        self.opaque = frozenset(opaque) - set(stream.CONTROL) - {stream.PAGE, stream.ZERO, stream.IDENTITY}
        self.identity = host.backend.contents_model == "identity"
        self._decompressor = zstandard.ZstdDecompressor() if compressed else None

    def receive(self, wire: bytes) -> str:
        """Take one record off the link: ``"ok"`` (installed, or a control record taken),
        ``"refused"`` (damaged: ask for it again) or ``"unresolved"`` (a plugin record no
        plugin here resolves: its pages stay owed); see :meth:`take`. Raises
        :class:`stream.StreamViolation` for a record the destination was not owed."""
        try:
            record = stream.decode(wire, self.vm.pages)
        except stream.StreamViolation:
            raise
        except stream.StreamError:
            return "refused"
        return self.take(record)

    def take(self, record: stream.Record) -> str:
        """Take one record that :func:`stream.decode` read with this VM's size (so its pages
        are distinct pages of the VM, at most :data:`stream.MAX_RECORD_PAGES`): as
        :meth:`receive`, and ``"opaque"`` for a record of one of the ``opaque`` kinds, next in
        sequence and without pages, which is the caller's to use."""
        if record.seq != self.next_seq:
            how = "replayed or duplicated" if record.seq < self.next_seq else "out of order (records are missing)"
            raise stream.StreamViolation(f"record {record.seq} arrived where record {self.next_seq} was expected: "
                                         f"{how}")
        if record.kind in self.opaque:
            if len(record.gpps):
                raise stream.StreamViolation(f"record {record.seq}: a {record.kind} record with pages")
            self.next_seq += 1
            return "opaque"
        if record.kind in stream.CONTROL:
            self._control(record)
            self.next_seq += 1
            return "ok"
        if len(record.gpps) and not self.owed[record.gpps].all():
            raise stream.StreamViolation(f"record {record.seq} ({record.kind}) carries pages the destination is "
                                         f"not owed (first: {int(record.gpps[~self.owed[record.gpps]][0])})")
        try:
            data = self._materialise(record)
        except stream.StreamError:
            return "refused"
        self.next_seq += 1
        if data is None:
            return "unresolved"
        self._install(record.gpps, data)
        return "ok"

    def expect(self, gpps: np.ndarray) -> None:
        """Post-copy: the destination asks for ``gpps`` (pages it lacks); they are owed now."""
        self.check_complete("the previous request")
        if not self.missing[gpps].all():
            raise stream.StreamViolation("post-copy asked for pages the destination has")
        self.owed[gpps] = True

    def check_complete(self, what: str) -> None:
        """:class:`stream.StreamViolation` when ``what`` (a round, a request) left pages owed."""
        if self.owed.any():
            left = np.flatnonzero(self.owed)
            raise stream.StreamViolation(f"{what} ended with {len(left)} pages owed (first: {int(left[0])})")

    def _control(self, record: stream.Record) -> None:
        if len(record.gpps) or self.switched:
            raise stream.StreamViolation(f"record {record.seq}: a {record.kind} record "
                                         + ("after the switch-over" if self.switched else "with pages"))
        head, pages = stream.unpack_ranges(record.payload, self.vm.pages)
        self.check_complete(f"round {self.round}")
        if record.kind == stream.ROUND:
            if head != self.round + 1:
                raise stream.StreamViolation(f"round {head} announced after round {self.round}")
            self.round = head
            self.owed = pages
            return
        # The switch-over: every page is here, but for post-copy's stale and never-sent ones.
        if not head and pages.any():
            raise stream.StreamViolation("a stop-and-copy switch-over names stale pages")
        stale = np.flatnonzero(pages & ~self.missing)
        if len(stale):
            self.host.backend.unmap(self.vm, stale)
            self.missing[stale] = True
        if not head and self.missing.any():
            left = np.flatnonzero(self.missing)
            raise stream.StreamViolation(f"switch-over with {len(left)} pages never received (first: {int(left[0])})")
        self.switched = True

    def _materialise(self, record: stream.Record):
        """Contents of a record's pages, bytes or identities (None: a plugin record not
        resolved here)."""
        n = len(record.gpps)
        if record.kind == stream.ZERO:
            if record.payload:
                raise stream.StreamError("zero record with a payload")
            return np.zeros((n, PAGE_SIZE), dtype=np.uint8)
        if record.kind == stream.PAGE:
            return stream.page_data(record.payload, n, self._decompressor)
        if record.kind == stream.IDENTITY:
            if not self.identity:
                raise stream.StreamViolation(f"record {record.seq}: an identity record to a host of bytes")
            return stream.identity_data(record.payload, n, self._decompressor)
        payloads = stream.unpack_payloads(record.payload, n)
        host = self.host
        try:
            data = host.hook.memvisor_resolve_records(
                host=host, vm=self.vm, records=PageRecords(record.kind, record.gpps, payloads))
        except BackendError:
            return None  # refused by its plugin (a disk block changed): never used
        except Exception as exc:  # a record its plugin cannot read: not installed, asked again
            raise stream.StreamError(f"{record.kind} record: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if data is None:
            return None
        if is_identities(data):
            if len(data) != n:
                raise stream.StreamError(f"{record.kind} record resolved to {len(data)} identities for {n} pages")
            return data
        data = np.asarray(data, dtype=np.uint8)
        if data.size != n * PAGE_SIZE:
            raise stream.StreamError(f"{record.kind} record resolved to {data.size} bytes for {n} pages")
        return data.reshape(n, PAGE_SIZE)

    def _install(self, gpps: np.ndarray, data: np.ndarray) -> None:
        backend = self.host.backend
        present = backend.present(self.vm, gpps)
        if (~present).any():
            backend.populate(self.vm, gpps[~present], data[~present])
        if present.any():
            backend.write(self.vm, gpps[present], data[present])
        self.missing[gpps] = False
        self.owed[gpps] = False


class LiveMigration:
    """One live migration of ``vm`` from ``source`` to ``destination``.

    The destination gets a VM of the same name and size, with every page missing, attached to
    the same disks. :meth:`run` performs the migration.

    :param link: the network (a :class:`Link`); a fresh, reliable one when None.
    """

    def __init__(self, source: Host, vm: VM, destination: Host, options: MigrationOptions | None = None,
                 link: Link | None = None):
        self.source, self.vm, self.destination = source, vm, destination
        self.options = options or MigrationOptions()
        self.link = link or Link()
        model, dest_model = source.backend.contents_model, destination.backend.contents_model
        if model != dest_model:
            raise MigrationAborted(f"migration of VM {vm.name!r}: the source holds pages as {model}, "
                                   f"the destination as {dest_model}")
        self.identity = model == "identity"
        self.dest_vm = destination.create_vm(vm.name, vm.pages, seed=vm.seed)
        destination.backend.unmap(self.dest_vm, np.arange(vm.pages, dtype=np.int64))
        for name, disk in source.disks.get(vm.name, {}).items():
            destination.attach_disk(self.dest_vm, disk=disk, name=name)
        self.dest = Destination(destination, self.dest_vm, self.options.level is not None)
        self.seq = 0  # the next record's sequence number
        self.ever_sent = np.zeros(vm.pages, dtype=bool)
        # Machine page of each page when it was last sent: a page remapped since (a balloon
        # taking or giving back a page, an eager give-back) changed without a guest write, so
        # without a dirty bit; it is sent again.
        self.sent_mpn = np.full(vm.pages, -1, dtype=np.int64)
        # ... and how many times the guest had given it up then: machine page numbers are
        # reused, so a page the balloon took can sit on the number it was sent from.
        self.sent_given_up = np.zeros(vm.pages, dtype=np.int64)
        method = "precopy+postcopy" if self.options.postcopy else "precopy"
        self.result = MigrationResult(vm.name, method, source.now)
        level = self.options.level
        self._compressor = None if level is None else zstandard.ZstdCompressor(level=level)
        self._puller: _PostCopyFaults | None = None
        self.switch_over: float | None = None
        self.aborted = False
        self.started = False  # memvisor_migration_phase("start") fired: an abort then fires "aborted"

    @property
    def missing(self) -> np.ndarray:
        """Per page, whether the destination VM still lacks it."""
        return self.dest.missing

    # -- phases -------------------------------------------------------------------------------

    def _phase(self, phase: str, round_: int = 0, pages: int = 0) -> None:
        self.started = self.started or phase == "start"
        self.source.hook.memvisor_migration_phase(
            host=self.source, vm=self.vm,
            phase=MigrationPhase(phase, round_, pages, self.destination, self.source.now))

    def run(self, run_guests: Callable[[float], None] | None = None) -> MigrationResult:
        """Migrate. ``run_guests(seconds)`` lets the source's guests run while a pre-copy round
        is on the wire (time passes without them when None). With post-copy, the method
        returns at the switch-over: the destination pulls pages on fault, and
        :meth:`finish_postcopy` pulls the rest."""
        with self._aborting():
            return self._run(run_guests)

    @contextlib.contextmanager
    def _aborting(self):
        """Any failure inside ends the migration: :meth:`abort`, then one
        :class:`MigrationAborted` line (an interrupt aborts too, and goes on)."""
        try:
            yield
        except MigrationAborted:
            raise
        except Exception as exc:
            self.abort(exc)
            raise MigrationAborted(f"migration of VM {self.vm.name!r} aborted, the VM runs on on the source: "
                                   + f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
        except BaseException as exc:
            self.abort(exc)
            raise

    def abort(self, exc: BaseException | None = None) -> None:
        """Give up: the destination's fault handler is unregistered, its VM destroyed (its host
        keeps nothing of it) and the source VM, which never stopped, runs on. Safe to call at
        any point, more than once."""
        if self._puller is not None:
            self.destination.pm.unregister(self._puller)
            self._puller = None
        if self.destination.vms.get(self.dest_vm.name) is self.dest_vm:
            self.destination.destroy_vm(self.dest_vm)
        if self.aborted:
            return
        self.aborted = True
        self.result.method += " (aborted)"
        self.source.metrics.event(self.source.now, "migration_aborted", vm=self.vm.name,
                                  error=None if exc is None else str(exc).splitlines()[0] if str(exc) else repr(exc))
        if self.started:  # the plugins that saw it start learn that it ended
            self._phase("aborted", self.result.rounds, 0)

    def _run(self, run_guests) -> MigrationResult:
        real = wallclock.perf_counter()
        src, opts, result = self.source, self.options, self.result
        self._phase("start", 0, self.vm.pages)
        src.backend.take_dirty(self.vm)  # from now on, dirty bits mean "changed since sent"
        to_send = np.arange(self.vm.pages, dtype=np.int64)
        while True:
            result.rounds += 1
            self._phase("round", result.rounds, len(to_send))
            seconds = self.send(to_send, round_=result.rounds)
            if run_guests is None:
                src.advance(seconds)
            else:
                run_guests(seconds)
            to_send = np.flatnonzero(src.backend.take_dirty(self.vm) | self._remapped())
            if len(to_send) <= opts.stop_pages or result.rounds >= opts.max_rounds:
                break
        self._phase("stop_and_copy", result.rounds, len(to_send))
        if opts.postcopy:  # the switch-over names the dirty pages: their copies there are old, pulled on fault
            downtime = self.send(np.empty(0, np.int64), switch=to_send)
        else:  # the VM stops: the last dirty pages, then the switch-over
            downtime = self.send(to_send, round_=result.rounds + 1 if len(to_send) else None,
                                 switch=np.empty(0, np.int64))
        src.advance(downtime)
        result.downtime_s = downtime
        self.switch_over = src.now
        self._sync_clock()
        if opts.postcopy and self.missing.any():
            self._phase("postcopy", result.rounds, int(self.missing.sum()))
            self._puller = _PostCopyFaults(self)
            self.destination.pm.register(self._puller)
        else:
            self._end()
        result.real_seconds += wallclock.perf_counter() - real
        return result

    def finish_postcopy(self) -> MigrationResult:
        """Pull every page still missing in the background and end the migration."""
        real = wallclock.perf_counter()
        missing = np.flatnonzero(self.missing)
        if len(missing):
            self.result.postcopy_background += len(missing)
            seconds = self.pull(missing, self.destination.backend)
            self.destination.advance(seconds)
        if self._puller is not None:
            self.destination.pm.unregister(self._puller)
            self._puller = None
        self._end()
        self.result.real_seconds += wallclock.perf_counter() - real
        return self.result

    def _end(self) -> None:
        if self.destination.now > self.source.now:
            self.source.advance(self.destination.now - self.source.now)
        self.result.total_s = self.source.now - self.result.started
        self._phase("end", self.result.rounds, 0)

    def _sync_clock(self) -> None:
        if self.source.now > self.destination.now:
            self.destination.advance(self.source.now - self.destination.now)

    # -- sending ------------------------------------------------------------------------------

    def pull(self, gpps: np.ndarray, clock) -> float:
        """Post-copy: the destination asks for ``gpps`` and the source sends them, time charged
        to ``clock`` (a backend). A failure (the link drops, a record not owed) is the
        migration's abort, after the switch-over too: the destination's VM and fault handler
        are removed and :class:`MigrationAborted` raised."""
        gpps = np.unique(gpps)
        with self._aborting():
            if self.aborted:
                raise MigrationAborted(f"migration of VM {self.vm.name!r} was aborted")
            self.dest.expect(gpps)
            seconds = self.send(gpps, clock=clock)
            self.dest.check_complete("a post-copy request")
            return seconds

    def send(self, gpps: np.ndarray, clock=None, round_: int | None = None, switch: np.ndarray | None = None) -> float:
        """Send pages of the source VM as records, after a ``round`` record owing them when
        ``round_`` is given and before a ``switch`` record (naming ``switch`` as stale pages,
        post-copy) when ``switch`` is given; returns the seconds the batch took."""
        src, opts, result = self.source, self.options, self.result
        clock = clock or src.backend
        gpps = np.sort(np.asarray(gpps, dtype=np.int64))
        nbytes = 0
        if round_ is not None:
            nbytes += self._deliver(stream.ROUND, np.empty(0, np.int64), stream.pack_ranges(gpps, round_))
        if not len(gpps):
            if switch is not None:
                nbytes += self._switch(switch)
            return clock.account("network", nbytes, 1) if nbytes else 0.0
        src_work = _background(src.backend)
        missing_src = gpps[~src.backend.present(self.vm, gpps)]
        if len(missing_src):  # pages dropped on the source (swapped, lazily restored): their owner serves them
            src.deliver_faults(self.vm, FaultBatch(missing_src, np.zeros(len(missing_src), bool), src.now))
        dest_work = _background(self.destination.backend)
        data_bytes = 0
        for start in range(0, len(gpps), stream.MAX_RECORD_PAGES):
            part = gpps[start : start + stream.MAX_RECORD_PAGES]
            data = src.backend.contents(self.vm, part)
            zero, described, rows = sort_pages(src, self.vm, part, data, opts.zero_pages, opts.records)
            if zero.any():
                nbytes += self._deliver(stream.ZERO, part[zero], b"")
            for records in described:
                nbytes += self._deliver_records(records.kind, records.gpps, records.payloads)
            pages, data = part[rows], data[rows]
            if self.identity:
                literal = data.literal()
                if not literal.all():
                    data_bytes += int(np.count_nonzero(~literal)) * PAGE_SIZE
                    nbytes += self._deliver_identities(pages[~literal], data[~literal])
                # Literal pages (bytes only this process holds) go as bytes.
                pages, data = pages[literal], materialise(data[literal])
            for first in range(0, len(pages), opts.chunk_pages):
                chunk = slice(first, first + opts.chunk_pages)
                data_bytes += len(pages[chunk]) * PAGE_SIZE
                nbytes += self._deliver(stream.PAGE, pages[chunk], stream.page_payload(data[chunk], self._compressor))
        if switch is not None:
            nbytes += self._switch(switch)
        result.pages_resent += int(np.count_nonzero(self.ever_sent[gpps]))
        self.ever_sent[gpps] = True
        self.sent_mpn[gpps] = src.backend.mpns(self.vm, gpps)
        self.sent_given_up[gpps] = src.times_given_up(self.vm, gpps)
        result.pages_sent += len(gpps)
        src_work = _background(src.backend) - src_work  # reading dropped pages back, describing
        dest_work = _background(self.destination.backend) - dest_work
        network = clock.account("network", nbytes, 1)
        compress = clock.account("compress", data_bytes) if self._compressor is not None else 0.0
        # The VM's migration bandwidth budget (host.budgets) may make the batch take longer.
        return src.budgets.migration_seconds(self.vm, nbytes, max(network, compress, src_work, dest_work))

    def _remapped(self) -> np.ndarray:
        """Per page, whether it was sent and is now present on another machine page: changed by
        the hypervisor rather than the guest (no dirty bit). Found by examples/overcommit.toml:
        a balloon inflating during pre-copy left the old bytes on the destination. Pages moved
        with equal contents (sharing, NUMA) are sent again too: wasted bytes, never a wrong page.
        A page the guest gave up since it was sent counts as remapped whatever its number: the
        balloon's own page can be allocated where the page was sent from (``memvisor selftest``
        found one ballooned onto its old number with zeros in it)."""
        now = self.source.backend.mpns(self.vm)
        given_up = self.source.times_given_up(self.vm) != self.sent_given_up
        return self.ever_sent & (now >= 0) & ((now != self.sent_mpn) | given_up)

    def _switch(self, stale: np.ndarray) -> int:
        """The switch-over record (``stale``: post-copy's dirty pages); returns bytes sent."""
        return self._deliver(stream.SWITCH, np.empty(0, np.int64),
                             stream.pack_ranges(np.sort(stale), int(self.options.postcopy)))

    def _deliver(self, kind: str, gpps: np.ndarray, payload: bytes, counted: int | None = None) -> int:
        """Send one record until it arrives intact and the destination takes it; returns bytes
        sent, negated when the destination could not resolve a plugin record (nothing
        installed, its pages still owed). ``counted``: the bytes the record counts as (an
        ``identity`` record counts as the ``page`` records it stands for)."""
        wire = stream.encode(kind, gpps, payload, self.seq)
        shown = stream.PAGE if kind == stream.IDENTITY else kind
        size = len(wire) if counted is None else counted
        sent = 0
        for _ in range(self.options.max_retries + 1):
            arrived = self.link.transmit(wire)
            sent += size
            self.result.bytes_sent += size
            self.result.bytes_by_kind[shown] += size
            if kind == stream.IDENTITY:
                self.result.identity_wire_bytes += len(wire)
            outcome = self.dest.receive(arrived)
            if outcome == "refused":
                self.result.refused += 1
                continue  # the destination asks for the same record again
            self.seq += 1
            if outcome == "unresolved":  # the caller asks again (halves, then data)
                return -sent
            if kind not in stream.CONTROL:
                self.result.records[shown] += len(gpps)
            return sent
        raise BackendError(f"migration of VM {self.vm.name!r}: a {kind} record arrived damaged "
                           f"{self.options.max_retries + 1} times")

    def _deliver_records(self, kind: str, gpps: np.ndarray, payloads) -> int:
        """Send a plugin's records. Where the destination cannot resolve them (no plugin for the
        kind, or a block changed since), it asks for each half again, down to single pages,
        which are then sent as data: one stale reference costs a few small records, never a
        wrong page. Returns bytes sent."""
        sent = self._deliver(kind, gpps, stream.pack_payloads(payloads))
        if sent >= 0:
            return sent
        sent = -sent
        if len(gpps) > 1:
            half = len(gpps) // 2
            if isinstance(payloads, np.ndarray):
                first, second = payloads[:half], payloads[half:]
            else:
                first, second = list(payloads)[:half], list(payloads)[half:]
            return sent + self._deliver_records(kind, gpps[:half], first) + self._deliver_records(
                kind, gpps[half:], second)
        self.result.fallbacks += 1
        data = self.source.backend.contents(self.vm, gpps)
        if self.identity:
            if not data.literal().any():
                return sent + self._deliver_identities(gpps, data)
            data = materialise(data)
        return sent + self._deliver(stream.PAGE, gpps, stream.page_payload(data, self._compressor))

    def _deliver_identities(self, gpps: np.ndarray, data) -> int:
        """Send pages by identity, counted as the ``page`` records they stand for."""
        counted = stream.modelled_page_bytes(data, self.options.chunk_pages, self.options.level)
        return self._deliver(stream.IDENTITY, gpps, stream.identity_payload(data, self._compressor), counted)


def sort_pages(host: Host, vm: VM, gpps: np.ndarray, data, zero_pages: bool = True,
               records: bool = True) -> tuple[np.ndarray, list[PageRecords], np.ndarray]:
    """How the stream carries a batch of pages (``gpps`` sorted and distinct, at most
    :data:`stream.MAX_RECORD_PAGES`; ``data`` their contents, bytes or identities): the mask of the all-zero ones
    (``zero`` records, when ``zero_pages``), the records plugins describe the others with
    (``memvisor_describe_pages``, purpose ``"migration"``, when ``records``), and the rows
    left to send as page data. The source of :class:`LiveMigration` and a backend's own link
    sort pages alike."""
    zero = zero_rows(data) if zero_pages else np.zeros(len(gpps), bool)
    rest = ~zero
    described = describe(host, vm, gpps[rest], "migration") if records and rest.any() else []
    for described_records in described:
        rest[np.searchsorted(gpps, described_records.gpps)] = False
    return zero, described, np.flatnonzero(rest)


def _background(backend) -> float:
    """Seconds of background work a backend has charged so far (0 where it does not say)."""
    return float(sum(getattr(backend, "background_seconds", {}).values()))


def migrate(source: Host, vm: VM, destination: Host, options: MigrationOptions | None = None,
            run_guests: Callable[[float], None] | None = None, link: Link | None = None) -> LiveMigration:
    """Migrate ``vm`` from ``source`` to ``destination`` (see :class:`LiveMigration`); returns
    the migration, whose ``result`` holds the figures (post-copy still running when
    ``options.postcopy``: call ``finish_postcopy``)."""
    migration = LiveMigration(source, vm, destination, options, link)
    migration.run(run_guests)
    return migration
