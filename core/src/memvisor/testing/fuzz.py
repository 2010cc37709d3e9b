"""Hostile input: fuzzers for every file or stream memvisor reads from outside.

Each ``check_*`` function takes hostile input and asserts its contract: one clear error (a
:class:`memvisor.errors.UserError` subclass; for a migration record the
:class:`memvisor.builtins.migration.stream.StreamError` that makes the destination ask again, or the
:class:`~memvisor.builtins.migration.stream.StreamViolation` that aborts the migration), or the exact
original; never another exception, never a wrong page, bounded memory (``MEMORY_LIMIT``) and
time (each example runs under a hypothesis deadline). The inputs:

- checkpoint files, migration records (decoded, and re-sealed with a valid checksum through
  the destination's whole path: sequence, pages owed, decompression, plugin resolvers,
  installation), migration links that damage, drop, replay, duplicate or reorder records
  before and after the switch-over, scenario files, trace files;
- scenario values at the edges of every type (NaN, infinities, huge, tiny, deep, long and
  path-like values in every key of a scenario that uses every core action), loaded and run
  (:func:`check_scenario_values`);
- the command line: :mod:`memvisor.testing.cli_matrix` runs every subcommand on every kind of
  bad argument.

:func:`run_all` drives them with hypothesis; pytest (``tests/integration/test_integration_hostile.py``)
does so with a small budget and ``memvisor selftest`` with a long one. The checkpoint reader has its own, deeper
fuzzer in ``core/tests/test_core_checkpoint_fuzz.py``; :func:`check_checkpoint` is the
whole-file outcome (through :class:`memvisor.builtins.checkpoint.CheckpointReader`) used here.
"""

from __future__ import annotations

import functools
import math
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from memvisor import PAGE_SIZE, hookimpl

MEMORY_LIMIT = 64 << 20
"""Peak Python memory any one hostile input may cost (bytes)."""


