"""The hypervisor side of ballooning: the balloon plugin.

- **Inflate.** The guest driver (:mod:`memvisor_balloon.driver`) reports the pages it pinned;
  the plugin remaps every one onto one dedicated, zero-filled machine page of the VM (held with
  ``hold_page``, copy-on-write) and so frees their machine pages. A read of a balloon page reads
  zeros from that page.
- **Detect a reset.** A guest write to the balloon page traps before it lands
  (:func:`memvisor_write_trap`). Because the balloon page is the plugin's own, the machine page
  number alone tells a write to it from writes to the zero page or to pages that a sharing
  plugin merged. Such a write means the guest forgot its balloon (a reboot, a driver reload):
  every balloon page of that VM is reset and the driver is told to start over.
- **Deflate** gives pages back to the guest: they are remapped to the zero page and become
  private zero-filled pages on their first write, as memory the guest has never used.
- **Memory pressure** (:func:`memvisor_memory_pressure`): per-VM targets follow the policy of
  :mod:`memvisor_balloon.policy` (MRC-guided when a plugin answers
  :func:`memvisor_giveable_pages`, else proportional share with an idle-memory tax).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from memvisor import PAGE_SIZE, hookimpl
from memvisor.backend import Capability
from memvisor.report import Column, Figure, Headline, Plot, ReportSection, Table
from memvisor_balloon import pages as bulk
from memvisor_balloon.driver import GuestBalloonDriver
from memvisor_balloon.policy import idle_tax_reclaim, mrc_reclaim
from memvisor_balloon.settings import BalloonSettings

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.events import MemoryPressure, Tick, WriteBatch
    from memvisor.host import VM, Host

log = structlog.get_logger("memvisor.balloon")

NAME = "balloon"
"""The plugin's entry-point name: its settings table, its report sections."""

MIB = 2**20 // PAGE_SIZE
"""Pages per MiB."""


class VMBalloon:
    """The hypervisor's record of one VM's balloon.

    :ivar vm: the VM.
    :ivar driver: the guest's balloon driver (the model of the guest side).
    :ivar in_balloon: per guest page, whether it is a balloon page mapped onto :attr:`mpn`.
    :ivar backed: per balloon page, whether it had its own machine page when ballooned (so
        ballooning it freed one).
    :ivar order: balloon pages in the order they were ballooned.
    :ivar mpn: the VM's balloon page (held while the balloon is not empty), or -1.
    :ivar target: the balloon size (pages) the host asks the driver for.
    :ivar resets: resets detected (writes to the balloon page).
    :ivar idle_age: per page, accessed-bit samples since the guest last touched it (saturates).
    :ivar active: estimated fraction of the VM's pages in active use (None: not sampled yet).
    """

    def __init__(self, vm: VM, driver: GuestBalloonDriver):
        self.vm = vm
        self.driver = driver
        self.in_balloon = np.zeros(vm.pages, dtype=bool)
        self.backed = np.zeros(vm.pages, dtype=bool)
        self.order = np.empty(0, dtype=np.int64)
        self.mpn = -1
        self.target = 0
        self.resets = 0
        self.idle_age = np.zeros(vm.pages, dtype=np.uint8)
        self.active: float | None = None
        self._fast: float | None = None
        self._slow: float | None = None
        self.peak = 0

    @property
    def size(self) -> int:
        """Balloon pages (mapped onto the balloon page)."""
        return len(self.order)

    @property
    def reclaimed(self) -> int:
        """Machine pages the balloon keeps free: balloon pages that had their own machine page,
        less the balloon page itself."""
        return int(np.count_nonzero(self.backed[self.order])) - (1 if self.mpn >= 0 else 0)

    def sample_accessed(self, accessed: np.ndarray) -> None:
        """Fold one sample of accessed bits into the idle ages and the activity estimate.

        As in ESX, the estimate is the larger of a fast and a slow moving average, so that it
        rises quickly when a VM becomes active and falls slowly when it idles.
        """
        self.idle_age = np.where(accessed, np.uint8(0), np.minimum(self.idle_age, 254) + np.uint8(1)).astype(np.uint8)
        usable = ~self.in_balloon
        used = int(np.count_nonzero(usable))
        fraction = int(np.count_nonzero(accessed & usable)) / used if used else 0.0
        self._fast = fraction if self._fast is None else 0.5 * self._fast + 0.5 * fraction
        self._slow = fraction if self._slow is None else 0.9 * self._slow + 0.1 * fraction
        self.active = max(self._fast, self._slow)


