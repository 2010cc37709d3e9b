"""Every technique at once: a hypothesis state machine that drives one host with every installed
plugin.

The machine enables every installed plugin (the allow- and block-lists apply) on one emulated
two-node host with several small VMs, and drives it through random interleavings of the core's
steps: guest reads and writes, whole-page writes, disk reads and writes, time passing (every
plugin's ticks), memory pressure, NUMA moves, checkpoint saves (lazy or not) while the guest
runs, restores, live migrations to a second host and memory errors. Plugins add what only they
know through :func:`memvisor_selftest` (a :class:`Selftest`): their settings on the machine's
hosts, steps of their own (a balloon inflating, a scanner running now), checks of their own
bookkeeping, and the pages whose contents a guest driver of theirs set. After every step the
machine checks:

- every guest page reads what the reference model says (:class:`IntegrationModel`): pages a
  plugin's guest driver took read what the plugin says they read (the guest gave them up);
  pages a memory error hit and nobody repaired are *unknown* (reported lost to the guest);
  everything else is exact;
- machine-page reference counts and the free pool are exact (the emulator recounts every page,
  ``Backend.check_invariants``), and the only pages held outside page tables are those the
  plugins say they hold;
- every plugin's own check (no bookkeeping points at a page another plugin changed behind it).

pytest runs it with a small budget (``tests/integration/``); ``memvisor selftest`` runs it for
as long as asked. Imports of hypothesis stay inside the functions that need them, so importing
:mod:`memvisor.testing` stays light. The core names no plugin here: a plugin installed beside
the others takes part as they do.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from memvisor import PAGE_SIZE
from memvisor.testing.reference import ReferenceMemory

VM_PAGES = 1024
"""Pages of each VM (two 2 MiB large pages: a technique can split and collapse them)."""

VMS = 3
"""VMs on the machine's host (VM 1 has a tight trap budget; VM 0 a disk)."""
DISK_BLOCKS = 256
"""Blocks of VM 0's disk (the last 128 pages of VM 0 are page cache of it)."""

CORE_STEPS = ("setup", "guest_accesses", "guest_writes_pages", "disk_io", "transfer", "time_passes", "pressure",
              "move_vcpus", "checkpoint_save", "checkpoint_restore", "migrate", "memory_error", "teardown")
"""Names of the core's own steps (a plugin's step may not take one)."""


@attrs.frozen
class SelftestStep:
    """A step a plugin adds to the machine (:meth:`Selftest.step`).

    :ivar plugin: the plugin's name.
    :ivar name: the step's name (what a failing example prints: ``state.NAME(...)``).
    :ivar function: ``function(plugin, host, vm=..., **arguments)``.
    :ivar arguments: each whole-number argument and its range ``(low, high)``, inclusive.
    :ivar vm: whether the step acts on one VM (drawn by the machine and passed as ``vm``).
    :ivar during_migration: when not None, the range of the step's one argument when the step
        also runs while a live migration's guests run (0: not this time).
    """

    plugin: str
    name: str
    function: Callable[..., Any]
    arguments: Mapping[str, tuple[int, int]]
    vm: bool = True
    during_migration: tuple[int, int] | None = None