def _bounded(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        tracemalloc.start()
        try:
            return function(*args, **kwargs)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < MEMORY_LIMIT, f"{function.__name__}: {peak >> 20} MiB for one hostile input"
    return wrapper


# -- checkpoint files -----------------------------------------------------------------------------

PAGES = 24


@functools.cache
def _image() -> np.ndarray:
    rng = np.random.default_rng(11)
    image = np.zeros((PAGES, PAGE_SIZE), np.uint8)
    image[:16] = rng.integers(97, 100, (16, PAGE_SIZE), dtype=np.uint8)
    image[20, 7] = 9
    return image


@functools.cache
def valid_checkpoint() -> bytes:
    """A small valid checkpoint (data, zero pages, one record kind)."""
    from memvisor.builtins.checkpoint import CheckpointWriter

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "valid.ckpt"
        with CheckpointWriter(path, PAGES, block_pages=4, buffer_bytes=5000, threads=1) as w:
            w.add_pages(0, _image()[:22])
            w.add_records("note", [22, 23], [b"x", b"yz"])
        return path.read_bytes()


@_bounded
def check_checkpoint(data: bytes) -> str:
    """Read every page of a hostile checkpoint file: ``CheckpointError`` or the exact pages."""
    from memvisor.builtins.checkpoint import KIND_DATA, CheckpointError, CheckpointReader

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "hostile.ckpt"
        path.write_bytes(data)
        try:
            with CheckpointReader(path) as reader:
                kinds = reader.page_kind(np.arange(reader.vm_pages))
                for _pb, gpps, pages in reader.iter_page_blocks():
                    if reader.vm_pages == PAGES:
                        assert (pages == _image()[gpps]).all(), "a hostile checkpoint read back wrong pages"
                assert reader.vm_pages != PAGES or np.count_nonzero(kinds == KIND_DATA) <= PAGES
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return "refused"
    return "read"


# -- migration record streams ------------------------------------------------------------------


@functools.cache
def valid_records() -> tuple[bytes, ...]:
    from memvisor.builtins.migration import stream

    return (stream.encode("page", np.arange(4), b"p" * 100), stream.encode("zero", np.arange(4, 9)),
            stream.encode("disk-ref", np.array([9]), bytes(24)))


@_bounded
def check_record(wire: bytes) -> str:
    """Decode a hostile migration record: ``StreamError`` (asked for again) or a record equal
    to one that was sent."""
    from memvisor.builtins.migration import stream

    try:
        record = stream.decode(wire)
    except stream.StreamError:
        return "refused"
    sent = [stream.decode(w) for w in valid_records()]
    assert any(r.kind == record.kind and np.array_equal(r.gpps, record.gpps) and r.payload == record.payload
               for r in sent), "a damaged record decoded as something never sent"
    return "read"


def check_migration(corrupt) -> str:
    """Migrate a small VM over a link that damages records with ``corrupt(index, wire)``: the
    destination reads exactly the source's pages, or the migration aborts with one clear
    error and the source VM runs on."""
    from memvisor.builtins.migration import Link, LiveMigration, MigrationOptions
    from memvisor.errors import UserError
    from memvisor.testing import small_host

    source, destination = small_host(memory_pages=1024), small_host(memory_pages=1024)
    vm = source.create_vm("m", 128)
    source.backend.write(vm, np.arange(16), np.tile(_image()[:16], (1, 1)))
    migration = LiveMigration(source, vm, destination, MigrationOptions(max_retries=3, chunk_pages=8),
                              link=Link(corrupt))
    try:
        migration.run()
    except UserError as exc:
        assert "\n" not in str(exc) and "m" not in destination.vms and vm.stopped is None
        return "aborted"
    got = destination.backend.guest_read(migration.dest_vm, np.arange(vm.pages))
    assert (got == source.backend.read(vm, np.arange(vm.pages))).all(), "a damaged stream left wrong pages"
    return "migrated"


# -- migration records through the destination -----------------------------------------------------

DEST_PAGES = 64
"""Pages of the destination VM the record fuzzer delivers to (round 1 owes all of them)."""


class _ConstantPages:
    """A destination plugin resolving ``constant`` records (one byte: the page's every byte),
    so hostile plugin records reach a resolver."""

    @hookimpl
    def memvisor_resolve_records(self, host, vm, records):
        if records.kind != "constant":
            return None
        fill = np.asarray(records.payloads, np.uint8).reshape(len(records.gpps), 1)
        return np.repeat(fill, PAGE_SIZE, axis=1)


@functools.cache
def _resolving_plugins() -> tuple[str, ...]:
    """Installed plugins that resolve records on a destination (diskmap's disk references):
    the record fuzzer reaches their resolvers too. Found by the hook they implement; the core
    imports no plugin."""
    from memvisor.plugins import hooks_of, installed_plugins, new_plugin_manager

    pm = new_plugin_manager(None, strict=False)
    return tuple(p.name for p in installed_plugins() if p.error is None and pm.get_plugin(p.name) is not None
                 and "memvisor_resolve_records" in hooks_of(pm, pm.get_plugin(p.name)))


@functools.cache
def _destination_host():
    from memvisor.testing import small_host

    return small_host(memory_pages=1024, plugins=_resolving_plugins(), extra_plugins=[_ConstantPages()])


def _destination():
    """A destination VM of :data:`DEST_PAGES` missing pages that has taken record 0, a round
    owing every page; it takes record 1 next. (One host for every example: making one costs
    more than the check.)"""
    from memvisor.builtins.migration import stream
    from memvisor.builtins.migration.live import Destination

    host = _destination_host()
    if "d" in host.vms:
        host.destroy_vm(host.vms["d"])
    vm = host.create_vm("d", DEST_PAGES)
    host.attach_disk(vm, blocks=32)  # a disk for disk references to name
    host.backend.unmap(vm, np.arange(DEST_PAGES))
    dest = Destination(host, vm, compressed=True)
    assert dest.receive(stream.encode(stream.ROUND, np.empty(0, np.int64),
                                      stream.pack_ranges(np.arange(DEST_PAGES), 1), 0)) == "ok"
    return dest


@functools.cache
def owed_records() -> tuple[bytes, ...]:
    """Record 1 of every kind the destination of :func:`_destination` can take."""
    import zstandard

    from memvisor.builtins.migration import stream

    page = stream.page_payload(_image()[:4], zstandard.ZstdCompressor(level=1))
    return (stream.encode(stream.PAGE, np.arange(4), page, 1),
            stream.encode(stream.ZERO, np.arange(4, 9), b"", 1),
            stream.encode("constant", np.array([9, 12]), stream.pack_payloads(np.array([[7], [8]], np.uint8)), 1),
            stream.encode("disk-ref", np.array([20, 21]), stream.pack_payloads(np.zeros((2, 24), np.uint8)), 1),
            stream.encode(stream.SWITCH, np.empty(0, np.int64), stream.pack_ranges(np.arange(3), 1), 1),
            stream.encode(stream.ROUND, np.empty(0, np.int64), stream.pack_ranges(np.arange(9), 2), 1))


@functools.cache
def zstd_bombs() -> tuple[bytes, ...]:
    """zstd frames of a few KiB that declare (or, without a declared size, hold) far more
    than a record's pages: 256 MiB of zeros, declared and not."""
    import zstandard

    out = []
    for declare in (True, False):
        writer = zstandard.ZstdCompressor(level=3, write_content_size=declare).compressobj(
            size=(256 << 20) if declare else -1)
        chunk = bytes(1 << 20)
        out.append(b"".join([writer.compress(chunk) for _ in range(256)] + [writer.flush()]))
    return tuple(out)


def seal(kind: bytes, gpps: bytes, payload: bytes, seq: int, pages: int | None = None) -> bytes:
    """A record of any fields, even inconsistent ones, with a valid checksum: what a hostile
    peer sends to get past the CRC."""
    import struct
    import zlib

    from memvisor.builtins.migration import stream

    pages = len(gpps) // 8 if pages is None else pages
    head = stream.HEADER.pack(stream.MAGIC, 0, len(kind) % 256, pages % 2**32, len(payload) % 2**32,
                              seq % 2**64, 0)[:-4]
    body = kind + gpps + payload
    return head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body


@_bounded
def check_destination(wire: bytes) -> str:
    """Deliver a hostile record to a migration's destination (decode, sequence, pages owed,
    decompression, plugin resolvers, installation): refused (asked again), a violation (the
    migration aborts), unresolved, or taken — and then it installed the pages it carried and
    nothing else."""
    from memvisor.builtins.migration import stream

    dest = _destination()
    before = dest.missing.copy()
    try:
        outcome = dest.receive(wire)
    except stream.StreamViolation as exc:
        assert "\n" not in str(exc)
        return "violation"
    installed = np.flatnonzero(before & ~dest.missing)
    if outcome == "ok":
        record = stream.decode(wire, DEST_PAGES)
        assert record.kind in stream.CONTROL or np.array_equal(installed, np.sort(record.gpps)), \
            "a record installed pages it did not carry"
        if record.kind not in stream.CONTROL and np.array_equal(record.gpps, np.arange(4)) \
                and wire == owed_records()[0]:
            got = dest.host.backend.read(dest.vm, np.arange(4))
            assert (got == _image()[:4]).all(), "an intact record installed wrong bytes"
        return "taken"
    assert outcome in ("refused", "unresolved") and not len(installed), "a refused record installed pages"
    return outcome


def _resealed(st):
    """Records 1 with one field made hostile and the checksum made valid again."""
    from memvisor.builtins.migration import stream

    def fields(wire):
        record = stream.decode(wire)
        return record.kind.encode(), record.gpps.astype("<i8").tobytes(), record.payload, record.seq

    int64 = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-2, DEST_PAGES + 2))
    gpps = st.lists(int64, max_size=40).map(lambda xs: np.asarray(xs, "<i8").tobytes())
    payload = st.one_of(st.binary(max_size=300), st.sampled_from(zstd_bombs()),
                        st.tuples(st.sampled_from([b"\x00", b"\x01"]), st.binary(max_size=60)).map(b"".join),
                        st.integers(0, 2**40).map(lambda n: b"\x28\xb5\x2f\xfd" + n.to_bytes(8, "little")))

    def hostile(base):
        kind, pages, body, seq = fields(base)
        return st.one_of(
            st.integers(0, 2**64 - 1).map(lambda q: seal(kind, pages, body, q)),
            gpps.map(lambda g: seal(kind, g, body, seq)),
            payload.map(lambda p: seal(kind, pages, p, seq)),
            st.binary(min_size=1, max_size=80).map(lambda k: seal(k, pages, body, seq)),
            st.integers(0, 2**32 - 1).map(lambda n: seal(kind, pages, body, seq, pages=n)),
            st.tuples(gpps, payload).map(lambda t: seal(kind, t[0], t[1], seq)),
        )

    return st.sampled_from(owed_records()).flatmap(hostile)


