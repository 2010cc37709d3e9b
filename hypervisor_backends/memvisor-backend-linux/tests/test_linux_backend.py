"""The Linux backend against the Backend contract: the emulator's batch semantics where the
capabilities allow (each test runs on both backends), and what is particular to real memory."""

import numpy as np
import pytest

from memvisor import hookimpl
from memvisor.backend import Capability
from memvisor.errors import BackendError, CapabilityError
from memvisor.testing import ReferenceMemory, small_host
from memvisor_backend_linux.backend import unavailable_reason
from memvisor_backend_linux.testing import Snapshot

REASON = unavailable_reason()
needs_linux = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture
def make_host():
    """Factory of small hosts on a given backend; every Linux guest is stopped at the end and
    nothing (process, descriptor, memfd mapping) may be left behind."""
    before = Snapshot()
    hosts = []

    def make(backend="linux", **kwargs):
        if backend == "linux" and REASON:
            pytest.skip(REASON)
        host = small_host(backend=backend, **kwargs)
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        if hasattr(host.backend, "close"):
            host.backend.close()
    assert not before.leaks()


@pytest.fixture(params=["emulator", "linux"])
def backend_name(request):
    """Each contract test runs on the emulator and on the Linux backend."""
    return request.param


def needs(host, *capabilities):
    """Skip unless the host's backend has ``capabilities``."""
    missing = [c for c in capabilities if c not in host.backend.capabilities]
    if missing:
        pytest.skip(f"backend {host.backend.name!r} lacks {', '.join(missing)}")


class BlockServer:
    """Serves faults by populating the whole aligned block of each faulting page with a known
    pattern (page p holds p in every 8-byte word), as a lazy restore serves checkpoint blocks."""

    def __init__(self, block=64):
        self.block = block
        self.calls = []

    @staticmethod
    def pattern(pages):
        return np.repeat(np.asarray(pages, np.uint64)[:, None], 512, axis=1).view(np.uint8)

    @hookimpl
    def memvisor_page_fault(self, host, vm, fault):
        self.calls.append(fault.gpps.copy())
        blocks = np.unique(fault.gpps // self.block)
        pages = (blocks[:, None] * self.block + np.arange(self.block)).ravel()
        pages = pages[pages < vm.pages]
        pages = pages[~host.backend.present(vm, pages)]
        host.backend.populate(vm, pages, self.pattern(pages))
        return pages


class Recorder:
    """Records traced accesses and writes to protected pages (and the contents before)."""

    def __init__(self):
        self.accessed, self.writes, self.before = [], [], []

    @hookimpl
    def memvisor_traced_access(self, access):
        self.accessed.append(access)

    @hookimpl
    def memvisor_write_trap(self, host, vm, write):
        self.writes.append(write)
        self.before.append(host.backend.read(vm, write.gpps).copy())


# -- listing and capabilities -------------------------------------------------------------------


def test_linux_is_listed_as_backend():
    """The Linux backend registers through the entry point, under its own name."""
    host = small_host()
    assert "linux" in host.registries["backend"]
    assert host.registries["backend"].owner("linux") == "linux"


def test_missing_capabilities_raise_one_line(make_host):
    """What the backend cannot do raises CapabilityError naming the backend and the reason."""
    host = make_host()
    caps = host.backend.capabilities
    assert Capability.FAULT in caps
    for absent in (Capability.SHARE, Capability.NUMA, Capability.VIRTUAL_TIME):
        assert absent not in caps
    vm = host.create_vm("a", 64)
    for call in (lambda: host.backend.share(vm, np.array([1]), np.array([2])),
                 lambda: host.backend.hold_page(),
                 lambda: host.backend.take_dirty(vm),
                 lambda: host.backend.migrate(vm, np.array([1]), 1)):
        with pytest.raises(CapabilityError) as info:
            call()
        assert "'linux'" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CapabilityError):
        host.require("sharing", Capability.SHARE)
    with pytest.raises(CapabilityError):
        make_host(numa_nodes=2)


# -- the contract, on both backends -------------------------------------------------------------


