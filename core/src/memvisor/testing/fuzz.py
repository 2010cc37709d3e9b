"""Hostile input: fuzzers for every file or stream memvisor reads from outside.

Each ``check_*`` function takes hostile bytes and asserts the contract of that input: one
clear error (a :class:`memvisor.errors.UserError` subclass, or for a migration record the
:class:`memvisor.migration.stream.StreamError` that makes the destination ask again), or the
exact original; never another exception, never a wrong page, bounded memory (``MEMORY_LIMIT``)
and time (each example runs under a hypothesis deadline). :func:`run_all` drives them with
hypothesis; pytest (``tests/integration/test_integration_hostile.py``) does so with a small
budget and ``memvisor selftest`` with a long one. The checkpoint reader has its own, deeper
fuzzer in ``core/tests/test_core_checkpoint_fuzz.py``; :func:`check_checkpoint` is the
whole-file outcome (through :class:`memvisor.checkpoint.CheckpointReader`) used here.
"""

from __future__ import annotations

import functools
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from memvisor import PAGE_SIZE

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
    from memvisor.checkpoint import CheckpointWriter

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "valid.ckpt"
        with CheckpointWriter(path, PAGES, block_pages=4, buffer_bytes=5000, threads=1) as w:
            w.add_pages(0, _image()[:22])
            w.add_records("note", [22, 23], [b"x", b"yz"])
        return path.read_bytes()


@_bounded
def check_checkpoint(data: bytes) -> str:
    """Read every page of a hostile checkpoint file: ``CheckpointError`` or the exact pages."""
    from memvisor.checkpoint import KIND_DATA, CheckpointError, CheckpointReader

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
    from memvisor.migration import stream

    return (stream.encode("page", np.arange(4), b"p" * 100), stream.encode("zero", np.arange(4, 9)),
            stream.encode("disk-ref", np.array([9]), bytes(24)))


@_bounded
def check_record(wire: bytes) -> str:
    """Decode a hostile migration record: ``StreamError`` (asked for again) or a record equal
    to one that was sent."""
    from memvisor.migration import stream

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
    from memvisor.errors import UserError
    from memvisor.migration import Link, LiveMigration, MigrationOptions
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
    return {
        "checkpoint": (_mutations(st, valid_checkpoint()), check_checkpoint),
        "migration_record": (st.sampled_from(valid_records()).flatmap(lambda w: _mutations(st, w)), check_record),
        "migration_stream": (link.map(damage), check_migration),
        "scenario": (scenario, check_scenario),
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
