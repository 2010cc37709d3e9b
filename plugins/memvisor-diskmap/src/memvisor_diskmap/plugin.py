"""The diskmap plugin: guest pages that equal disk blocks are kept as mappings GPP -> (disk, block).

A mapping is made when a page is filled from a block (:func:`memvisor_disk_io`, a read), when
a page is written back to a block (a write: the two are equal afterwards), or, with
``scan = true``, when a page is found identical to a block by content (the disk index, verified
byte for byte). Mapped pages are write-protected; a guest write to one drops its mapping
(:func:`memvisor_write_trap`), and so does a write to its disk block; a checkpoint restore
drops them all (the memory is replaced). Each mapping keeps the
block's version and the page's fingerprint (``Backend.fingerprint``: a 64-bit hash of its bytes,
or of its identity on an identity-model host) at the time it was made, and every use checks
them, so a block changed since, or a page changed behind the guest's back, is never used.

Uses of the mapping:

- **snapshots and live migration** -- :func:`memvisor_describe_pages` answers with
  ``disk-ref`` records (disk, block, hash: 24 bytes instead of a page), and
  :func:`memvisor_resolve_records` reads the blocks back and checks their hash;
- **swap** -- under :func:`memvisor_memory_pressure`, mapped clean pages are dropped without a
  write (``backend.unmap``); a later touch faults them back from the block
  (:func:`memvisor_page_fault`); a block about to be overwritten is read back in first;
- **memory-error repair** -- :func:`memvisor_memory_error` rebuilds mapped pages from their
  blocks.

Settings (``[plugins.diskmap]``): ``swap`` (default true), ``scan`` (default false),
``protect`` (default true: write-protect mapped pages; without it a guest write is not seen
and mappings are checked by hash alone at each use).
"""

from __future__ import annotations

from collections import Counter

import attrs
import numpy as np

from memvisor import PAGE_SIZE, hookimpl
from memvisor.backend import Capability
from memvisor.errors import BackendError
from memvisor.events import PageRecords
from memvisor.identity import concat, rows_equal, zero_rows
from memvisor.identity import fingerprints as _fingerprints
from memvisor.report import Column, Figure, Headline, ReportSection, Table
from memvisor.settings import setting
from memvisor_diskmap.index import DiskIndex

KIND = "disk-ref"
"""The record kind this plugin writes: payload ``[disk slot, block, hash]`` as 3 little-endian
uint64 (24 bytes), the disk slot being the disk's position among the VM's disks."""

PAYLOAD_BYTES = 24


@attrs.frozen
class DiskmapSettings:
    """What ``[plugins.diskmap]`` may set (docs/migration.md)."""

    swap: bool = setting(True, doc="Under memory pressure, drop mapped pages that still equal their blocks "
                                   "(a touch faults them back from the disk); needs the fault capability.")
    scan: bool | None = setting(None, doc="Also find pages equal to disk blocks by content (a scan of the VM's "
                                          "pages), not only through the guest's disk reads.",
                                host_dependent="default: true for a VM whose disks are all attached read-only (a "
                                               "memory image with its disk: memvisor migrate --image --disk, whose "
                                               "pages were never read from the disk), else false.")
    protect: bool = setting(True, doc="Write-protect mapped pages, so that a guest write drops the mapping at "
                                      "once; needs the write_protect capability.")


def _fields(payloads, count: int, vm) -> np.ndarray:
    """The ``(slot, block, hash)`` u64 fields of ``count`` disk-ref payloads, which come from
    a file or a link: anything but ``count`` payloads of 24 bytes is refused with
    :class:`BackendError` (the records are then never used)."""
    if isinstance(payloads, np.ndarray):
        ok = payloads.dtype == np.uint8 and payloads.shape == (count, PAYLOAD_BYTES)
        raw = payloads if ok else None
    else:
        items = list(payloads)
        ok = len(items) == count and all(isinstance(p, (bytes, bytearray)) and len(p) == PAYLOAD_BYTES
                                         for p in items)
        raw = np.frombuffer(b"".join(items), np.uint8).reshape(count, PAYLOAD_BYTES) if ok else None
    if raw is None:
        raise BackendError(f"disk-ref records of VM {vm.name!r}: payloads are not {count} of {PAYLOAD_BYTES} bytes")
    return np.ascontiguousarray(raw).view("<u8").astype(np.uint64)


