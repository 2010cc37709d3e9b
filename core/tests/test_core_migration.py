"""Live migration in the core: pre-copy rounds, stop-and-copy, post-copy, the record stream
with checksums, plugin records, the migration phase hook, the migrate action and command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor import PAGE_SIZE, hookimpl
from memvisor.builtins.checkpoint.vm import make_present
from memvisor.builtins.migration import Link, LiveMigration, MigrationOptions, StreamError, stream
from memvisor.contents import ContentSpec
from memvisor.errors import BackendError
from memvisor.events import PageRecords
from memvisor.runner import ScenarioRun
from memvisor.scenario import parse_scenario
from memvisor.testing import HookRecorder, small_host

CONTENTS = ContentSpec.parse({"zero": 0.3, "text": 0.4, "random": 0.3}, "t")


def hosts(*plugins):
    return small_host(memory_pages=2048, extra_plugins=plugins), small_host(memory_pages=2048, extra_plugins=plugins)


def memory(host, vm):
    make_present(host, vm)
    return host.backend.read(vm, np.arange(vm.pages))


class Guest:
    """A guest that writes random pages of its VM while a pre-copy round is on the wire."""

    def __init__(self, host, vm, seed, accesses, write_fraction):
        self.host, self.vm, self.rng = host, vm, np.random.default_rng(seed)
        self.accesses, self.write_fraction = accesses, write_fraction

    def __call__(self, seconds):
        gpps = self.rng.integers(0, self.vm.pages, self.accesses)
        result = self.host.access(self.vm, gpps, self.rng.random(self.accesses) < self.write_fraction)
        self.host.advance(max(seconds, result.seconds))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), pages=st.integers(8, 200), accesses=st.integers(0, 300),
       write_fraction=st.floats(0.0, 1.0), postcopy=st.booleans(), stop_pages=st.integers(0, 40),
       reads_after=st.integers(0, 200))
def test_destination_equals_source_at_switch_over(seed, pages, accesses, write_fraction, postcopy, stop_pages,
                                                  reads_after):
    """Whatever the guest writes during pre-copy, the destination's memory equals the source's
    at switch-over, byte for byte: with stop-and-copy, and with post-copy (pages pulled on the
    destination's faults, then in the background)."""
    source, destination = hosts()
    vm = source.create_vm("a", pages, contents=CONTENTS, seed=seed)
    options = MigrationOptions(max_rounds=4, stop_pages=stop_pages, postcopy=postcopy, chunk_pages=16)
    migration = LiveMigration(source, vm, destination, options)
    migration.run(Guest(source, vm, seed, accesses, write_fraction))
    at_switch_over = memory(source, vm)
    if postcopy:
        rng = np.random.default_rng(seed)
        destination.access(migration.dest_vm, rng.integers(0, pages, reads_after), np.zeros(reads_after, bool))
        migration.finish_postcopy()
    assert (memory(destination, migration.dest_vm) == at_switch_over).all()
    assert not migration.missing.any()
    result = migration.result
    assert result.pages_sent >= pages and result.total_s >= result.downtime_s > 0
    assert sum(result.records.values()) == result.pages_sent
    destination.backend.check_invariants()


def test_hook_memvisor_migration_phase():
    """The source's plugins see start, each round, stop_and_copy and end, in order."""
    source, destination = hosts()
    vm = source.create_vm("a", 64, contents=CONTENTS)
    recorder = HookRecorder(source.pm)
    migration = LiveMigration(source, vm, destination, MigrationOptions(stop_pages=0, max_rounds=3))
    migration.run(Guest(source, vm, 0, 50, 1.0))
    phases = [c.phase for c in recorder.of("memvisor_migration_phase")]
    assert [p.phase for p in phases] == ["start", "round", "round", "round", "stop_and_copy", "end"]
    assert phases[1].pages == 64 and phases[0].destination is destination and phases[3].round == 3
    assert migration.result.rounds == 3 and migration.result.pages_resent > 0
    recorder.close()


def test_damaged_records_are_refused_and_asked_for_again():
    """A record with a bad checksum is refused and sent again; the destination never takes it."""
    source, destination = hosts()
    vm = source.create_vm("a", 128, contents=CONTENTS)

    def corrupt(index, wire):
        if index in (0, 2, 3):
            wire = bytearray(wire)
            wire[-1] ^= 0x40
            return bytes(wire)
        return wire

    migration = LiveMigration(source, vm, destination, MigrationOptions(chunk_pages=16), link=Link(corrupt))
    migration.run()
    assert migration.result.refused == 3
    assert (memory(destination, migration.dest_vm) == memory(source, vm)).all()
    always_bad = LiveMigration(source, vm, small_host(memory_pages=1024), MigrationOptions(max_retries=2),
                               link=Link(lambda index, wire: wire[:-1]))
    with pytest.raises(BackendError, match="arrived damaged 3 times"):
        always_bad.run()


def test_stream_records_round_trip_and_refuse_damage():
    """Every record kind decodes to what was encoded; a flipped bit anywhere is refused."""
    gpps = np.array([5, 9, 1000])
    for payload in (b"", stream.pack_payloads(np.arange(12, dtype=np.uint8).reshape(3, 4)),
                    stream.pack_payloads([b"a", b"", b"xyz"])):
        record = stream.decode(stream.encode("disk-ref", gpps, payload))
        assert record.kind == "disk-ref" and record.gpps.tolist() == [5, 9, 1000] and record.payload == payload
    assert stream.unpack_payloads(stream.pack_payloads([b"a", b"", b"xyz"]), 3) == [b"a", b"", b"xyz"]
    wire = stream.encode("page", gpps, b"data")
    for position in range(0, len(wire), 7):
        damaged = bytearray(wire)
        damaged[position] ^= 1
        with pytest.raises(StreamError):
            stream.decode(bytes(damaged))


class ConstantPages:
    """Describes pages whose bytes are all one value as a 1-byte record; can be told to refuse
    resolving (as a plugin does when a disk block changed)."""

    def __init__(self, refuse=False):
        self.refuse = refuse

    @hookimpl
    def memvisor_describe_pages(self, host, vm, gpps, purpose):
        data = host.backend.read(vm, gpps)
        same = (data == data[:, :1]).all(axis=1)
        if not same.any():
            return None
        return PageRecords("constant", gpps[same], data[same, :1].copy())

    @hookimpl
    def memvisor_resolve_records(self, host, vm, records):
        if records.kind != "constant":
            return None
        if self.refuse:
            raise BackendError("changed since")
        return np.repeat(np.asarray(records.payloads, np.uint8).reshape(-1, 1), PAGE_SIZE, axis=1)


@pytest.mark.parametrize("refuse", [False, True])
def test_plugin_records_travel_instead_of_data(refuse):
    """Pages a plugin describes travel as its records and come back through the destination's
    resolver; a record the destination refuses is sent again as data, never used."""
    source = small_host(memory_pages=2048, extra_plugins=[ConstantPages()])
    destination = small_host(memory_pages=2048, extra_plugins=[ConstantPages(refuse)])
    vm = source.create_vm("a", 256, contents=CONTENTS)
    constant = np.arange(0, 256, 4)
    source.backend.write(vm, constant, np.repeat((constant % 200 + 1).astype(np.uint8)[:, None], PAGE_SIZE, axis=1))
    migration = LiveMigration(source, vm, destination)
    result = migration.run()
    assert (memory(destination, migration.dest_vm) == memory(source, vm)).all()
    if refuse:
        assert result.fallbacks == 64 and "constant" not in result.records
    else:
        assert result.records["constant"] == 64 and result.bytes_by_kind["constant"] < 64 * 16


def test_zero_pages_and_compression_shrink_the_stream():
    """Zero pages travel as page numbers, data compressed; turning both off sends every byte."""
    sizes = {}
    for zero_pages, level in ((True, 1), (False, None)):
        source, destination = hosts()
        vm = source.create_vm("a", 512, contents=CONTENTS)
        sizes[zero_pages] = LiveMigration(source, vm, destination,
                                          MigrationOptions(zero_pages=zero_pages, level=level)).run().bytes_sent
    assert sizes[False] >= 512 * PAGE_SIZE > 2 * sizes[True]


def test_migrate_action_in_a_scenario():
    """The migrate action migrates while the guests run, checks the destination and reports."""
    spec = parse_scenario({
        "host": {"memory": "16MiB", "batch": 512},
        "vm": [{"name": "a", "memory": "512KiB", "contents": "mixed",
                "workload": {"kind": "zipf", "write_fraction": 0.2}}],
        "timeline": [{"do": "run", "for": "1ms"}, {"do": "migrate", "vm": "a"},
                     {"do": "migrate", "vm": "a", "postcopy": True, "max_rounds": 2}],
    })
    report = ScenarioRun(spec).run()
    section = next(s for s in report.data["sections"] if s["title"].startswith("Live migrations"))
    first, second = section["metrics"]["migrations"]
    assert first["verified"] and second["verified"] and second["method"] == "precopy+postcopy"
    assert second["postcopy_faults"] + second["postcopy_background"] > 0


def test_migrate_command_with_an_image(tmp_path):
    """memvisor migrate --image IMAGE --disk DISK --json OUT writes bytes and records by kind."""
    image, disk, out = tmp_path / "mem.img", tmp_path / "disk.img", tmp_path / "out.json"
    pages = ContentSpec.parse({"zero": 0.5, "random": 0.5}, "t").fill(64, 3, np.arange(64))
    image.write_bytes(pages.tobytes())
    disk.write_bytes(pages[::-1].tobytes())
    done = subprocess.run([sys.executable, "-m", "memvisor", "migrate", "--image", str(image), "--disk", str(disk),
                           "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert figures["bytes_sent"] > 0 and sum(figures["records"].values()) == 64
    done = subprocess.run([sys.executable, "-m", "memvisor", "migrate"], capture_output=True, text=True)
    assert done.returncode == 2 and "SCENARIO or --image" in done.stderr


def test_intact_records_the_destination_was_not_owed_abort():
    """Records with a valid checksum that no source of this VM sends — pages outside the VM, a
    page twice, more than a record may carry, out of sequence, not owed in the round — are
    refused before anything is allocated or installed on their word."""
    from memvisor.builtins.migration.live import Destination
    from memvisor.builtins.migration.stream import StreamViolation

    host = small_host(memory_pages=1024)
    vm = host.create_vm("d", 64)
    dest = Destination(host, vm, compressed=False)
    assert dest.receive(stream.encode("round", np.empty(0), stream.pack_ranges(np.arange(8), 1), 0)) == "ok"
    for wire, message in [
        (stream.encode("zero", np.array([3, 2**40]), b"", 1), "outside the VM"),
        (stream.encode("zero", np.array([3, 3]), b"", 1), "a page twice"),
        (stream.encode("zero", np.arange(20000) % 64, b"", 1), "more than 16384"),
        (stream.encode("zero", np.array([1]), b"", 7), "where record 1 was expected: out of order"),
        (stream.encode("zero", np.array([1]), b"", 0), "replayed or duplicated"),
        (stream.encode("zero", np.array([9]), b"", 1), "not owed"),
        (stream.encode("switch", np.empty(0), stream.pack_ranges(np.empty(0), 0), 1),
         "round 1 ended with 8 pages owed"),
    ]:
        with pytest.raises(StreamViolation, match=message):
            dest.receive(wire)
    assert dest.missing.all()
    short = stream.encode("disk-ref", np.array([1]), b"\x01\x18", 1)
    assert dest.receive(short) == "refused"  # a payload too short for its header: damaged


def test_opaque_records_keep_their_place_in_the_sequence():
    """A transport's own records (memvisor-qemu's QEMU bytes) are handed back to the caller in
    sequence, never installed; replayed, carrying pages or of a kind not declared opaque,
    they are refused like any record."""
    from memvisor.builtins.migration.live import Destination
    from memvisor.builtins.migration.stream import StreamViolation

    host = small_host(memory_pages=1024)
    vm = host.create_vm("d", 64)
    host.backend.unmap(vm, np.arange(64))
    dest = Destination(host, vm, compressed=False, opaque=("carrier",))
    opaque = stream.encode("carrier", np.empty(0), b"\x00bytes of the transport", 0)
    assert dest.take(stream.decode(opaque, 64)) == "opaque"
    assert dest.receive(stream.encode("round", np.empty(0), stream.pack_ranges(np.arange(2), 1), 1)) == "ok"
    assert dest.receive(stream.encode("zero", np.arange(2), b"", 2)) == "ok"
    assert dest.missing.sum() == 62
    with pytest.raises(StreamViolation, match="replayed"):
        dest.take(stream.decode(opaque, 64))
    with pytest.raises(StreamViolation, match="carrier record with pages"):
        dest.receive(stream.encode("carrier", np.array([5]), b"", 3))
    assert Destination(host, vm, compressed=False).receive(opaque) == "refused"  # not declared: a plugin's record


def test_a_postcopy_link_failure_after_the_switch_over_is_the_documented_abort():
    """The link drops while the destination pulls a page after the switch-over: one
    MigrationAborted, the destination's VM and its fault handler gone, the source running."""
    from memvisor.builtins.migration import MigrationAborted
    from memvisor.builtins.migration.live import _PostCopyFaults

    source, destination = hosts()
    vm = source.create_vm("a", 128, contents=CONTENTS)
    switched = []

    def link(index, wire):
        if stream.decode(wire).kind == "switch":
            switched.append(index)
        elif switched:
            raise ConnectionResetError("link dropped")
        return wire

    from memvisor.testing import HookRecorder

    recorder = HookRecorder(source.pm)
    migration = LiveMigration(source, vm, destination, MigrationOptions(postcopy=True, max_rounds=1),
                              link=Link(link))
    migration.run(Guest(source, vm, 1, 200, 1.0))
    assert migration.missing.any() and "a" in destination.vms
    with pytest.raises(MigrationAborted, match="'a' aborted.*ConnectionResetError: link dropped"):
        destination.access(migration.dest_vm, np.flatnonzero(migration.missing)[:4], np.zeros(4, bool))
    assert "a" not in destination.vms and vm.stopped is None
    assert not [p for p in destination.pm.get_plugins() if isinstance(p, _PostCopyFaults)]
    with pytest.raises(MigrationAborted):
        migration.finish_postcopy()
    phases = [c.kwargs["phase"].phase for c in recorder.of("memvisor_migration_phase")]
    recorder.close()  # the plugins that saw it start saw it end, once, as aborted
    assert phases[0] == "start" and phases[-1] == "aborted" and "end" not in phases and phases.count("aborted") == 1


def test_migrate_command_says_when_a_named_disk_cannot_be_used(tmp_path):
    """`memvisor migrate --image IMAGE --disk DISK` without a plugin that describes pages (one
    that could send disk references) says so in one line (the migration still runs, every page
    as data) rather than silently sending plain compression."""
    image, disk, out = tmp_path / "mem.img", tmp_path / "disk.img", tmp_path / "out.json"
    pages = ContentSpec.parse("random", "t").fill(16, 3, np.arange(16))
    image.write_bytes(pages.tobytes())
    disk.write_bytes(pages.tobytes())
    done = subprocess.run([sys.executable, "-m", "memvisor", "migrate", "--image", str(image), "--disk", str(disk),
                           "--json", str(out)], capture_output=True, text=True,
                          env={**os.environ, "MEMVISOR_PLUGINS": "emulator"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"memvisor migrate: --disk {disk}: no installed plugin describes pages (memvisor plugins "
                           "--hook memvisor_describe_pages lists them); every page was sent as data\n")
    figures = json.loads(out.read_text())
    assert figures["records"] == {"page": 16} and figures["describers"] == []
