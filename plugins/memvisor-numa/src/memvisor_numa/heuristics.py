"""The heuristics: which of a VM's remote pages to migrate first after its virtual CPUs moved.

Every heuristic keeps, per VM, an *order* (an array of guest pages, best first, consumed from
a cursor) or a *queue* of pages that trapped, and refills it from the plugin's tick. The plugin
(:mod:`memvisor_numa.plugin`) drains them within the per-tick budget, skipping pages that are
no longer remote or cannot move. All work is on numpy arrays of pages, never per page.

``scan``
    Accessed-bit scanning with aging: once a VM has made ``scan_window`` accesses per page of
    its memory since its last scan (at the next tick), its accessed bits are read and cleared
    and shifted into a 32-bit age per page (the classic aging algorithm). Hot pages are those
    touched in the most recent scans: the order is by the number of scans that saw the page
    (frequency), then by the age value (recency). Pages no scan of the last 32 saw are not
    migrated at all. Scanning runs all the time, not only after a move, so that the order is
    right at the moment of the move; the window scales with the VM so that a scan neither sees
    every page (no ranking) nor almost none.
``hinting``
    Sampled hinting traps, like Linux NUMA balancing: each tick a random sample of
    ``hint_pages`` remote pages is traced; the pages that trap are the ones in use, and each is
    migrated inside its trap while the tick's budget lasts (as Linux migrates a misplaced page
    in its hinting fault), the rest queued in the order they trapped. Armed pages that are never
    touched are never moved.
``mrc``
    The order a page-use plugin (an MRC plugin's LRU) offers through
    :func:`memvisor.hookspecs.memvisor_page_heat`, hottest first, ties broken by ``scan``'s
    aging. When no plugin answers, it is exactly ``scan``.
``touch``
    Migrate on touch: every remote page is traced at the move; a page that traps is migrated
    inside the trap (the guest waits for the copy) while the tick's budget lasts, and queued
    for the next ticks otherwise.
``address`` and ``random``
    Baselines: every remote page in guest-address order, or in a random order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import structlog

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.host import Host
    from memvisor_numa.plugin import NumaPlugin, VmNuma

log = structlog.get_logger("memvisor.numa")

AGE_BITS = 32
"""Scans of history an age holds (``uint32`` ages)."""

AGE_DTYPE = np.uint32
"""The dtype of an age."""



def hotness(age: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Order key of aged pages, higher is hotter: scans that saw the page (``seen``, kept by
    the scan as the number of set bits of ``age``), then recency (the age itself)."""
    key = seen.astype(np.int64)
    key <<= AGE_BITS
    key |= age
    return key


def top_order(pages: np.ndarray, key: np.ndarray, limit: int) -> np.ndarray:
    """The ``limit`` pages of highest ``key``, best first.

    A partial selection first: only the pages that can move before the next refresh need to
    be sorted, which keeps a refresh linear in the VM's size.
    """
    if len(pages) > limit:
        keep = np.argpartition(key, len(key) - limit)[len(key) - limit :]
        pages, key = pages[keep], key[keep]
    return pages[np.argsort(key, kind="stable")[::-1]]


class Heuristic:
    """Base class: what a heuristic does at a move, at a tick and on a trap.

    :cvar name: the setting's value that selects it.
    :cvar hot_first: whether it tries to move the most used pages first.
    :cvar ages: whether it needs the accessed-bit aging of every VM.
    :cvar traps: whether it traces pages (its traps arrive through the plugin).
    """

    name = "?"
    hot_first = True
    ages = False
    traps = False

    def begin(self, plugin: NumaPlugin, host: Host, st: VmNuma) -> None:
        """A move (or a resume) began: build the order from the VM's remote pages."""

    def tick(self, plugin: NumaPlugin, host: Host, st: VmNuma, scanned: bool) -> None:
        """Once per tick while the VM migrates, before pages are drained (``scanned``: the
        accessed bits were just folded into the ages)."""

    def trapped(self, plugin: NumaPlugin, host: Host, st: VmNuma, gpps: np.ndarray) -> None:
        """Pages this heuristic traced were touched (already untraced by the core)."""

    def end(self, plugin: NumaPlugin, host: Host, st: VmNuma) -> None:
        """Migration of the VM stops (stop rule, another move, or the end of the run)."""
        if st.armed is not None and st.armed.any():
            host.backend.untrace(st.vm, np.flatnonzero(st.armed))
            st.armed[:] = False
        st.queue.clear()


class AddressOrder(Heuristic):
    """Baseline: every remote page, in guest-address order."""

    name = "address"
    hot_first = False

    def begin(self, plugin, host, st):
        """Order: the remote pages, lowest address first."""
        st.set_order(np.flatnonzero(plugin.remote_mask(host, st)))


