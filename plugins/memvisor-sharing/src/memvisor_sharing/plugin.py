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
from typing import Any

import attrs
import numpy as np

from memvisor import LARGE_PAGE_PAGES, PAGE_SIZE, hookimpl, report
from memvisor.backend import Capability
from memvisor.identity import concat, rows_equal, take, zero_rows
from memvisor.report import Column, Figure, Headline, Plot, ReportSection
from memvisor.settings import as_json, setting
from memvisor_sharing.table import Entries, Table, build_table

NAME = "sharing"

ORDERS = ("reclaimable", "address")
"""Orders in which large pages are broken up under pressure."""

_CHUNK = 8192  # source pages verified and shared per step: bounds the bytes read at once (32 MiB)
PRESSURE_SHARDS = 4
"""Shards of the table a memory pressure event rebuilds at most on a host of several (a few
seconds of work at 1 TiB): sharing then gives what it can quickly and leaves the rest of the
deficit to the other reclaimers."""
_MAX_BARS = 256  # large pages drawn as bars at most (more: a staircase)
_SCAN_CHUNK = 1 << 20  # pages fingerprinted at a time (fingerprints are 8 bytes: 8 MiB)
SHARD_PAGES = 1 << 22
"""Guest pages per shard of the table: a host with more is cut into shards by fingerprint
(a power of two of them), one rebuilt per tick, so a rebuild sorts about this many
fingerprints (a second or so) however large the host; every copy of a content has the same
fingerprint, so a shard's table finds all of them."""


class _VMScan:
    """What the scanner knows of one VM: a fingerprint per page and the machine page hashed
    (14 bytes a page). The fingerprint is the one seen at the scan, not the page's current one,
    on either machine model: both models then take the same decisions (a page written since
    its scan fails the comparison before a share, as on a real host)."""

    def __init__(self, vm, group: int, large_pages: int, mpn_dtype):
        self.vm = vm
        self.group = group
        self.hash = np.zeros(vm.pages, dtype=np.uint64)
        self.scanned = np.zeros(vm.pages, dtype=bool)
        self.stable = np.zeros(vm.pages, dtype=bool)  # same fingerprint at the last two scans
        self.seen_mpn = np.full(vm.pages, -1, dtype=mpn_dtype)
        self.cursor = 0
        self.large_at_start = large_pages


def _one_group_each(across: tuple[tuple[str, ...], ...]) -> str | None:
    names = [name for group in across for name in group]
    return "a VM is named in two groups" if len(names) != len(set(names)) else None


@attrs.frozen
class SharingSettings:
    """What ``[plugins.sharing]`` may set (docs/sharing.md explains each)."""

    pages_per_tick: int = setting(4096, low=0, high=10**9,
                                  doc="Pages hashed per tick, spread evenly over the VMs (KSM's pages_to_scan; "
                                      "0: scan only under pressure).")
    across: tuple[tuple[str, ...], ...] = setting((), check=_one_group_each,
                                                   doc="Groups of VM names that may share with each other, e.g. "
                                                       "[[\"web\", \"api\"]]; a VM in no group shares only within "
                                                       "itself (salting).")
    order: str = setting("reclaimable", choices=ORDERS,
                         doc="Order of break-up under pressure: reclaimable (most first) or address (the baseline).")
    share_small: bool = setting(True, doc="Share small pages outside large pages as they are found (else only "
                                          "under pressure).")
    scan_on_pressure: bool = setting(True, doc="Under pressure, hash every page never hashed before choosing what "
                                               "to break.")
    wait_stable: bool = setting(True, doc="Share a page as found only once two scans saw the same content.")


