"""Checkpoints and live migration of identity-model VMs: they hold identities and say so, give
back exactly the pages, are refused by a host of the other model in one line, and report the
bytes the bytes model would have written or sent (within 5%)."""

from __future__ import annotations

import numpy as np
import pytest

from memvisor.builtins.checkpoint import CheckpointError, CheckpointReader, restore_image
from memvisor.builtins.migration import LiveMigration, MigrationAborted, MigrationOptions
from memvisor.contents import ContentSpec
from memvisor.events import RestoreRequest, SaveRequest
from memvisor.testing import ReferenceMemory, small_host

SPEC = ContentSpec.parse({"zero": 0.35, "text": 0.3, "random": 0.2, "duplicate": 0.15}, "contents")
PAGES = 8192


def vm_with_history(model: str, seed: int = 3):
    """A host of ``model`` with one VM of generated contents that its guest then wrote, plus
    literal pages (bytes written from outside); the reference model follows it."""
    host = small_host(memory_pages=4 * PAGES, contents=model, seed=seed)
    vm = host.create_vm("a", PAGES, contents=SPEC, seed=seed)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        gpps = rng.integers(0, PAGES, 3000)
        ref.access(host, vm, gpps, rng.random(3000) < 0.4)
    ref.guest_write(host, vm, np.arange(100, 110), rng.integers(0, 256, (10, 4096), dtype=np.uint8))
    return host, vm, ref


def test_identity_checkpoint_restores_every_page(tmp_path):
    """Save on an identity host, scribble, restore: the guest reads exactly what it read at the
    save; the file holds identities (the flag, identity page blocks) and is far smaller than the
    bytes it stands for, which it reports as bytes_out. (The lazy restore of such a file is
    memvisor-lazy-restore's test: the core's tests run without plugins.)"""
    host, vm, ref = vm_with_history("identity")
    path = tmp_path / "a.ckpt"
    job = host.save_checkpoint(vm, SaveRequest(str(path), time=host.now))
    saved = ref.expected["a"].copy()
    assert job.stats["file_bytes"] == path.stat().st_size < job.stats["bytes_out"] / 20
    with CheckpointReader(path) as reader:
        assert reader.contents_model == "identity"
    ref.guest_write(host, vm, np.arange(0, 500), np.full((500, 4096), 7, np.uint8))
    host.restore_checkpoint(vm, RestoreRequest(str(path), time=host.now))
    ref.expected["a"] = saved
    ref.check(host)
    host.backend.check_invariants()


def test_identity_checkpoint_is_refused_by_a_bytes_host_and_back(tmp_path):
    """A checkpoint of identities restores only onto an identity host, one of bytes only onto a
    bytes host: one line saying why, and nothing of the VM changed."""
    for saver, loader in (("identity", "bytes"), ("bytes", "identity")):
        host, vm, _ = vm_with_history(saver)
        path = tmp_path / f"{saver}.ckpt"
        host.save_checkpoint(vm, SaveRequest(str(path), time=host.now))
        other = small_host(memory_pages=4 * PAGES, contents=loader)
        target = other.create_vm("a", PAGES, contents=SPEC)
        before = other.backend.read(target, np.arange(PAGES))
        with pytest.raises(CheckpointError, match=f"holds pages as {saver}: it restores only onto a host with "
                                                  f'contents = "{saver}"') as caught:
            other.restore_checkpoint(target, RestoreRequest(str(path), time=other.now))
        assert "\n" not in str(caught.value)
        np.testing.assert_array_equal(other.backend.read(target, np.arange(PAGES)), before)


def test_identity_checkpoint_materialises_to_the_bytes_checkpoints_image(tmp_path):
    """`memvisor checkpoint restore` of an identity checkpoint writes the bytes the identities
    name: the same raw image as the bytes model's checkpoint of the same scenario; and the two
    checkpoints report bytes_out within 5% of each other (the measured size model)."""
    images, out = {}, {}
    for model in ("bytes", "identity"):
        host, vm, _ = vm_with_history(model)
        path = tmp_path / f"{model}.ckpt"
        out[model] = host.save_checkpoint(vm, SaveRequest(str(path), time=host.now)).stats
        restore_image(path, tmp_path / f"{model}.raw")
        images[model] = (tmp_path / f"{model}.raw").read_bytes()
    assert images["bytes"] == images["identity"]
    assert out["identity"]["zero_pages"] == out["bytes"]["zero_pages"]
    assert out["identity"]["write_calls"] == pytest.approx(out["bytes"]["write_calls"], abs=1)
    assert abs(out["identity"]["bytes_out"] / out["bytes"]["bytes_out"] - 1) < 0.05