# -- migration links ---------------------------------------------------------------------------------


def _reordered(wire: bytes) -> bytes:
    """``wire`` as if a later record had overtaken it: its sequence number one ahead."""
    from memvisor.builtins.migration import stream

    record = stream.decode(wire)
    return seal(record.kind.encode(), record.gpps.astype("<i8").tobytes(), record.payload, record.seq + 1)


def check_link(faults: dict, postcopy: bool, touches: tuple[int, ...] = (), sent=None) -> str:
    """Migrate a small VM (post-copy: the destination touches ``touches`` after the
    switch-over, pulling pages over the link) over a link that, at the record numbers of
    ``faults``, replays an earlier record, duplicates the previous one, delivers one that
    overtook it (reordered), drops or damages it. The destination ends exactly equal to the
    source at switch-over (``"migrated"``), or the migration aborts in one line with the
    destination's VM and fault handler gone and the source running (``"aborted"``, or
    ``"aborted after the switch-over"`` during post-copy). ``sent(wire)`` sees every record
    sent."""
    from memvisor.builtins.migration import Link, LiveMigration, MigrationOptions
    from memvisor.builtins.migration.live import _PostCopyFaults
    from memvisor.errors import UserError
    from memvisor.testing import small_host

    history: list[bytes] = []

    def link(index, wire):
        history.append(wire)
        if sent is not None:
            sent(wire)
        fault = faults.get(index)
        if fault is None:
            return wire
        kind, arg = fault
        if kind == "replay" and index:
            return history[arg % index]
        if kind == "duplicate" and index:
            return history[index - 1]
        if kind == "reorder":
            return _reordered(wire)
        if kind == "drop":
            return b""
        if kind == "damage":
            out = bytearray(wire)
            out[arg % len(out)] ^= 1 + arg % 255
            return bytes(out)
        return wire

    source, destination = small_host(memory_pages=1024), small_host(memory_pages=1024)
    vm = source.create_vm("m", 128)
    # Every page distinct, a few zero, and the guest writing during pre-copy: a record
    # installed where another was due always leaves a page that differs.
    pages = np.random.default_rng(5).integers(1, 256, (vm.pages, PAGE_SIZE), dtype=np.uint8)
    pages[::9] = 0
    source.backend.write(vm, np.arange(vm.pages), pages)
    writes = np.random.default_rng(6)

    def guest(seconds):
        touched = writes.integers(0, vm.pages, 24)
        source.advance(max(seconds, source.access(vm, touched, np.ones(len(touched), bool)).seconds))

    migration = LiveMigration(source, vm, destination, MigrationOptions(max_retries=3, chunk_pages=8, max_rounds=3,
                                                                         postcopy=postcopy, stop_pages=8),
                              link=Link(link))

    def aborted(exc) -> str:
        assert "\n" not in str(exc) and "m" not in destination.vms and vm.stopped is None
        assert not [p for p in destination.pm.get_plugins() if isinstance(p, _PostCopyFaults)], \
            "an aborted migration left its fault handler registered"
        return "aborted" if migration.switch_over is None else "aborted after the switch-over"

    try:
        migration.run(guest)
    except UserError as exc:
        return aborted(exc)
    expected = source.backend.read(vm, np.arange(vm.pages))
    if postcopy:
        try:
            if touches:
                destination.access(migration.dest_vm, np.asarray(touches, np.int64) % vm.pages,
                                   np.zeros(len(touches), bool))
            migration.finish_postcopy()
        except UserError as exc:
            return aborted(exc)
    got = destination.backend.guest_read(migration.dest_vm, np.arange(vm.pages))
    assert (got == expected).all(), "a hostile link left wrong pages on the destination"
    return "migrated"


