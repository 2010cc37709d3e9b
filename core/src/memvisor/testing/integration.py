"""Every technique at once: a hypothesis state machine that drives one host with every plugin.

The machine installs every technique plugin (stats, mrc, balloon, sharing, numa, lazy-save,
lazy-restore, diskmap) on one emulated two-node host with several small VMs and drives it
through random interleavings of guest reads and writes, balloon inflate / deflate / driver
reset, sharing scans and memory pressure, NUMA moves, lazy checkpoint saves while the guest
runs, lazy restores, live migrations to a second host, disk reads and writes, and memory
errors. After every step it checks:

- every guest page reads what the reference model says (:class:`IntegrationModel`): balloon
  pages read zeros once ballooned (the guest gave them up), pages a memory error hit and
  nobody repaired are *unknown* (reported lost to the guest); everything else is exact;
- machine-page reference counts and the free pool are exact (the emulator recounts every page),
  and the only pages held outside page tables are the balloons' shared pages;
- no plugin's bookkeeping points at a page another plugin changed behind it (the balloon's
  pages map its one page; diskmap's mappings still equal their blocks).

pytest runs it with a small budget (``tests/integration/``); ``memvisor selftest`` runs it for
as long as asked. Imports of hypothesis stay inside the functions that need them, so importing
:mod:`memvisor.testing` stays light.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from memvisor import PAGE_SIZE
from memvisor.testing.reference import ReferenceMemory

PLUGINS = ("stats", "mrc", "balloon", "sharing", "numa", "lazy-save", "lazy-restore", "diskmap")
"""Every technique plugin of this repository, by entry-point name."""

VM_PAGES = 1024
"""Pages of each VM (two 2 MiB large pages: sharing can split and collapse them)."""

VMS = 3
DISK_BLOCKS = 256


class IntegrationModel(ReferenceMemory):
    """The reference model of guest memory, with pages that may legitimately be unknown.

    ``expected[vm]`` holds what each page must read; ``known[vm]`` is False for pages a memory
    error hit that no plugin repaired (the guest was told they are lost). A whole-page guest
    write or a disk read makes a page known again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.known: dict[str, np.ndarray] = {}

    def follow(self, host, vm) -> None:
        """Start following ``vm`` with its current contents."""
        super().follow(host, vm)
        self.known[vm.name] = np.ones(vm.pages, dtype=bool)

    def guest_write(self, host, vm, gpps, data) -> None:
        """The guest writes whole pages: they are known again."""
        super().guest_write(host, vm, gpps, data)
        self.known[vm.name][np.asarray(gpps, dtype=np.int64)] = True

    def snapshot(self, vm) -> tuple[np.ndarray, np.ndarray]:
        """What a checkpoint of ``vm`` taken now must hold."""
        return self.expected[vm.name].copy(), self.known[vm.name].copy()

    def unexpected_pages(self, host, vm, *, fault: bool) -> np.ndarray:
        """Known pages of ``vm`` that read otherwise than expected. With ``fault`` the pages
        are read the way the guest reads them (faults served, which finishes a lazy restore);
        without, present pages are read by the hypervisor and the others left for later."""
        gpps = np.arange(vm.pages)
        if fault:
            got = host.backend.guest_read(vm, gpps)
        else:
            gpps = gpps[host.backend.present(vm, gpps)]
            got = host.backend.read(vm, gpps)
        known = self.known[vm.name][gpps]
        bad = np.any(got != self.expected[vm.name][gpps], axis=1) & known
        return gpps[bad]