class _Map:
    """The mappings of one VM that has a disk (26 bytes a page: a VM without a disk has none).

    ``disk`` is the disk's slot (-1: not mapped); ``version`` the low 32 bits of the block's
    version when mapped (a filter only: every use also compares fingerprints, so a version that
    wrapped around is caught by the fingerprint).
    """

    def __init__(self, pages: int):
        self.disk = np.full(pages, -1, dtype=np.int8)
        self.block = np.full(pages, -1, dtype=np.int32)
        self.version = np.zeros(pages, dtype=np.uint32)
        self.hash = np.zeros(pages, dtype=np.uint64)
        self.swapped = np.zeros(pages, dtype=bool)
        # Machine page each page's bytes were last seen equal to its block on: a memory error
        # is repaired only on that page (the hypervisor may remap a page without a trap).
        self.verified_mpn = np.full(pages, -1, dtype=np.int32)
        self.verified_given_up = np.zeros(pages, dtype=np.uint32)  # host.times_given_up then

    def verified(self, host, vm, gpps: np.ndarray) -> None:
        """``gpps`` were just seen to hold their blocks' bytes."""
        self.verified_mpn[gpps] = host.backend.mpns(vm, gpps)
        self.verified_given_up[gpps] = host.times_given_up(vm, gpps)