class Selftest:
    """What plugins contribute to the all-techniques machine, through
    :func:`memvisor_selftest`. The core calls each plugin's implementation in turn; every
    function registered here gets the machine's host's instance of that plugin first."""

    def __init__(self) -> None:
        self.current_plugin = "?"
        self.tables: dict[str, dict] = {}
        self.steps: dict[str, SelftestStep] = {}
        self.checks: list[tuple[str, Callable]] = []
        self.views: list[tuple[str, Callable]] = []
        self.commands: dict[str, dict] = {}

    def settings(self, table: Mapping[str, Any]) -> None:
        """The plugin's ``[plugins.NAME]`` table on the machine's hosts (small budgets and short
        delays, so that a few dozen steps see it act)."""
        self.tables[self.current_plugin] = dict(table)

    def step(self, name: str, function: Callable[..., Any], *, vm: bool = True,
             during_migration: tuple[int, int] | None = None, **arguments: tuple[int, int]) -> None:
        """A step of the plugin's own: ``function(plugin, host, vm=VM, **arguments)``, each
        argument a whole number drawn from its ``(low, high)`` range; ``vm=False`` for a step
        on the whole host. ``during_migration=(low, high)``: the step (of one argument) also
        runs while a migration's guests run, with its argument drawn from that range."""
        if name in CORE_STEPS or name in self.steps:
            owner = "the core" if name in CORE_STEPS else f"plugin {self.steps[name].plugin!r}"
            raise ValueError(f"plugin {self.current_plugin!r}: selftest step {name!r} is {owner}'s already")
        if during_migration is not None and len(arguments) != 1:
            raise ValueError(f"plugin {self.current_plugin!r}: step {name!r} runs during migrations, so it takes "
                             f"one argument (it has {len(arguments)})")
        self.steps[name] = SelftestStep(self.current_plugin, name, function, dict(arguments), vm, during_migration)

    def check(self, function: Callable[..., int | None]) -> None:
        """``function(plugin, host)`` after every step: raise ``AssertionError`` saying what is
        wrong with the plugin's bookkeeping; return the machine pages the plugin holds outside
        page tables (``backend.hold_page``), or None for none."""
        self.checks.append((self.current_plugin, function))

    def guest_view(self, function: Callable[..., Any]) -> None:
        """``function(plugin, host, vm)`` after every step: ``(gpps, data)``, the pages of
        ``vm`` the guest gave up to the plugin's guest driver (``host.pin_guest_pages``) and
        what they read now (``data`` None: zeros), or None. The model expects those bytes from
        then on, until the guest writes the pages again."""
        self.views.append((self.current_plugin, function))

    def command(self, path: str, arguments: Mapping[str, object]) -> None:
        """A valid invocation of one of the plugin's commands for the CLI matrix
        (:mod:`memvisor.testing.cli_matrix`), by parameter name; ``{scenario}``, ``{image}``,
        ``{disk}``, ``{ckpt}``, ``{trace}``, ``{key}`` and ``{out}`` name the sandbox's files."""
        self.commands[path] = dict(arguments)


def contributions(pm=None) -> Selftest:
    """What the plugins of ``pm`` (every installed plugin when None) contribute."""
    from memvisor.plugins import new_plugin_manager

    pm = pm or new_plugin_manager(None, strict=False)
    selftest = Selftest()
    for impl in reversed(pm.hook.memvisor_selftest.get_hookimpls()):
        selftest.current_plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
        impl.function(selftest=selftest)
    return selftest


