"""Stateful property test: scans, shares, break-ups, guest writes, frees, splits and collapses
in any order keep guest memory equal to the reference model, machine-page reference counts
exact, every shared machine page copy-on-write for all its mappers, and the estimate equal to
a brute-force count once everything has been hashed again."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE
from memvisor.testing import ReferenceMemory, small_host
from memvisor_backend_emulator.backend import COW
from memvisor_sharing import SharingPlugin

# A few contents, so that duplicates within and across VMs are common; 0 is the zero page.
CONTENTS = np.stack([np.zeros(PAGE_SIZE, np.uint8)]
                    + [np.full(PAGE_SIZE, v, np.uint8) for v in (1, 2, 3)]
                    + [np.random.default_rng(5).integers(0, 256, PAGE_SIZE, dtype=np.uint8)])
VMS = {"big": 2 * LARGE_PAGE_PAGES, "small": 256, "peer": 256}


class SharingMachine(RuleBasedStateMachine):
    """A host with three VMs (one on large pages; "small" and "peer" share across)."""

    @initialize(rate=st.sampled_from([64, 512, 4096]), order=st.sampled_from(["reclaimable", "address"]),
                wait_stable=st.booleans())
    def start(self, rate, order, wait_stable):
        self.plugin = SharingPlugin()
        self.host = small_host(memory_pages=4096, extra_plugins=[self.plugin], settings={"sharing": {
            "pages_per_tick": rate, "order": order, "across": [["small", "peer"]], "wait_stable": wait_stable}})
        rng = np.random.default_rng(rate)
        for name, pages in VMS.items():
            vm = self.host.create_vm(name, pages, large_pages=name == "big")
            picks = rng.integers(0, len(CONTENTS), pages)
            self.host.backend.write(vm, np.arange(pages), CONTENTS[picks])
            self.host.backend.write(vm, np.arange(0, pages, 7), rng.integers(1, 256, (len(range(0, pages, 7)),
                                                                                      PAGE_SIZE), dtype=np.uint8))
        self.ref = ReferenceMemory()
        self.ref.follow_all(self.host)

    def _pages(self, name, data):
        vm = self.host.vms[name]
        return vm, np.unique(np.asarray(data.draw(st.lists(st.integers(0, vm.pages - 1), min_size=1, max_size=40))))

    @rule(ticks=st.integers(1, 3))
    def scan(self, ticks):
        """Time passes: the scanner hashes and shares small pages."""
        for _ in range(ticks):
            self.host.advance(self.host.tick_interval)

    @rule(extra=st.integers(1, 600))
    def pressure(self, extra):
        """Memory pressure: break-ups and shares until `extra` more pages are free (or nothing is left)."""
        self.host.check_pressure(target_free_pages=self.host.backend.free_pages() + extra)

    @rule(name=st.sampled_from(list(VMS)), data=st.data(), content=st.integers(0, len(CONTENTS) - 1))
    def guest_writes_pages(self, name, data, content):
        """The guest writes whole pages with a common content (new twins, or zeros)."""
        vm, gpps = self._pages(name, data)
        self.ref.guest_write(self.host, vm, gpps, np.tile(CONTENTS[content], (len(gpps), 1)))

    @rule(name=st.sampled_from(list(VMS)), data=st.data())
    def guest_stores(self, name, data):
        """The guest's ordinary stores (8 bytes into each page), through traps where shared."""
        vm, gpps = self._pages(name, data)
        self.ref.access(self.host, vm, gpps, np.ones(len(gpps), bool))

    @rule(name=st.sampled_from(list(VMS)), data=st.data())
    def free_pages(self, name, data):
        """The hypervisor drops pages (a balloon would); the guest reads zeros afterwards."""
        vm, gpps = self._pages(name, data)
        self.host.backend.unmap(vm, gpps)
        self.ref.expected[name][gpps] = 0

    @rule(index=st.integers(0, 1), collapse=st.booleans())
    def split_or_collapse(self, index, collapse):
        """Another agent (khugepaged, say) collapses or splits a large page of "big"."""
        vm = self.host.vms["big"]
        if collapse:
            self.host.backend.collapse(vm, np.array([index]))
        else:
            self.host.backend.split(vm, np.array([index]))

    @invariant()
    def memory_reads_as_the_model_says(self):
        """Guest memory equals the reference model; reference counts are exact."""
        if hasattr(self, "ref"):
            self.ref.check(self.host)
            self.host.backend.check_invariants()

    @invariant()
    def shared_pages_are_copy_on_write_for_every_mapper(self):
        """No guest can write a machine page another guest page maps (sharing never leaks writes)."""
        if not hasattr(self, "ref"):
            return
        backend = self.host.backend
        for vm in self.host.vms.values():
            state = backend._state(vm)
            mapped = state.p2m >= 0
            shared = mapped & ((state.p2m == backend.zero_mpn)
                               | (backend.refcounts(np.maximum(state.p2m, 0)) > 1))
            assert ((state.flags[shared] & COW) != 0).all()

    def teardown(self):
        """After any history, a full rescan gives the brute-force estimate."""
        if not hasattr(self, "ref"):
            return
        plugin, host = self.plugin, self.host
        for scan in plugin.vms.values():
            scan.scanned[:] = False
        plugin.scan(host, 10**6, unscanned_only=True)
        plugin.refresh(host)
        assert plugin.table.total == remaining_by_brute_force(host, plugin)


def remaining_by_brute_force(host, plugin):
    """Reclaimable machine pages left, counted from guest bytes and machine page numbers."""
    backend = host.backend
    zeros, duplicates = set(), 0
    groups = {"big": 0, "small": 1, "peer": 1}
    units = {}
    for name, vm in host.vms.items():
        mpns = backend.mpns(vm)
        data = backend.read(vm, np.arange(vm.pages))
        for gpp in range(vm.pages):
            mpn = int(mpns[gpp])
            if mpn == backend.zero_mpn:
                continue
            if not data[gpp].any():
                zeros.add(mpn)
            else:
                units.setdefault((groups[name], data[gpp].tobytes()), set()).add(mpn)
    duplicates = sum(len(m) - 1 for m in units.values())
    return len(zeros) + duplicates


TestSharingStateful = SharingMachine.TestCase
TestSharingStateful.settings = settings(max_examples=20, stateful_step_count=12, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