# -- scenario values at the edges of every type ----------------------------------------------------

EDGE_SCENARIO = {
    "name": "edges", "seed": 1,
    "host": {"memory": "32MiB", "contents": "bytes", "numa_nodes": 2, "tick": "1ms", "batch": 4096,
             "low_watermark": 0.02, "high_watermark": 0.05, "handler_threads": 1, "costs": {"page_copy_ns": 300},
             "budgets": {"trap_rate": 100000}},
    "vm": [{"name": "a", "memory": "2MiB", "node": 0, "large_pages": False, "seed": 3,
            "contents": {"zero": 0.5, "text": 0.5}, "workload": {"kind": "zipf", "alpha": 0.9, "write_fraction": 0.2},
            "disk": {"size": "1MiB", "contents": "text", "page_cache": 0.1}, "budgets": {"trap_rate": 50000}},
           {"name": "b", "memory": "2MiB", "workload": {"kind": "loop", "footprint": 100}}],
    "timeline": [{"do": "run", "for": "2ms"}, {"do": "idle", "for": "1ms"},
                 {"do": "workload", "vm": "b", "workload": {"kind": "uniform"}},
                 {"do": "pressure", "target_free": "1MiB"}, {"do": "move_vcpus", "vm": "a", "node": 1},
                 {"do": "create_vm", "name": "c", "memory": "1MiB", "node": 0, "seed": 1, "workload": {"kind": "scan"}},
                 {"do": "checkpoint", "vm": "a", "name": "ck", "block_pages": 16, "buffer": "64KiB", "level": 1,
                  "timeout": "1s"},
                 {"do": "restore", "vm": "a", "name": "ck"},
                 {"do": "migrate", "vm": "b", "max_rounds": 3, "stop_pages": 16, "postcopy": True,
                  "postcopy_for": "1ms", "level": 1},
                 {"do": "memory_error", "vm": "a", "pages": 2, "bits": 3, "seed": 1},
                 {"do": "run", "accesses": 2000}],
}
"""A small scenario that uses every core action and key: every one of its values is a place
for :func:`check_scenario_values` to put an edge value."""


