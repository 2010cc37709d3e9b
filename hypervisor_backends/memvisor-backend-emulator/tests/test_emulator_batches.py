"""Batch semantics of the emulator: which touches trap, how often, and the bits they leave."""

import numpy as np
import pytest

from memvisor import hookimpl
from memvisor.errors import BackendError
from memvisor.testing import HookRecorder, small_host


class Retracer:
    """Records traced accesses (and does nothing else)."""

    def __init__(self):
        self.batches = []

    @hookimpl
    def memvisor_traced_access(self, access):
        self.batches.append(access)


def test_emulator_is_listed_as_backend():
    """The emulator registers through the entry point like any backend."""
    host = small_host()
    assert "emulator" in host.registries["backend"]
    assert host.registries["backend"].owner("emulator") == "emulator"


def test_first_touch_of_traced_page_traps_once_per_batch():
    """A traced page touched many times in one batch traps once, at its first touch, in
    order of first touch; untouched traced pages never trap."""
    tracer = Retracer()
    host = small_host(extra_plugins=[tracer])
    vm = host.create_vm("a", 1024)
    host.backend.trace(vm, np.array([5, 7, 9, 11]))
    gpps = np.array([1, 7, 5, 7, 7, 2, 5, 9, 9])
    result = host.access(vm, gpps, np.zeros(len(gpps), bool))
    assert result.traced == 3
    (batch,) = tracer.batches
    assert batch.gpps.tolist() == [7, 5, 9]
    assert batch.positions.tolist() == [1, 2, 7]
    assert host.backend.traced(vm, np.array([5, 7, 9, 11])).tolist() == [False, False, False, True]
    host.access(vm, gpps, np.zeros(len(gpps), bool))
    assert len(tracer.batches) == 1  # untraced now: no more traps


def test_untouched_pages_never_trap(hook_recorder):
    """A batch that touches no traced, protected or missing page makes no hook call."""
    host = small_host()
    vm = host.create_vm("a", 1024)
    host.backend.trace(vm, np.arange(512, 1024))
    host.backend.protect(vm, np.arange(0, 100))
    recorder = hook_recorder(host)
    result = host.access(vm, np.arange(100, 512), np.ones(412, bool))
    assert (result.faults, result.traced, result.write_traps) == (0, 0, 0)
    assert not [c for c in recorder.names() if c.startswith("memvisor_page")]


def test_accessed_and_dirty_bits_match_a_model():
    """Accessed bits mark every touched page and dirty bits every written one; take_* clears."""
    rng = np.random.default_rng(3)
    host = small_host()
    vm = host.create_vm("a", 2048)
    host.backend.take_accessed(vm)
    host.backend.take_dirty(vm)
    gpps = rng.integers(0, 2048, 5000)
    writes = rng.random(5000) < 0.3
    host.access(vm, gpps, writes)
    accessed = np.zeros(2048, bool)
    accessed[gpps] = True
    dirty = np.zeros(2048, bool)
    dirty[gpps[writes]] = True
    assert np.array_equal(host.backend.take_accessed(vm), accessed)
    assert np.array_equal(host.backend.take_dirty(vm), dirty)
    assert not host.backend.take_accessed(vm).any()


def test_fault_on_missing_page_is_zero_filled_by_default(reference_memory):
    """An unmapped page faults once and reads zeros afterwards unless a plugin serves it."""
    host = small_host()
    vm = host.create_vm("a", 64)
    recorder = HookRecorder(host.pm)
    host.backend.write(vm, np.array([3]), np.full((1, 4096), 7, np.uint8))
    host.backend.unmap(vm, np.array([3, 4]))
    result = host.access(vm, np.array([3, 3, 4, 3]), np.array([False, True, False, False]))
    assert result.faults == 2
    (call,) = recorder.of("memvisor_page_fault")
    assert call.fault.gpps.tolist() == [3, 4]
    page = host.backend.read(vm, np.array([3]))[0]
    assert page[8:].sum() == 0 and page[:8].view(np.uint64)[0] == vm.write_epoch


def test_write_to_shared_page_gets_private_copy_and_nothing_else_changes(reference_memory):
    """Writing one of two pages that share a machine page leaves the other's contents alone."""
    host = small_host()
    vm = host.create_vm("a", 64)
    data = np.random.default_rng(1).integers(0, 256, (1, 4096), dtype=np.uint8)
    host.backend.write(vm, np.array([1]), data)
    host.backend.write(vm, np.array([2]), data)
    reference_memory.follow(host, vm)
    free = host.backend.free_pages()
    assert host.backend.share(vm, np.array([2]), host.backend.mpns(vm, np.array([1]))) == 1
    assert host.backend.free_pages() == free + 1
    result = reference_memory.access(host, vm, np.array([2, 2]), np.array([True, True]))
    assert result.write_traps == 1
    assert host.backend.mpns(vm, np.array([1]))[0] != host.backend.mpns(vm, np.array([2]))[0]
    reference_memory.check(host)
    host.backend.check_invariants()