@attrs.define
class _Summary:
    """What one shard's latest table said: reclaimable pages (zero, duplicate, of which small)
    and the reclaimable subpages of each large page (by VM name and index)."""

    zero: int = 0
    duplicate: int = 0
    small: int = 0
    large: dict[str, tuple[np.ndarray, np.ndarray]] = attrs.field(factory=dict)
    on_zero: int = 0  # guest pages of the shard on the zero page (what sharing saves there)

    @property
    def total(self) -> int:
        return self.zero + self.duplicate

    @classmethod
    def of(cls, table: Table, scans: list[_VMScan], on_zero: int) -> _Summary:
        large = {}
        for index in np.unique(table.large_vm):
            mine = table.large_vm == index
            large[scans[index].vm.name] = (table.large_index[mine], table.large_reclaimable[mine])
        return cls(table.zero, table.duplicate, table.small, large, on_zero)


def _in_shard(scan: _VMScan, mask: np.uint64, shard: int) -> np.ndarray:
    """The scanned pages of a VM whose fingerprint's low bits are ``shard``: a chunk at a time
    into buffers made once, so a pass over a 64 GiB VM allocates 9 MiB, not 200 MiB (system
    time, the kernel mapping fresh temporaries, was 30% of the CPU time of a 1 TiB run)."""
    n = scan.vm.pages
    words = np.empty(min(n, _SCAN_CHUNK), np.uint64)
    hit = np.empty(min(n, _SCAN_CHUNK), bool)
    parts = []
    for start in range(0, n, _SCAN_CHUNK):
        end = min(n, start + _SCAN_CHUNK)
        w, h = words[: end - start], hit[: end - start]
        np.bitwise_and(scan.hash[start:end], mask, out=w)
        np.equal(w, np.uint64(shard), out=h)
        np.logical_and(h, scan.scanned[start:end], out=h)
        parts.append(np.flatnonzero(h) + start)
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class SharingPlugin:
    """Page sharing with small pages inside large pages: scan, estimate, break up under pressure.

    One instance per host. Public attributes hold the figures the report shows; :attr:`table`
    is the latest estimate (None before the first scan).
    """

    def __init__(self) -> None:
        self.settings = SharingSettings()
        self.vms: dict[str, _VMScan] = {}
        self.groups: dict[str, int] = {}
        self.own = np.zeros(0, dtype=np.int64)  # machine pages this plugin shares (sorted)
        self._new_own: list[np.ndarray] = []  # made since the last rebuild (merged into own then)
        self.table: Table | None = None  # the table of the shard rebuilt last
        self.shards = 1
        self._summaries: dict[int, _Summary] = {}  # per shard, as of its latest table
        self._next_shard = 0
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
    def memvisor_selftest(self, selftest):
        """A small scan budget per tick, a scan step, and `memvisor sharing estimate`."""
        selftest.settings({"pages_per_tick": 512})
        selftest.step("sharing_scan", lambda plugin, host, budget: plugin.scan(host, budget), vm=False,
                      budget=(64, 4096))
        selftest.command("sharing estimate", {"images": ["{image}"], "json_out": "{out}/sharing.json"})

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare ``[plugins.sharing]``."""
        register(NAME, SharingSettings)

    @hookimpl
    def memvisor_host_started(self, host):
        """Read ``[plugins.sharing]`` and check that the backend can share (splitting large
        pages is optional: without it the plugin shares small pages only)."""
        self.settings = host.plugin_settings(NAME)
        host.require(NAME, Capability.SHARE, Capability.ZERO_PAGE)
        self.can_split = Capability.LARGE_PAGES in host.backend.capabilities
        self.groups = {name: i for i, group in enumerate(self.settings.across) for name in group}

    @hookimpl
    def memvisor_vm_created(self, host, vm):
        """Start knowing nothing of the VM: every page is to be scanned."""
        group = self.groups.get(vm.name, 1_000_000 + vm.id)  # salting: a group of its own
        mpn_dtype = np.int32 if host.backend.total_pages() < 2**31 else np.int64
        self.vms[vm.name] = _VMScan(vm, group, self._intact(host, vm).sum(), mpn_dtype)
        self._reshard()

    @hookimpl
    def memvisor_vm_destroyed(self, vm):
        """Forget the VM (its shared pages are released by the backend as it goes)."""
        self.vms.pop(vm.name, None)
        self.table = None
        for summary in self._summaries.values():
            summary.large.pop(vm.name, None)
        self._reshard()

    def _reshard(self) -> None:
        """Cut the table into a power of two of shards of about :data:`SHARD_PAGES` pages."""
        pages = sum(s.vm.pages for s in self.vms.values())
        shards = 1 << max(0, int(np.ceil(np.log2(max(1.0, pages / SHARD_PAGES)))))
        if shards != self.shards:
            self.shards, self._summaries, self._next_shard = shards, {}, 0

    @hookimpl
    def memvisor_tick(self, host, tick):
        """Hash the next ``pages_per_tick`` pages (sharing the zero pages found), rebuild the
        next shard of the table, share small pages."""
        if not self.vms or not self.settings.pages_per_tick:
            return
        self.scan(host, self.settings.pages_per_tick)
        shard, self._next_shard = self._next_shard, (self._next_shard + 1) % self.shards
        table = self.refresh(host, shard=shard)
        if self.settings.share_small:
            self._share(host, table, shard)
        self._sample(tick.now)

    def _share(self, host, table: Table, shard: int) -> int:
        """Share what a shard's table plans; what it freed moves from "remaining" to "saved" one
        for one (each content's copies but one are freed, the new shared page included), so no
        second rebuild is needed."""
        freed = self.share_now(host, table)
        self.saved += freed
        self.remaining -= freed
        summary = self._summaries.get(shard)
        if summary is not None and freed > 0:
            summary.small -= min(freed, summary.small)
            taken = min(freed, summary.zero)
            summary.zero -= taken
            summary.duplicate -= min(freed - taken, summary.duplicate)
        return freed

    @hookimpl
    def memvisor_write_trap(self, vm, write):
        """The guest writes shared (or protected) pages: their fingerprints are void; the core
        gives shared ones a private copy right after this call (nothing is re-shared here)."""
        scan = self.vms.get(vm.name)
        if scan is None:
            return
        scan.scanned[write.gpps] = False
        self.writes_broken += int(np.count_nonzero(write.shared))

    # -- scanning -----------------------------------------------------------------------------

    def scan(self, host, budget: int, *, unscanned_only: bool = False, urgent: bool = False) -> int:
        """Hash up to ``budget`` pages, round robin over the VMs from each VM's cursor (or every
        page not yet hashed, when ``unscanned_only``), within each VM's scan budget
        (:mod:`memvisor.budgets`); returns pages hashed. Zero pages found are shared at once
        (small private ones, seen zero twice, or at once when ``urgent``): they need no table,
        the host's zero page holds their content."""
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
            for part in range(0, len(gpps), _SCAN_CHUNK):
                chunk = gpps[part : part + _SCAN_CHUNK]
                mpns = backend.mpns(vm, chunk)
                fresh = backend.fingerprint(vm, chunk)
                scan.stable[chunk] = scan.scanned[chunk] & (scan.hash[chunk] == fresh)
                scan.hash[chunk] = fresh
                scan.seen_mpn[chunk] = mpns
                scan.scanned[chunk] = True
                if urgent or self.settings.share_small:
                    self._share_zero(host, scan, chunk, mpns, fresh, urgent)
            hashed += len(gpps)
        self.pages_hashed += hashed
        self.hash_seconds += time.perf_counter() - start
        return hashed

    def _share_zero(self, host, scan: _VMScan, gpps, mpns, fresh, urgent: bool) -> None:
        """Map the zero pages among freshly hashed ``gpps`` onto the zero page: small private
        pages seen zero twice in a row (``wait_stable``), or all of them when ``urgent``. The
        backend compares each with the zero page (a fingerprint of 0 is the zero page only)."""
        backend = host.backend
        zero = (fresh == 0) & (mpns != backend.zero_mpn)
        if not urgent and self.settings.wait_stable:
            zero &= scan.stable[gpps]
        if not zero.any():
            return
        pages, where = gpps[zero], mpns[zero]
        small = ~backend.large(scan.vm, pages) & (backend.refcounts(where) == 1)
        pages = pages[small]
        if not len(pages):
            return
        before = backend.free_pages()
        backend.share(scan.vm, pages, np.full(len(pages), backend.zero_mpn, dtype=np.int64))
        scan.seen_mpn[pages] = backend.zero_mpn
        freed = backend.free_pages() - before
        self.zero_mapped += len(pages)
        self.reclaimed += freed
        self.saved += freed
        # Zero pages are in shard 0: its count of them is kept current between its rebuilds.
        self._summaries.setdefault(0, _Summary()).on_zero += len(pages)

    def _pressure_shards(self) -> list[int]:
        """The shards a pressure event rebuilds: every one on a host of one shard; else at most
        :data:`PRESSURE_SHARDS`, those whose latest table promised most first, then those never
        built (the rest of the deficit is for the other reclaimers, and later ticks)."""
        if self.shards == 1:
            return [0]
        known = sorted((s for s, summary in self._summaries.items() if summary.total > 0),
                       key=lambda s: -self._summaries[s].total)
        unknown = [s for s in range(self.shards) if s not in self._summaries]
        return (known + unknown)[:PRESSURE_SHARDS]

    def _share_scanned_zero(self, host) -> None:
        """Under pressure: map the pages last hashed as zero that are not on the zero page yet
        (each is checked: its fingerprint now must still be 0) without building a table."""
        backend = host.backend
        for scan in self.vms.values():
            if scan.vm.name not in host.vms:
                continue
            gpps = np.flatnonzero(scan.scanned & (scan.hash == 0))
            for part in range(0, len(gpps), _SCAN_CHUNK):
                chunk = gpps[part : part + _SCAN_CHUNK]
                mpns = backend.mpns(scan.vm, chunk)
                chunk, mpns = chunk[mpns != backend.zero_mpn], mpns[mpns != backend.zero_mpn]
                chunk, mpns = chunk[mpns >= 0], mpns[mpns >= 0]
                if len(chunk):
                    self._share_zero(host, scan, chunk, mpns, backend.fingerprint(scan.vm, chunk), urgent=True)

    # -- the table ----------------------------------------------------------------------------

    def _intact(self, host, vm) -> np.ndarray:
        """Per large-page index of ``vm``, whether it is an intact large page."""
        whole = vm.pages // LARGE_PAGE_PAGES
        return host.backend.large(vm)[: whole * LARGE_PAGE_PAGES].reshape(whole, LARGE_PAGE_PAGES)[:, 0]

    def refresh(self, host, *, urgent: bool = False, shard: int | None = None) -> Table:
        """Rebuild the table of shard ``shard`` (every shard when None, one after the other) from
        its valid fingerprints (a page whose machine page changed since it was hashed is void and
        will be hashed again); returns the last table built. Pages may be shared now when their
        content was stable over two scans (``wait_stable``), or always when ``urgent``. Pages
        already on the zero page are counted as saved and left out of the table."""
        backend = host.backend
        scans = [s for s in self.vms.values() if s.vm.name in host.vms]
        self._scans = scans
        if self._new_own:  # one merge per rebuild: a sort per share chunk was quadratic in own pages
            merged = np.sort(np.concatenate([self.own, *self._new_own]), kind="stable")  # mostly sorted
            self.own = merged[np.concatenate(([True], merged[1:] != merged[:-1]))] if len(merged) else merged
            self._new_own = []
        self.own = self.own[backend.refcounts(self.own) >= 2] if len(self.own) else self.own
        table = None
        for s in range(self.shards) if shard is None else [shard % self.shards]:
            table, on_zero = self._build(host, scans, s, urgent)
            self._summaries[s] = _Summary.of(table, scans, on_zero)
        # What sharing saves now: guest pages on the zero page (all in shard 0: their fingerprint
        # is 0), and every mapping of a page this plugin shares but one.
        self.saved = sum(summary.on_zero for summary in self._summaries.values())
        if len(self.own):
            self.saved += int((backend.refcounts(self.own).astype(np.int64) - 1).sum())
        self.table = table
        self.remaining = sum(summary.total for summary in self._summaries.values())
        return table

    def _build(self, host, scans: list[_VMScan], shard: int, urgent: bool) -> tuple[Table, int]:
        """The table of one shard, from the fingerprints whose low bits are ``shard`` that are
        still valid (a page whose machine page changed since it was hashed is void and will be
        hashed again), and the number of them on the zero page (left out of the table)."""
        backend = host.backend
        parts, on_zero = [], 0
        mask = np.uint64(self.shards - 1)
        for index, scan in enumerate(scans):
            gpps = np.flatnonzero(scan.scanned) if self.shards == 1 else _in_shard(scan, mask, shard)
            mpns = backend.mpns(scan.vm, gpps)
            valid = mpns == scan.seen_mpn[gpps]
            scan.scanned[gpps[~valid]] = False
            gpps, mpns = gpps[valid], mpns[valid]
            zero = mpns == backend.zero_mpn
            on_zero += int(np.count_nonzero(zero))
            gpps, mpns = gpps[~zero], mpns[~zero]
            movable = np.ones(len(gpps), bool) if urgent or not self.settings.wait_stable else scan.stable[gpps]
            parts.append((np.full(len(gpps), index, dtype=np.int64), gpps, scan.hash[gpps], mpns,
                          backend.large(scan.vm, gpps), np.full(len(gpps), scan.group, dtype=np.int64), movable))
        cols = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(7)]
        mpn = cols[3].astype(np.int64)
        refcount = backend.refcounts(np.maximum(mpn, 0)).astype(np.int64) if len(mpn) else np.zeros(0, np.int64)
        at = np.minimum(np.searchsorted(self.own, mpn), max(len(self.own) - 1, 0))
        own = self.own[at] == mpn if len(self.own) else np.zeros(len(mpn), bool)
        entries = Entries(cols[0].astype(np.int64), cols[1].astype(np.int64), cols[2].astype(np.uint64), mpn,
                          cols[4].astype(bool), cols[5].astype(np.int64), refcount, own, cols[6].astype(bool))
        return build_table(entries, backend.zero_mpn), on_zero

    @property
    def estimated(self) -> int:
        """Machine pages sharing everything found so far reclaims: what it saves already plus
        what the tables say is left (0 before the first scan)."""
        return self.saved + self.remaining

    def per_large_page(self, vm_name: str) -> np.ndarray:
        """Machine pages that breaking up each large page of a VM would reclaim (by index), as
        of each shard's latest table."""
        scan = self.vms[vm_name]
        out = np.zeros(scan.vm.pages // LARGE_PAGE_PAGES, dtype=np.int64)
        for summary in self._summaries.values():
            index, counts = summary.large.get(vm_name, (None, None))
            if index is not None:
                np.add.at(out, index, counts)
        return out

    # -- sharing ------------------------------------------------------------------------------

    def _rows_by_vm(self, entries: Entries, rows: np.ndarray):
        for index in np.unique(entries.vm[rows]):
            yield self._scans[index], rows[entries.vm[rows] == index]

    def _contents(self, host, entries: Entries, rows: np.ndarray):
        """The contents of the pages at ``rows``, in that order, in the backend's model (bytes, or
        identities: :meth:`memvisor.backend.Backend.contents`)."""
        vms = entries.vm[rows]
        order = np.argsort(vms, kind="stable")
        parts = [host.backend.contents(self._scans[index].vm, entries.gpp[rows[order[vms[order] == index]]])
                 for index in np.unique(vms)]
        if not parts:
            return host.backend.contents(self._scans[0].vm, rows[:0]) if self._scans else np.zeros((0, PAGE_SIZE))
        return take(concat(parts), np.argsort(order, kind="stable"))

    def _void(self, entries: Entries, rows: np.ndarray) -> None:
        """Pages whose bytes no longer match their fingerprint: hash them again later."""
        self.verify_failures += len(rows)
        for scan, mine in self._rows_by_vm(entries, rows):
            scan.scanned[entries.gpp[mine]] = False

    def _map(self, host, entries: Entries, rows: np.ndarray, targets: np.ndarray) -> int:
        """Share the pages at ``rows`` onto ``targets`` (verified already); returns pages freed."""
        freed = 0
        vms = entries.vm[rows]
        for index in np.unique(vms).tolist():
            at = vms == index
            gpps, scan = entries.gpp[rows[at]], self._scans[index]
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
            ok = zero_rows(self._contents(host, e, rows))
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
            rep_contents = self._contents(host, e, reps)
            same = rows_equal(self._contents(host, e, src), take(rep_contents, rep_at))
            self._void(e, src[~same])
            src, rep, rep_at, target = src[same], rep[same], rep_at[same], target[same]
            # A new page per content that still has two copies (the keeper among them).
            new = target < 0
            wanted = np.bincount(rep_at[new], minlength=len(reps)) >= 2
            drop = new & ~wanted[rep_at]
            src, rep_at, target, new = src[~drop], rep_at[~drop], target[~drop], new[~drop]
            contents = np.flatnonzero(wanted)  # one new page per content, held in one call
            nodes = np.array([self._scans[i].vm.home_node for i in e.vm[reps[contents]].tolist()], dtype=np.int64)
            held = backend.hold_pages(take(rep_contents, contents), nodes) if len(contents) else contents
            mpn_of = np.full(len(reps), -1, dtype=np.int64)
            mpn_of[contents] = held
            target[new] = mpn_of[rep_at[new]]
            self._map(host, e, src, target)
            backend.release_pages(held)
            self._new_own.append(held)
            self.pages_shared += len(src)
        freed = backend.free_pages() - before
        self.reclaimed += freed
        return freed

    # -- memory pressure ----------------------------------------------------------------------

    def _candidates(self, host) -> tuple[list, np.ndarray, np.ndarray]:
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
        if self.settings.order == "reclaimable":
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
        zero_before = self.zero_mapped
        if self.settings.scan_on_pressure:  # zero pages found are shared as they are hashed
            self.scan(host, sum(s.vm.pages for s in self.vms.values()), unscanned_only=True, urgent=True)
        self._share_scanned_zero(host)  # and those hashed before, still waiting for a second scan
        estimated = self.zero_mapped - zero_before  # what is left to reclaim, before this event
        for shard in self._pressure_shards():  # build, share, until the target is met
            if backend.free_pages() >= target:
                break
            table = self.refresh(host, urgent=True, shard=shard)
            estimated += self._summaries[shard].total
            self._share(host, table, shard)
        broken = estimated_breakup = 0
        freed_breakup = 0
        while self.can_split and backend.free_pages() < target:
            if self.shards == 1:
                self.refresh(host, urgent=True)
            vm_of, index, gain = self._candidates(host)
            if not len(index):
                break
            deficit = target - backend.free_pages()
            take = min(len(index), int(np.searchsorted(np.cumsum(gain), deficit)) + 1)
            for i in np.unique(vm_of[:take]):
                backend.split(self._scans[i].vm, index[:take][vm_of[:take] == i])
            broken += take
            estimated_breakup += int(gain[:take].sum())
            if self.shards > 1:  # their zero subpages need no table; their duplicates wait for ticks
                free_before = backend.free_pages()
                self._share_scanned_zero(host)
                freed_breakup += backend.free_pages() - free_before
                break  # one round per event
            freed_breakup += self._share(host, self.refresh(host, urgent=True), 0)
        self.large_broken += broken
        self.reclaimed_by_breakup += freed_breakup
        freed = backend.free_pages() - before
        self.refresh(host) if self.shards == 1 else None  # a host cut in shards keeps what it has
        self.pressure_events.append({
            "time": pressure.time, "deficit_pages": target - before, "estimated_pages": estimated,
            "reclaimed_pages": freed, "large_pages_broken": broken,
            "estimated_from_breakup": estimated_breakup, "reclaimed_from_breakup": freed_breakup,
        })
        self._sample(host.now)
        return max(freed, 0)

    # -- reporting ----------------------------------------------------------------------------

    def _in_large_pages(self) -> int:
        """Reclaimable pages that need a large page broken up, as of each shard's latest table."""
        return sum(int(counts.sum()) for summary in self._summaries.values() for _, counts in summary.large.values())

    def _sample(self, now: float) -> None:
        if self.table is None:
            return
        pages = sum(s.vm.pages for s in self.vms.values()) or 1
        scanned = sum(int(np.count_nonzero(s.scanned)) for s in self.vms.values())
        self.history.append({
            "time": now, "estimated_pages": self.estimated, "remaining_pages": self.remaining,
            "in_large_pages": self._in_large_pages(), "saved_pages": self.saved,
            "scanned_fraction": scanned / pages,
        })

    def metrics(self, host) -> dict[str, Any]:
        """The figures of the report section."""
        summaries = self._summaries.values()
        intact = sum(int(self._intact(host, s.vm).sum()) for s in self.vms.values() if s.vm.name in host.vms)
        at_start = sum(int(s.large_at_start) for s in self.vms.values())
        return {
            "estimated_reclaimable_pages": self.estimated,
            "saved_pages": self.saved,
            "remaining_reclaimable_pages": self.remaining,
            "remaining_zero_pages": sum(summary.zero for summary in summaries),
            "remaining_duplicate_pages": sum(summary.duplicate for summary in summaries),
            "remaining_in_large_pages": self._in_large_pages(),
            "table_shards": self.shards,
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
            "settings": as_json(self.settings),
        }

    @hookimpl
    def memvisor_report(self, host):
        """The estimate with its history, what was reclaimed, and large pages broken and kept."""
        if self.vms and self.shards == 1:  # the figures as of now (a sharded table: as of each shard's
            self.refresh(host)             # latest rebuild, not one more rebuild of every shard)
        if self.vms and (not self.history or self.history[-1]["time"] != host.now):
            self._sample(host.now)  # the plot ends where the table does
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
        counts = [c for summary in self._summaries.values() for _, c in summary.large.values()]
        if counts and sum(len(c) for c in counts):
            r = np.sort(np.concatenate(counts))[::-1]
            # A bar each for a few large pages; a staircase for thousands (a bar is a patch to draw).
            plots.append(Plot("sharing-large-pages", "Reclaimable subpages per intact large page", "large pages (rank)",
                              "pages", {"reclaimable": (np.arange(len(r)), r)},
                              kind="bar" if len(r) <= _MAX_BARS else "step",
                              shows="The intact large pages at the end, most reclaimable subpages first "
                                    "(together: the Estimate table's \"of it in large pages\")."))
        return ReportSection(
            plugin=NAME, title="Page sharing in large pages", metrics=self.metrics(host), plots=plots,
            headlines=HEADLINES, tables=TABLES,
            text="Machine pages that sharing could reclaim (estimate, by 4 KiB fingerprints verified byte for "
                 "byte, or identity for identity, before any share), what the plugin reclaimed, and the large "
                 "pages it broke up under memory pressure, most reclaimable first (a dash, null in report.json: "
                 "no large page broken, or no page hashed yet; a host of more than one table shard reports each "
                 "shard as of its latest rebuild).")

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
