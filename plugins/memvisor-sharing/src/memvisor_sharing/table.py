"""The table of candidate contents and the estimate built from it.

The scanner leaves, per VM, a fingerprint for every page it has hashed together with the machine
page the page was on at that time. From those, :func:`build_table` makes one vectorised pass
(a sort, no Python loop per page) that answers three questions at once:

- how many machine pages sharing could reclaim, in total and attributed to each large page;
- which small pages can be shared right now, and onto what (the zero page, a machine page this
  plugin already shares, or a new page holding the content);
- which large pages are worth breaking up, and how much each would give back.

Counting is by machine page, not by guest page: guest pages that already share one machine page
are one copy. For each content (a fingerprint within a sharing group) every machine page but
one is reclaimable; zero pages are all reclaimable, because the host's zero page exists anyway.
Which copy is kept decides where the reclaimable ones are counted: a machine page this plugin
already shares first, then another shared page, then a small private page, then a large-page
member (lowest VM and address first). So the per-large-page figures and the small-page figure
add up to the total exactly.
"""

from __future__ import annotations

import attrs
import numpy as np

from memvisor import LARGE_PAGE_PAGES

OWN, FOREIGN, SMALL, LARGE = 0, 1, 2, 3
"""Classes of a machine page, in the order a copy is kept: shared by this plugin, shared by
someone else, a small private page, a member of an intact large page."""


@attrs.frozen(eq=False)
class Entries:
    """Every hashed page of the host whose fingerprint is still valid, one row per page.

    :ivar vm: index of the page's VM (into the list of VMs the table was built from).
    :ivar gpp: guest page number.
    :ivar hash: fingerprint when hashed.
    :ivar mpn: machine page behind the page now (the same as when hashed).
    :ivar large: whether the page is a member of an intact large page.
    :ivar group: the sharing group of the page's VM (salting: pages share only within a group).
    :ivar refcount: reference count of the machine page.
    :ivar own: whether the machine page is one this plugin shares.
    :ivar movable: whether the page may be shared now (its content was the same at the two
        latest scans, KSM's rule against sharing pages that are being written; or always, under
        memory pressure).
    """

    vm: np.ndarray
    gpp: np.ndarray
    hash: np.ndarray
    mpn: np.ndarray
    large: np.ndarray
    group: np.ndarray
    refcount: np.ndarray
    own: np.ndarray
    movable: np.ndarray

    def take(self, rows: np.ndarray) -> Entries:
        """The entries at ``rows``."""
        return Entries(*(getattr(self, f.name)[rows] for f in attrs.fields(Entries)))


@attrs.frozen(eq=False)
class SharePlan:
    """Small pages that can be shared now (every array has one row per source page).

    :ivar src: rows of :class:`Entries` to remap.
    :ivar rep: per source, the row whose bytes the source must equal (the content's keeper).
    :ivar target: per source, the machine page to map it onto, or -1 for "a new page holding
        the content of ``rep``", one per distinct ``rep``.
    """

    src: np.ndarray
    rep: np.ndarray
    target: np.ndarray


@attrs.frozen(eq=False)
class Table:
    """The estimate and the sharing plan derived from one set of :class:`Entries`.

    :ivar entries: the rows the table was built from.
    :ivar zero: reclaimable zero pages (machine pages of zeros other than the zero page).
    :ivar duplicate: reclaimable non-zero machine pages (every copy of a content but one).
    :ivar small: of the total, machine pages that need no large page broken up.
    :ivar large_vm, large_index, large_reclaimable: per large page with an opportunity, its VM
        (row index), its index (gpp // 512) and the machine pages breaking it up would reclaim.
    :ivar zero_plan: rows of small private zero pages that can map to the zero page now.
    :ivar plan: small non-zero pages that can be shared now.
    """

    entries: Entries
    zero: int
    duplicate: int
    small: int
    large_vm: np.ndarray
    large_index: np.ndarray
    large_reclaimable: np.ndarray
    zero_plan: np.ndarray
    plan: SharePlan

    @property
    def total(self) -> int:
        """Machine pages that sharing everything found so far would reclaim."""
        return self.zero + self.duplicate


