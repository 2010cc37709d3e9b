"""The hook glue: the ``mrc`` plugin traces a spatial sample of each VM's pages and keeps its
miss-rate curve up to date while the VM runs.

- ``memvisor_vm_created``: trace the sampled pages (spatial hash, :mod:`memvisor_mrc.online`).
- ``memvisor_traced_access``: the sampled pages' traps (one batch, in first-touch order) go to
  the VM's online LRU and trap log; each page stays untraced for ``untrace_period``.
- ``memvisor_tick``: retrace the pages whose period ended; every ``refresh`` seconds compute a
  snapshot of the curve (the curve over time in the report).
- ``memvisor_page_heat`` and ``memvisor_giveable_pages``: answers for NUMA migration, lazy
  save and the balloon policy, from the LRU and the latest curve. Those plugins declare the
  hooks (``memvisor_register_hookspecs``); this one answers them where they are (hooks marked
  ``optionalhook``).
- ``memvisor_report``: the final curve, working sets, recommended size, traps; plots.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from memvisor import hookimpl, report
from memvisor.backend import Capability
from memvisor.report import Column, Figure, Headline, Plot, ReportSection
from memvisor.settings import Duration, setting
from memvisor.units import shown
from memvisor_mrc.curve import Curve
from memvisor_mrc.online import ESTIMATORS, VMTracker
from memvisor_mrc.summary import PAGE_SIZE, curve_points, describe, giveable_pages

__all__ = ["MRCPlugin", "MRCSettings"]

NAME = "mrc"
MIB = 2**20


@attrs.frozen
class MRCSettings:
    """What ``[plugins.mrc]`` may set (docs/mrc.md explains the modes)."""

    rate: float | None = setting(None, above=0.0, high=1.0,
                                 doc="Sampling rate R: a page is traced iff hash(gpp) mod 2^32 < R * 2^32; 0.01 "
                                     "unless given (fixed-rate mode); with sample_size, the initial rate (1.0 unless "
                                     "given).")
    sample_size: int | None = setting(None, low=1, high=10**12,
                                      doc="Fixed-size mode: at most this many touched pages per VM stay in the sample; "
                                          "the rate drops as the set grows (SHARDS s_max).")
    untrace_period: Duration = setting(0.0, low=0.0, doc="Virtual time a sampled page stays untraced after it "
                                                        "trapped; retraced from the first tick after it.")
    refresh: Duration = setting(0.1, above=0.0, doc="Time between snapshots of every VM's curve (the curve over "
                                                   "time).")
    miss_ratios: tuple[float, ...] = setting((0.1, 0.05, 0.01), low=0.0, high=1.0, min_items=1,
                                             doc="Miss ratios at which working-set sizes are reported.")
    tolerance: float = setting(0.01, low=0.0, high=1.0,
                               doc="The recommended size is within this miss ratio of the curve's floor.")
    estimator: str = setting("model", choices=ESTIMATORS,
                             doc="model: the untraced-period model (below); shards: the online histogram of the "
                                 "traps alone (the ablation).")
    seed: int = setting(0, low=0, doc="Seed of the page hash.")


@attrs.define
class _VMState:
    """One VM: its tracker, the latest curve and the snapshots so far."""

    vm: Any
    tracker: VMTracker
    curve: Curve | None = None
    curve_accesses: int = -1
    snapshots: list = attrs.field(factory=list)
    final: dict | None = None


class MRCPlugin:
    """Online miss-rate curves of every VM from a traced spatial sample of its pages."""

    def __init__(self) -> None:
        self.settings = MRCSettings()
        self.vms: dict[str, _VMState] = {}
        self.host = None
        self._next_refresh = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    @hookimpl
    def memvisor_selftest(self, selftest):
        """A tenth of the pages traced on the machine's hosts, and `memvisor mrc` of a trace."""
        selftest.settings({"rate": 0.1})
        selftest.command("mrc", {"trace": "{trace}", "json_out": "{out}/mrc.json", "plot_out": "{out}/mrc.png",
                                 "quiet": True})

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare ``[plugins.mrc]``."""
        register(NAME, MRCSettings)

    @hookimpl
    def memvisor_host_started(self, host):
        """Read ``[plugins.mrc]`` (the rate of the fixed-rate mode is 0.01 unless given) and
        check that the backend can trace pages."""
        settings = host.plugin_settings(NAME)
        if settings.rate is None and settings.sample_size is None:
            settings = attrs.evolve(settings, rate=0.01)
        self.settings = settings
        host.require(NAME, Capability.TRACE)
        self.host = host
        self._next_refresh = self.settings.refresh

    @hookimpl
    def memvisor_vm_created(self, host, vm):
        """Pick the VM's sampled pages by spatial hash and trace them."""
        s = self.settings
        tracker = VMTracker(vm.pages, s.rate, s.sample_size, s.seed)
        self.vms[vm.name] = _VMState(vm, tracker)
        host.backend.trace(vm, tracker.sample())

    @hookimpl
    def memvisor_vm_destroyed(self, host, vm):
        """Keep the VM's last figures for the report and drop its state."""
        state = self.vms.get(vm.name)
        if state is not None and state.final is None:
            self._snapshot(host, state)
            state.final = self._summary(host, state)
            state.tracker = None

    @hookimpl
    def memvisor_host_stopping(self, host):
        """Take the final snapshot of every VM that still runs."""
        for state in self.vms.values():
            if state.final is None:
                self._snapshot(host, state)
                state.final = self._summary(host, state)

    # -- traps and ticks -----------------------------------------------------------------------

    @hookimpl
    def memvisor_traced_access(self, host, vm, access):
        """Feed the sampled pages' traps to the VM's online LRU and trap log (one batch)."""
        state = self.vms.get(vm.name)
        if state is None or state.tracker is None:
            return
        # The core counts a batch's accesses after the batch, so this is where the batch starts
        # on the VM's access clock; positions place each trap inside it.
        start = _accesses(host, vm)
        left = state.tracker.on_traps(access.gpps, start + access.positions,
                                      access.time + self.settings.untrace_period)
        if len(left):  # fixed-size mode lowered the threshold: stop tracing those pages
            host.backend.untrace(vm, left)

    @hookimpl
    def memvisor_tick(self, host, tick):
        """Retrace pages whose untraced period ended; refresh the curves every ``refresh`` s."""
        for state in self.vms.values():
            if state.tracker is None:
                continue
            due = state.tracker.due_for_retrace(tick.now, _accesses(host, state.vm))
            if len(due):
                host.backend.trace(state.vm, due)
        if tick.now + 1e-12 >= self._next_refresh:
            self._next_refresh += self.settings.refresh * max(1, int((tick.now - self._next_refresh)
                                                                      // self.settings.refresh) + 1)
            for state in self.vms.values():
                if state.tracker is not None:
                    self._snapshot(host, state)

    # -- answers to other plugins --------------------------------------------------------------

    @hookimpl(optionalhook=True)
    def memvisor_page_heat(self, vm, gpps):
        """Recency of each page in the VM's LRU (1.0 most recent); 0 for unknown pages."""
        state = self.vms.get(vm.name)
        if state is None or state.tracker is None:
            return None
        return state.tracker.heat(gpps)

    @hookimpl(optionalhook=True)
    def memvisor_giveable_pages(self, host, vm, miss_ratio_increase):
        """Pages the VM can be without for at most ``miss_ratio_increase`` more misses,
        counted from its whole memory, the baseline being its current allocation (its pages
        minus those a guest driver pinned): see :func:`memvisor_mrc.summary.giveable_pages`."""
        state = self.vms.get(vm.name)
        if state is None or state.tracker is None:
            return None
        curve = self._current(host, state)
        if curve is None:
            return None
        allocation = vm.pages - int(np.count_nonzero(host.guest_pinned(vm)))
        return giveable_pages(curve, allocation, vm.pages, miss_ratio_increase)

    # -- registration --------------------------------------------------------------------------

    @hookimpl
    def memvisor_register_commands(self, cli):
        """Add ``memvisor mrc``."""
        from memvisor_mrc.cli import mrc

        cli.add_command(mrc)

    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """Add the ``memvisor bench mrc`` cases."""
        from memvisor_mrc.bench import cases

        for case in cases():
            register("mrc", case)

    # -- report --------------------------------------------------------------------------------

    @hookimpl
    def memvisor_report(self, host):
        """The final curve of every VM, its working sets and recommended size, traps; plots of
        the final curves and of each VM's curve over time."""
        if not self.vms:
            return None
        s = self.settings
        per_vm = {}
        for name, state in self.vms.items():
            per_vm[name] = state.final if state.final is not None else self._summary(host, state)
        curves = {name: _mib_series(m) for name, m in per_vm.items() if "miss_ratio" in m}
        final = Plot("mrc-final", "Miss-ratio curves (LRU), end of run", "memory (MiB, log scale)", "miss ratio",
                     curves, logx=True, ends_at={name: ("vms", name, "miss_ratio", -1) for name in curves},
                     shows="Each VM's miss ratio at each memory size of its curve (every point in report.json).")
        plots = [final]
        for name, state in self.vms.items():
            if len(state.snapshots) < 2:
                continue
            chosen = _spread(state.snapshots, 5)
            plots.append(Plot(f"mrc-over-time-{_slug(name)}", f"{name}: miss-ratio curve over time",
                              "memory (MiB, log scale)", "miss ratio",
                              {f"t={snap['time']:.3g}s": _mib_series(snap) for snap in chosen}, logx=True,
                              shows=f"The curve at {len(chosen)} of the {len(state.snapshots)} snapshots "
                                    f"(one every {shown(s.refresh, 's')}), the last at the end of the run."))
        if any(len(st.snapshots) >= 2 for st in self.vms.values()):
            target = f"{s.miss_ratios[0]:g}"
            # A curve that never comes down to the target has no working set there: a gap, not 0.
            sets = {name: ([snap["time"] for snap in st.snapshots],
                           [_pages_or_nan(snap["working_set_pages"].get(target)) * PAGE_SIZE / MIB
                            for snap in st.snapshots])
                    for name, st in self.vms.items() if st.snapshots}
            plots.append(Plot("mrc-working-set", f"Working-set size at miss ratio {target} over time", "time (s)",
                              "MiB", sets, scale=PAGE_SIZE / MIB,
                              ends_at={name: ("vms", name, "working_set_pages", target) for name in sets},
                              shows="A gap: the curve did not come down to that miss ratio then."))
        settings = {"rate": s.rate, "sample_size": s.sample_size, "untrace_period_s": s.untrace_period,
                    "refresh_s": s.refresh, "estimator": s.estimator, "seed": s.seed}
        return ReportSection(
            plugin=NAME,
            title="Miss-ratio curves",
            metrics={"trap_rate": _overall_trap_rate(per_vm), "settings": settings, "vms": per_vm},
            plots=plots, headlines=_headlines(per_vm), tables=_tables(s.miss_ratios),
            text=("LRU miss ratio against memory size for each VM, estimated online from a traced spatial "
                  "sample of its pages (SHARDS), with a model of the accesses that untraced periods hide. "
                  "Working sets: smallest memory reaching each miss ratio (null: the curve never comes "
                  f"down to it); recommended: within {s.tolerance:g} of the curve's floor. A null setting "
                  "is not set."),
        )

    # -- helpers -------------------------------------------------------------------------------

    def _current(self, host, state: _VMState) -> Curve | None:
        """The latest curve; computed now when no snapshot was taken yet."""
        if state.curve is None:
            accesses = _accesses(host, state.vm)
            if accesses == 0:
                return None
            state.curve = state.tracker.curve(accesses, self.settings.estimator)
            state.curve_accesses = accesses
        return state.curve

    def _snapshot(self, host, state: _VMState) -> None:
        accesses = _accesses(host, state.vm)
        if accesses == 0 or accesses == state.curve_accesses:
            return
        s = self.settings
        state.curve = state.tracker.curve(accesses, s.estimator)
        state.curve_accesses = accesses
        points = curve_points(state.curve, state.vm.pages, points=60)
        state.snapshots.append({"time": host.now, "accesses": accesses, "traps": state.tracker.traps, **points,
                                "working_set_pages": describe(state.curve, s.miss_ratios, s.tolerance,
                                                              state.vm.pages)["working_set_pages"]})

    def _summary(self, host, state: _VMState) -> dict:
        s = self.settings
        tracker = state.tracker
        accesses = _accesses(host, state.vm)
        curve = self._current(host, state) if tracker is not None else state.curve
        out = {"accesses": accesses, "traps": tracker.traps if tracker else 0,
               "trap_rate": (tracker.traps / accesses) if tracker and accesses else 0.0,
               "sampled_pages": tracker.sampled_pages if tracker else 0,
               "traced_pages": int(len(tracker.sample())) if tracker else 0,
               "rate": tracker.rate if tracker else None}
        if curve is not None:
            out.update(describe(curve, s.miss_ratios, s.tolerance, state.vm.pages))
        else:
            out.update(cache_pages=[0], cache_bytes=[0], miss_ratio=[1.0])
        out["snapshots"] = state.snapshots
        return out


def _overall_trap_rate(per_vm: Mapping[str, dict]) -> float:
    """Traps per guest access over every VM."""
    accesses = sum(m["accesses"] for m in per_vm.values())
    return sum(m["traps"] for m in per_vm.values()) / accesses if accesses else 0.0


def _accesses(host, vm) -> int:
    """The VM's access clock: accesses of every batch finished so far."""
    return int(host.counters(vm)["accesses"])


def _pages_or_nan(pages: int | None) -> float:
    return float("nan") if pages is None else float(pages)


def _mib_series(points: Mapping[str, list]) -> tuple[list, list]:
    """A curve's points as (MiB, miss ratio), size 0 left out (the plots' x axes are logarithmic:
    an MRC's detail is at small sizes)."""
    pairs = [(p * PAGE_SIZE / MIB, r) for p, r in zip(points["cache_pages"], points["miss_ratio"]) if p > 0]
    return [p for p, _ in pairs], [r for _, r in pairs]


def _spread(items: Sequence, count: int) -> list:
    """Up to ``count`` items evenly spread over ``items``, the last one included."""
    if len(items) <= count:
        return list(items)
    picks = np.unique(np.rint(np.linspace(0, len(items) - 1, count)).astype(int))
    return [items[i] for i in picks]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "vm"


def _headlines(per_vm: Mapping[str, dict]) -> list[Headline]:
    """Each VM's recommended size, from how many traps of how many sampled pages."""
    return [Headline("its miss-ratio curve recommends {size} (miss ratio {ratio} there), measured from {traps} traps "
                     "of {sampled} sampled pages",
                     {"size": Figure(("vms", name, "recommended_pages"), "pages", label="recommended size"),
                      "ratio": Figure(("vms", name, "recommended_miss_ratio"), "fraction", label="miss ratio there"),
                      "traps": Figure(("vms", name, "traps"), "count", "lower"),
                      "sampled": Figure(("vms", name, "sampled_pages"), "count")}, vm=name)
            for name, m in per_vm.items() if "recommended_pages" in m]


def _tables(miss_ratios: tuple[float, ...]) -> list[report.Table]:
    """Each VM's curve in figures, and the settings."""
    never = "the curve never comes down to it"
    return [
        report.Table("", [Column("trap_rate", "traps per access", "fraction")], record=()),
        report.Table("Curves", [Column("accesses", "accesses", "count"), Column("traps", "traps", "count"),
                         Column("trap_rate", "traps per access", "fraction"),
                         Column("sampled_pages", "sampled pages", "count"),
                         Column("rate", "sampling rate", "fraction"),
                         *(Column(("working_set_pages", f"{r:g}"), f"working set at miss ratio {r:g}", "pages", never)
                           for r in miss_ratios),
                         Column("recommended_pages", "recommended", "pages"),
                         Column("recommended_miss_ratio", "its miss ratio", "fraction"),
                         Column("miss_ratio_floor", "floor", "fraction", help="miss ratio with all of the memory")],
              rows=("vms",)),
        report.Table("Settings", [Column("rate", "sampling rate", "fraction", "not set"),
                           Column("sample_size", "sample size", "count", "not set"),
                           Column("untrace_period_s", "untraced period", "s"),
                           Column("refresh_s", "snapshot every", "s"),
                           Column("estimator", "estimator", "text"), Column("seed", "seed", "count")],
              record=("settings",)),
    ]