def _deep(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


SANDBOX = "<inside the sandbox>"
"""An edge value :func:`check_scenario_values` replaces by an absolute path inside its private
folder: an absolute path, without letting a bug write anywhere that matters."""

EDGE_VALUES = (float("nan"), float("inf"), float("-inf"), 1e308, -1e308, 1e-300, 5e-324, 0, -1, 2**31, 2**53,
               2**63 - 1, 2**64, -2**63, 10**400, 0.5, True, "", " ", "x" * 10_000, "../x", "../../x",
               "../../../x", SANDBOX, "a/b", "..", ".", "\x00", "\n", "1" + "0" * 400 + "TiB", "1e400s", "nanms",
               "infs", "1GB", "-1s", "1ns", "0s", "100TiB", "1PiB", "0xff", [], {}, [1, 2], {"kind": "zipf"},
               _deep(50), _deep(5000))
"""Values at the edges of every type a scenario holds."""


def scenario_paths(data=None, prefix=()) -> list[tuple]:
    """Every key path of :data:`EDGE_SCENARIO` (tables and array items), to put values at."""
    data = EDGE_SCENARIO if data is None else data
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        out.append((*prefix, key))
        out += scenario_paths(value, (*prefix, key))
    return out


def _short(value) -> str:
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 4, 60, 60, 60
    return short.repr(value)


class _Deadline(BaseException):
    """The scenario ran past the fuzzer's time budget (a BaseException: nothing swallows it)."""


RUN_SECONDS = 10.0
"""Wall-clock budget of one scenario run in :func:`check_scenario_values` (the edge scenario
itself takes about half a second; a loaded machine can take several)."""

RUN_MEMORY_LIMIT = 160 << 20
"""Peak Python memory one edge scenario may cost, its 32 MiB host and its migration's
destination included."""


def check_scenario_values(changes: list[tuple[tuple, object]]) -> str:
    """Put edge values at key paths of :data:`EDGE_SCENARIO`, check it and run it: refused in
    one line (a :class:`UserError`), or it runs — to its end, or, past :data:`RUN_SECONDS`,
    still making progress (a long run the documented limits allow, never a hang) — in bounded
    memory, leaving no file behind."""
    import copy
    import os
    import shutil
    import signal
    import time

    from memvisor.errors import UserError
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import parse_scenario

    # The run's temp folder is 4 levels down a private folder, so a name that climbs out of the
    # run's work folder ("../../x") still lands where the check below sees it.
    sandbox = tempfile.mkdtemp(prefix="memvisor-fuzz-")
    temp = os.path.join(sandbox, "a", "b", "c", "tmp")
    os.makedirs(temp)
    data = copy.deepcopy(EDGE_SCENARIO)
    for path, value in changes:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = os.path.join(sandbox, "abs") if value == SANDBOX else value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change replaced a table this path goes through
    reports: list[tuple[float, float]] = []  # (when, fraction done) of each progress report

    def progress(fraction, description):
        reports.append((time.monotonic(), fraction))

    def expire(signum, frame):
        raise _Deadline

    tracemalloc.start()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, RUN_SECONDS)
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, temp
    try:
        try:
            ScenarioRun(parse_scenario(data, "edges.toml"), progress).run()
            outcome = "ran"
        except UserError as exc:
            assert "\n" not in str(exc).strip(), str(exc)
            outcome = "refused"
        except _Deadline:
            # A long run is allowed (the documented limits allow a week of virtual time) if it
            # goes somewhere: over the last half of its budget, how much is done is a finite
            # number that grew.
            half = time.monotonic() - RUN_SECONDS / 2
            earlier = [f for t, f in reports if t < half]
            recent = [f for t, f in reports if t >= half]
            start = earlier[-1] if earlier else recent[0] if recent else None
            assert recent and math.isfinite(recent[-1]) and recent[-1] > start, \
                f"a hang (progress {start} -> {recent[-1:]}) on {_short(changes)}"
            outcome = "long"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        tempfile.tempdir = saved_tempdir
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        written = [os.path.join(d, f) for d, _, files in os.walk(sandbox) for f in files]
        shutil.rmtree(sandbox, ignore_errors=True)
    assert peak < RUN_MEMORY_LIMIT, f"{peak >> 20} MiB for one edge scenario: {_short(changes)}"
    assert not written, f"a run left {written[:3]} (outside its work folder, or the folder itself)"
    if _not_finite(data):
        assert outcome == "refused", f"a number that is not finite was accepted: {_short(changes)}"
    return outcome