def machine_plugins() -> tuple[str, ...]:
    """The plugins the machine enables: every installed one that loads (the allow- and
    block-lists apply)."""
    from memvisor.plugins import installed_plugins

    return tuple(p.name for p in installed_plugins() if p.error is None)


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
    """The hypothesis rule-based state machine (built lazily: hypothesis is a test tool), with
    the steps the installed plugins add.

    ``final_fault_check``: at the end of each example, after the host stops, read every page
    the way the guest does (faults served), not only the present ones that the per-step
    invariant reads (it found the pages a refused restore left to be zero-filled).
    ``model``: the hosts' machine model, ``"bytes"`` or ``"identity"`` (the model of guest
    memory stays bytes: an identity host's pages are read back as the bytes they name)."""
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

    from memvisor.builtins.checkpoint import CheckpointError
    from memvisor.builtins.migration import LiveMigration, MigrationOptions
    from memvisor.events import RestoreRequest, SaveRequest
    from memvisor.identity import as_bytes
    from memvisor.testing import small_host

    plugins = machine_plugins()
    offered = contributions()
    added = {name: s for name, s in offered.steps.items() if s.plugin in plugins}
    checks = [(p, f) for p, f in offered.checks if p in plugins]
    views = [(p, f) for p, f in offered.views if p in plugins]
    tables = {p: t for p, t in offered.tables.items() if p in plugins}
    during = {name: s for name, s in added.items() if s.during_migration is not None}

    vm_index = st.integers(0, VMS - 1)
    page_lists = st.lists(st.integers(0, VM_PAGES - 1), min_size=1, max_size=64, unique=True)

    class AllTechniques(RuleBasedStateMachine):
        """Random guest and hypervisor activity with every installed plugin on one host."""

        def __init__(self):
            super().__init__()
            self._tmp = tempfile.TemporaryDirectory(prefix="memvisor-integration-")
            self.workdir = Path(self._tmp.name)
            self.counts = {"steps": 0, "memory_errors": 0, "lost": 0, "repaired": 0, "migrations": 0,
                           "checkpoints": 0, "restores": 0, "refused_restores": 0}
            self.plugin_steps: dict[str, int] = {}

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
            from memvisor.budgets import Budget
            from memvisor.contents import ContentSpec

            self.host = small_host(memory_pages=8192, numa_nodes=2, plugins=plugins, settings=tables, seed=seed,
                                   contents=model)
            contents = ContentSpec.parse({"zero": 0.4, "text": 0.3, "random": 0.2, "duplicate": 0.1}, "contents")
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
            self.viewed: dict[tuple[str, str], set] = {}
            self.transfer(list(range(VM_PAGES - 128, VM_PAGES)), list(range(128)), [False] * 128)
            self.checkpoints: dict[str, tuple[str, np.ndarray, np.ndarray, object]] = {}
            self.sync()

        # -- helpers --------------------------------------------------------------------------

        def plugin(self, name: str):
            """The host's instance of plugin ``name``."""
            return self.host.pm.get_plugin(name)

        def sync(self, *, restored: bool = False):
            """Pages a plugin's guest driver took read what the plugin says (the guest gave
            them up). Every such page is set in the model, not only those new since the last
            sync: a page can leave a driver, be written by the guest and join again between two
            syncs (ticks deflate and reload balloons while a migration's guests run). A page
            that joins must be one the guest gave up; after a restore the drivers start over."""
            for name, view in views:
                for vm in self.vms:
                    seen = view(self.plugin(name), self.host, vm)
                    gpps, data = (np.zeros(0, dtype=np.int64), None) if seen is None else seen
                    gpps = np.asarray(gpps, dtype=np.int64)
                    now = set(gpps.tolist())
                    new = np.array(sorted(now - self.viewed.get((name, vm.name), set())), dtype=np.int64)
                    if len(new) and not restored:
                        assert self.host.guest_pinned(vm)[new].all(), \
                            f"plugin {name!r}: a page the guest did not give up was taken (VM {vm.name})"
                    self.model.expected[vm.name][gpps] = 0 if data is None else data
                    self.model.known[vm.name][gpps] = True
                    self.viewed[(name, vm.name)] = now
            self.counts["steps"] += 1

        def describe_pages(self, vm, pages) -> str:
            """What the host knows of ``pages`` (for failure messages)."""
            backend = self.host.backend
            src = backend.read(vm, pages[backend.present(vm, pages)])
            return (f"pinned {int(self.host.guest_pinned(vm)[pages].sum())}, present "
                    f"{int(backend.present(vm, pages).sum())}, zero on the source {int((~src.any(axis=1)).sum())}, "
                    f"zero in the model {int((~self.model.expected[vm.name][pages].any(axis=1)).sum())}")

        def check_all(self, *, fault: bool):
            for vm in self.vms:
                bad = self.model.unexpected_pages(self.host, vm, fault=fault)
                assert not len(bad), (f"VM {vm.name}: {len(bad)} pages differ from the model, "
                                      f"first {bad[:8].tolist()}")

        def run_step(self, step: SelftestStep, vm=None, **arguments):
            """A plugin's step on the host's instance of the plugin."""
            kwargs = dict(arguments)
            if step.vm:
                kwargs["vm"] = vm
            step.function(self.plugin(step.plugin), self.host, **kwargs)
            key = f"{step.plugin}.{step.name}"
            self.plugin_steps[key] = self.plugin_steps.get(key, 0) + 1

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
            """Whole-page writes (pages a driver took included: a misbehaving or rebooted guest)."""
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
            """Ticks: every plugin's periodic work (background saves, prefetch, scans, reloads)."""
            self.host.advance(ticks * self.host.tick_interval)
            self.sync()

        @rule(free_target=st.integers(0, 6000))
        def pressure(self, free_target):
            """Memory pressure: every reclaimer in its order."""
            self.host.check_pressure(free_target)
            self.sync()

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
            self.sync(restored=True)

        # -- migration ------------------------------------------------------------------------

        def migrate(self, v, postcopy, **amounts):
            """Live-migrate a VM to a second host while its guest writes and the plugins' steps
            that run during migrations run (with the drawn ``amounts``); the destination must
            read what the model says, then it is discarded."""
            vm = self.vms[v]
            destination = small_host(memory_pages=8192, numa_nodes=2, plugins=plugins, settings=tables,
                                     contents=model)
            migration = LiveMigration(self.host, vm, destination, MigrationOptions(postcopy=postcopy, max_rounds=3))

            def run_guests(seconds):
                gpps = np.arange(0, VM_PAGES, 7)
                writes = (gpps % 3) == 0
                self.host.advance(self.model.access(self.host, vm, gpps, writes).seconds)
                for name, amount in amounts.items():
                    if amount:
                        (argument,) = during[name].arguments
                        self.run_step(during[name], vm, **{argument: amount})
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
            """Reference counts and the free pool are exact, the pages held outside page tables
            are those the plugins hold, and every plugin's own check passes."""
            if not hasattr(self, "model"):
                return
            held = 0
            for name, check in checks:
                held += check(self.plugin(name), self.host) or 0
            assert self.host.backend.check_invariants() == held

    rules = {"migrate": rule(v=vm_index, postcopy=st.booleans(),
                             **{name: st.integers(*s.during_migration) for name, s in during.items()})(
        AllTechniques.migrate)}
    for name, step in added.items():
        rules[name] = _plugin_rule(step, vm_index, rule, st)
    return type("AllTechniques", (AllTechniques,), rules)


