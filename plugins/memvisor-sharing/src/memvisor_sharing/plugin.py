"""The ``sharing`` plugin: a scanner that shares pages, including the small pages inside large
pages, estimates what sharing could reclaim, and breaks large pages up under memory pressure.

Per tick the scanner hashes ``pages_per_tick`` pages (round robin over the VMs, like KSM's
``pages_to_scan``), large-page members included, and rebuilds the table of candidate contents
(:mod:`memvisor_sharing.table`). Small pages outside large pages are shared as they are found;
large pages stay intact until memory is short. Under pressure, large pages are broken up most
reclaimable first until the deficit is covered, and their subpages are shared.

Salting: pages share only with pages of the same VM unless a group of VMs opts in to sharing
across (``across = [["a", "b"]]``); zero pages always map to the host's zero page.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE, hookimpl, report
from memvisor.backend import Capability
from memvisor.errors import UserError
from memvisor.report import Column, Figure, Headline, Plot, ReportSection
from memvisor_sharing.fingerprint import page_hashes, zero_rows
from memvisor_sharing.table import Entries, Table, build_table

NAME = "sharing"

DEFAULTS: dict[str, Any] = {
    "pages_per_tick": 4096,
    "across": [],
    "order": "reclaimable",
    "share_small": True,
    "scan_on_pressure": True,
    "wait_stable": True,
}
"""Settings of ``[plugins.sharing]`` and their defaults (docs/sharing.md explains each)."""

ORDERS = ("reclaimable", "address")
"""Orders in which large pages are broken up under pressure."""

_CHUNK = 8192  # source pages verified and shared per step: bounds the bytes read at once (32 MiB)


class _VMScan:
    """What the scanner knows of one VM: a fingerprint per page and the machine page hashed."""

    def __init__(self, vm, group: int, large_pages: int):
        self.vm = vm
        self.group = group
        self.hash = np.zeros(vm.pages, dtype=np.uint64)
        self.scanned = np.zeros(vm.pages, dtype=bool)
        self.stable = np.zeros(vm.pages, dtype=bool)  # same fingerprint at the last two scans
        self.seen_mpn = np.full(vm.pages, -1, dtype=np.int64)
        self.cursor = 0
        self.large_at_start = large_pages


def _settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Checked settings; one line naming the key on a mistake."""
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise UserError(f"plugins.sharing.{unknown[0]}: unknown setting (known: {', '.join(DEFAULTS)})")
    out = {**DEFAULTS, **raw}
    per_tick = out["pages_per_tick"]
    if isinstance(per_tick, bool) or not isinstance(per_tick, int) or per_tick < 0:
        raise UserError(f"plugins.sharing.pages_per_tick: expected a whole number >= 0, got {per_tick!r}")
    across = out["across"]
    if not isinstance(across, list) or not all(
            isinstance(g, list) and all(isinstance(n, str) for n in g) for g in across):
        raise UserError(f"plugins.sharing.across: expected a list of lists of VM names, got {across!r}")
    names = [n for g in across for n in g]
    if len(names) != len(set(names)):
        raise UserError("plugins.sharing.across: a VM is named in two groups")
    if out["order"] not in ORDERS:
        raise UserError(f"plugins.sharing.order: expected one of {', '.join(ORDERS)}, got {out['order']!r}")
    for key in ("share_small", "scan_on_pressure", "wait_stable"):
        if not isinstance(out[key], bool):
            raise UserError(f"plugins.sharing.{key}: expected true or false, got {out[key]!r}")
    return out