def test_share_refuses_different_contents():
    """Sharing two pages whose bytes differ is refused and changes nothing."""
    host = small_host()
    vm = host.create_vm("a", 8)
    host.backend.write(vm, np.array([0]), np.ones((1, 4096), np.uint8))
    before = host.backend.mpns(vm).copy()
    with pytest.raises(BackendError, match="differ"):
        host.backend.share(vm, np.array([0]), host.backend.mpns(vm, np.array([1])))
    assert np.array_equal(before, host.backend.mpns(vm))


def test_remote_accesses_are_counted_and_cost_more():
    """Accesses to pages on another NUMA node are remote and take longer in virtual time."""
    host = small_host(memory_pages=8192, numa_nodes=2)
    vm = host.create_vm("a", 1024, home_node=0)
    gpps = np.arange(1024)
    local = host.access(vm, gpps, np.zeros(1024, bool))
    host.move_vcpus(vm, 1)
    remote = host.access(vm, gpps, np.zeros(1024, bool))
    assert local.remote == 0 and remote.remote == 1024
    assert remote.seconds > local.seconds * 1.5
    assert host.backend.migrate(vm, gpps[:512], 1) == 512
    half = host.access(vm, gpps, np.zeros(1024, bool))
    assert half.remote == 512


def test_large_pages_split_and_collapse_keep_contents(reference_memory):
    """Splitting and collapsing a large page never changes what the guest reads."""
    host = small_host(memory_pages=8192)
    vm = host.create_vm("a", 1024, large_pages=True)
    assert host.backend.large(vm).all()
    reference_memory.follow(host, vm)
    reference_memory.access(host, vm, np.arange(0, 1024, 3), np.ones(342, bool))
    assert host.backend.split(vm, np.array([0])) == 1
    assert not host.backend.large(vm, np.arange(512)).any()
    assert host.backend.collapse(vm, np.array([0])) == 1
    reference_memory.check(host)
    host.backend.check_invariants()


def test_time_is_deterministic_under_a_seed():
    """Two identical runs take exactly the same virtual time."""
    def run():
        host = small_host(numa_nodes=2)
        vm = host.create_vm("a", 2048)
        rng = np.random.default_rng(9)
        host.backend.trace(vm, np.arange(0, 2048, 7))
        total = 0.0
        for _ in range(5):
            total += host.access(vm, rng.integers(0, 2048, 4000), rng.random(4000) < 0.2).seconds
        return total

    assert run() == run()


def test_page_shared_onto_turns_copy_on_write_too(reference_memory):
    """When a page is shared onto another page's machine page, a write to either one leaves
    the other unchanged (both became copy-on-write)."""
    host = small_host()
    vm = host.create_vm("a", 8)
    reference_memory.follow(host, vm)  # all zero: pages 0 and 1 are equal
    host.backend.share(vm, np.array([1]), host.backend.mpns(vm, np.array([0])))
    reference_memory.guest_write(host, vm, np.array([0]), np.full((1, 4096), 5, np.uint8))
    reference_memory.check(host)
    assert host.backend.check_invariants() == 0


@pytest.mark.parametrize("seed", range(5))
def test_trapping_predicts_the_pages_that_trap(seed):
    """Backend.trapping (the host cuts batches at a trap budget with it) marks exactly the
    accesses whose pages trap when the batch runs: missing, traced, and written protected
    pages — the union of every trap hook call's pages, no more, no fewer."""
    rng = np.random.default_rng(seed)
    host = small_host()
    vm = host.create_vm("a", 1024)
    host.backend.unmap(vm, rng.choice(1024, 100, replace=False))
    present = np.flatnonzero(host.backend.present(vm, np.arange(1024)))
    host.backend.trace(vm, rng.choice(present, 100, replace=False))
    host.backend.protect(vm, rng.choice(present, 100, replace=False))
    gpps, writes = rng.integers(0, 1024, 3000), rng.random(3000) < 0.5
    marked = host.backend.trapping(vm, gpps, writes)
    recorder = HookRecorder(host.pm)
    result = host.access(vm, gpps, writes)
    trapped = set()
    for name, key in (("memvisor_page_fault", "fault"), ("memvisor_traced_access", "access"),
                      ("memvisor_write_trap", "write")):
        for call in recorder.of(name):
            trapped |= set(call.kwargs[key].gpps.tolist())
    assert trapped == set(gpps[marked].tolist())
    assert result.faults + result.traced + result.write_traps >= len(trapped) > 0