def machine_class(final_fault_check: bool = True, model: str = "bytes"):
    """The hypothesis rule-based state machine (built lazily: hypothesis is a test tool).

    ``final_fault_check``: at the end of each example, after the host stops, read every page
    the way the guest does (faults served), not only the present ones that the per-step
    invariant reads (it found the pages a refused restore left to be zero-filled).
    ``model``: the hosts' machine model, ``"bytes"`` or ``"identity"`` (the model of guest
    memory stays bytes: an identity host's pages are read back as the bytes they name)."""
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

    from memvisor.checkpoint import CheckpointError
    from memvisor.events import RestoreRequest, SaveRequest
    from memvisor.identity import as_bytes
    from memvisor.migration import LiveMigration, MigrationOptions
    from memvisor.testing import small_host

    vm_index = st.integers(0, VMS - 1)
    page_lists = st.lists(st.integers(0, VM_PAGES - 1), min_size=1, max_size=64, unique=True)

    class AllTechniques(RuleBasedStateMachine):
        """Random guest and hypervisor activity with every technique plugin on one host."""

        def __init__(self):
            super().__init__()
            self._tmp = tempfile.TemporaryDirectory(prefix="memvisor-integration-")
            self.workdir = Path(self._tmp.name)
            self.counts = {"steps": 0, "memory_errors": 0, "lost": 0, "repaired": 0, "migrations": 0,
                           "checkpoints": 0, "restores": 0, "refused_restores": 0}

        def teardown(self):
            host = getattr(self, "host", None)
            if host is not None:
                host.stop()
                if final_fault_check:
                    self.check_all(fault=True)
            self._tmp.cleanup()

        # -- set-up ---------------------------------------------------------------------------

        @initialize(seed=st.integers(0, 2**16), large=st.booleans())
        def setup(self, seed, large):
            from memvisor.contents import ContentSpec

            settings = {
                "balloon": {"reload_delay": "20ms", "max_fraction": 0.5},
                "sharing": {"pages_per_tick": 512},
                "numa": {"heuristic": "scan"},
                "mrc": {"rate": 0.1},
            }
            self.settings = settings
            self.host = small_host(memory_pages=8192, numa_nodes=2, plugins=PLUGINS, settings=settings, seed=seed,
                                   contents=model)
            self.plugins = {name: self.host.pm.get_plugin(name) for name in PLUGINS}
            contents = ContentSpec.parse({"zero": 0.4, "text": 0.3, "random": 0.2, "duplicate": 0.1}, "contents")
            from memvisor.budgets import Budget

            budgets = {1: Budget(trap_rate=500, handler_share=0.2, scan_rate=20000)}  # VM 1 is budgeted tightly
            self.vms = [self.host.create_vm(f"v{i}", VM_PAGES, home_node=i % 2, large_pages=large and i == 0,
                                            contents=contents, budget=budgets.get(i)) for i in range(VMS)]
            self.model = IntegrationModel()
            for vm in self.vms:
                self.model.follow(self.host, vm)
            # VM 0 has a disk with half of its memory page cache of it.
            vm = self.vms[0]
            self.disk = self.host.attach_disk(vm, blocks=DISK_BLOCKS)
            self.disk_model = np.array(as_bytes(self.disk.read(np.arange(DISK_BLOCKS))), copy=True)
            self.disk_known = np.ones(DISK_BLOCKS, dtype=bool)
            self.ballooned = [set() for _ in self.vms]
            self.transfer(list(range(VM_PAGES - 128, VM_PAGES)), list(range(128)), [False] * 128)
            self.checkpoints: dict[str, tuple[str, np.ndarray, np.ndarray, object]] = {}
            self.sync()

        # -- helpers --------------------------------------------------------------------------

        def sync(self):
            """Pages in a balloon were given up by the guest: they read zeros. Every page in a
            balloon now is zero in the model, not only those new since the last sync: a page
            can leave a balloon, be written by the guest and join again between two syncs
            (ticks deflate and reload balloons while a migration's guests run)."""
            balloon = self.plugins["balloon"]
            for i, vm in enumerate(self.vms):
                pages = balloon.balloon_pages(vm)
                now = set(pages.tolist())
                new = np.array(sorted(now - self.ballooned[i]), dtype=np.int64)
                if len(new):
                    assert self.host.guest_pinned(vm)[new].all(), "a page the guest did not give up was ballooned"
                self.model.expected[vm.name][pages] = 0
                self.model.known[vm.name][pages] = True
                self.ballooned[i] = now
            self.counts["steps"] += 1

        def describe_pages(self, vm, pages) -> str:
            """What the techniques know of ``pages`` (for failure messages)."""
            backend = self.host.backend
            src = backend.read(vm, pages[backend.present(vm, pages)])
            return (f"pinned {int(self.host.guest_pinned(vm)[pages].sum())}, in balloon "
                    f"{int(np.isin(pages, self.plugins['balloon'].balloon_pages(vm)).sum())}, present "
                    f"{int(backend.present(vm, pages).sum())}, zero on the source {int((~src.any(axis=1)).sum())}, "
                    f"zero in the model {int((~self.model.expected[vm.name][pages].any(axis=1)).sum())}, "
                    f"disk-mapped {int(np.isin(pages, self.plugins['diskmap'].mapped(vm)).sum())}")

        def check_all(self, *, fault: bool):
            for vm in self.vms:
                bad = self.model.unexpected_pages(self.host, vm, fault=fault)
                assert not len(bad), (f"VM {vm.name}: {len(bad)} pages differ from the model, "
                                      f"first {bad[:8].tolist()}")

        # -- guest activity -------------------------------------------------------------------

        @rule(v=vm_index, gpps=page_lists, data=st.data(), within_budget=st.booleans())
        def guest_accesses(self, v, gpps, data, within_budget):
            """A batch of reads and writes; ``within_budget`` cuts it at the VM's trap budget
            (VM 1 has a small one) as the runner does: only the accesses that ran count."""
            writes = np.array(data.draw(st.lists(st.booleans(), min_size=len(gpps), max_size=len(gpps))))
            result = self.model.access(self.host, self.vms[v], np.array(gpps), writes, within_budget=within_budget)
            self.host.advance(result.seconds)
            self.sync()

        @rule(v=vm_index, gpps=page_lists, byte=st.integers(0, 255))
        def guest_writes_pages(self, v, gpps, byte):
            """Whole-page writes (balloon pages included: a misbehaving or rebooted guest)."""
            gpps = np.array(gpps)
            self.model.guest_write(self.host, self.vms[v], gpps, np.full((len(gpps), PAGE_SIZE), byte, np.uint8))
            self.sync()

        @rule(pages=page_lists, data=st.data())
        def disk_io(self, pages, data):
            """The guest of VM 0 reads disk blocks into pages and writes pages to blocks."""
            blocks = data.draw(st.lists(st.integers(0, DISK_BLOCKS - 1), min_size=len(pages), max_size=len(pages)))
            self.transfer(pages, blocks, [b % 3 == 0 for b in blocks])

        def transfer(self, pages, blocks, writes):
            """Disk I/O of VM 0, mirrored in the model of its memory and of its disk."""
            vm = self.vms[0]
            gpps = self.host.guest_pages(vm, np.array(pages, dtype=np.int64))
            blocks, writes = np.array(blocks, dtype=np.int64), np.array(writes, dtype=bool)
            # Mirror host.disk_io: the last transfer of each (page, direction) wins; reads first.
            order = np.arange(len(gpps))[::-1]
            _, last = np.unique(gpps[::-1] * 2 + writes[::-1], return_index=True)
            keep = np.sort(order[last])
            g, b, w = gpps[keep], blocks[keep], writes[keep]
            self.host.advance(self.host.disk_io(vm, self.disk, gpps, blocks, writes))
            exp, known = self.model.expected[vm.name], self.model.known[vm.name]
            exp[g[~w]] = self.disk_model[b[~w]]
            known[g[~w]] = self.disk_known[b[~w]]
            for page, block in zip(g[w], b[w]):
                self.disk_model[block] = exp[page]
                self.disk_known[block] = known[page]
            self.sync()

        @rule(ticks=st.integers(1, 8))
        def time_passes(self, ticks):
            """Ticks: background saves, prefetch, sharing scans, NUMA scans, balloon reloads."""
            self.host.advance(ticks * self.host.tick_interval)
            self.sync()

        # -- balloon --------------------------------------------------------------------------

        @rule(v=vm_index, count=st.integers(1, 300))
        def inflate(self, v, count):
            self.plugins["balloon"].inflate(self.vms[v], count)
            self.sync()

        @rule(v=vm_index, count=st.integers(1, 300))
        def deflate(self, v, count):
            self.plugins["balloon"].deflate(self.vms[v], count)
            self.sync()

        @rule(v=vm_index)
        def driver_reset(self, v):
            self.plugins["balloon"].reset_driver(self.vms[v])
            self.sync()

        # -- sharing and pressure -------------------------------------------------------------

        @rule(budget=st.integers(64, 4096))
        def sharing_scan(self, budget):
            self.plugins["sharing"].scan(self.host, budget)
            self.sync()

        @rule(free_target=st.integers(0, 6000))
        def pressure(self, free_target):
            """Memory pressure: sharing breaks up large pages, balloons inflate, diskmap swaps."""
            self.host.check_pressure(free_target)
            self.sync()

        @rule(v=vm_index)
        def diskmap_scan(self, v):
            if self.host.disks.get(self.vms[v].name):
                self.plugins["diskmap"].scan(self.vms[v])
            self.sync()

        # -- NUMA -----------------------------------------------------------------------------

        @rule(v=vm_index)
        def move_vcpus(self, v):
            vm = self.vms[v]
            self.host.move_vcpus(vm, 1 - vm.home_node)
            self.sync()

        # -- checkpoints ----------------------------------------------------------------------

        @rule(v=vm_index, lazy=st.booleans())
        def checkpoint_save(self, v, lazy):
            """Save while the guest runs (lazy) or stop-the-world; the file must hold the
            memory as it was when the save was asked for."""
            vm = self.vms[v]
            path = str(self.workdir / f"{vm.name}-{self.counts['checkpoints']}.ckpt")
            expected, known = self.model.snapshot(vm)
            job = self.host.save_checkpoint(vm, SaveRequest(path, lazy=lazy, time=self.host.now))
            self.checkpoints[vm.name] = (path, expected, known, job)
            self.counts["checkpoints"] += 1
            self.sync()

        @precondition(lambda self: getattr(self, "checkpoints", None))
        @rule(data=st.data(), lazy=st.booleans())
        def checkpoint_restore(self, data, lazy):
            name = data.draw(st.sampled_from(sorted(self.checkpoints)))
            vm = self.host.vms[name]
            path, expected, known, job = self.checkpoints[name]
            if not job.done:  # a restore of a file still being written: finish it first
                self.host.advance(self.host.tick_interval)
                limit = self.host.now + 10.0
                while not job.done and self.host.now < limit:
                    self.host.advance(self.host.tick_interval)
                assert job.done, "a lazy save never finished"
            try:
                self.host.restore_checkpoint(vm, RestoreRequest(path, lazy=lazy, time=self.host.now))
            except CheckpointError as exc:
                # Refused before anything changed: only a checkpoint whose disk references name
                # blocks written since may be refused; the VM runs on as it was.
                assert "cannot be restored" in str(exc), str(exc)
                self.counts["refused_restores"] += 1
                self.sync()
                return
            self.model.expected[name] = expected.copy()
            self.model.known[name] = known.copy()
            self.counts["restores"] += 1
            self.ballooned[self.vms.index(vm)] = set(self.plugins["balloon"].balloon_pages(vm).tolist())
            self.sync()

        # -- migration ------------------------------------------------------------------------

        @rule(v=vm_index, postcopy=st.booleans(), inflate=st.integers(0, 200))
        def migrate(self, v, postcopy, inflate):
            """Live-migrate a VM to a second host while its guest writes and its balloon
            inflates by ``inflate`` pages; the destination must read what the model says, then
            it is discarded."""
            vm = self.vms[v]
            destination = small_host(memory_pages=8192, numa_nodes=2, plugins=PLUGINS, settings=self.settings,
                                     contents=model)
            migration = LiveMigration(self.host, vm, destination, MigrationOptions(postcopy=postcopy, max_rounds=3))

            def run_guests(seconds):
                gpps = np.arange(0, VM_PAGES, 7)
                writes = (gpps % 3) == 0
                self.host.advance(self.model.access(self.host, vm, gpps, writes).seconds)
                if inflate:
                    self.plugins["balloon"].inflate(vm, inflate)
                    self.sync()

            migration.run(run_guests)
            self.sync()
            # What the destination must hold: the VM at switch-over. (The source VM runs on
            # after it here — the step measures the migration —, and once post-copy has pulled
            # the last pages the clocks meet and its ticks may re-inflate its balloon.)
            expected, known = self.model.snapshot(vm)
            if postcopy:
                migration.finish_postcopy()
                self.sync()
            got = destination.backend.guest_read(migration.dest_vm, np.arange(vm.pages))
            bad = np.flatnonzero(np.any(got != expected, axis=1) & known)
            assert not len(bad), (f"migration of {vm.name}: {len(bad)} pages differ, first {bad[:8].tolist()} "
                                  f"({self.describe_pages(vm, bad)})")
            destination.backend.check_invariants()
            destination.stop()
            self.counts["migrations"] += 1

        # -- memory errors --------------------------------------------------------------------

        @rule(v=vm_index, gpps=page_lists, bit=st.integers(0, PAGE_SIZE * 8 - 1))
        def memory_error(self, v, gpps, bit):
            """Flip a bit in present pages (as the hardware would); repaired pages must read
            their old bytes again, the others are reported lost."""
            vm = self.vms[v]
            gpps = np.array(gpps, dtype=np.int64)
            gpps = gpps[self.host.backend.present(vm, gpps)]
            if not len(gpps):
                return
            data = self.host.backend.read(vm, gpps)
            data[:, bit // 8] ^= np.uint8(1 << (bit % 8))
            self.host.backend.write(vm, gpps, data)
            outcome = self.host.memory_error(vm, gpps)
            lost = np.array(outcome["lost"], dtype=np.int64)
            self.model.known[vm.name][lost] = False
            self.counts["memory_errors"] += 1
            self.counts["lost"] += len(lost)
            self.counts["repaired"] += len(outcome["repaired"])
            self.sync()

        # -- invariants -----------------------------------------------------------------------

        @invariant()
        def guest_reads_what_the_model_says(self):
            if hasattr(self, "model"):
                self.check_all(fault=False)

        @invariant()
        def machine_pages_exact(self):
            if not hasattr(self, "model"):
                return
            backend, balloon = self.host.backend, self.plugins["balloon"]
            held = 0
            for vm in self.vms:
                state = balloon.state(vm)
                if state.size:
                    held += 1
                    assert np.all(backend.mpns(vm, state.order) == state.mpn), \
                        f"VM {vm.name}: a balloon page was remapped behind the balloon"
                    assert backend.refcounts(np.array([state.mpn]))[0] == state.size + 1
            assert backend.check_invariants() == held
            assert balloon.verify() == 0
            assert self.plugins["diskmap"].verify(self.vms[0]) == 0, "a disk mapping diskmap trusts does not hold"

    return AllTechniques


class _Draws:
    """Stands for hypothesis's ``data`` in a replayed step: hands out the values printed as
    ``Draw N: ...`` before it, in order."""

    def __init__(self, values: list):
        self.values = list(values)

    def draw(self, strategy):
        if not self.values:
            raise ValueError("the step draws more values than the printed example has")
        return self.values.pop(0)


def parse_steps(text: str) -> list[tuple[str, dict]]:
    """The steps of the last failing example in ``text`` (what ``memvisor selftest`` printed:
    ``state.rule(key=value, ...)`` lines, ``Draw N: value`` lines before the step that drew
    them), as ``(rule, keyword arguments)``. Values are read as Python literals, never run."""
    import ast

    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("state = ")]
    if not starts:
        raise ValueError("no failing example in it (no 'state = ...' line)")
    statements, current = [], ""
    for line in lines[starts[-1] + 1:]:  # join what one statement spreads over several lines
        current = f"{current}\n{line}" if current else line
        body = current.split(":", 1)[1] if current.startswith("Draw ") else current
        try:
            ast.parse(body.strip())
        except SyntaxError:
            continue
        statements.append(current)
        current = ""
    steps, draws = [], []
    for statement in statements:
        if statement.startswith("Draw "):
            draws.append(ast.literal_eval(statement.split(":", 1)[1].strip()))
            continue
        if not statement.startswith("state."):
            continue
        call = ast.parse(statement.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
            raise ValueError(f"not a step: {statement.strip()[:80]}")
        kwargs = {}
        for keyword in call.keywords:
            if keyword.arg == "data":
                kwargs["data"] = _Draws(draws)
            else:
                kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        draws = []
        steps.append((call.func.attr, kwargs))
    return steps


def replay(text: str) -> int:
    """Replay the last failing example printed in ``text`` step by step, checking the
    invariants after each as the state machine does; raises the failure again (an
    ``AssertionError`` with its message) or returns the number of steps replayed."""
    machine = machine_class(final_fault_check=True)()
    steps = parse_steps(text)
    for name, kwargs in steps:
        if name == "teardown":
            machine.teardown()
            continue
        method = getattr(machine, name, None)
        if method is None:
            raise ValueError(f"unknown step {name!r}: printed by another version of memvisor?")
        method(**kwargs)
    return len(steps)


def run(max_examples: int, steps: int = 30, seconds: float | None = None, seed: int | None = None,
        shrink: bool = False, final_fault_check: bool = True, model: str = "bytes") -> dict:
    """Run the state machine for ``max_examples`` examples (or until ``seconds`` have passed,
    whichever comes first); returns the figures. Raises on the first failure, with the steps
    that led to it (shrunk to fewer steps when ``shrink``: minutes for this machine)."""
    import time

    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    machine = machine_class(final_fault_check, model)
    totals = {"examples": 0, "steps": 0, "memory_errors": 0, "lost": 0, "repaired": 0, "migrations": 0,
              "checkpoints": 0, "restores": 0, "refused_restores": 0}
    deadline = None if seconds is None else time.monotonic() + seconds

    class Counted(machine):
        def teardown(self):
            super().teardown()
            totals["examples"] += 1
            for key, value in self.counts.items():
                totals[key] += value

    batch = max_examples if deadline is None else min(max_examples, 20)
    done = 0
    while done < max_examples:
        run_state_machine_as_test(Counted, settings=settings(
            max_examples=min(batch, max_examples - done), stateful_step_count=steps, deadline=None,
            database=None, derandomize=seed is not None and done == 0,
            phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
            suppress_health_check=list(HealthCheck)))
        done += batch
        if deadline is not None and time.monotonic() >= deadline:
            break
    return totals