def _not_finite(data) -> bool:
    """Whether a float NaN or infinity is anywhere in ``data`` (walked without recursion)."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return True
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


# -- scenario files -------------------------------------------------------------------------------


@_bounded
def check_scenario(text: str) -> str:
    """Load a hostile scenario file: ``UserError`` (one line) or a checked scenario."""
    from memvisor.errors import UserError
    from memvisor.scenario import load_scenario

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "hostile.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            load_scenario(path)
        except UserError as exc:
            assert "\n" not in str(exc).strip() or "TOML" in str(exc), str(exc)
            return "refused"
    return "read"


# -- trace files ----------------------------------------------------------------------------------


@_bounded
def check_trace(data: bytes, suffix: str) -> str:
    """Load a hostile trace file: ``TraceError`` or a trace of sane page numbers."""
    from memvisor.errors import TraceError
    from memvisor.traces import load_trace

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"hostile{suffix}"
        path.write_bytes(data)
        try:
            trace = load_trace(path)
        except TraceError as exc:
            assert "\n" not in str(exc)
            return "refused"
        assert trace.pages.ndim == 1 and (len(trace.pages) == 0 or trace.pages.min() >= 0)
    return "read"


# -- driving them -----------------------------------------------------------------------------------


def _mutations(st, valid: bytes):
    """Hostile variants of ``valid``: flipped bytes, truncation, insertions, random bytes."""
    flips = st.lists(st.tuples(st.integers(0, max(0, len(valid) - 1)), st.integers(1, 255)), min_size=1, max_size=8)

    def flip(changes):
        out = bytearray(valid)
        for at, x in changes:
            out[at] ^= x
        return bytes(out)

    return st.one_of(flips.map(flip), st.integers(0, len(valid)).map(lambda n: valid[:n]),
                     st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=64)).map(
                         lambda t: valid[: t[0]] + t[1] + valid[t[0]:]),
                     st.binary(max_size=512))


SCENARIO = """name = "x"
[host]
memory = "64MiB"
numa_nodes = 2
[plugins.stats]
[[vm]]
name = "a"
memory = "16MiB"
contents = { zero = 0.5, text = 0.5 }
workload = { kind = "zipf", alpha = 0.9, write_fraction = 0.2 }
[[timeline]]
do = "run"
for = "10ms"
"""


def strategies():
    """The hypothesis strategy of each fuzzer, by name, with the function that checks it."""
    from hypothesis import strategies as st

    def damage(draw_changes):
        def corrupt(index, wire):
            changes = draw_changes.get(index)
            if changes is None:
                return wire
            out = bytearray(wire)
            for at, x in changes:
                out[at % len(out)] ^= x
            return bytes(out)
        return corrupt

    link = st.dictionaries(st.integers(0, 40), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                                        min_size=1, max_size=3), max_size=12)
    lines = SCENARIO.splitlines(keepends=True)
    scenario = st.one_of(
        _mutations(st, SCENARIO.encode()).map(lambda b: b.decode("utf-8", "replace")),
        st.lists(st.sampled_from(lines + ["memory = -1\n", "numa_nodes = 100000\n", "for = \"-1s\"\n",
                                          "do = \"nope\"\n", "[[vm]]\n", "name = \"a\"\n", "batch = 0\n",
                                          "memory = \"1PiB\"\n", "seed = 1e400\n"]), max_size=30).map("".join))
    trace = st.tuples(st.one_of(st.binary(max_size=400), st.text(alphabet="0123456789,\n-xabRW ", max_size=400).map(
        str.encode)), st.sampled_from([".csv", ".npy", ".oracleGeneral", ".bin", ".csv.zst"]))
    records = st.one_of(_resealed(st), st.sampled_from(owed_records()),
                        st.sampled_from(owed_records()).flatmap(lambda w: _mutations(st, w)))
    fault = st.one_of(st.tuples(st.sampled_from(["replay", "damage"]), st.integers(0, 10**6)),
                      st.tuples(st.sampled_from(["duplicate", "reorder", "drop"]), st.just(0)))
    links = st.tuples(st.dictionaries(st.integers(0, 60), fault, min_size=1, max_size=4), st.booleans(),
                      st.lists(st.integers(0, 127), max_size=20).map(tuple))
    edges = st.lists(st.tuples(st.sampled_from(scenario_paths()), st.sampled_from(EDGE_VALUES)), min_size=1,
                     max_size=3)
    return {
        "checkpoint": (_mutations(st, valid_checkpoint()), check_checkpoint),
        "migration_record": (st.sampled_from(valid_records()).flatmap(lambda w: _mutations(st, w)), check_record),
        "migration_destination": (records, check_destination),
        "migration_stream": (link.map(damage), check_migration),
        "migration_link": (links, lambda t: check_link(*t)),
        "scenario": (scenario, check_scenario),
        "scenario_values": (edges, check_scenario_values),
        "trace": (trace, lambda t: check_trace(*t)),
    }


def _fuzzer(strategy, check, outcomes, batch: int, deadline: float | None):
    import time

    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=batch, deadline=5000, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def fuzz(value):
        if deadline is not None and time.monotonic() > deadline:
            return
        outcomes[check(value)] += 1

    return fuzz


def run_all(examples: int = 50, seconds: float | None = None, names=None) -> dict:
    """Run each fuzzer for ``examples`` examples (sharing ``seconds`` among them when given);
    returns inputs tried and outcomes by fuzzer. Raises on the first broken contract."""
    import time
    from collections import Counter

    chosen = {k: v for k, v in strategies().items() if names is None or k in names}
    out = {}
    for name, (strategy, check) in chosen.items():
        outcomes = Counter()
        deadline = None if seconds is None else time.monotonic() + seconds / len(chosen)

        batch = examples if seconds is None else min(examples, 200)

        fuzz = _fuzzer(strategy, check, outcomes, batch, deadline)

        while True:  # with a time budget: batches until the time is up
            fuzz()
            if deadline is None or time.monotonic() > deadline or sum(outcomes.values()) >= examples:
                break
        out[name] = {"inputs": sum(outcomes.values()), **dict(outcomes)}
    return out
