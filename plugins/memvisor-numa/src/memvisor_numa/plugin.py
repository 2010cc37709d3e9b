"""The numa plugin: after a VM's virtual CPUs move to another NUMA node, migrate its pages to
the new node, most used first, within the interconnect's bandwidth, and measure how fast its
accesses become local again."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs
import numpy as np
import structlog

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE, hookimpl
from memvisor.backend import Capability
from memvisor.errors import CapabilityError
from memvisor.report import Column, Figure, Headline, Plot, ReportSection, Table
from memvisor_numa.heuristics import AGE_DTYPE, HEURISTIC_CLASSES, Heuristic
from memvisor_numa.locality import time_to_reach
from memvisor_numa.settings import DEFAULT_NUMA_GIB_PER_S, HOT_FIRST, NumaSettings, bandwidth_pages, resolve

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.host import VM, Host

log = structlog.get_logger("memvisor.numa")


@attrs.define(eq=False)
class Move:
    """One move of a VM's virtual CPUs and what the migration that followed did.

    :ivar time: when the virtual CPUs moved (seconds).
    :ivar old_node: node before.
    :ivar new_node: node after (the migration's target).
    :ivar migrated_pages: pages migrated while this move was the latest.
    :ivar stopped: when the stop rule ended the migration, or None.
    :ivar first_sample: index of the first locality sample taken after the move (every
        access it counts came after the move).
    """

    time: float
    old_node: int
    new_node: int
    migrated_pages: int = 0
    stopped: float | None = None
    first_sample: int = 0


@attrs.define(eq=False)
class VmNuma:
    """The plugin's state for one VM: ages, order or queue, and what it measured."""

    vm: VM
    rng: np.random.Generator
    age: np.ndarray | None = None  # uint32 per page, for the aging heuristics
    seen_scans: np.ndarray | None = None  # uint8: set bits of age, kept as the scans go
    seen: np.ndarray | None = None  # accessed bits taken at migration, folded in at the next scan
    untouched: np.ndarray | None = None  # migrated and not touched since
    armed: np.ndarray | None = None  # traced by this plugin
    remote: np.ndarray | None = None  # on another node than the target, as of the move, minus what moved
    order: np.ndarray = attrs.field(factory=lambda: np.empty(0, np.int64))
    pos: int = 0
    queue: list = attrs.field(factory=list)
    pool: np.ndarray = attrs.field(factory=lambda: np.empty(0, np.int64))
    pool_pos: int = 0
    active: bool = False
    target: int = 0
    good_ticks: int = 0
    moves: list[Move] = attrs.field(factory=list)
    migrated: int = 0
    resumes: int = 0
    heat_source: str | None = None
    last_counts: tuple[int, int] = (0, 0)
    scanned_at: tuple[int, int] = (0, 0)  # (accesses, tick number) at the last scan
    scan_period: int = 1  # ticks between the last two scans
    times: list[float] = attrs.field(factory=list)
    local: list[float] = attrs.field(factory=list)

    def set_order(self, pages: np.ndarray) -> None:
        """Replace the order (best first) and rewind its cursor."""
        self.order, self.pos = np.asarray(pages, dtype=np.int64), 0

    def ensure_armed(self) -> None:
        """Allocate the mask of pages this plugin traced."""
        if self.armed is None:
            self.armed = np.zeros(self.vm.pages, dtype=bool)


class NumaPlugin:
    """Migrates a moved VM's memory to its new node, most used pages first (``heuristic``),
    ``pages_per_tick`` at most per tick, and reports how soon accesses become local."""

    def __init__(self) -> None:
        self.settings = NumaSettings()
        self.bandwidth_pages = 0  # the most the interconnect carries per tick (set when the host starts)
        self.heuristic: Heuristic = HEURISTIC_CLASSES["scan"]()
        self.vms: dict[str, VmNuma] = {}
        self.budget_left = 0
        self.split_pages = 0
        self.real_seconds = 0.0  # the plugin's own work, without the copies (for the benchmark)
        self.migrate_seconds = 0.0  # inside backend.migrate: the emulator copying page bytes
        self._full_nodes: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    @hookimpl
    def memvisor_selftest(self, selftest):
        """Accessed-bit scanning on the machine's hosts, and a tiny `memvisor numa compare`."""
        selftest.settings({"heuristic": "scan"})
        selftest.command("numa compare", {"vm_bytes": "4MiB", "pre": "0.001", "post": "0.001",
                                          "json_out": "{out}/numa.json"})

    @hookimpl
    def memvisor_register_hookspecs(self, register):
        """Declare ``memvisor_page_heat``, which the ``mrc`` heuristic asks."""
        from memvisor_numa import hookspecs

        register(hookspecs)

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare ``[plugins.numa]``."""
        register("numa", NumaSettings)

    @hookimpl
    def memvisor_host_started(self, host):
        """Read the settings; refuse a host with one NUMA node (there is nowhere to migrate)."""
        if Capability.NUMA not in host.backend.capabilities or host.backend.numa_nodes < 2:
            raise CapabilityError(
                f"plugin 'numa' cannot migrate: backend {host.backend.name!r} has "
                f"{host.backend.numa_nodes} NUMA node(s) (set host.numa_nodes = 2 or more)")
        page_seconds = host.backend.work_seconds("numa_copy", PAGE_SIZE)
        # No cost model (a real clock): the emulator's default bandwidth bounds the budget.
        gib_per_s = DEFAULT_NUMA_GIB_PER_S if not page_seconds else PAGE_SIZE / page_seconds / 2**30
        self.bandwidth_pages = bandwidth_pages(gib_per_s, host.tick_interval)
        self.settings = resolve(host.plugin_settings("numa"), limit=self.bandwidth_pages, seed=host.config.seed,
                                low_watermark=host.config.low_watermark)
        self.heuristic = HEURISTIC_CLASSES[self.settings.heuristic]()
        needs = [Capability.ACCESSED]
        if self.heuristic.traps:
            needs.append(Capability.TRACE)
        host.require("numa", *needs)
        self.budget_left = self.settings.pages_per_tick

    @hookimpl
    def memvisor_vm_created(self, host, vm):
        """Start keeping the VM's state (and its ages, for the aging heuristics)."""
        st = VmNuma(vm, np.random.default_rng([self.settings.seed, vm.id]), target=vm.home_node)
        if self.heuristic.ages:
            st.age = np.zeros(vm.pages, dtype=AGE_DTYPE)
            st.seen_scans = np.zeros(vm.pages, dtype=np.uint8)
        self.vms[vm.name] = st

    @hookimpl
    def memvisor_vm_destroyed(self, host, vm):
        """Forget the VM (its pages go with it)."""
        self.vms.pop(vm.name, None)

    @hookimpl
    def memvisor_vcpus_moved(self, host, vm, move):
        """Start migrating toward the new node; a move back mid-migration restarts the order
        toward the old node (pages that went over come back, the others never moved)."""
        started = time.perf_counter()
        st = self.vms[vm.name]
        if st.active:
            self._stop(host, st, stopped=None)
        # Close the locality window at the move: the accesses before it are not evidence of
        # how fast the migration made them local (a tick due at the move's instant, sampled
        # before it, once passed for 100% local a float-rounding instant after the move).
        self._sample_locality(host, st, host.now)
        st.moves.append(Move(move.time, move.old_node, move.new_node, first_sample=len(st.times)))
        self._begin(host, st)
        # Migration starts at the move, with what is left of this tick's budget, not a tick later.
        migrate_before = self.migrate_seconds
        self.drain(host, st)
        started += self.migrate_seconds - migrate_before  # the copies are not the plugin's own time
        self.real_seconds += time.perf_counter() - started

    @hookimpl
    def memvisor_traced_access(self, host, vm, access):
        """Traps of pages this plugin traced: hand them to the heuristic."""
        st = self.vms.get(vm.name)
        if st is None or st.armed is None:
            return
        started, migrate_before = time.perf_counter(), self.migrate_seconds
        mine = access.gpps[st.armed[access.gpps]]  # other plugins trace pages too
        if len(mine):
            st.armed[mine] = False
            if st.active:
                self.heuristic.trapped(self, host, st, mine)
        self.real_seconds += time.perf_counter() - started - (self.migrate_seconds - migrate_before)

    @hookimpl
    def memvisor_tick(self, host, tick):
        """Measure locality, scan accessed bits, apply the stop rule and migrate a budget."""
        started = time.perf_counter()
        migrate_before = self.migrate_seconds
        self.budget_left = self.settings.pages_per_tick
        for st in list(self.vms.values()):
            local = self._sample_locality(host, st, host.now)
            scan = self.heuristic.ages and self._scan_due(st, tick.number)
            if scan:
                self._scan(host, st)
            if st.active:
                self._stop_rule(host, st, local, tick.now)
            elif st.moves and local == local and local < self.settings.resume_local:
                st.resumes += 1  # the working set went remote again (a new phase touches cold pages)
                self._begin(host, st)
            if st.active:
                self.heuristic.tick(self, host, st, scan)
                self.drain(host, st)
        self.real_seconds += time.perf_counter() - started - (self.migrate_seconds - migrate_before)

    @hookimpl
    def memvisor_host_stopping(self, host):
        """Stop every migration and count the migrated pages the guest never touched since."""
        for st in self.vms.values():
            if st.active:
                self._stop(host, st, stopped=None)
            self._scan(host, st, final=True)

    # -- the migration engine -------------------------------------------------------------------

    def refresh_limit(self, st: VmNuma) -> int:
        """How many pages an order holds: what can move before the next scan refreshes it, and
        a quarter more for pages that turn out not to be movable."""
        return self.settings.pages_per_tick * (st.scan_period + st.scan_period // 4 + 1)

    def _scan_due(self, st: VmNuma, tick_number: int) -> bool:
        """Whether the VM made ``scan_window`` accesses per page since its last scan."""
        accesses = st.last_counts[0]
        if accesses - st.scanned_at[0] < self.settings.scan_window * st.vm.pages:
            return False
        st.scan_period = max(1, tick_number - st.scanned_at[1])
        st.scanned_at = (accesses, tick_number)
        return True

    def remote_mask(self, host: Host, st: VmNuma) -> np.ndarray:
        """Per page of the VM, whether it is on another node than the target.

        Read from the backend when a migration begins and kept up to date as pages move, so
        that a refresh of the order costs no walk of the page table. Pages that leave the
        target some other way (a spill) are seen at the next move or resume; pages that
        stopped being movable are filtered when they are drained.
        """
        if st.remote is None:
            nodes = host.backend.node_of(st.vm)
            st.remote = (nodes >= 0) & (nodes != st.target)
        return st.remote

    def _begin(self, host: Host, st: VmNuma) -> None:
        st.active, st.good_ticks, st.target = True, 0, st.vm.home_node
        st.queue.clear()
        st.remote = None  # read again: toward a new target
        self.heuristic.begin(self, host, st)

    def _stop(self, host: Host, st: VmNuma, stopped: float | None) -> None:
        st.active = False
        self.heuristic.end(self, host, st)
        if stopped is not None and st.moves and st.moves[-1].stopped is None:
            st.moves[-1].stopped = stopped

    def _stop_rule(self, host: Host, st: VmNuma, local: float, now: float) -> None:
        """Stop once ``stop_local`` of the accesses were local for ``stop_ticks`` ticks in a row."""
        if local != local:  # no accesses in this tick: nothing learnt
            return
        st.good_ticks = st.good_ticks + 1 if local >= self.settings.stop_local else 0
        if st.good_ticks >= self.settings.stop_ticks:
            self._stop(host, st, stopped=now)

    def _sample_locality(self, host: Host, st: VmNuma, now: float) -> float:
        """Fraction of the VM's accesses since the last sample that were local (NaN if none),
        kept as the sample at ``now`` (the host's time: the accesses counted are those made
        up to it, as in the core's own series).

        Read from the core's counters, which the core keeps per VM for its own report.
        """
        counters = host.counters(st.vm)
        if not any(counters.values()):  # the VM has not run a batch yet
            return float("nan")
        counts = (counters["accesses"], counters["remote"])
        accesses, remote = counts[0] - st.last_counts[0], counts[1] - st.last_counts[1]
        st.last_counts = counts
        local = 1.0 - remote / accesses if accesses else float("nan")
        st.times.append(now)
        st.local.append(local)
        return local

    def _scan(self, host: Host, st: VmNuma, final: bool = False) -> None:
        """Read and clear the accessed bits: age the pages, and strike migrated pages off the
        untouched list. Without aging only the migrated pages' bits are read (at the end)."""
        vm = st.vm
        if st.age is None:
            if final and st.untouched is not None:
                pages = np.flatnonzero(st.untouched)
                if len(pages):
                    st.untouched[pages[host.take_accessed(vm, "numa", pages)]] = False
            return
        accessed = host.take_accessed(vm, "numa")
        if st.untouched is not None:
            st.untouched &= ~accessed
        if st.seen is not None:
            accessed |= st.seen  # touches before a migration read the bits: still touches
            st.seen[:] = False
        # In place: at a million pages, fresh temporaries cost as much as the arithmetic.
        st.seen_scans -= (st.age & 1).astype(np.uint8)  # the oldest scan falls off
        st.seen_scans += accessed
        st.age >>= 1
        top = accessed.astype(AGE_DTYPE)
        top <<= AGE_DTYPE(31)
        st.age |= top

    def _capacity(self, host: Host, node: int) -> int:
        """Pages migration may still put on ``node``, leaving ``reserve`` of it free."""
        backend = host.backend
        reserve = int(self.settings.reserve * backend.total_pages(node))
        room = backend.free_pages(node) - reserve
        if room <= 0 and node not in self._full_nodes:
            self._full_nodes.add(node)
            log.warning("NUMA node full: migration to it waits for free memory", node=node,
                        free_pages=backend.free_pages(node), reserve_pages=reserve)
        elif room > 0:
            self._full_nodes.discard(node)
        return max(0, room)

    def _next_pages(self, st: VmNuma, n: int) -> np.ndarray:
        """Up to ``n`` more pages from the queue of traps, then from the order."""
        if st.queue:
            queued = np.concatenate(st.queue)
            st.queue.clear()
            take, rest = queued[:n], queued[n:]
            if len(rest):
                st.queue.append(rest)
            return take
        take = st.order[st.pos : st.pos + n]
        st.pos += len(take)
        return take

    def movable(self, host: Host, st: VmNuma, gpps: np.ndarray) -> np.ndarray:
        """The pages of ``gpps`` that can move to the target: present, elsewhere, private."""
        backend = host.backend
        nodes = backend.node_of(st.vm, gpps)
        mpns = backend.mpns(st.vm, gpps)
        ok = (nodes >= 0) & (nodes != st.target) & (mpns != backend.zero_mpn)
        ok[ok] = backend.refcounts(mpns[ok]) == 1  # shared (or held) pages stay: copy-on-write
        return gpps[ok]

    def drain(self, host: Host, st: VmNuma) -> int:
        """Migrate pages from the VM's queue and order until the tick's budget, the target's
        free memory or the candidates run out; returns pages migrated."""
        moved_total = 0
        while self.budget_left > 0:
            room = min(self.budget_left, self._capacity(host, st.target))
            if room <= 0:
                break
            pages = self._next_pages(st, room)
            if not len(pages):
                break
            pages = self.movable(host, st, pages)
            if not len(pages):
                continue
            moved = self._migrate(host, st, pages)
            moved_total += moved
            self.budget_left -= moved
        return moved_total

    def _migrate(self, host: Host, st: VmNuma, pages: np.ndarray) -> int:
        backend, vm = host.backend, st.vm
        large = backend.large(vm, pages)
        if large.any():
            if self.settings.split_large and Capability.LARGE_PAGES in backend.capabilities:
                # The emulator (like most hypervisors' copy paths) moves small pages only.
                self.split_pages += backend.split(vm, np.unique(pages[large] // LARGE_PAGE_PAGES)) * LARGE_PAGE_PAGES
            else:
                pages = pages[~large]
        started = time.perf_counter()
        backend.migrate(vm, pages, st.target)
        self.migrate_seconds += time.perf_counter() - started
        moved = pages[backend.node_of(vm, pages) == st.target]
        if st.remote is not None:
            st.remote[moved] = False
        # Bits set before the move are history for the ages, not evidence that it paid off:
        # clear them now so that the end of the run sees only later touches.
        before = host.take_accessed(vm, "numa", moved)
        if st.age is not None:
            if st.seen is None:
                st.seen = np.zeros(vm.pages, dtype=bool)
            st.seen[moved] |= before
        if st.untouched is None:
            st.untouched = np.zeros(vm.pages, dtype=bool)
        st.untouched[moved] = True
        st.migrated += len(moved)
        if st.moves:
            st.moves[-1].migrated_pages += len(moved)
        return len(moved)

    # -- registration ---------------------------------------------------------------------------

    @hookimpl
    def memvisor_register_commands(self, cli):
        """``memvisor numa compare``."""
        from memvisor_numa.compare import numa

        cli.add_command(numa)

    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """``memvisor bench numa``: time to 90% local against address order, and overhead."""
        from memvisor_numa.bench import cases

        for case in cases():
            register("numa", case)

    # -- report ---------------------------------------------------------------------------------

    def vm_metrics(self, st: VmNuma) -> dict:
        """The figures of one VM: per move, the time to 90% and 99% local accesses."""
        times, local = np.asarray(st.times), np.asarray(st.local)
        moves = []
        for index, move in enumerate(st.moves):
            until = st.moves[index + 1].time if index + 1 < len(st.moves) else float("inf")
            # Only the samples whose accesses all came after the move.
            after = slice(move.first_sample, None)
            moves.append({
                "time_s": move.time, "old_node": move.old_node, "new_node": move.new_node,
                "t90_s": time_to_reach(times[after], local[after], move.time, 0.90, until),
                "t99_s": time_to_reach(times[after], local[after], move.time, 0.99, until),
                "migrated_pages": move.migrated_pages, "stopped_s": move.stopped,
            })
        wasted = int(st.untouched.sum()) if st.untouched is not None else 0
        after = np.arange(len(times)) >= (st.moves[0].first_sample if st.moves else len(times))
        finite = after & np.isfinite(local)
        return {
            "migrated_pages": st.migrated, "migrated_bytes": st.migrated * PAGE_SIZE, "wasted_pages": wasted,
            "mean_local_fraction_after_move": float(local[finite].mean()) if finite.any() else None,
            "resumes": st.resumes, "heat_source": st.heat_source, "moves": moves,
        }

    @hookimpl
    def memvisor_report(self, host):
        """Bytes migrated, wasted migrations, times to 90% / 99% local, local fraction plot."""
        per_vm = {name: self.vm_metrics(st) for name, st in self.vms.items()}
        first = next((m["moves"][0] for m in per_vm.values() if m["moves"]), None)
        metrics = {
            "heuristic": self.settings.heuristic,
            "hot_first": self.settings.heuristic in HOT_FIRST,
            "pages_per_tick": self.settings.pages_per_tick,
            "bandwidth_pages_per_tick": self.bandwidth_pages,
            "t90_s": first["t90_s"] if first else None,
            "t99_s": first["t99_s"] if first else None,
            "migrated_pages": sum(m["migrated_pages"] for m in per_vm.values()),
            "migrated_bytes": sum(m["migrated_bytes"] for m in per_vm.values()),
            "wasted_pages": sum(m["wasted_pages"] for m in per_vm.values()),
            "split_pages": self.split_pages,
            "real_seconds": {"plugin": self.real_seconds, "migrate": self.migrate_seconds},
            "vms": per_vm,
        }
        series = {name: (st.times, st.local) for name, st in self.vms.items() if st.moves}
        plots = []
        if series:
            plots.append(Plot("numa-local-fraction", f"Local accesses over time ({self.settings.heuristic})",
                              "time (s)", "local fraction", series,
                              shows="The fraction of each moved VM's accesses since the previous sample that "
                                    "were local (a sample at every tick and at each move); the Moves table's "
                                    "90 % and 99 % local after are when it first reached 0.9 and 0.99 after "
                                    "the move."))
        return ReportSection(
            plugin="numa", title="NUMA migration", metrics=metrics, plots=plots, headlines=_headlines(per_vm),
            tables=TABLES,
            text=("After a VM's virtual CPUs move, its pages are migrated to the new node "
                  f"({self.settings.heuristic} order, at most {self.settings.pages_per_tick:,} pages per tick). "
                  "90 % / 99 % local after: time from the move until 90 % / 99 % of a tick's accesses are "
                  "local; not touched since: migrated pages the guest did not touch afterwards; heat from: "
                  "where the mrc heuristic's order came from. A dash (null in report.json): not reached, not "
                  "asked, or a VM that did not move."),
        )


def _headlines(per_vm: dict[str, dict]) -> list[Headline]:
    """Per move of a VM: what was migrated and how soon its accesses were local again."""
    out = []
    for name, vm in per_vm.items():
        for i, move in enumerate(vm["moves"]):
            def at(key: str, i: int = i, name: str = name) -> tuple:
                return ("vms", name, "moves", i, key)

            figures = {"heuristic": Figure(("heuristic",), "text"),
                       "pages": Figure(at("migrated_pages"), "pages", label="migrated"),
                       "node": Figure(at("new_node"), "text", label="to node")}
            text = "NUMA migration ({heuristic}) moved {pages} to node {node} after its move; "
            if move["t90_s"] is not None:
                figures["t90"] = Figure(at("t90_s"), "s", "lower", "90 % local after")
                text += "90 % of its accesses were local again after {t90}"
            else:
                text += "its accesses never came back to 90 % local"
            if len(vm["moves"]) == 1:
                figures["wasted"] = Figure(("vms", name, "wasted_pages"), "pages", "lower", "moved, not touched since")
                text += " ({wasted} of what moved not touched since)"
            out.append(Headline(text, figures, vm=name, key=f"move {i}"))
    return out


TABLES = (
    Table("", [Column("heuristic", "heuristic", "text"), Column("hot_first", "hottest first", "text"),
               Column("pages_per_tick", "pages per tick", "count"),
               Column("bandwidth_pages_per_tick", "bandwidth (pages per tick)", "count"),
               Column("t90_s", "90 % local after", "s", "not reached", help="of the first move"),
               Column("t99_s", "99 % local after", "s", "not reached", help="of the first move"),
               Column("migrated_pages", "migrated", "pages"),
               Column("wasted_pages", "not touched since", "pages", help="migrated pages the guest did not touch"),
               Column("split_pages", "large pages split", "count")], record=()),
    Table("Moves", [Column("time_s", "at", "s"), Column("old_node", "from node", "text"),
                    Column("new_node", "to node", "text"),
                    Column("t90_s", "90 % local after", "s", "not reached"),
                    Column("t99_s", "99 % local after", "s", "not reached"),
                    Column("migrated_pages", "migrated", "pages"),
                    Column("stopped_s", "stop rule ended it at", "s", "the stop rule did not end it")],
          rows=("vms", "*", "moves")),
    Table("VMs", [Column("migrated_pages", "migrated", "pages"), Column("wasted_pages", "not touched since", "pages"),
                  Column("mean_local_fraction_after_move", "local after the move", "fraction", "did not move",
                         help="mean share of local accesses after the move"),
                  Column("resumes", "migrations resumed", "count"),
                  Column("heat_source", "heat from", "text", "not asked")], rows=("vms",)),
)
"""The settings and figures, every move, and every VM."""