def test_fault_on_missing_page_is_zero_filled_by_default(make_host, backend_name):
    """An unmapped page faults once and reads zeros afterwards unless a plugin serves it."""
    host = make_host(backend_name)
    vm = host.create_vm("a", 256)
    ref = ReferenceMemory()
    host.backend.guest_write(vm, np.arange(256), np.full((256, 4096), 7, np.uint8))
    ref.follow(host, vm)
    host.backend.unmap(vm, np.arange(10, 20))
    assert host.backend.present(vm, np.arange(8, 22)).tolist() == [True] * 2 + [False] * 10 + [True] * 2
    result = ref.access(host, vm, np.array([12, 12, 15, 3, 12]), np.array([False, True, False, False, False]))
    assert result.faults == 2
    ref.expected["a"][np.arange(10, 20)] = 0
    ref.expected["a"][12, :8] = np.frombuffer(np.uint64(vm.write_epoch).tobytes(), np.uint8)
    ref.check(host)


def test_faults_are_served_by_a_plugin_block_at_a_time(make_host, backend_name):
    """A plugin that populates whole 64-page blocks serves every fault; the guest reads what it
    populated. On Linux the hook is called once per block touched."""
    server = BlockServer()
    host = make_host(backend_name, extra_plugins=[server])
    vm = host.create_vm("a", 512)
    host.backend.unmap(vm, np.arange(512))
    touched = np.arange(0, 512, 3)
    host.access(vm, touched, np.zeros(len(touched), bool))
    served = np.concatenate(server.calls)
    assert np.array_equal(np.unique(served // 64), np.arange(8))
    if backend_name == "linux":
        # Real faults come one at a time: the first touch of each block faults, and the rest
        # of the block is present by then.
        assert len(server.calls) == 8 and len(served) == 8
    else:  # the emulator sees the whole batch and delivers every missing page at once
        assert len(server.calls) == 1
    got = host.backend.guest_read(vm, np.arange(512))
    assert np.array_equal(got, BlockServer.pattern(np.arange(512)))


def test_reference_model_round_trip(make_host, backend_name):
    """Random batches, unmaps and refills keep every page reading what the reference model
    says."""
    rng = np.random.default_rng(7)
    host = make_host(backend_name, extra_plugins=[BlockServer(16)])
    vm = host.create_vm("a", 1024)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    for step in range(6):
        gpps = rng.integers(0, 1024, 4000)
        ref.access(host, vm, gpps, rng.random(4000) < 0.3)
        if step % 2 == 0:
            dropped = np.unique(rng.integers(0, 1024, 100))
            host.backend.unmap(vm, dropped)
            blocks = np.unique(dropped // 16)
            refill = (blocks[:, None] * 16 + np.arange(16)).ravel()
            # BlockServer fills the whole block of a dropped page; present pages keep theirs.
            keep = host.backend.present(vm, refill)
            ref.expected["a"][refill[~keep]] = BlockServer.pattern(refill[~keep])
        ref.check(host)


def test_first_touch_of_traced_page_traps_once_per_batch(make_host, backend_name):
    """A traced page touched many times in one batch traps once, in order of first touch;
    untouched traced pages never trap and stay traced."""
    recorder = Recorder()
    host = make_host(backend_name, extra_plugins=[recorder])
    needs(host, Capability.TRACE)
    vm = host.create_vm("a", 1024)
    host.backend.trace(vm, np.array([5, 7, 9, 11]))
    gpps = np.array([1, 7, 5, 7, 7, 2, 5, 9, 9])
    result = host.access(vm, gpps, np.zeros(len(gpps), bool))
    assert result.traced == 3
    (batch,) = recorder.accessed
    assert batch.gpps.tolist() == [7, 5, 9]
    assert host.backend.traced(vm, np.array([5, 7, 9, 11])).tolist() == [False, False, False, True]
    host.access(vm, gpps, np.zeros(len(gpps), bool))
    assert len(recorder.accessed) == 1


def test_write_to_protected_page_traps_before_it_lands(make_host, backend_name):
    """A write to a protected page reaches the write hook with the old contents still there;
    then it lands and the page is no longer protected. Reads do not trap."""
    recorder = Recorder()
    host = make_host(backend_name, extra_plugins=[recorder])
    needs(host, Capability.WRITE_PROTECT)
    vm = host.create_vm("a", 256)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    host.backend.protect(vm, np.array([3, 4, 200]))
    result = ref.access(host, vm, np.array([4, 3, 200, 3]), np.array([False, True, True, True]))
    assert result.write_traps == 2
    assert sorted(np.concatenate([w.gpps for w in recorder.writes]).tolist()) == [3, 200]
    assert all(not before[:, :8].any() for before in recorder.before)  # the write had not landed
    assert host.backend.protected(vm, np.array([3, 4, 200])).tolist() == [False, True, False]
    ref.check(host)


def test_protection_survives_unmap_and_refill(make_host):
    """A protected page that is unmapped and zero-filled again is still protected."""
    recorder = Recorder()
    host = make_host(extra_plugins=[recorder])
    needs(host, Capability.WRITE_PROTECT)
    vm = host.create_vm("a", 64)
    host.backend.protect(vm, np.array([9]))
    host.backend.unmap(vm, np.array([9]))
    result = host.access(vm, np.array([9]), np.array([True]))
    assert (result.faults, result.write_traps) == (1, 1)


def test_populate_refuses_present_and_duplicate_pages(make_host, backend_name):
    """populate of a present page or of one page twice is a caller bug."""
    host = make_host(backend_name)
    vm = host.create_vm("a", 64)
    with pytest.raises(BackendError):
        host.backend.populate(vm, np.array([1]))
    host.backend.unmap(vm, np.array([1, 2]))
    with pytest.raises(BackendError):
        host.backend.populate(vm, np.array([1, 1]))
    with pytest.raises(BackendError):
        host.backend.read(vm, np.array([1]))


# -- particular to real memory ------------------------------------------------------------------


def test_populate_resolves_a_block_with_one_ioctl(make_host):
    """Populating 64 consecutive pages costs one UFFDIO_COPY."""
    host = make_host()
    vm = host.create_vm("a", 256)
    host.backend.unmap(vm, np.arange(64, 128))
    before = host.backend.stats["ioctls"]
    host.backend.populate(vm, np.arange(64, 128), BlockServer.pattern(np.arange(64, 128)))
    assert host.backend.stats["ioctls"] - before == 1
    assert np.array_equal(host.backend.guest_read(vm, np.arange(64, 128)), BlockServer.pattern(np.arange(64, 128)))


def test_staged_pages_are_served_without_a_hook_call(make_host, hook_recorder):
    """Staged contents are resolved by the compiled fault loop: no memvisor_page_fault call."""
    host = make_host()
    vm = host.create_vm("a", 256)
    host.backend.unmap(vm, np.arange(256))
    host.backend.stage(vm, np.arange(256), BlockServer.pattern(np.arange(256)), block_pages=64)
    recorder = hook_recorder(host)
    result = host.access(vm, np.array([0, 70, 140, 210, 5]), np.zeros(5, bool))
    assert result.faults == 0 and "memvisor_page_fault" not in recorder.names()
    assert host.backend.present(vm).sum() == 256
    assert np.array_equal(host.backend.read(vm, np.arange(256)), BlockServer.pattern(np.arange(256)))


def test_guest_is_its_own_process_and_memvisor_reads_its_memory(make_host):
    """The guest's stores are visible through memvisor's memfd mapping at once, and memvisor's
    writes are visible to the guest."""
    host = make_host()
    vm = host.create_vm("a", 32)
    import os

    assert host.backend.guest_pid(vm) != os.getpid()
    host.access(vm, np.array([3]), np.array([True]))
    assert host.backend.read(vm, np.array([3]))[0, :8].view(np.uint64)[0] == vm.write_epoch
    host.backend.write(vm, np.array([4]), np.full((1, 4096), 9, np.uint8))
    assert (host.backend.guest_read(vm, np.array([4])) == 9).all()


def test_destroy_vm_leaves_nothing_behind(make_host):
    """Destroying a VM stops its guest and closes its memfd, socket and userfaultfd."""
    host = make_host()
    before = Snapshot()
    vm = host.create_vm("a", 128)
    assert before.leaks()  # the guest and its descriptors exist
    host.destroy_vm(vm)
    assert not before.leaks()


def test_real_time_clock(make_host):
    """now() is real time since start; account() charges nothing; advance() waits until the
    time has passed since the previous advance (time the guests took already counts)."""
    host = make_host()
    host.backend.advance(0.0)
    t0 = host.backend.now()
    host.backend.advance(0.05)
    assert host.backend.now() - t0 >= 0.045
    assert host.backend.account("disk_read", 1 << 20) == 0.0


def test_mixed_operations_keep_the_reference_model(make_host, backend_name):
    """Random steps of guest batches, unmaps (served back block-wise), traces, protections,
    direct writes and guest writes: every page always reads what the reference model says, and
    the trap counts match the state the steps set up."""
    rng = np.random.default_rng(11)
    recorder = Recorder()
    host = make_host(backend_name, extra_plugins=[BlockServer(8), recorder])
    vm = host.create_vm("a", 512)
    backend = host.backend
    ref = ReferenceMemory()
    ref.follow(host, vm)
    can_trace = Capability.TRACE in backend.capabilities
    can_protect = Capability.WRITE_PROTECT in backend.capabilities
    for _ in range(25):
        step = rng.integers(0, 6)
        pages = np.unique(rng.integers(0, 512, 40))
        if step == 0:
            backend.unmap(vm, pages)
            blocks = np.unique(pages // 8)
            refill = (blocks[:, None] * 8 + np.arange(8)).ravel()
            missing = refill[~backend.present(vm, refill)]
            ref.expected["a"][missing] = BlockServer.pattern(missing)
        elif step == 1 and can_trace:
            backend.trace(vm, pages)
        elif step == 2 and can_protect:
            backend.protect(vm, pages)
        elif step == 3:
            present = pages[backend.present(vm, pages)]
            data = rng.integers(0, 256, (len(present), 4096), dtype=np.uint8)
            backend.write(vm, present, data)
            ref.expected["a"][present] = data
        elif step == 4:
            ref.guest_write(host, vm, pages[:4], rng.integers(0, 256, (min(4, len(pages)), 4096), dtype=np.uint8))
        gpps = rng.integers(0, 512, 3000)
        writes = rng.random(3000) < 0.3
        traced = backend.traced(vm, np.unique(gpps)).sum() if can_trace else 0
        first_writes = np.unique(gpps[writes])
        protected_written = backend.protected(vm, first_writes).sum() if can_protect else 0
        result = ref.access(host, vm, gpps, writes)
        assert result.traced == traced
        assert result.write_traps == protected_written
        ref.check(host)


def test_no_userfaultfd_is_one_capability_error():
    """Where userfaultfd cannot be opened, starting the backend is one CapabilityError line that
    says why (the tests of this folder skip with that line)."""
    from memvisor_backend_linux.backend import kernel_features

    class NoUffd:
        @staticmethod
        def mv_uffd_open(flags):
            return -1  # EPERM

    with pytest.raises(CapabilityError, match="needs userfaultfd.*Operation not permitted"):
        kernel_features(NoUffd(), None)


@pytest.mark.parametrize("backend_name", ["emulator", "linux"])
def test_dirty_bits_match_a_model(make_host, backend_name):
    """Dirty bits mark every page the guest wrote since the last take, not pages populated or
    written by the hypervisor; take_dirty clears them (Linux: the option dirty, WP_ASYNC)."""
    from memvisor.host import Host, HostConfig

    if backend_name == "linux" and REASON:
        pytest.skip(REASON)
    try:
        host = Host(HostConfig(memory_pages=8192, backend=backend_name, backend_options={"dirty": True}))
    except CapabilityError as exc:  # a kernel without WP_ASYNC
        pytest.skip(str(exc))
    try:
        backend = host.backend
        needs(host, Capability.DIRTY)
        vm = host.create_vm("a", 1024)
        backend.take_dirty(vm)
        rng = np.random.default_rng(3)
        gpps = rng.integers(0, 1024, 5000)
        writes = rng.random(5000) < 0.3
        host.access(vm, gpps, writes)
        dirty = np.zeros(1024, bool)
        dirty[gpps[writes]] = True
        assert np.array_equal(backend.take_dirty(vm), dirty)
        assert not backend.take_dirty(vm).any()
        backend.unmap(vm, np.arange(10, 20))
        backend.populate(vm, np.arange(10, 15))
        backend.write(vm, np.array([30]), np.ones((1, 4096), np.uint8))
        host.access(vm, np.arange(0, 40), np.zeros(40, bool))
        assert not backend.take_dirty(vm).any()
        host.access(vm, np.array([12, 17, 500]), np.ones(3, bool))
        assert np.flatnonzero(backend.take_dirty(vm, np.arange(0, 100))).tolist() == [12, 17]
        assert np.flatnonzero(backend.take_dirty(vm)).tolist() == [500]
        if backend_name == "linux":
            with pytest.raises(CapabilityError, match="write-protect"):
                backend.protect(vm, np.array([1]))
    finally:
        if hasattr(host.backend, "close"):
            host.backend.close()


def test_core_checkpoint_round_trip(make_host, backend_name, tmp_path):
    """The core's stop-the-world save and eager restore run through the Backend interface:
    after a restore every page reads what it did when saved, guest writes since are gone."""
    from memvisor.contents import ContentSpec
    from memvisor.events import RestoreRequest, SaveRequest

    host = make_host(backend_name)
    contents = ContentSpec.parse({"zero": 0.4, "text": 0.3, "random": 0.3}, "contents")
    vm = host.create_vm("a", 2048, contents=contents)
    ref = ReferenceMemory()
    ref.follow(host, vm)
    rng = np.random.default_rng(2)
    ref.access(host, vm, rng.integers(0, 2048, 5000), rng.random(5000) < 0.3)
    saved = host.backend.read(vm, np.arange(2048)).copy()
    path = str(tmp_path / "a.ckpt")
    host.save_checkpoint(vm, SaveRequest(path, lazy=False))
    ref.access(host, vm, rng.integers(0, 2048, 5000), rng.random(5000) < 0.5)
    host.restore_checkpoint(vm, RestoreRequest(path, lazy=False))
    ref.expected["a"] = saved
    ref.check(host)


@pytest.mark.parametrize("backend_name", ["emulator", "linux"])
def test_accessed_bits_match_a_model(make_host, backend_name):
    """Accessed bits mark every page the guest touched since the last take, not pages populated
    by the hypervisor (Linux: the option accessed); taking clears them. With dirty tracking on as
    well, taking accessed bits forgets no write."""
    from memvisor.host import Host, HostConfig

    if backend_name == "linux" and REASON:
        pytest.skip(REASON)
    options = {"accessed": True, "dirty": True}
    server = BlockServer(16)
    try:
        host = Host(HostConfig(memory_pages=8192, backend=backend_name, backend_options=options),
                    extra_plugins=[server])
    except CapabilityError as exc:  # a kernel without WP_ASYNC
        pytest.skip(str(exc))
    try:
        backend = host.backend
        needs(host, Capability.ACCESSED, Capability.DIRTY)
        vm = host.create_vm("a", 1024)
        assert not backend.take_accessed(vm).any()
        rng = np.random.default_rng(4)
        gpps = rng.integers(0, 1024, 3000)
        writes = rng.random(3000) < 0.3
        host.access(vm, gpps, writes)
        touched = np.zeros(1024, bool)
        touched[gpps] = True
        assert np.array_equal(backend.take_accessed(vm), touched)
        assert not backend.take_accessed(vm).any()
        written = np.zeros(1024, bool)
        written[gpps[writes]] = True
        assert np.array_equal(backend.take_dirty(vm), written)
        # A block served on a fault: only the faulting page is accessed, not its neighbours.
        backend.unmap(vm, np.arange(32, 48))
        host.access(vm, np.array([35, 40]), np.array([False, True]))
        assert np.flatnonzero(backend.take_accessed(vm)).tolist() == [35, 40]
        assert np.flatnonzero(backend.take_dirty(vm)).tolist() == [40]
        ref = ReferenceMemory()
        ref.follow(host, vm)
        ref.access(host, vm, np.arange(30, 50), np.zeros(20, bool))
        ref.check(host)
    finally:
        if hasattr(host.backend, "close"):
            host.backend.close()