class SharingPlugin:
    """Page sharing with small pages inside large pages: scan, estimate, break up under pressure.

    One instance per host. Public attributes hold the figures the report shows; :attr:`table`
    is the latest estimate (None before the first scan).
    """

    def __init__(self) -> None:
        self.settings: dict[str, Any] = dict(DEFAULTS)
        self.vms: dict[str, _VMScan] = {}
        self.groups: dict[str, int] = {}
        self.own = np.zeros(0, dtype=np.int64)  # machine pages this plugin shares (sorted)
        self.table: Table | None = None
        self.history: list[dict[str, float]] = []
        self.pressure_events: list[dict[str, Any]] = []
        self.pages_hashed = 0
        self.hash_seconds = 0.0
        self.reclaimed = 0  # net machine pages freed by this plugin's shares, cumulated
        self.saved = 0  # machine pages that sharing saves now (see refresh)
        self.remaining = 0  # machine pages left to reclaim, by the latest table
        self.zero_mapped = 0
        self.pages_shared = 0
        self.large_broken = 0
        self.reclaimed_by_breakup = 0
        self.writes_broken = 0
        self.verify_failures = 0
        self._rotation = 0
        self._scans: list[_VMScan] = []  # the VMs in the order of the latest table's rows
        self.can_split = True

    # -- lifecycle ----------------------------------------------------------------------------

    @hookimpl
    def memvisor_host_started(self, host):
        """Read ``[plugins.sharing]`` and check that the backend can share (splitting large
        pages is optional: without it the plugin shares small pages only)."""
        self.settings = _settings(host.plugin_settings(NAME))
        host.require(NAME, Capability.SHARE, Capability.ZERO_PAGE)
        self.can_split = Capability.LARGE_PAGES in host.backend.capabilities
        self.groups = {name: i for i, group in enumerate(self.settings["across"]) for name in group}

    @hookimpl
    def memvisor_vm_created(self, host, vm):
        """Start knowing nothing of the VM: every page is to be scanned."""
        group = self.groups.get(vm.name, 1_000_000 + vm.id)  # salting: a group of its own
        self.vms[vm.name] = _VMScan(vm, group, self._intact(host, vm).sum())

    @hookimpl
    def memvisor_vm_destroyed(self, vm):
        """Forget the VM (its shared pages are released by the backend as it goes)."""
        self.vms.pop(vm.name, None)
        self.table = None

    @hookimpl
    def memvisor_tick(self, host, tick):
        """Hash the next ``pages_per_tick`` pages, refresh the estimate, share small pages."""
        if not self.vms or not self.settings["pages_per_tick"]:
            return
        self.scan(host, self.settings["pages_per_tick"])
        table = self.refresh(host)
        if self.settings["share_small"]:
            # Sharing moves pages from "remaining" to "saved" one for one (each content's copies
            # but one are freed, the new shared page included), so no second refresh is needed.
            freed = self.share_now(host, table)
            self.saved += freed
            self.remaining -= freed
        self._sample(tick.now, table)

    @hookimpl
    def memvisor_page_write(self, vm, write):
        """The guest writes shared (or protected) pages: their fingerprints are void; the core
        gives shared ones a private copy right after this call (nothing is re-shared here)."""
        scan = self.vms.get(vm.name)
        if scan is None:
            return
        scan.scanned[write.gpps] = False
        self.writes_broken += int(np.count_nonzero(write.shared))

    # -- scanning -----------------------------------------------------------------------------

    def scan(self, host, budget: int, *, unscanned_only: bool = False) -> int:
        """Hash up to ``budget`` pages, round robin over the VMs from each VM's cursor (or every
        page not yet hashed, when ``unscanned_only``), within each VM's scan budget
        (:mod:`memvisor.budgets`); returns pages hashed."""
        backend = host.backend
        scans = [s for s in self.vms.values() if s.vm.name in host.vms]
        if not scans:
            return 0
        hashed = 0
        start = time.perf_counter()
        self._rotation = (self._rotation + 1) % len(scans)
        per_vm = -(-budget // len(scans))  # the budget split evenly, rounded up
        for scan in scans[self._rotation:] + scans[: self._rotation]:
            vm = scan.vm
            # Each VM's scan budget (host.budgets, pages per second) caps its share: a VM whose
            # pages never settle cannot take the scanner from the others.
            if unscanned_only:
                gpps = np.flatnonzero(~scan.scanned)[:budget]
                gpps = gpps[: host.budgets.take_scan(vm, len(gpps), host.now)]
            else:
                n = host.budgets.take_scan(vm, min(per_vm, vm.pages), host.now)
                gpps = (scan.cursor + np.arange(n)) % vm.pages
                scan.cursor = int((scan.cursor + n) % vm.pages)
            gpps = gpps[backend.present(vm, gpps)]
            for part in range(0, len(gpps), _CHUNK):
                chunk = gpps[part : part + _CHUNK]
                mpns = backend.mpns(vm, chunk)
                fresh = page_hashes(backend.read(vm, chunk))
                scan.stable[chunk] = scan.scanned[chunk] & (scan.hash[chunk] == fresh)
                scan.hash[chunk] = fresh
                scan.seen_mpn[chunk] = mpns
                scan.scanned[chunk] = True
            hashed += len(gpps)
        self.pages_hashed += hashed
        self.hash_seconds += time.perf_counter() - start
        return hashed

    # -- the table ----------------------------------------------------------------------------

    def _intact(self, host, vm) -> np.ndarray:
        """Per large-page index of ``vm``, whether it is an intact large page."""
        whole = vm.pages // LARGE_PAGE_PAGES
        return host.backend.large(vm)[: whole * LARGE_PAGE_PAGES].reshape(whole, LARGE_PAGE_PAGES)[:, 0]

    def refresh(self, host, *, urgent: bool = False) -> Table:
        """Rebuild the table from every valid fingerprint (a page whose machine page changed
        since it was hashed is void and will be hashed again). Pages may be shared now when
        their content was stable over two scans (``wait_stable``), or always when ``urgent``."""
        backend = host.backend
        parts = []
        scans = [s for s in self.vms.values() if s.vm.name in host.vms]
        for index, scan in enumerate(scans):
            vm = scan.vm
            mpns = backend.mpns(vm)
            scan.scanned &= mpns == scan.seen_mpn
            gpps = np.flatnonzero(scan.scanned)
            movable = np.ones(len(gpps), bool) if urgent or not self.settings["wait_stable"] else scan.stable[gpps]
            parts.append((np.full(len(gpps), index, dtype=np.int64), gpps, scan.hash[gpps], mpns[gpps],
                          backend.large(vm, gpps), np.full(len(gpps), scan.group, dtype=np.int64), movable))
        cols = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(7)]
        mpn = cols[3].astype(np.int64)
        refcount = backend.refcounts(np.maximum(mpn, 0)).astype(np.int64) if len(mpn) else np.zeros(0, np.int64)
        self.own = self.own[backend.refcounts(self.own) >= 2] if len(self.own) else self.own
        own = np.isin(mpn, self.own)
        entries = Entries(cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.uint64), mpn,
                          cols[4].astype(bool), cols[5].astype(np.int64), refcount, own, cols[6].astype(bool))
        self._scans = scans
        self.table = build_table(entries, backend.zero_mpn)
        self.remaining = self.table.total
        # What sharing saves now: guest pages on the zero page, and every mapping of a page this
        # plugin shares but one.
        self.saved = int(np.count_nonzero(mpn == backend.zero_mpn))
        if len(self.own):
            self.saved += int((backend.refcounts(self.own).astype(np.int64) - 1).sum())
        return self.table

    @property
    def estimated(self) -> int:
        """Machine pages sharing everything found so far reclaims: what it saves already plus
        what the table says is left (0 before the first scan)."""
        return self.saved + self.remaining

    def per_large_page(self, vm_name: str) -> np.ndarray:
        """Machine pages that breaking up each large page of a VM would reclaim (by index)."""
        scan = self.vms[vm_name]
        out = np.zeros(scan.vm.pages // LARGE_PAGE_PAGES, dtype=np.int64)
        if self.table is not None:
            index = self._scans.index(scan)
            mine = self.table.large_vm == index
            out[self.table.large_index[mine]] = self.table.large_reclaimable[mine]
        return out

    # -- sharing ------------------------------------------------------------------------------

    def _rows_by_vm(self, entries: Entries, rows: np.ndarray):
        for index in np.unique(entries.vm[rows]):
            yield self._scans[index], rows[entries.vm[rows] == index]

    def _read(self, host, entries: Entries, rows: np.ndarray) -> np.ndarray:
        """The bytes of the pages at ``rows`` (in that order)."""
        out = np.empty((len(rows), PAGE_SIZE), dtype=np.uint8)
        for index in np.unique(entries.vm[rows]):
            at = np.flatnonzero(entries.vm[rows] == index)
            out[at] = host.backend.read(self._scans[index].vm, entries.gpp[rows[at]])
        return out

    def _void(self, entries: Entries, rows: np.ndarray) -> None:
        """Pages whose bytes no longer match their fingerprint: hash them again later."""
        self.verify_failures += len(rows)
        for scan, mine in self._rows_by_vm(entries, rows):
            scan.scanned[entries.gpp[mine]] = False

    def _map(self, host, entries: Entries, rows: np.ndarray, targets: np.ndarray) -> int:
        """Share the pages at ``rows`` onto ``targets`` (verified already); returns pages freed."""
        freed = 0
        for scan, mine in self._rows_by_vm(entries, rows):
            at = np.isin(rows, mine)
            gpps = entries.gpp[rows[at]]
            freed += host.backend.share(scan.vm, gpps, targets[at])
            scan.seen_mpn[gpps] = targets[at]
        return freed

    def share_now(self, host, table: Table) -> int:
        """Share what the table says can be shared without breaking a large page: zero pages
        onto the zero page, duplicates onto a page this plugin shares or onto a new one. Every
        page is compared byte for byte first. Returns net machine pages freed."""
        e, backend = table.entries, host.backend
        before = backend.free_pages()
        for part in range(0, len(table.zero_plan), _CHUNK):
            rows = table.zero_plan[part : part + _CHUNK]
            ok = zero_rows(self._read(host, e, rows))
            self._void(e, rows[~ok])
            rows = rows[ok]
            self._map(host, e, rows, np.full(len(rows), backend.zero_mpn, dtype=np.int64))
            self.zero_mapped += len(rows)
        plan = table.plan
        order = np.argsort(plan.rep, kind="stable")  # keep each content within one chunk
        for part in range(0, len(order), _CHUNK):
            pick = order[part : part + _CHUNK]
            src, rep, target = plan.src[pick], plan.rep[pick], plan.target[pick].copy()
            reps, rep_at = np.unique(rep, return_inverse=True)
            rep_bytes = self._read(host, e, reps)
            same = ~np.any(self._read(host, e, src) != rep_bytes[rep_at], axis=1)
            self._void(e, src[~same])
            src, rep, rep_at, target = src[same], rep[same], rep_at[same], target[same]
            # A new page per content that still has two copies (the keeper among them).
            new = target < 0
            wanted = np.bincount(rep_at[new], minlength=len(reps)) >= 2
            drop = new & ~wanted[rep_at]
            src, rep_at, target, new = src[~drop], rep_at[~drop], target[~drop], new[~drop]
            held = {}
            for r in np.flatnonzero(wanted):  # one call per content, not per page
                node = self._scans[e.vm[reps[r]]].vm.home_node
                held[int(r)] = backend.hold_page(rep_bytes[r], node=node)
            if held:
                target[new] = np.array([held[int(r)] for r in rep_at[new]], dtype=np.int64)
            self._map(host, e, src, target)
            for mpn in held.values():
                backend.release_page(mpn)
            self.own = np.union1d(self.own, np.fromiter(held.values(), dtype=np.int64, count=len(held)))
            self.pages_shared += len(src)
        freed = backend.free_pages() - before
        self.reclaimed += freed
        return freed

    # -- memory pressure ----------------------------------------------------------------------

    def _candidates(self, host, table: Table) -> tuple[list, np.ndarray, np.ndarray]:
        """Intact large pages in the order they are broken up, with the reclaimable estimate."""
        vms, index, gain = [], [], []
        for i, scan in enumerate(self._scans):
            intact = np.flatnonzero(self._intact(host, scan.vm))
            r = self.per_large_page(scan.vm.name)[intact]
            vms.append(np.full(len(intact), i))
            index.append(intact)
            gain.append(r)
        vm_of = np.concatenate(vms) if vms else np.zeros(0, np.int64)
        index = np.concatenate(index) if index else np.zeros(0, np.int64)
        gain = np.concatenate(gain) if gain else np.zeros(0, np.int64)
        if self.settings["order"] == "reclaimable":
            keep = gain > 0
            vm_of, index, gain = vm_of[keep], index[keep], gain[keep]
            order = np.lexsort((index, vm_of, -gain))
        else:
            order = np.lexsort((index, vm_of))
        return vm_of[order], index[order], gain[order]

    @hookimpl
    def memvisor_memory_pressure(self, host, pressure):
        """Reclaim until ``pressure.target_free_pages`` are free: share small pages, then break
        up large pages (most reclaimable first) and share their subpages. Returns pages freed."""
        backend = host.backend
        target = pressure.target_free_pages
        before = backend.free_pages()
        if before >= target or not self.vms:
            return 0
        if self.settings["scan_on_pressure"]:
            self.scan(host, sum(s.vm.pages for s in self.vms.values()), unscanned_only=True)
        table = self.refresh(host, urgent=True)
        estimated = table.total  # what is left to reclaim, before this event
        self.share_now(host, table)
        broken = estimated_breakup = 0
        freed_breakup = 0
        while self.can_split and backend.free_pages() < target:
            table = self.refresh(host, urgent=True)
            vm_of, index, gain = self._candidates(host, table)
            if not len(index):
                break
            deficit = target - backend.free_pages()
            take = min(len(index), int(np.searchsorted(np.cumsum(gain), deficit)) + 1)
            for i in np.unique(vm_of[:take]):
                backend.split(self._scans[i].vm, index[:take][vm_of[:take] == i])
            broken += take
            estimated_breakup += int(gain[:take].sum())
            freed_breakup += self.share_now(host, self.refresh(host, urgent=True))
        self.large_broken += broken
        self.reclaimed_by_breakup += freed_breakup
        freed = backend.free_pages() - before
        self.refresh(host)
        self.pressure_events.append({
            "time": pressure.time, "deficit_pages": target - before, "estimated_pages": estimated,
            "reclaimed_pages": freed, "large_pages_broken": broken,
            "estimated_from_breakup": estimated_breakup, "reclaimed_from_breakup": freed_breakup,
        })
        self._sample(host.now, self.table)
        return max(freed, 0)

    # -- reporting ----------------------------------------------------------------------------

    def _sample(self, now: float, table: Table | None) -> None:
        if table is None:
            return
        pages = sum(s.vm.pages for s in self.vms.values()) or 1
        self.history.append({
            "time": now, "estimated_pages": self.estimated, "remaining_pages": self.remaining,
            "in_large_pages": int(table.large_reclaimable.sum()), "saved_pages": self.saved,
            "scanned_fraction": len(table.entries.gpp) / pages,
        })

    def metrics(self, host) -> dict[str, Any]:
        """The figures of the report section."""
        table = self.table
        intact = sum(int(self._intact(host, s.vm).sum()) for s in self.vms.values() if s.vm.name in host.vms)
        at_start = sum(int(s.large_at_start) for s in self.vms.values())
        return {
            "estimated_reclaimable_pages": self.estimated,
            "saved_pages": self.saved,
            "remaining_reclaimable_pages": table.total if table else 0,
            "remaining_zero_pages": table.zero if table else 0,
            "remaining_duplicate_pages": table.duplicate if table else 0,
            "remaining_in_large_pages": int(table.large_reclaimable.sum()) if table else 0,
            "reclaimed_pages": self.reclaimed,
            "reclaimed_mib": self.reclaimed * PAGE_SIZE / 2**20,
            "pages_shared": self.pages_shared,
            "zero_pages_mapped": self.zero_mapped,
            "large_pages_broken": self.large_broken,
            "reclaimed_per_broken_large_page": (self.reclaimed_by_breakup / self.large_broken
                                                if self.large_broken else None),
            "large_pages_intact": intact,
            "large_pages_at_start": at_start,
            "pages_hashed": self.pages_hashed,
            "pages_hashed_per_s": self.pages_hashed / self.hash_seconds if self.hash_seconds else None,
            "sharing_broken_by_writes": self.writes_broken,
            "verify_failures": self.verify_failures,
            "pressure_events": self.pressure_events,
            "settings": {k: v for k, v in self.settings.items()},
        }

    @hookimpl
    def memvisor_report(self, host):
        """The estimate with its history, what was reclaimed, and large pages broken and kept."""
        if self.vms:  # the figures as of now, all from one table
            self.refresh(host)
            if not self.history or self.history[-1]["time"] != host.now:
                self._sample(host.now, self.table)  # the plot ends where the table does
        plots = []
        if self.history:
            t = [h["time"] for h in self.history]
            mib = PAGE_SIZE / 2**20
            plots.append(Plot("sharing-estimate", "Reclaimable by sharing: estimate and reclaimed", "time (s)", "MiB",
                              {"estimated": (t, [h["estimated_pages"] * mib for h in self.history]),
                               "saved now": (t, [h["saved_pages"] * mib for h in self.history]),
                               "left in large pages": (t, [h["in_large_pages"] * mib for h in self.history])},
                              kind="step", scale=mib,
                              ends_at={"estimated": ("estimated_reclaimable_pages",), "saved now": ("saved_pages",),
                                       "left in large pages": ("remaining_in_large_pages",)}))
        if self.table is not None and len(self.table.large_reclaimable):
            r = np.sort(self.table.large_reclaimable)[::-1]
            plots.append(Plot("sharing-large-pages", "Reclaimable subpages per intact large page", "large pages (rank)",
                              "pages", {"reclaimable": (np.arange(len(r)), r)}, kind="bar",
                              shows="The intact large pages at the end, most reclaimable subpages first "
                                    "(together: the Estimate table's \"of it in large pages\")."))
        return ReportSection(
            plugin=NAME, title="Page sharing in large pages", metrics=self.metrics(host), plots=plots,
            headlines=HEADLINES, tables=TABLES,
            text="Machine pages that sharing could reclaim (estimate, by 4 KiB fingerprints verified byte for "
                 "byte before any share), what the plugin reclaimed, and the large pages it broke up under "
                 "memory pressure, most reclaimable first (a dash, null in report.json: no large page broken, or no "
                 "page hashed yet).")

    # -- registration -------------------------------------------------------------------------

    @hookimpl
    def memvisor_register_commands(self, cli):
        """``memvisor sharing estimate``."""
        from memvisor_sharing.cli import sharing

        cli.add_command(sharing)

    @hookimpl
    def memvisor_register_benchmarks(self, register):
        """``memvisor bench sharing``: estimate throughput and break-up order."""
        from memvisor_sharing.bench import cases

        for case in cases():
            register("sharing", case)


HEADLINES = (
    Headline("sharing saves {saved} now, of the {estimated} it estimates reclaimable; {broken} large pages broken "
             "up, {intact} intact",
             {"saved": Figure(("saved_pages",), "pages", "higher", "saved now"),
              "estimated": Figure(("estimated_reclaimable_pages",), "pages", label="estimated reclaimable"),
              "broken": Figure(("large_pages_broken",), "count", "lower"),
              "intact": Figure(("large_pages_intact",), "count", "higher")}),
)
"""What sharing saved, against its estimate, and what it cost in large pages (the host's: a
shared page belongs to several VMs)."""

_PRESSURE = (("time", "at", "s"), ("deficit_pages", "deficit", "pages"), ("estimated_pages", "estimated", "pages"),
             ("reclaimed_pages", "reclaimed", "pages"), ("large_pages_broken", "large pages broken", "count"),
             ("estimated_from_breakup", "estimated from break-up", "pages"),
             ("reclaimed_from_breakup", "reclaimed from break-up", "pages"))

TABLES = (
    report.Table("Estimate", [Column("estimated_reclaimable_pages", "reclaimable (estimate)", "pages"),
                       Column("saved_pages", "saved now", "pages"),
                       Column("remaining_reclaimable_pages", "still to take", "pages"),
                       Column("remaining_zero_pages", "of it zero pages", "pages"),
                       Column("remaining_duplicate_pages", "of it duplicates", "pages"),
                       Column("remaining_in_large_pages", "of it in large pages", "pages")], record=()),
    report.Table("Work", [Column("reclaimed_pages", "reclaimed (net)", "pages"),
                   Column("pages_shared", "pages shared", "count"),
                   Column("zero_pages_mapped", "zero pages mapped", "count"),
                   Column("large_pages_broken", "large pages broken", "count"),
                   Column("reclaimed_per_broken_large_page", "reclaimed per broken large page", "pages", "none broken"),
                   Column("large_pages_intact", "large pages intact", "count"),
                   Column("large_pages_at_start", "large pages at start", "count"),
                   Column("pages_hashed", "pages hashed", "count"),
                   Column("pages_hashed_per_s", "hash rate", "per_s", "no hash yet", help="pages per second"),
                   Column("sharing_broken_by_writes", "shares broken by writes", "count"),
                   Column("verify_failures", "byte-for-byte checks failed", "count",
                          help="equal fingerprints, different bytes: not shared")], record=()),
    report.Table("Memory pressure", [Column(key, label, unit) for key, label, unit in _PRESSURE],
                 rows=("pressure_events",), keys=()),
    report.Table("Settings", [Column("pages_per_tick", "pages per tick", "count"),
                              Column("across", "shared across", "text",
                                     "no group: a VM's pages share only with its own (zero pages with all)"),
                       Column("order", "break-up order", "text"), Column("share_small", "share small pages", "text"),
                       Column("scan_on_pressure", "scan on pressure", "text"),
                       Column("wait_stable", "wait for stable pages", "text")], record=("settings",)),
)
"""The estimate, the work done, every pressure event and the settings."""
