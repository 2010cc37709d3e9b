"""Hypothesis stateful test: after any sequence of inflate, deflate, driver reset, ticks and
guest reads and writes, every guest page reads what the reference model says (balloon pages
read zeros: the guest gave them up), the hypervisor's balloon agrees with the driver, and no
machine page leaks."""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from memvisor import PAGE_SIZE
from memvisor.testing import ReferenceMemory, small_host
from memvisor_balloon import BalloonPlugin

VM_PAGES = 256
vm_index = st.integers(0, 1)
pages = st.lists(st.integers(0, VM_PAGES - 1), min_size=1, max_size=24, unique=True)


class BalloonMachine(RuleBasedStateMachine):
    """Random balloon and guest activity on two small VMs."""

    @initialize(reset=st.sampled_from(["lazy", "eager"]))
    def setup(self, reset):
        self.plugin = BalloonPlugin()
        self.host = small_host(memory_pages=2048, extra_plugins=[self.plugin],
                               settings={"balloon": {"reset": reset, "reload_delay": "20ms", "max_fraction": 0.8}})
        self.vms = [self.host.create_vm(f"v{i}", VM_PAGES) for i in range(2)]
        rng = np.random.default_rng(3)
        for vm in self.vms:
            self.host.backend.write(vm, np.arange(VM_PAGES), rng.integers(0, 256, (VM_PAGES, PAGE_SIZE), np.uint8))
        self.model = ReferenceMemory()
        self.model.follow_all(self.host)
        self.ballooned = [set() for _ in self.vms]

    def sync(self):
        """Pages that joined a balloon were given up by the guest's driver: they read zeros."""
        for i, vm in enumerate(self.vms):
            now = set(self.plugin.balloon_pages(vm).tolist())
            new = np.array(sorted(now - self.ballooned[i]), dtype=np.int64)
            if len(new):
                assert self.host.guest_pinned(vm)[new].all(), "a page the guest did not give up was ballooned"
                self.model.expected[vm.name][new] = 0
            self.ballooned[i] = now

    @rule(v=vm_index, count=st.integers(1, 120))
    def inflate(self, v, count):
        self.plugin.inflate(self.vms[v], count)
        self.sync()

    @rule(v=vm_index, count=st.integers(1, 120))
    def deflate(self, v, count):
        self.plugin.deflate(self.vms[v], count)
        self.sync()

    @rule(v=vm_index, pages_wanted=st.integers(0, 200))
    def set_target(self, v, pages_wanted):
        self.plugin.set_target(self.vms[v], pages_wanted)
        self.sync()

    @rule(v=vm_index)
    def driver_reset(self, v):
        self.plugin.reset_driver(self.vms[v])
        self.sync()

    @rule()
    def tick(self):
        """Time passes: accessed bits are sampled and reloaded drivers re-inflate to target."""
        self.host.advance(self.host.tick_interval)
        self.sync()

    @rule(v=vm_index, gpps=pages, data=st.data())
    def guest_accesses(self, v, gpps, data):
        writes = np.array(data.draw(st.lists(st.booleans(), min_size=len(gpps), max_size=len(gpps))))
        self.model.access(self.host, self.vms[v], np.array(gpps), writes)
        self.sync()

    @rule(v=vm_index, gpps=pages, byte=st.integers(0, 255))
    def guest_writes_pages(self, v, gpps, byte):
        """The guest writes whole pages, balloon pages included (a misbehaving or reset guest)."""
        gpps = np.array(gpps)
        self.model.guest_write(self.host, self.vms[v], gpps, np.full((len(gpps), PAGE_SIZE), byte, np.uint8))
        self.sync()

    @rule(v=vm_index, gpps=pages)
    def share_zero_pages(self, v, gpps):
        """Another plugin maps zero-filled guest pages onto the zero page (not the balloon's)."""
        vm, backend = self.vms[v], self.host.backend
        gpps = np.array(gpps)
        gpps = gpps[~self.plugin.state(vm).in_balloon[gpps]]
        zero = gpps[~backend.read(vm, gpps).any(axis=1)]
        backend.share(vm, zero, np.full(len(zero), backend.zero_mpn))

    @invariant()
    def guest_reads_what_the_model_says(self):
        if hasattr(self, "model"):
            self.model.check(self.host)
            self.sync()

    @invariant()
    def balloon_and_machine_pages_agree(self):
        if not hasattr(self, "model"):
            return
        backend = self.host.backend
        held = 0
        for vm in self.vms:
            state = self.plugin.state(vm)
            assert set(state.driver.pages.tolist()) <= set(state.order.tolist())
            if state.size:
                held += 1
                assert np.all(backend.mpns(vm, state.order) == state.mpn)
                assert backend.refcounts(np.array([state.mpn]))[0] == state.size + 1
            else:
                assert state.mpn == -1
        assert backend.check_invariants() == held
        assert self.plugin.verify() == 0 and self.plugin.guest_visible_errors == 0


TestBalloonMachine = BalloonMachine.TestCase
TestBalloonMachine.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