def build_table(e: Entries, zero_mpn: int) -> Table:
    """Count reclaimable machine pages and plan the shares of small pages (see the module doc)."""
    is_zero = e.hash == 0  # Backend.fingerprint: 0 is the page of zeros and no other
    klass = np.where(e.own & (e.refcount >= 2), OWN,
                     np.where(e.refcount >= 2, FOREIGN, np.where(e.large, LARGE, SMALL))).astype(np.int64)

    # One unit per machine page: guest pages already sharing a page are one copy. Only pages
    # with a reference count above one can have a twin mapping (a sort of those few, not all).
    z_units = _one_per_machine_page(e, np.flatnonzero(is_zero & (e.mpn != zero_mpn)))
    units = _one_per_machine_page(e, np.flatnonzero(~is_zero & (e.mpn != zero_mpn)))

    # Sort units by content (group, hash), then by how good a keeper each is: class, VM and page
    # packed in one key (3 sort keys instead of 5: this sort is most of a refresh's time).
    keeper_key = (klass[units] << 60) | (e.vm[units] << 40) | e.gpp[units]
    order = np.lexsort((keeper_key, e.hash[units], e.group[units]))
    units = units[order]
    g, h = e.group[units], e.hash[units]
    starts = np.ones(len(units), dtype=bool)
    starts[1:] = (g[1:] != g[:-1]) | (h[1:] != h[:-1])
    run = np.cumsum(starts) - 1
    keeper = units[np.flatnonzero(starts)][run]  # per unit, the row kept for its content
    reclaimable = units[~starts]

    # Attribute reclaimable machine pages to the large page they sit in, or to the small pages.
    lost = np.concatenate([z_units, reclaimable])
    in_large = lost[e.large[lost]]
    key = e.vm[in_large] * (1 << 40) + e.gpp[in_large] // LARGE_PAGE_PAGES
    keys, counts = np.unique(key, return_counts=True)
    small = int(len(lost) - len(in_large))

    # Zero pages to map now: small private pages (shared ones were counted once and are left alone).
    zero_plan = z_units[(klass[z_units] == SMALL) & e.movable[z_units]]

    # Non-zero small private pages to share now: onto the keeper when it is ours, else onto a new
    # page, when the content has at least two small private copies.
    u_klass = klass[units]
    k_klass = klass[keeper]
    small_units = (u_klass == SMALL) & e.movable[units]
    small_per_run = np.bincount(run[small_units], minlength=int(run[-1]) + 1 if len(run) else 0)
    onto_own = small_units & (k_klass == OWN)
    onto_new = small_units & (k_klass != OWN) & (small_per_run[run] >= 2)
    # A new page copies the first small copy of its content.
    first_small = np.full(len(small_per_run), -1, dtype=np.int64)
    small_idx = np.flatnonzero(small_units)
    first_small[run[small_idx[::-1]]] = units[small_idx[::-1]]
    src = np.concatenate([units[onto_own], units[onto_new]])
    rep = np.concatenate([keeper[onto_own], first_small[run[onto_new]]])
    target = np.concatenate([e.mpn[keeper[onto_own]], np.full(int(onto_new.sum()), -1, dtype=np.int64)])

    return Table(
        entries=e,
        zero=int(len(z_units)),
        duplicate=int(len(reclaimable)),
        small=small,
        large_vm=(keys >> 40).astype(np.int64),
        large_index=(keys & ((1 << 40) - 1)).astype(np.int64),
        large_reclaimable=counts.astype(np.int64),
        zero_plan=zero_plan,
        plan=SharePlan(src, rep, target),
    )


def _one_per_machine_page(e: Entries, rows: np.ndarray) -> np.ndarray:
    """``rows`` with one row kept per machine page, in row order."""
    multi = e.refcount[rows] > 1
    if not multi.any():
        return rows
    shared = rows[multi]
    _, first = np.unique(e.mpn[shared], return_index=True)
    return np.sort(np.concatenate([rows[~multi], shared[first]]))