def _plugin_rule(step: SelftestStep, vm_index, rule, st):
    """The hypothesis rule of a plugin's step: its arguments drawn from their ranges, and the
    VM when it takes one (``v``), as a failing example prints it: ``state.NAME(v=1, count=3)``."""
    strategies = {argument: st.integers(low, high) for argument, (low, high) in step.arguments.items()}

    def perform(self, v=None, **arguments):
        self.run_step(step, None if v is None else self.vms[v], **arguments)
        self.sync()

    perform.__name__ = step.name
    perform.__doc__ = f"Plugin {step.plugin!r}'s step {step.name!r}."
    if step.vm:
        strategies["v"] = vm_index
    return rule(**strategies)(perform)


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
            raise ValueError(f"unknown step {name!r}: printed by another version of memvisor, or a step of a "
                             f"plugin that is not installed here?")
        method(**kwargs)
    return len(steps)


def run(max_examples: int, steps: int = 30, seconds: float | None = None, seed: int | None = None,
        shrink: bool = False, final_fault_check: bool = True, model: str = "bytes") -> dict:
    """Run the state machine for ``max_examples`` examples (or until ``seconds`` have passed,
    whichever comes first); returns the figures, with the plugins that took part and how often
    each plugin's steps ran. Raises on the first failure, with the steps that led to it
    (shrunk to fewer steps when ``shrink``: minutes for this machine)."""
    import time

    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    machine = machine_class(final_fault_check, model)
    totals = {"examples": 0, "steps": 0, "memory_errors": 0, "lost": 0, "repaired": 0, "migrations": 0,
              "checkpoints": 0, "restores": 0, "refused_restores": 0, "plugins": list(machine_plugins()),
              "plugin_steps": {}}
    deadline = None if seconds is None else time.monotonic() + seconds

    class Counted(machine):
        def teardown(self):
            super().teardown()
            totals["examples"] += 1
            for key, value in self.counts.items():
                totals[key] += value
            for key, value in self.plugin_steps.items():
                totals["plugin_steps"][key] = totals["plugin_steps"].get(key, 0) + value

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
    totals["plugin_steps"] = dict(sorted(totals["plugin_steps"].items()))
    return totals