class RandomOrder(Heuristic):
    """Baseline: every remote page, in a random order (seeded)."""

    name = "random"
    hot_first = False

    def begin(self, plugin, host, st):
        """Order: the remote pages, shuffled."""
        pages = np.flatnonzero(plugin.remote_mask(host, st))
        st.set_order(pages[st.rng.permutation(len(pages))])


class ScanAging(Heuristic):
    """Accessed-bit scanning with aging: pages seen in the most recent scans first."""

    name = "scan"
    ages = True

    def begin(self, plugin, host, st):
        """Order the remote pages by age, right away (ages were kept before the move)."""
        self.refresh(plugin, host, st)

    def tick(self, plugin, host, st, scanned):
        """Re-order after every scan of the VM (pages that turned hot join the front), and
        when the order ran out."""
        if scanned or st.pos >= len(st.order):
            self.refresh(plugin, host, st)

    def refresh(self, plugin: NumaPlugin, host: Host, st: VmNuma) -> None:
        """Order the remote pages that any recent scan saw, hottest first."""
        remote = plugin.remote_mask(host, st)
        pages = np.flatnonzero(remote & (st.age > 0))
        st.set_order(top_order(pages, hotness(st.age[pages], st.seen_scans[pages]), plugin.refresh_limit(st)))


class PageHeat(ScanAging):
    """The order of a page-use plugin (``memvisor_page_heat``), falling back to ``scan``."""

    name = "mrc"

    def refresh(self, plugin, host, st):
        """Ask for the heat of every remote page; order by heat, then by age."""
        remote = plugin.remote_mask(host, st)
        pages = np.flatnonzero(remote)
        heat = host.hook.memvisor_page_heat(host=host, vm=st.vm, gpps=pages) if len(pages) else None
        if heat is None:
            if st.heat_source != "accessed_bits":
                log.info("no plugin answers memvisor_page_heat: ordering by accessed-bit aging", vm=st.vm.name)
            st.heat_source = "accessed_bits"
            super().refresh(plugin, host, st)
            return
        st.heat_source = "page_heat"
        heat = np.asarray(heat, dtype=np.float64)
        age = st.age[pages]
        known = (heat > 0) | (age > 0)  # a page neither measure has seen in use stays put
        pages, heat, age = pages[known], heat[known], age[known]
        # Rank by heat, ties (pages the heat plugin knows nothing of) by aging.
        rank = np.empty(len(pages), dtype=np.int64)
        rank[np.lexsort((-hotness(age, st.seen_scans[pages]), -heat))] = np.arange(len(pages))[::-1]
        st.set_order(top_order(pages, rank, plugin.refresh_limit(st)))


class HintingTraps(Heuristic):
    """Sampled hinting traps (Linux NUMA balancing): trace a sample, migrate what traps."""

    name = "hinting"
    traps = True

    def begin(self, plugin, host, st):
        """The pool to sample from: every remote page, in a random order."""
        pages = np.flatnonzero(plugin.remote_mask(host, st))
        st.set_order(np.empty(0, np.int64))
        st.pool = pages[st.rng.permutation(len(pages))]
        st.pool_pos = 0
        st.ensure_armed()

    def tick(self, plugin, host, st, scanned):
        """Trace the next sample of the pool (re-arming is done here, never inside a trap)."""
        sample = st.pool[st.pool_pos : st.pool_pos + plugin.settings.hint_pages]
        st.pool_pos += len(sample)
        sample = sample[host.backend.present(st.vm, sample)] if len(sample) else sample
        if len(sample):
            host.backend.trace(st.vm, sample)
            st.armed[sample] = True

    def trapped(self, plugin, host, st, gpps):
        """Migrate the trapped pages at once while the tick's budget lasts (Linux migrates a
        misplaced page in its hinting fault); queue the rest in the order they were touched."""
        st.queue.append(gpps)
        plugin.drain(host, st)


class MigrateOnTouch(Heuristic):
    """Trace every remote page; migrate each one when it is touched (inside the trap)."""

    name = "touch"
    traps = True

    def begin(self, plugin, host, st):
        """Arm every remote page."""
        pages = np.flatnonzero(plugin.remote_mask(host, st))
        st.set_order(np.empty(0, np.int64))
        st.ensure_armed()
        if len(pages):
            host.backend.trace(st.vm, pages)
            st.armed[pages] = True

    def trapped(self, plugin, host, st, gpps):
        """Migrate at once what this tick's budget allows; queue the rest."""
        st.queue.append(gpps)
        plugin.drain(host, st)


HEURISTIC_CLASSES: dict[str, type[Heuristic]] = {
    cls.name: cls for cls in (ScanAging, HintingTraps, PageHeat, MigrateOnTouch, AddressOrder, RandomOrder)
}
"""Heuristic classes by setting value."""