def test_identity_migration_sends_identities_counted_as_pages():
    """Between identity hosts pages travel as identity records: the destination reads every
    page right, and the migration reports the bytes and records of the bytes model's stream
    (within 5%, same record counts); the wire carried a fraction of it."""
    results = {}
    for model in ("bytes", "identity"):
        host, vm, ref = vm_with_history(model)
        destination = small_host(memory_pages=4 * PAGES, contents=model)
        migration = LiveMigration(host, vm, destination, MigrationOptions(max_rounds=2))
        migration.run()
        got = destination.backend.read(migration.dest_vm, np.arange(PAGES))
        np.testing.assert_array_equal(got, ref.expected["a"])
        results[model] = migration.result
    ident, plain = results["identity"], results["bytes"]
    assert dict(ident.records) == dict(plain.records)
    assert abs(ident.bytes_sent / plain.bytes_sent - 1) < 0.05
    assert 0 < ident.identity_wire_bytes < ident.bytes_sent / 10


def test_migration_between_models_is_refused():
    """A migration from an identity host to a bytes host (or back) is refused before anything
    is sent; the VM runs on."""
    host, vm, ref = vm_with_history("identity")
    with pytest.raises(MigrationAborted, match="the source holds pages as identity, the destination as bytes"):
        LiveMigration(host, vm, small_host(memory_pages=4 * PAGES, contents="bytes"))
    ref.check(host)


def test_identity_records_are_numbered_owed_and_checked():
    """An identity record goes through the destination's checks like a page record: installed
    only when next in sequence and owed; replayed, not owed or sent to a host of bytes it
    aborts; a frame that does not declare exactly its records is refused (asked again)."""
    import zstandard

    from memvisor.builtins.migration import stream
    from memvisor.builtins.migration.live import Destination
    from memvisor.builtins.migration.stream import StreamViolation
    from memvisor.identity import Identities

    host, vm, _ = vm_with_history("identity")
    contents = host.backend.contents(vm, np.arange(8))
    target = small_host(memory_pages=1024, contents="identity")
    dest_vm = target.create_vm("d", 64)
    target.backend.unmap(dest_vm, np.arange(64))
    dest = Destination(target, dest_vm, compressed=True)
    compressor = zstandard.ZstdCompressor()
    payload = stream.identity_payload(contents, compressor)
    assert dest.receive(stream.encode("round", np.empty(0), stream.pack_ranges(np.arange(16), 1), 0)) == "ok"
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(contents.to_records())
    assert dest.receive(stream.encode("identity", np.arange(8), unsized, 1)) == "refused"
    assert dest.receive(stream.encode("identity", np.arange(8), payload, 1)) == "ok"
    assert dest.host.backend.contents(dest_vm, np.arange(8)).equal(contents).all()
    for wire, message in [
        (stream.encode("identity", np.arange(8), payload, 1), "replayed"),
        (stream.encode("identity", np.arange(20, 28), payload, 2), "not owed"),
    ]:
        with pytest.raises(StreamViolation, match=message):
            dest.receive(wire)
    plain = small_host(memory_pages=1024)
    plain_vm = plain.create_vm("d", 64)
    to_bytes = Destination(plain, plain_vm, compressed=True)
    to_bytes.receive(stream.encode("round", np.empty(0), stream.pack_ranges(np.arange(8), 1), 0))
    with pytest.raises(StreamViolation, match="identity record to a host of bytes"):
        to_bytes.receive(stream.encode("identity", np.arange(8), payload, 1))
    assert isinstance(contents, Identities)


def test_a_replayed_identity_record_aborts_the_migration_with_the_source_running():
    """A link that delivers an identity record twice ends the migration (never a silent
    difference): the destination VM is gone and the source reads as the reference says."""
    from memvisor.builtins.migration import Link, stream

    host, vm, ref = vm_with_history("identity")
    destination = small_host(memory_pages=4 * PAGES, contents="identity")
    identity_records: list[bytes] = []

    def replay(index: int, wire: bytes) -> bytes:
        if identity_records:  # every record after the first identity record: that record again
            return identity_records[0]
        if stream.decode(wire).kind == "identity":
            identity_records.append(wire)
        return wire

    migration = LiveMigration(host, vm, destination, MigrationOptions(max_rounds=2), link=Link(replay))
    with pytest.raises(MigrationAborted, match="replayed"):
        migration.run()
    assert identity_records and "a" not in destination.vms
    ref.check(host)