class DiskmapPlugin:
    """Guest pages that equal disk blocks, as mappings used by snapshots, migration, swap and
    memory-error repair."""

    def __init__(self) -> None:
        self.host = None
        self.settings = DiskmapSettings()
        self.maps: dict[str, _Map] = {}
        self.counts: Counter = Counter()
        self._indexes: dict[int, tuple[int, DiskIndex]] = {}
        self._watched: set[int] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    @hookimpl
    def memvisor_selftest(self, selftest):
        """A scan step and the check that trusted mappings hold."""
        from memvisor_diskmap.selftest import contribute

        contribute(selftest)

    @hookimpl
    def memvisor_register_settings(self, register):
        """Declare ``[plugins.diskmap]``."""
        register("diskmap", DiskmapSettings)

    @hookimpl
    def memvisor_host_started(self, host):
        """Read the settings; swap needs page faults, protection needs write protection."""
        self.host = host
        self.settings = host.plugin_settings("diskmap")
        needs = [Capability.FAULT] if self.settings.swap else []
        if self.settings.protect:
            needs.append(Capability.WRITE_PROTECT)
        host.require("diskmap", *needs)

    @hookimpl
    def memvisor_vm_created(self, vm):
        """Start with no mapping (the table of mappings comes with the first one)."""
        self.maps.pop(vm.name, None)

    @hookimpl
    def memvisor_vm_destroyed(self, host, vm):
        """Forget the VM and stop watching its disks."""
        self.maps.pop(vm.name, None)
        for disk in host.disks.get(vm.name, {}).values():
            if self._before_write in disk.before_write:
                disk.before_write.remove(self._before_write)

    # -- helpers ------------------------------------------------------------------------------

    def _map_of(self, vm) -> _Map:
        """The VM's mappings; an empty table for a VM that has none yet (not kept)."""
        m = self.maps.get(vm.name)
        if m is None:
            m = _Map(vm.pages)
            if self._disks(vm):  # only a VM with a disk ever gets a mapping
                self.maps[vm.name] = m
        return m

    def _disks(self, vm) -> list:
        return list(self.host.disks.get(vm.name, {}).values())

    def _slot(self, vm, disk) -> int:
        return next(i for i, d in enumerate(self._disks(vm)) if d is disk)

    def _set(self, vm, gpps, slot: int, blocks, hashes) -> None:
        """Record mappings of ``gpps`` to ``blocks`` of disk ``slot`` (page bytes hashed by the
        caller) and write-protect the pages."""
        m = self._map_of(vm)
        disk = self._disks(vm)[slot]
        m.disk[gpps], m.block[gpps] = slot, blocks
        m.version[gpps], m.hash[gpps] = disk.versions[blocks].astype(np.uint32), hashes
        m.verified(self.host, vm, gpps)
        if self.settings.protect and len(gpps):
            self.host.backend.protect(vm, gpps)
        self.counts["mapped"] += len(gpps)

    def _drop(self, vm, gpps, reason: str) -> None:
        m = self.maps.get(vm.name)
        if m is None:
            return
        gpps = gpps[m.disk[gpps] >= 0]
        m.disk[gpps] = -1
        self.counts[f"dropped_{reason}"] += len(gpps)

    def _scans(self, vm) -> bool:
        """Whether pages of ``vm`` are found by content (``scan``; by default, only for a VM whose
        disks are all read-only images: its pages were never read through its disks)."""
        if self.settings.scan is not None:
            return self.settings.scan
        disks = self._disks(vm)
        return bool(disks) and all(d.read_only for d in disks)

    def _valid(self, vm, gpps) -> np.ndarray:
        """Per page, whether it is mapped and its block has not been written since."""
        m = self.maps.get(vm.name)
        if m is None:
            return np.zeros(len(gpps), dtype=bool)
        ok = m.disk[gpps] >= 0
        for slot, disk in enumerate(self._disks(vm)):
            mine = ok & (m.disk[gpps] == slot)
            if mine.any():
                ok[mine] = disk.versions[m.block[gpps[mine]]].astype(np.uint32) == m.version[gpps[mine]]
        return ok

    def mapped(self, vm) -> np.ndarray:
        """The pages of ``vm`` mapped to a block that has not changed since (sorted)."""
        m = self.maps.get(vm.name)
        if m is None:
            return np.zeros(0, dtype=np.int64)
        pages = np.flatnonzero(m.disk >= 0)
        return pages[self._valid(vm, pages)]

    def still_equal(self, vm) -> np.ndarray:
        """The mapped pages whose bytes still hash as when they were mapped (swapped-out ones
        count: they come back from their blocks). A page changed by the hypervisor rather than
        the guest (a balloon page remapped) keeps its mapping until a use checks it."""
        pages = self.mapped(vm)
        present = pages[self.host.backend.present(vm, pages)]
        m = self._map_of(vm)
        keep = np.ones(len(pages), dtype=bool)
        if len(present):
            same = self.host.backend.fingerprint(vm, present) == m.hash[present]
            keep[np.searchsorted(pages, present[~same])] = False
            m.verified(self.host, vm, present[same])
        return pages[keep]

    def _trusted(self, host, vm, gpps: np.ndarray, mpns: np.ndarray) -> np.ndarray:
        """Per page, whether its mapping can be used without looking at its bytes: it is on the
        machine page it was last seen equal to its block on, and the guest has not given it up
        since (a balloon takes only pages given up, and gives them back as zeros). Machine page
        numbers are reused, so the first alone is not enough: the balloon's page can be
        allocated where a mapped page once was, and the page, once taken, then sits on its old
        number with zeros in it (found by ``memvisor selftest`` through :meth:`verify`)."""
        m = self._map_of(vm)
        return (mpns == m.verified_mpn[gpps]) & (host.times_given_up(vm, gpps) == m.verified_given_up[gpps])

    def verify(self, vm) -> int:
        """Check the mappings this plugin would trust without looking: a dropped page's block
        still holds the page (it comes back from there), and a present page on the machine
        page it was last seen equal to its block on still equals it (a memory error is repaired
        from there). Returns the pages for which that does not hold."""
        m = self._map_of(vm)
        backend = self.host.backend
        pages = self.mapped(vm)
        if not len(pages):
            return 0
        present = backend.present(vm, pages)
        swapped = pages[~present & m.swapped[pages]]
        trusted = pages[present]
        trusted = trusted[self._trusted(self.host, vm, trusted, backend.mpns(vm, trusted))]
        bad = 0
        for group, hashes in ((swapped, None), (trusted, backend.fingerprint(vm, trusted) if len(trusted) else None)):
            if not len(group):
                continue
            expected = m.hash[group] if hashes is None else hashes
            bad += int(np.count_nonzero(self._block_hashes(vm, group) != expected))
        return bad

    def _block_contents(self, vm, gpps: np.ndarray):
        """The contents of the blocks mapped pages ``gpps`` are mapped to (in that order)."""
        m, disks = self._map_of(vm), self._disks(vm)
        slots = m.disk[gpps]
        order = np.argsort(slots, kind="stable")
        parts = [disks[slot].contents(m.block[gpps[order[slots[order] == slot]]]) for slot in np.unique(slots)]
        data = concat(parts)
        return data[np.argsort(order, kind="stable")]

    def _block_hashes(self, vm, gpps: np.ndarray) -> np.ndarray:
        """Fingerprints of the blocks mapped pages ``gpps`` are mapped to."""
        m, disks = self._map_of(vm), self._disks(vm)
        out = np.zeros(len(gpps), np.uint64)
        for slot in np.unique(m.disk[gpps]):
            rows = np.flatnonzero(m.disk[gpps] == slot)
            out[rows] = disks[slot].fingerprints(m.block[gpps[rows]])
        return out

    def _index(self, disk):
        cached = self._indexes.get(id(disk))
        if cached is None or cached[0] != disk.version:
            index = DiskIndex(disk.data) if disk.contents_model == "bytes" else _IdentityIndex(disk)
            cached = (disk.version, index)
            self._indexes[id(disk)] = cached
        return cached[1]

    def scan(self, vm, gpps: np.ndarray | None = None) -> int:
        """Map pages of ``vm`` (all present ones when None) that are identical to a block of one
        of its disks, found by content; returns pages newly mapped."""
        backend = self.host.backend
        gpps = np.flatnonzero(backend.present(vm)) if gpps is None else gpps
        m = self._map_of(vm)
        gpps = gpps[m.disk[gpps] < 0]
        found = 0
        chunk = 8192 if backend.contents_model == "bytes" else 1 << 20
        for start in range(0, len(gpps), chunk):
            part = gpps[start : start + chunk]
            data = backend.contents(vm, part)
            keep = ~zero_rows(data)
            part, data = part[keep], data[keep]
            for slot, disk in enumerate(self._disks(vm)):
                blocks = self._index(disk).lookup(data)
                hit = blocks >= 0
                if hit.any():
                    self._set(vm, part[hit], slot, blocks[hit], backend.fingerprint(vm, part[hit]))
                    self.counts["mapped_by_scan"] += int(hit.sum())
                    found += int(hit.sum())
                    part, data = part[~hit], data[~hit]
        return found

    # -- disk I/O and guest writes ----------------------------------------------------------

    @hookimpl
    def memvisor_disk_io(self, host, vm, io):
        """Map pages read from blocks and pages written to blocks; drop mappings of other pages
        to the blocks written."""
        slot = self._slot(vm, io.disk)
        m = self._map_of(vm)
        written = io.blocks[io.writes]
        if len(written):
            stale = np.flatnonzero((m.disk == slot) & np.isin(m.block, written))
            self._drop(vm, stale, "disk_write")
        if len(io.gpps):
            hashes = io.disk.fingerprints(io.blocks)
            # Map only pages that equal their block now: a page read from a block that the same
            # batch then overwrote from another page does not (found by the all-techniques
            # integration test: a memory error "repaired" such a page with the other page's bytes).
            gpps, blocks = io.gpps, io.blocks
            present = host.backend.present(vm, gpps)
            same = np.zeros(len(gpps), dtype=bool)
            same[present] = host.backend.fingerprint(vm, gpps[present]) == hashes[present]
            self._set(vm, gpps[same], slot, blocks[same], hashes[same])
            self._drop(vm, gpps[~same], "disk_write")
            self.counts["mapped_by_io"] += int(same.sum())

    @hookimpl
    def memvisor_write_trap(self, vm, write):
        """The guest writes mapped pages: they no longer equal their blocks."""
        self._drop(vm, write.gpps, "guest_write")

    # -- snapshots and migration --------------------------------------------------------------

    @hookimpl
    def memvisor_describe_pages(self, host, vm, gpps, purpose):
        """``disk-ref`` records for mapped pages whose bytes still hash as they did."""
        gpps = np.asarray(gpps, dtype=np.int64)
        if len(gpps) and self._scans(vm):
            self.scan(vm, gpps)
        valid = self._valid(vm, gpps)
        if not valid.any():
            return None
        pages = gpps[valid]
        m = self._map_of(vm)
        same = host.backend.fingerprint(vm, pages) == m.hash[pages]
        if not same.all():  # changed behind the guest's back (no write trap): never describe it
            self._drop(vm, pages[~same], "hash_mismatch")
            pages = pages[same]
        m.verified(host, vm, pages)
        if not len(pages):
            return None
        payload = np.stack([m.disk[pages].astype(np.uint64), m.block[pages].astype(np.uint64), m.hash[pages]], axis=1)
        self.counts[f"records_{purpose}"] += len(pages)
        return PageRecords(KIND, pages, payload.astype("<u8").view(np.uint8).reshape(len(pages), PAYLOAD_BYTES))

    @hookimpl
    def memvisor_resolve_records(self, host, vm, records):
        """Read the blocks that ``disk-ref`` records name and check each against its hash; a
        block changed since raises :class:`BackendError` (it is never used)."""
        if records.kind != KIND:
            return None
        fields = _fields(records.payloads, len(records.gpps), vm)
        slots, blocks, hashes = fields[:, 0], fields[:, 1], fields[:, 2]
        disks = self._disks(vm)
        order = np.argsort(slots, kind="stable")
        parts = []
        for slot in np.unique(slots):
            rows = order[slots[order] == slot]
            if slot >= len(disks) or np.any(blocks[rows] >= disks[slot].blocks):
                raise BackendError(f"disk-ref records name disk {slot} of VM {vm.name!r}, which it does not have")
            parts.append(disks[int(slot)].contents(blocks[rows]))
            host.backend.account("disk_read", len(rows) * PAGE_SIZE, 1)
        out = concat(parts)[np.argsort(order, kind="stable")] if parts else host.backend.contents(vm, [])
        bad = _fingerprints(out) != hashes
        if bad.any():
            self.counts["stale_refs_refused"] += int(bad.sum())
            raise BackendError(f"{int(bad.sum())} disk-ref records of VM {vm.name!r} name blocks changed since")
        for slot in np.unique(slots):  # the restored pages equal their blocks: map them again
            rows = np.flatnonzero(slots == slot)
            self._set(vm, records.gpps[rows], int(slot), blocks[rows].astype(np.int64), hashes[rows])
        self._map_of(vm).swapped[records.gpps] = False  # the caller makes them present
        self.counts["refs_resolved"] += len(records.gpps)
        return out

    @hookimpl
    def memvisor_restore_starting(self, vm, restore):
        """The VM's memory is about to be replaced: every mapping is void but those of the
        restore's own disk references (mapped when the core's check resolved them), and the
        pages dropped under pressure are the restore's to fill, with every other page. (A
        refused restore does not get here: the VM then runs on with its mappings, dropped
        pages included.)"""
        m = self.maps.get(vm.name)
        if m is None:  # no disk, no mapping
            return
        keep = np.zeros(vm.pages, dtype=bool)
        keep[restore.record_pages.get(KIND, np.zeros(0, dtype=np.int64))] = True
        self.counts["dropped_restore"] += int(np.count_nonzero((m.disk >= 0) & ~keep))
        m.disk[~keep] = -1
        m.swapped[:] = False

    # -- swap -----------------------------------------------------------------------------------

    @hookimpl
    def memvisor_memory_pressure(self, host, pressure):
        """Drop mapped pages that still equal their blocks, without writing anything."""
        if not self.settings.swap:
            return None
        backend, freed = host.backend, 0
        for vm in list(host.vms.values()):
            need = pressure.target_free_pages - backend.free_pages()
            if need <= 0:
                break
            m = self.maps.get(vm.name)
            if m is None:
                continue
            m.swapped &= ~backend.present(vm)  # pages made present by others (a restore) are back
            pages = self.mapped(vm)
            pages = pages[backend.present(vm, pages)][: need * 2]
            if not len(pages):
                continue
            same = backend.fingerprint(vm, pages) == m.hash[pages]
            # Only a page on its own machine page: dropping a shared one frees nothing and pulls
            # it from under its owner (a balloon's page that equals a zero block — found by
            # memvisor selftest — or pages sharing merged).
            private = backend.refcounts(backend.mpns(vm, pages)) == 1
            pages = pages[same & private][:need]
            before = backend.free_pages()
            backend.unmap(vm, pages)
            m.swapped[pages] = True
            for disk in self._disks(vm):
                if self._before_write not in disk.before_write:
                    disk.before_write.append(self._before_write)
            freed += backend.free_pages() - before
            self.counts["swapped_out"] += len(pages)
        return freed or None

    def _swap_in(self, vm, gpps) -> None:
        """Make swapped-out pages present again from their blocks (checked by hash)."""
        m = self._map_of(vm)
        backend = self.host.backend
        data = self._block_contents(vm, gpps)
        if np.any(_fingerprints(data) != m.hash[gpps]):
            raise BackendError(f"VM {vm.name!r}: a swapped-out page's disk block changed; the page is lost")
        backend.account("disk_read", len(gpps) * PAGE_SIZE, 1)
        backend.populate(vm, gpps, data)
        m.verified(self.host, vm, gpps)
        m.swapped[gpps] = False
        self.counts["swapped_in"] += len(gpps)

    @hookimpl
    def memvisor_page_fault(self, host, vm, fault):
        """Serve faults on pages this plugin dropped: read them back from their blocks."""
        m = self.maps.get(vm.name)
        if m is None:
            return None
        mine = fault.gpps[m.swapped[fault.gpps]]
        mine = mine[~host.backend.present(vm, mine)]
        if not len(mine):
            return None
        self._swap_in(vm, mine)
        return mine

    def _before_write(self, disk, blocks) -> None:
        """A block that backs swapped-out pages is about to be overwritten: read them in first."""
        for name, m in self.maps.items():
            vm = self.host.vms.get(name)
            if vm is None or disk not in self._disks(vm):
                continue
            slot = self._slot(vm, disk)
            pages = np.flatnonzero(m.swapped & (m.disk == slot) & np.isin(m.block, blocks))
            present = self.host.backend.present(vm, pages)
            m.swapped[pages[present]] = False  # made present by someone else meanwhile (a restore)
            if (~present).any():
                self._swap_in(vm, pages[~present])

    # -- memory errors --------------------------------------------------------------------------

    @hookimpl
    def memvisor_memory_error(self, host, vm, error):
        """Rebuild mapped pages hit by an error from their blocks (checked by hash), where the
        error hit the machine page the page was last seen equal to its block on. A page the
        hypervisor remapped since (a balloon taking it, then resetting it to zeros) keeps a
        stale mapping until a use checks it; repairing it would write the block's bytes where
        the guest reads zeros (found by ``memvisor selftest``). See :meth:`_trusted`."""
        m = self.maps.get(vm.name)
        if m is None:
            return None
        pages = error.gpps[self._valid(vm, error.gpps) & self._trusted(host, vm, error.gpps, error.mpns)]
        pages = pages[host.backend.present(vm, pages)]
        if not len(pages):
            return None
        data = self._block_contents(vm, pages)
        good = _fingerprints(data) == m.hash[pages]
        pages, data = pages[good], data[good]
        if len(pages):
            host.backend.account("disk_read", len(pages) * PAGE_SIZE, 1)
            host.backend.write(vm, pages, data)
            if self.settings.protect:
                host.backend.protect(vm, pages)
        self.counts["repaired"] += len(pages)
        return pages

    # -- report -------------------------------------------------------------------------------

    @hookimpl
    def memvisor_report(self, host):
        """Mapped pages per VM and what the mappings were used for."""
        per_vm = {name: int(len(self.still_equal(vm))) for name, vm in host.vms.items()}
        metrics = {"mapped_pages": per_vm, **{k: int(v) for k, v in sorted(self.counts.items())}}
        return ReportSection("diskmap", "Guest pages mapped to disk blocks", metrics,
                             headlines=_headlines(metrics), tables=_tables(metrics),
                             text="Pages identical to disk blocks travel as 24-byte references in snapshots "
                                  "and migrations, are dropped without a write under pressure, and are "
                                  "rebuilt after memory errors.")