class BalloonPlugin:
    """Memory ballooning: balloon pages share one page, a write to it resets the balloon, and a
    memory-pressure policy sets each VM's balloon target."""

    def __init__(self) -> None:
        self.settings = BalloonSettings()
        self.host: Host | None = None
        self.vms: dict[str, VMBalloon] = {}
        self.resets = 0
        self.guest_visible_errors = 0
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.freed_pages = 0
        self.pressure_events = 0
        self.pressure_freed = 0
        self.policy_used: dict[str, int] = {}
        self.mrc_increase: list[float] = []
        self._last_sample = -math.inf
        self.wanted_free: int | None = None  # free pages the last pressure event asked for
        self.series: dict[str, list[float]] = {"time": [], "free_pages": [], "reclaimed_pages": [], "level": []}
        self.sizes: dict[str, list[int]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    @hookimpl
    def memvisor_register_hookspecs(self, register):
        """Declare ``memvisor_giveable_pages``, which the MRC-guided policy asks."""
        from memvisor_balloon import hookspecs

        register(hookspecs)

    @hookimpl
    def memvisor_selftest(self, selftest):
        """Inflate, deflate and driver resets as steps; balloon pages read zeros."""
        from memvisor_balloon.selftest import contribute

        contribute(selftest)

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare ``[plugins.balloon]``."""
        register(NAME, BalloonSettings)

    @hookimpl
    def memvisor_host_started(self, host: Host) -> None:
        """Read ``[plugins.balloon]`` and check the backend can share pages and map the zero
        page."""
        self.settings = host.plugin_settings(NAME)
        host.require(NAME, Capability.SHARE, Capability.ZERO_PAGE)
        self.host = host

    @hookimpl
    def memvisor_vm_created(self, host: Host, vm: VM) -> None:
        """Load the VM's balloon driver, with an empty balloon."""
        driver = GuestBalloonDriver(host, vm, self.settings.reload_delay)
        self.vms[vm.name] = VMBalloon(vm, driver)
        self.sizes[vm.name] = [0] * len(self.series["time"])

    @hookimpl
    def memvisor_vm_destroyed(self, host: Host, vm: VM) -> None:
        """Drop the VM's record and the hold on its balloon page (its mappings go with the VM)."""
        st = self.vms.pop(vm.name, None)
        if st is not None and st.mpn >= 0:
            host.backend.release_page(st.mpn)

    @hookimpl
    def memvisor_tick(self, host: Host, tick: Tick) -> None:
        """Sample accessed bits, move reloaded drivers towards their targets, verify, record."""
        if tick.now - self._last_sample >= self.settings.sample_interval - 1e-12:
            self._last_sample = tick.now
            for st in self.vms.values():
                st.sample_accessed(host.take_accessed(st.vm, "balloon"))
        for st in self.vms.values():
            if st.driver.loaded(tick.now) and st.driver.size != st.target:
                self.adjust(st.vm)
        if self.settings.verify:
            self.verify()
        self._record(host)

    @hookimpl
    def memvisor_host_stopping(self, host: Host) -> None:
        """A last check of every balloon page, and a last sample for the plots."""
        self.verify()
        self._record(host)

    # -- the hypervisor's balloon operations --------------------------------------------------

    def state(self, vm: VM | str) -> VMBalloon:
        """The balloon record of a VM (by VM or name)."""
        return self.vms[vm if isinstance(vm, str) else vm.name]

    def balloon_pages(self, vm: VM | str) -> np.ndarray:
        """The VM's balloon pages, in the order they were ballooned."""
        return self.state(vm).order.copy()

    def set_target(self, vm: VM | str, pages: int) -> int:
        """Ask the VM's driver for a balloon of ``pages`` (clamped to ``max_fraction`` of the VM)
        and move it there now if the driver is loaded; returns machine pages freed (negative
        when the balloon deflated, counting pages handed back)."""
        st = self.state(vm)
        st.target = max(0, min(int(pages), self.cap(st.vm)))
        return self.adjust(st.vm)

    def cap(self, vm: VM) -> int:
        """The largest balloon of ``vm`` (``max_fraction`` of its memory, one page kept)."""
        return max(0, min(int(vm.pages * self.settings.max_fraction), vm.pages - 1))

    def adjust(self, vm: VM) -> int:
        """Inflate or deflate the VM's driver to its target; returns machine pages freed, or
        minus the pages handed back."""
        st = self.state(vm)
        if not st.driver.loaded(self._now()):
            return 0
        if st.driver.size < st.target:
            return self.inflate(vm, st.target - st.driver.size)
        if st.driver.size > st.target:
            return -self.deflate(vm, st.driver.size - st.target)
        return 0

    def inflate(self, vm: VM, count: int) -> int:
        """The driver pins ``count`` more pages and reports them; each is remapped onto the
        balloon page. The target follows (a tick does not undo it). Returns machine pages freed
        (net of the balloon page when it is new)."""
        st = self.state(vm)
        if not st.driver.loaded(self._now()):
            return 0
        reported = st.driver.inflate(count, st.idle_age)
        st.target = st.driver.size
        return self._take(st, reported)

    def deflate(self, vm: VM, count: int) -> int:
        """The driver gives ``count`` pages back to the guest; they leave the balloon and the
        target follows. Returns the pages handed back."""
        st = self.state(vm)
        released = st.driver.deflate(count)
        st.target = st.driver.size
        given = self._give_back(st, released, eager=False)
        self.deflated_pages += given
        self._record(self.host)
        return given

    def reset_driver(self, vm: VM) -> np.ndarray:
        """A guest event: the VM's balloon driver restarts (reboot, reload) and forgets its pages.
        The hypervisor is not told: it learns when the guest writes one of them."""
        return self.state(vm).driver.reset(self._now())

    def reset_balloon(self, vm: VM, written: int = 0) -> int:
        """Reset every balloon page of ``vm`` (the guest wrote its balloon page): they become
        the guest's again, zero-filled; the driver starts over. Returns the pages reset."""
        st = self.state(vm)
        pages = self._give_back(st, st.order.copy(), eager=self.settings.reset == "eager")
        if st.driver.size:  # the driver still thinks it holds them: the hypervisor resets it
            st.driver.reset(self._now())
        st.resets += 1
        self.resets += 1
        log.info("balloon reset", vm=vm.name, pages=pages, written_pages=written, mode=self.settings.reset,
                 time=self._now())
        self.host.record_event("balloon_reset", vm=vm.name, pages=pages)
        self._record(self.host)
        return pages

    def _now(self) -> float:
        return self.host.now if self.host is not None else 0.0

    def _take(self, st: VMBalloon, reported: np.ndarray) -> int:
        backend = self.host.backend
        vm = st.vm
        new = reported[~st.in_balloon[reported]]
        # Pages another plugin made not present stay with it (it serves them if the guest ever
        # touches them again); only present pages can be remapped.
        mpns = backend.mpns(vm, new)
        new, mpns = new[mpns >= 0], mpns[mpns >= 0]
        if not len(new):
            return 0
        before = backend.free_pages()
        bulk.split_large(backend, vm, new)
        if st.mpn < 0:
            # A page of our own rather than the zero page: a write to it is, by its machine page
            # number alone, a write to a balloon page, and its reference count is the balloon's
            # size (the emulator's invariant check verifies it).
            st.mpn = backend.hold_page(node=vm.home_node)
        backed = (mpns != backend.zero_mpn) & (backend.refcounts(mpns) == 1)
        self.freed_pages += bulk.share_onto(backend, vm, new, st.mpn)
        st.in_balloon[new] = True
        st.backed[new] = backed
        st.order = np.concatenate([st.order, new])
        st.peak = max(st.peak, st.size)
        self.inflated_pages += len(new)
        self._record(self.host)
        return backend.free_pages() - before

    def _give_back(self, st: VMBalloon, gpps: np.ndarray, *, eager: bool) -> int:
        backend = self.host.backend
        vm = st.vm
        gpps = gpps[st.in_balloon[gpps]]
        if not len(gpps):
            return 0
        # Pages that no longer map the balloon page were remapped by someone else: they leave
        # the balloon untouched.
        ours = gpps[backend.mpns(vm, gpps) == st.mpn]
        if eager:
            low = int(self.host.config.low_watermark * backend.total_pages())
            now_backed = ours[: max(0, min(len(ours), backend.free_pages() - low))]
            bulk.unmap(backend, vm, now_backed)
            bulk.populate(backend, vm, now_backed)
            ours = ours[len(now_backed) :]
        bulk.share_onto(backend, vm, ours, backend.zero_mpn)
        st.in_balloon[gpps] = False
        st.backed[gpps] = False
        st.order = st.order[st.in_balloon[st.order]]
        if not st.size and st.mpn >= 0:
            backend.release_page(st.mpn)
            st.mpn = -1
        return len(gpps)

    @hookimpl
    def memvisor_restore_starting(self, host: Host, vm: VM) -> None:
        """A restore replaces every page of the VM, balloon pages included: the balloon ends
        without touching memory (the restore owns every page now), its page is released and
        the guest's driver starts over, as after a reboot.

        Without this the balloon's record would name pages that the restore remapped (found by
        the all-techniques integration test)."""
        st = self.vms.get(vm.name)
        if st is None:
            return
        st.in_balloon[:] = False
        st.backed[:] = False
        st.order = np.empty(0, dtype=np.int64)
        st.target = 0
        if st.mpn >= 0:
            host.backend.release_page(st.mpn)
            st.mpn = -1
        if st.driver.size:
            st.driver.reset(self._now())
        self._record(host)

    @hookimpl
    def memvisor_memory_error(self, host: Host, vm: VM, error) -> np.ndarray | None:
        """Repair balloon pages that a memory error hit: they hold nothing of the guest's (it
        gave them up, they read zeros), so each is mapped onto the balloon page again, dropping
        whatever copy the error left. Returns the pages repaired.

        Without this a balloon page hit by an error kept a private, non-zero copy that the
        balloon's record still counted as ballooned (found by the all-techniques integration
        test)."""
        st = self.vms.get(vm.name)
        if st is None or st.mpn < 0:
            return None
        gpps = np.asarray(error.gpps, dtype=np.int64)
        hit = gpps[st.in_balloon[gpps]]
        if not len(hit):
            return None
        backend = host.backend
        present = backend.present(vm, hit)
        moved = hit[present & (backend.mpns(vm, hit) != st.mpn)]
        if len(moved):
            self.freed_pages += bulk.share_onto(backend, vm, moved, st.mpn)
        if not backend.is_zero(vm, st.order[:1])[0]:
            return None  # the balloon page itself is damaged: nothing to repair from
        return hit[present]

    # -- detecting a reset --------------------------------------------------------------------

    @hookimpl
    def memvisor_write_trap(self, host: Host, vm: VM, write: WriteBatch) -> None:
        """A write to the VM's balloon page means the guest forgot its balloon: reset it.

        Writes to the zero page or to pages shared by other plugins are not the balloon's
        business: the balloon page's machine page number tells them apart.
        """
        st = self.vms.get(vm.name)
        if st is None or st.mpn < 0:
            return
        hit = write.shared & (write.mpns == st.mpn) & st.in_balloon[write.gpps]
        if hit.any():
            self.reset_balloon(vm, written=int(np.count_nonzero(hit)))

    # -- memory pressure ----------------------------------------------------------------------

    @hookimpl
    def memvisor_memory_pressure(self, host: Host, pressure: MemoryPressure) -> int | None:
        """Inflate balloons until free memory reaches the target, splitting the deficit among
        VMs by the policy. It runs in the middle of the reclaimers: page sharing (transparent,
        cheap) should be ``tryfirst`` and hypervisor swapping (blind to what the guest values)
        ``trylast``; hook order decides, not imports."""
        self.pressure_events += 1
        backend = host.backend
        start = backend.free_pages()
        self.wanted_free = pressure.target_free_pages
        self._record(host)
        for _ in range(4):  # pages that were shared already free nothing: plan again for the rest
            deficit = pressure.target_free_pages - backend.free_pages()
            if deficit <= 0:
                break
            plan = self.plan(deficit)
            if not any(plan.values()):
                break
            before = backend.free_pages()
            for name, more in plan.items():
                if more:
                    st = self.vms[name]
                    if st.mpn < 0:  # its first balloon page costs a machine page: take one more
                        more += 1
                    st.target = st.driver.size + more
                    self.adjust(st.vm)
            if backend.free_pages() <= before:
                break
        freed = backend.free_pages() - start
        self.pressure_freed += max(0, freed)
        self._record(host)
        return freed if freed > 0 else None

    def plan(self, deficit: int) -> dict[str, int]:
        """Pages each VM's balloon should grow by to free ``deficit`` machine pages."""
        host = self.host
        now = self._now()
        sts = [st for st in self.vms.values() if st.driver.loaded(now)]
        if not sts or deficit <= 0:
            return {}
        policy = self.settings.policy
        if policy in ("auto", "mrc"):
            def giveable(x: float) -> list:
                return [host.hook.memvisor_giveable_pages(host=host, vm=st.vm, miss_ratio_increase=x) for st in sts]

            if all(g is not None for g in giveable(0.0)):
                more, increase = mrc_reclaim(giveable, np.array([st.driver.size for st in sts]),
                                             np.array([self.cap(st.vm) for st in sts]), deficit)
                self.policy_used["mrc"] = self.policy_used.get("mrc", 0) + 1
                self.mrc_increase.append(increase)
                return {st.vm.name: int(m) for st, m in zip(sts, more)}
            if policy == "mrc" and "mrc_unanswered" not in self.policy_used:
                log.warning("no plugin answers memvisor_giveable_pages; the balloon uses the idle-memory tax")
            if policy == "mrc":
                self.policy_used["mrc_unanswered"] = self.policy_used.get("mrc_unanswered", 0) + 1
        shares = np.array([self.settings.shares.get(st.vm.name, float(st.vm.pages)) for st in sts])
        allocated = np.array([st.vm.pages - st.driver.size for st in sts], dtype=float)
        active = np.array([1.0 if st.active is None else st.active for st in sts])
        floor = np.array([st.vm.pages - self.cap(st.vm) for st in sts], dtype=float)
        more = idle_tax_reclaim(shares, allocated, active, floor, self.settings.tax_rate, deficit)
        self.policy_used["idle_tax"] = self.policy_used.get("idle_tax", 0) + 1
        return {st.vm.name: int(m) for st, m in zip(sts, more)}

    # -- checks and metrics -------------------------------------------------------------------

    def verify(self) -> int:
        """Check that every balloon page reads zeros; returns (and counts as guest-visible
        errors) the pages that do not. Pages on the balloon page cost one 4 KiB check."""
        backend = self.host.backend
        errors = 0
        for st in self.vms.values():
            if not st.size:
                continue
            mpns = backend.mpns(st.vm, st.order)
            on_ours = mpns == st.mpn
            if on_ours.any() and not backend.is_zero(st.vm, st.order[np.argmax(on_ours)][None])[0]:
                errors += int(np.count_nonzero(on_ours))
            elsewhere = st.order[~on_ours & (mpns >= 0)]
            if len(elsewhere):
                errors += int(np.count_nonzero(~backend.is_zero(st.vm, elsewhere)))
        if errors:
            log.error("balloon pages do not read zeros", pages=errors)
        self.guest_visible_errors += errors
        return errors

    def _record(self, host: Host | None) -> None:
        if host is None:
            return
        backend = host.backend
        free = backend.free_pages()
        # Pressure is measured against what the host last asked for (a pressure action wants
        # room for something), never less than the high watermark.
        wanted = max(int(host.config.high_watermark * backend.total_pages()), self.wanted_free or 0)
        self.series["time"].append(host.now)
        self.series["free_pages"].append(free)
        self.series["reclaimed_pages"].append(sum(max(0, st.reclaimed) for st in self.vms.values()))
        self.series["level"].append(max(0.0, 1.0 - free / wanted) if wanted > 0 else 0.0)
        for name, sizes in self.sizes.items():
            st = self.vms.get(name)
            sizes.append(st.size if st is not None else 0)

    @hookimpl
    def memvisor_report(self, host: Host) -> ReportSection:
        """Balloon sizes, reclaimed memory, resets, errors and pressure, with plots."""
        if not self.series["time"] or self.series["time"][-1] != host.now:
            self._record(host)
        t = self.series["time"]
        mib = lambda values: [v / MIB for v in values]
        plots = [
            Plot("balloon-reclaimed", "Machine memory reclaimed by ballooning", "time (s)", "MiB",
                 {"reclaimed": (t, mib(self.series["reclaimed_pages"])), "free": (t, mib(self.series["free_pages"]))},
                 kind="step", ends_at={"reclaimed": ("reclaimed_mib",)},
                 shows="free: the host's free memory, sampled with the balloons."),
            Plot("balloon-size", "Balloon size per VM", "time (s)", "MiB",
                 {name: (t, mib(sizes)) for name, sizes in self.sizes.items()}, kind="step", scale=1 / MIB,
                 ends_at={name: ("vms", name, "balloon_pages") for name in self.sizes}),
            Plot("balloon-pressure", "Memory pressure (0: free memory at the host's target, 1: none free)", "time (s)",
                 "pressure level", {"pressure": (t, self.series["level"])}, kind="step",
                 shows="The pressure level each time the balloons were sampled."),
        ]
        metrics = {
            "policy": self.settings.policy,
            "policy_used": dict(self.policy_used),
            "reset_mode": self.settings.reset,
            "resets": self.resets,
            "guest_visible_errors": self.guest_visible_errors,
            "reclaimed_mib": self.series["reclaimed_pages"][-1] / MIB,
            "reclaimed_mib_peak": max(self.series["reclaimed_pages"]) / MIB,
            "inflated_pages": self.inflated_pages,
            "deflated_pages": self.deflated_pages,
            "freed_pages": self.freed_pages,
            "pressure_events": self.pressure_events,
            "pressure_freed_pages": self.pressure_freed,
            "mrc_miss_ratio_increase": self.mrc_increase[-1] if self.mrc_increase else None,
            "vms": {name: {"balloon_pages": st.size, "balloon_pages_peak": st.peak, "target_pages": st.target,
                           "resets": st.resets, "driver_resets": st.driver.resets,
                           "active_fraction": st.active}
                    for name, st in sorted(self.vms.items())},
        }
        return ReportSection(NAME, "Ballooning", metrics, plots, headlines=_headlines(metrics),
                             tables=_tables(metrics),
                             text="Balloon pages share one zero-filled page per VM; a guest write to it resets "
                                  "that VM's balloon. Under memory pressure each VM's target follows the "
                                  f"{self.settings.policy} policy (docs/balloon.md). Miss-ratio rise allowed: the rise "
                                  "in miss ratio the MRC-guided targets allowed (a dash, null in report.json: no "
                                  "MRC plugin answered).")

    # -- registration -------------------------------------------------------------------------

    @hookimpl
    def memvisor_register_actions(self, register) -> None:
        """``balloon_target`` and ``balloon_reset`` timeline actions."""
        from memvisor_balloon.actions import balloon_reset, balloon_target

        register("balloon_target", balloon_target)
        register("balloon_reset", balloon_reset)

    @hookimpl
    def memvisor_register_benchmarks(self, register) -> None:
        """``memvisor bench balloon``: inflate-1gib and reset-1gib."""
        from memvisor_balloon.bench import cases

        for case in cases():
            register("balloon", case)


def _headlines(metrics: dict[str, Any]) -> list[Headline]:
    """What ballooning kept free, and each VM's balloon (for a VM whose balloon ever held a page)."""
    out = [Headline("ballooning keeps {now} free now ({peak} at most), with {policy} targets; balloon pages that "
                    "read non-zero: {errors}",
                    {"now": Figure(("reclaimed_mib",), "MiB", "higher", "kept free now"),
                     "peak": Figure(("reclaimed_mib_peak",), "MiB", label="kept free at most"),
                     "policy": Figure(("policy",), "text"),
                     "errors": Figure(("guest_visible_errors",), "count", "lower")})]
    for name, vm in metrics["vms"].items():
        if vm["balloon_pages_peak"] or vm["resets"]:
            at = ("vms", name)
            figures = {"peak": Figure((*at, "balloon_pages_peak"), "pages", label="balloon at most"),
                       "resets": Figure((*at, "resets"), "count", label="balloon resets")}
            if vm["balloon_pages"]:
                figures["size"] = Figure((*at, "balloon_pages"), "pages", label="balloon at the end")
                text = "its balloon holds {size} at the end ({peak} at most); balloon resets: {resets}"
            else:
                text = "its balloon held {peak} at most, empty at the end; balloon resets: {resets}"
            out.append(Headline(text, figures, vm=name))
    return out


def _tables(metrics: dict[str, Any]) -> list[Table]:
    """The totals, each VM's balloon, and how often each policy set the targets."""
    return [
        Table("", [Column("policy", "policy", "text"), Column("reset_mode", "reset mode", "text"),
                   Column("reclaimed_mib", "kept free now", "MiB"), Column("reclaimed_mib_peak", "at most", "MiB"),
                   Column("inflated_pages", "inflated", "pages"), Column("deflated_pages", "deflated", "pages"),
                   Column("freed_pages", "machine memory freed", "pages"),
                   Column("pressure_events", "pressure events", "count"),
                   Column("pressure_freed_pages", "freed under pressure", "pages"),
                   Column("resets", "balloon resets", "count"),
                   Column("guest_visible_errors", "guest-visible errors", "count",
                          help="balloon pages that did not read zeros"),
                   Column("mrc_miss_ratio_increase", "miss-ratio rise allowed", "fraction",
                          "no MRC plugin answered")], record=()),
        Table("Balloons", [Column("balloon_pages", "balloon now", "pages"),
                           Column("balloon_pages_peak", "at most", "pages"),
                           Column("target_pages", "target", "pages"), Column("resets", "resets", "count"),
                           Column("driver_resets", "driver reloads", "count"),
                           Column("active_fraction", "active memory", "fraction", "not sampled",
                                  help="share of its memory found in use by idle sampling")], rows=("vms",)),
        Table("Targets set, by policy", [Column(k, k.replace("_", " "), "count") for k in metrics["policy_used"]],
              record=("policy_used",)),
    ]
