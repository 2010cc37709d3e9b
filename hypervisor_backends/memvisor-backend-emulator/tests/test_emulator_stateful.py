"""Hypothesis stateful test: machine memory operations never leak or double-free a page and
never change what a guest reads."""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from memvisor import LARGE_PAGE_PAGES
from memvisor.testing import ReferenceMemory, small_host

VM_PAGES = 2 * LARGE_PAGE_PAGES
pages = st.lists(st.integers(0, VM_PAGES - 1), min_size=1, max_size=40, unique=True)


class MachineMemoryMachine(RuleBasedStateMachine):
    """Random share / break / unmap / migrate / split / collapse / guest write sequences."""

    contents = "bytes"

    @initialize()
    def setup(self):
        self.host = small_host(memory_pages=4 * 2048, numa_nodes=2, contents=self.contents)
        self.vms = [self.host.create_vm(f"v{i}", VM_PAGES, large_pages=(i == 0), home_node=i) for i in range(2)]
        self.model = ReferenceMemory()
        rng = np.random.default_rng(0)
        for vm in self.vms:
            # a few distinct contents so that equal pages exist to share
            pool = rng.integers(0, 256, (4, 4096), dtype=np.uint8)
            pool[0] = 0
            choice = rng.integers(0, 4, VM_PAGES)
            self.host.backend.write(vm, np.arange(VM_PAGES), pool[choice])
        self.model.follow_all(self.host)

    @rule(v=st.integers(0, 1), gpps=pages)
    def share_equal_pages(self, v, gpps):
        """Share each chosen page with the first page of the same VM holding equal bytes."""
        vm, backend = self.vms[v], self.host.backend
        backend.split(vm, np.arange(VM_PAGES // LARGE_PAGE_PAGES))
        gpps = np.array(gpps)
        present = gpps[backend.present(vm, gpps)]
        if not len(present):
            return
        first_with = {}
        everything = backend.read(vm, np.arange(VM_PAGES))
        for gpp in np.flatnonzero(backend.present(vm)):
            first_with.setdefault(everything[gpp].tobytes(), gpp)
        twins = np.array([first_with[everything[g].tobytes()] for g in present])
        backend.share(vm, present, backend.mpns(vm, twins))

    @rule(v=st.integers(0, 1), gpps=pages)
    def share_with_zero_page(self, v, gpps):
        """Zero pages may map to the zero page."""
        vm, backend = self.vms[v], self.host.backend
        gpps = np.array(gpps)
        present = gpps[backend.present(vm, gpps)]
        zero = present[~backend.read(vm, present).any(axis=1)]
        backend.split(vm, np.unique(zero // LARGE_PAGE_PAGES))
        backend.share(vm, zero, np.full(len(zero), backend.zero_mpn))

    @rule(v=st.integers(0, 1), gpps=pages)
    def break_sharing(self, v, gpps):
        self.host.backend.break_sharing(self.vms[v], np.array(gpps))

    @rule(v=st.integers(0, 1), gpps=pages)
    def unmap_then_guest_reads_zero(self, v, gpps):
        """An unmapped page's contents are gone: the guest reads zeros afterwards (default)."""
        vm = self.vms[v]
        self.host.backend.unmap(vm, np.array(gpps))
        self.model.expected[vm.name][np.array(gpps)] = 0

    @rule(v=st.integers(0, 1), gpps=pages, node=st.integers(0, 1))
    def migrate(self, v, gpps, node):
        self.host.backend.migrate(self.vms[v], np.array(gpps), node)

    @rule(v=st.integers(0, 1), index=st.integers(0, 1))
    def split(self, v, index):
        self.host.backend.split(self.vms[v], np.array([index]))

    @rule(v=st.integers(0, 1), index=st.integers(0, 1))
    def collapse(self, v, index):
        self.host.backend.collapse(self.vms[v], np.array([index]))

    @rule(v=st.integers(0, 1), gpps=pages, byte=st.integers(0, 255))
    def guest_write(self, v, gpps, byte):
        self.model.guest_write(self.host, self.vms[v], np.array(gpps), np.full((len(gpps), 4096), byte, np.uint8))

    @rule(v=st.integers(0, 1), gpps=st.lists(st.integers(0, VM_PAGES - 1), min_size=1, max_size=60),
          seed=st.integers(0, 1000))
    def guest_accesses(self, v, gpps, seed):
        writes = np.random.default_rng(seed).random(len(gpps)) < 0.5
        self.model.access(self.host, self.vms[v], np.array(gpps), writes)

    @rule(v=st.integers(0, 1), gpps=pages)
    def protect(self, v, gpps):
        self.host.backend.protect(self.vms[v], np.array(gpps))

    @invariant()
    def no_leak_and_guest_reads_model(self):
        if not hasattr(self, "host"):
            return
        assert self.host.backend.check_invariants() == 0
        self.model.check(self.host)


class IdentityMachineMemoryMachine(MachineMemoryMachine):
    """The same on the identity model: pages written as bytes are interned, read back as bytes."""

    contents = "identity"


MachineMemoryMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
IdentityMachineMemoryMachine.TestCase.settings = MachineMemoryMachine.TestCase.settings
test_machine_memory = MachineMemoryMachine.TestCase
test_machine_memory_identity = IdentityMachineMemoryMachine.TestCase