class _IdentityIndex:
    """The fingerprints of an identity disk's non-zero blocks, sorted: which block holds a page's
    contents (the disk index of the identity model; a hit is confirmed by comparing identities)."""

    def __init__(self, disk):
        self.disk = disk
        keys = disk.fingerprints(np.arange(disk.blocks))
        blocks = np.flatnonzero(keys)
        order = np.argsort(keys[blocks], kind="stable")
        self.keys, self.blocks = keys[blocks][order], blocks[order]

    def lookup(self, contents) -> np.ndarray:
        """For each (non-zero) page, a disk block with exactly its contents, or -1."""
        out = np.full(len(contents), -1, dtype=np.int64)
        if not len(self.keys) or not len(contents):
            return out
        keys = _fingerprints(contents)
        where = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = np.flatnonzero(self.keys[where] == keys)
        if len(hit):
            blocks = self.blocks[where[hit]]
            same = rows_equal(self.disk.contents(blocks), contents[hit])
            out[hit[same]] = blocks[same]
        return out


_USES = (("records_migration", "{n} pages travelled as disk references in live migrations"),
         ("records_checkpoint", "{n} pages saved as disk references in checkpoints"),
         ("swapped_out", "{n} pages dropped without a write under memory pressure"),
         ("repaired", "{n} pages rebuilt from disk after memory errors"))


def _headlines(metrics: dict) -> list[Headline]:
    """Each VM's pages equal to disk blocks, and what the mappings were used for."""
    out = [Headline("diskmap: {mapped} of its memory equals disk blocks at the end",
                    {"mapped": Figure(("mapped_pages", name), "pages", "higher", "equal to disk blocks")}, vm=name)
           for name, pages in metrics["mapped_pages"].items() if pages]
    out += [Headline("diskmap: " + text, {"n": Figure((key,), "count", "higher", text.split("{n} ")[1])}, key=key)
            for key, text in _USES if metrics.get(key)]
    return out


def _tables(metrics: dict) -> list[Table]:
    """Pages mapped per VM; what was mapped, dropped and used (counters the run did not touch
    are left out)."""
    count = [("mapped", "mapped"), ("mapped_by_io", "mapped by disk I/O"), ("mapped_by_scan", "mapped by scan"),
             ("dropped_guest_write", "dropped: guest wrote"), ("dropped_disk_write", "dropped: block written"),
             ("dropped_hash_mismatch", "dropped: contents changed"), ("dropped_restore", "dropped: restored"),
             ("records_migration", "migration references"), ("records_checkpoint", "checkpoint references"),
             ("refs_resolved", "references resolved"), ("stale_refs_refused", "stale references refused"),
             ("swapped_out", "dropped under pressure"), ("swapped_in", "read back"),
             ("repaired", "repaired after errors")]
    return [Table("Mapped at the end", [Column(name, name, "pages") for name in metrics["mapped_pages"]],
                  record=("mapped_pages",)),
            Table("Pages mapped, dropped and used", [Column(key, label, "count") for key, label in count], record=())]
