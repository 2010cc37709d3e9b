"""Guest access generators: the page numbers a VM touches, batch by batch.

A workload is built from its table in a scenario (``{"kind": "zipf", "alpha": 0.99}``), the VM's
size in pages and a seed, by a factory in :data:`WORKLOADS` (:func:`make_workload` looks it up).
Kinds:

``uniform``
    Every page of a region equally likely.
``zipf``
    Page popularity follows Zipf's law with exponent ``alpha`` (default 0.99); ranks are mapped
    to pages through a fixed random permutation of the region, so hot pages are scattered.
``scan``
    A sequential sweep over a region, wrapping around at its end.
``loop``
    The same ``footprint`` pages over and over, in one fixed random order.
``phased``
    A zipf (or uniform) working set of ``footprint`` pages that moves to another region of the
    VM every ``phase_accesses`` accesses.
``mixture``
    Sub-workloads (``parts``, each a table with a ``weight``) interleaved at random by weight.
``pagecache``
    Anonymous accesses plus file reads of the VM's disk into its page cache (guest disk I/O,
    taken by the runner through :meth:`PageCacheWorkload.take_io`). It needs a VM with a disk,
    so it is registered apart from :data:`WORKLOADS` (by ``memvisor.builtins.workloads``).
``trace``
    Replay of a trace file (:func:`memvisor.traces.load_trace`), page numbers compacted to
    0..D-1.

Options every kind but ``mixture`` and ``trace`` share: ``start`` (first page of the region,
default 0) and ``footprint`` (pages in the region, default the rest of the VM). Both take a
whole number of pages or a fraction of the VM (a float: ``0.25``). ``write_fraction`` is the
chance that an access writes, drawn independently per access; it defaults to 0.3, near the
0.33 and 0.35 of the shared sqlite and python traces.

Every stream is deterministic under the seed and does not depend on how it is cut into batches:
``next_batch(100)`` twice gives the same accesses as ``next_batch(200)`` once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import numpy as np

from memvisor.errors import UserError

DEFAULT_WRITE_FRACTION = 0.3
"""Write fraction of the synthetic kinds when the scenario gives none."""

_MAX_REGION = 2**32  # page indices come from the high 32 bits of a random word


class Workload(ABC):
    """A guest's memory accesses, produced in batches.

    :ivar vm_pages: size of the VM in pages; every page number is in ``[0, vm_pages)``.
    """

    vm_pages: int

    @abstractmethod
    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The next (up to) ``n`` accesses in program order: page numbers (int64) and a write
        mask (bool), or None when a finite workload has no accesses left. Fewer than ``n`` only
        at the end of a finite workload."""


# -- random streams -----------------------------------------------------------------------------


def _entropy(seed: int) -> int:
    """The seed as SeedSequence entropy: any integer, negative ones folded to 128 bits."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, not {seed!r}")
    return int(seed) % 2**128 if seed < 0 else int(seed)


def _derive_seed(seed: int, *words: int) -> int:
    """A seed for a named sub-stream of ``seed`` (a 128-bit integer)."""
    state = np.random.SeedSequence([_entropy(seed), *words]).generate_state(2, np.uint64)
    return int(state[0]) << 64 | int(state[1])


def _bit_generators(seed: int, count: int) -> list[np.random.PCG64]:
    """``count`` independent PCG64 streams from one seed."""
    return [np.random.PCG64(child) for child in np.random.SeedSequence(_entropy(seed)).spawn(count)]


def _scaled(raw: np.ndarray, size: int) -> np.ndarray:
    """Random words to integers in ``[0, size)``: multiply the high 32 bits and keep the top."""
    return ((raw >> np.uint64(32)) * np.uint64(size)) >> np.uint64(32)


@attrs.define(eq=False)
class _WriteMask:
    """Independent per-access write flags: one random word per access, so batches concatenate."""

    bits: np.random.PCG64
    fraction: float

    def draw(self, n: int) -> np.ndarray:
        """Write flags for the next ``n`` accesses."""
        if self.fraction <= 0.0:
            return np.zeros(n, np.bool_)
        if self.fraction >= 1.0:
            return np.ones(n, np.bool_)
        threshold = np.uint64(min(int(self.fraction * 2.0**64), 2**64 - 1))
        return self.bits.random_raw(n) < threshold


# -- page samplers ------------------------------------------------------------------------------


@attrs.frozen
class _UniformSampler:
    """Offsets uniform in ``[0, size)``."""

    size: int

    def offsets(self, raw: np.ndarray) -> np.ndarray:
        return _scaled(raw, self.size).astype(np.int64)


@attrs.frozen(eq=False)
class _AliasSampler:
    """Offsets drawn from a fixed distribution with Walker's alias method.

    One random word per draw: its high 32 bits pick one of ``size`` buckets, its low 32 bits
    decide between the bucket's own offset and its alias. Two gathers per draw, no search.
    """

    size: int
    table: np.ndarray  # int64, 2 * size: own offset of bucket i at i, its alias at size + i
    threshold: np.ndarray  # uint64: keep the own offset when the low 32 bits are below this

    @classmethod
    def build(cls, probabilities: np.ndarray, offsets: np.ndarray) -> _AliasSampler:
        """The sampler drawing ``offsets[i]`` with probability ``probabilities[i]``."""
        prob, alias = _alias_table(probabilities)
        threshold = np.minimum(np.round(prob * 2.0**32), 2.0**32).astype(np.uint64)
        table = np.concatenate([offsets, offsets[alias]]).astype(np.int64)
        return cls(size=len(prob), table=table, threshold=threshold)

    def offsets(self, raw: np.ndarray) -> np.ndarray:
        # In place where possible: at tens of millions of draws a second, fresh 8 MB
        # temporaries cost as much as the arithmetic.
        bucket = raw >> np.uint64(32)
        bucket *= np.uint64(self.size)
        bucket >>= np.uint64(32)
        bucket = bucket.view(np.int64)  # below 2**32: same bits, and take() wants intp
        use_alias = (raw & np.uint64(0xFFFFFFFF)) >= self.threshold.take(bucket)
        bucket += use_alias * self.size
        return self.table.take(bucket)


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias table (probability of keeping bucket i, alias of bucket i) for ``p``.

    The sweeping construction (Hübschle-Schneider and Sanders, "Parallel Weighted Random
    Sampling", 2019) written with prefix sums so that it needs no loop over items: light items
    (scaled weight below 1) take their deficit from the heavy item whose cumulative excess covers
    the start of their cumulative deficit; a heavy item left below 1 is topped up by the next
    heavy item.
    """
    size = len(p)
    scaled = p * (size / p.sum())
    prob = np.ones(size)
    alias = np.arange(size)
    light = np.flatnonzero(scaled < 1.0)
    heavy = np.flatnonzero(scaled >= 1.0)
    if len(light) == 0:
        return prob, alias
    deficit = 1.0 - scaled[light]
    deficit_sum = np.cumsum(deficit)
    excess_sum = np.cumsum(scaled[heavy] - 1.0)
    server = np.minimum(np.searchsorted(excess_sum, deficit_sum - deficit, "left"), len(heavy) - 1)
    prob[light] = scaled[light]
    alias[light] = heavy[server]
    # The light item that takes a heavy item below 1 is the first whose cumulative deficit
    # passes the heavy items' cumulative excess; the last heavy item ends at (about) 1.
    overshoot = np.searchsorted(deficit_sum, excess_sum, "right")
    exhausted = overshoot < len(light)
    left = 1.0 + excess_sum - deficit_sum[np.minimum(overshoot, len(light) - 1)]
    prob[heavy] = np.where(exhausted, np.clip(left, 0.0, 1.0), 1.0)
    alias[heavy] = np.where(exhausted, np.append(heavy[1:], heavy[-1]), heavy)
    return prob, alias


def _permutation(size: int, bits: np.random.PCG64) -> np.ndarray:
    """A random permutation of ``range(size)`` (int64).

    Sorting raw PCG64 words rather than ``Generator.permutation``: numpy promises the raw
    stream, not its Generator methods, stays the same across versions.
    """
    return np.argsort(bits.random_raw(size), kind="stable").astype(np.int64, copy=False)


EXACT_ZIPF_RANKS = 1 << 20
"""Regions up to this many pages get an exact Zipf table (an alias table and a permutation:
about 40 bytes a page while it is built, 24 kept); larger ones the compact sampler."""
_HEAD_RANKS = 1 << 16


def _zipf_sampler(size: int, alpha: float, structure: np.random.PCG64) -> _AliasSampler | _CompactZipfSampler:
    """Zipf(alpha) over ``size`` ranks, rank r at offset ``permutation[r]`` (exact up to
    :data:`EXACT_ZIPF_RANKS`; above, :class:`_CompactZipfSampler`)."""
    if size > EXACT_ZIPF_RANKS:
        return _CompactZipfSampler.build(size, alpha, structure)
    weights = np.arange(1, size + 1, dtype=np.float64) ** -alpha
    return _AliasSampler.build(weights / weights.sum(), _permutation(size, structure))


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: a fresh uniform word from a used one."""
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


@attrs.frozen(eq=False)
class _CompactZipfSampler:
    """Zipf(alpha) over a region too large for a table per page: O(1) memory in the region.

    The first :data:`_HEAD_RANKS` ranks are drawn exactly (an alias table with one more bucket
    for the tail's whole weight); a draw in the tail takes its rank from the inverse of the
    continuous density ``x ** -alpha`` over ``[head + 0.5, size + 0.5)`` (within a fraction of
    a percent of the discrete tail, whose ranks each carry less than ``head ** -alpha`` of the
    weight). Ranks map to offsets by an affine bijection of the region, ``(r * multiplier +
    shift) mod size`` with the multiplier prime to the size: hot pages scattered, no table.
    """

    size: int
    alpha: float
    head: _AliasSampler
    multiplier: int
    shift: int

    @classmethod
    def build(cls, size: int, alpha: float, structure: np.random.PCG64) -> _CompactZipfSampler:
        head = np.arange(1, _HEAD_RANKS + 1, dtype=np.float64) ** -alpha
        low, high = _HEAD_RANKS + 0.5, size + 0.5
        if abs(1.0 - alpha) < 1e-9:
            tail = np.log(high / low)
        else:
            tail = (high ** (1 - alpha) - low ** (1 - alpha)) / (1 - alpha)
        weights = np.append(head, tail)
        sampler = _AliasSampler.build(weights / weights.sum(), np.arange(_HEAD_RANKS + 1))
        raw = structure.random_raw(2)
        multiplier = int(_scaled(raw[:1], size // 2)[0]) + size // 4 | 1
        while np.gcd(multiplier, size) != 1:
            multiplier += 2
        return cls(size, alpha, sampler, multiplier, int(_scaled(raw[1:], size)[0]))

    def offsets(self, raw: np.ndarray) -> np.ndarray:
        rank = self.head.offsets(raw)
        tail = np.flatnonzero(rank == _HEAD_RANKS)
        if len(tail):
            u = (_mix64(raw[tail]) >> np.uint64(11)) * 2.0**-53
            low, high = _HEAD_RANKS + 0.5, self.size + 0.5
            if abs(1.0 - self.alpha) < 1e-9:
                x = low * (high / low) ** u
            else:
                e = 1.0 - self.alpha
                x = (low**e + u * (high**e - low**e)) ** (1.0 / e)
            rank[tail] = np.clip(np.floor(x + 0.5).astype(np.int64) - 1, _HEAD_RANKS, self.size - 1)
        offsets = (rank.astype(np.uint64) * np.uint64(self.multiplier) + np.uint64(self.shift)) % np.uint64(self.size)
        return offsets.astype(np.int64)


# -- workloads ----------------------------------------------------------------------------------


@attrs.define(eq=False)
class RegionWorkload(Workload):
    """Accesses drawn independently from a sampler over the region ``[start, start + size)``:
    the ``uniform`` and ``zipf`` kinds."""

    vm_pages: int
    start: int
    sampler: _UniformSampler | _AliasSampler | _CompactZipfSampler
    pages_bits: np.random.PCG64
    writes: _WriteMask

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`Workload.next_batch`; never exhausted."""
        offsets = self.sampler.offsets(self.pages_bits.random_raw(n))
        return offsets + self.start, self.writes.draw(n)


@attrs.define(eq=False)
class ScanWorkload(Workload):
    """Pages of a region in a fixed order, over and over: ``scan`` (sequential) and ``loop``
    (a fixed random order)."""

    vm_pages: int
    order: np.ndarray  # the pages of one pass (int64)
    writes: _WriteMask
    position: int = 0

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`Workload.next_batch`; never exhausted."""
        index = (self.position + np.arange(n)) % len(self.order)
        self.position = (self.position + n) % len(self.order)
        return self.order[index], self.writes.draw(n)


@attrs.define(eq=False)
class PhasedWorkload(Workload):
    """A working set that moves: the VM is cut into :attr:`slots` disjoint slots of ``size``
    pages; each phase of ``phase_accesses`` accesses draws from the sampler inside one slot, a
    different one (at random) from the phase before."""

    vm_pages: int
    size: int
    phase_accesses: int
    sampler: _UniformSampler | _AliasSampler | _CompactZipfSampler
    pages_bits: np.random.PCG64
    slot_bits: np.random.PCG64
    writes: _WriteMask
    position: int = 0
    slot: int = -1

    @property
    def slots(self) -> int:
        """Number of disjoint regions the working set moves between."""
        return self.vm_pages // self.size

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`Workload.next_batch`; never exhausted."""
        pages = self.sampler.offsets(self.pages_bits.random_raw(n))
        done = 0
        while done < n:  # one iteration per phase this batch touches
            if self.position % self.phase_accesses == 0:
                self._next_slot()
            length = min(n - done, self.phase_accesses - self.position % self.phase_accesses)
            pages[done : done + length] += self.slot * self.size
            done += length
            self.position += length
        return pages, self.writes.draw(n)

    def _next_slot(self) -> None:
        """Move to a slot other than the current one, chosen at random."""
        raw = self.slot_bits.random_raw(1)
        if self.slot < 0:
            self.slot = int(_scaled(raw, self.slots)[0])
        else:
            step = 1 + int(_scaled(raw, self.slots - 1)[0])
            self.slot = (self.slot + step) % self.slots


@attrs.define(eq=False)
class MixtureWorkload(Workload):
    """Sub-workloads interleaved at random: each access comes from part i with probability
    proportional to its weight (one random word per access picks the part). Each part sees
    only its own accesses, so it keeps its pattern. Ends when a finite part runs out."""

    vm_pages: int
    parts: list[Workload]
    edges: np.ndarray  # uint64: part i owns random words in [edges[i-1], edges[i])
    choice_bits: np.random.PCG64
    exhausted: bool = False

    @staticmethod
    def edges_for(weights: np.ndarray) -> np.ndarray:
        """Boundaries between the parts' shares of the 64-bit random words."""
        cumulative = np.cumsum(weights / weights.sum())[:-1]
        # 53-bit fixed point shifted up: exact, and never 2**64 (which would wrap to 0).
        return np.minimum(np.floor(cumulative * 2.0**53), 2.0**53 - 1).astype(np.uint64) << np.uint64(11)

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """See :meth:`Workload.next_batch`."""
        if self.exhausted:
            return None
        which = np.searchsorted(self.edges, self.choice_bits.random_raw(n), "right")
        pages = np.empty(n, np.int64)
        writes = np.empty(n, np.bool_)
        end = n
        for index, part in enumerate(self.parts):
            slots = np.flatnonzero(which == index)
            got = part.next_batch(len(slots)) if len(slots) else (pages[:0], writes[:0])
            supplied = 0 if got is None else len(got[0])
            if supplied < len(slots):  # a finite part ran out: the mixture ends where it did
                self.exhausted = True
                end = min(end, int(slots[supplied]))
            if supplied:
                pages[slots[:supplied]], writes[slots[:supplied]] = got
        if end == 0 and n > 0:
            return None
        return pages[:end], writes[:end]


@attrs.define(eq=False)
class TraceWorkload(Workload):
    """Replay of a recorded trace, its pages compacted to ``start + 0..D-1``."""

    vm_pages: int
    pages: np.ndarray  # compacted, int32 or int64
    start: int
    trace_writes: np.ndarray | None
    writes: _WriteMask
    loop: bool
    position: int = 0

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """See :meth:`Workload.next_batch`; without ``loop``, None after the trace's end."""
        total = len(self.pages)
        if not self.loop:
            if self.position >= total:
                return None
            n = min(n, total - self.position)
        index = (self.position + np.arange(n)) % total if self.loop else slice(self.position, self.position + n)
        self.position = (self.position + n) % total if self.loop else self.position + n
        pages = self.pages[index].astype(np.int64) + self.start
        writes = self.writes.draw(n) if self.trace_writes is None else self.trace_writes[index].copy()
        return pages, writes


# -- spec validation ----------------------------------------------------------------------------


_REQUIRED = object()  # the default of an option the scenario must give


class _Problem(Exception):
    """A bad option value: the message is the problem; the caller names the workload and key."""


def _number(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Problem(f"expected a number, got {value!r}")
        if not (low < value if low_open else low <= value) or not value <= high:
            raise _Problem(f"must be in {'(' if low_open else '['}{low}, {high}], got {value!r}")
        return float(value)

    return check


def _integer(low: int, high: int = 2**62) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Problem(f"expected a whole number, got {value!r}")
        if not low <= value <= high:
            raise _Problem(f"must be from {low} to {high}, got {value!r}")
        return value

    return check


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Problem(f"expected true or false, got {value!r}")
    return value


def _text(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Problem(f"expected a string, got {value!r}")
        if choices and value not in choices:
            raise _Problem(f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    return check


def _pages_or_fraction(value: Any) -> int | float:
    """A page count (int) or a fraction of the VM (float in [0, 1]); resolved by the factory."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Problem(f"expected a page count or a fraction of the VM, got {value!r}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:  # NaN too
        raise _Problem(f"a fraction of the VM must be in [0, 1] (give a whole number for pages), got {value!r}")
    if value < 0:
        raise _Problem(f"must not be negative, got {value!r}")
    return value


_WRITE_FRACTION = ("write_fraction", _number(0.0, 1.0), DEFAULT_WRITE_FRACTION)
_START = ("start", _pages_or_fraction, 0)
_FOOTPRINT = ("footprint", _pages_or_fraction, None)


def _options(kind: str, spec: Mapping[str, Any], *schema: tuple[str, Callable, Any]) -> dict[str, Any]:
    """Checked options of ``spec`` with defaults filled in (``kind`` itself is skipped)."""
    if not isinstance(spec, Mapping):
        raise UserError(f"workload {kind}: expected a table of options, got {spec!r}")
    known = {name: (check, default) for name, check, default in schema}
    for key in spec:
        if key != "kind" and key not in known:
            raise UserError(f"workload {kind}: {key}: unknown option (known: {', '.join(sorted(known))})")
    options = {}
    for name, (check, default) in known.items():
        if name not in spec:
            if default is _REQUIRED:
                raise UserError(f"workload {kind}: {name}: missing (it has no default)")
            options[name] = default
            continue
        try:
            options[name] = check(spec[name])
        except _Problem as problem:
            raise UserError(f"workload {kind}: {name}: {problem}") from None
    return options


def _check_vm_pages(vm_pages: int) -> None:
    if isinstance(vm_pages, bool) or not isinstance(vm_pages, (int, np.integer)) or vm_pages < 1:
        raise ValueError(f"vm_pages must be a positive integer, not {vm_pages!r}")


def _region(kind: str, options: dict[str, Any], vm_pages: int) -> tuple[int, int]:
    """``(start, size)`` of the region the options name, checked against the VM."""

    def pages(value: int | float) -> int:
        return int(round(value * vm_pages)) if isinstance(value, float) else value

    start = pages(options["start"])
    if start >= vm_pages:
        raise UserError(f"workload {kind}: start: page {start} is beyond the VM's {vm_pages} pages")
    footprint = options["footprint"]
    size = vm_pages - start if footprint is None else max(1, pages(footprint))
    if footprint == 0:
        raise UserError(f"workload {kind}: footprint: must be at least one page")
    if start + size > vm_pages:
        raise UserError(
            f"workload {kind}: footprint: {size} pages from page {start} do not fit in the VM's {vm_pages} pages"
        )
    if size > _MAX_REGION:
        raise UserError(f"workload {kind}: footprint: more than 2**32 pages")
    return start, size


# -- factories ----------------------------------------------------------------------------------


def make_uniform(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``uniform``: every page of the region equally likely (options: start, footprint,
    write_fraction)."""
    _check_vm_pages(vm_pages)
    options = _options("uniform", spec, _START, _FOOTPRINT, _WRITE_FRACTION)
    start, size = _region("uniform", options, vm_pages)
    pages_bits, write_bits = _bit_generators(seed, 2)
    return RegionWorkload(
        vm_pages, start, _UniformSampler(size), pages_bits, _WriteMask(write_bits, options["write_fraction"])
    )


def make_zipf(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``zipf``: Zipf(alpha) popularity over the region's pages, hot pages scattered (options:
    alpha (default 0.99, 0 is uniform), start, footprint, write_fraction)."""
    _check_vm_pages(vm_pages)
    options = _options("zipf", spec, ("alpha", _number(0.0, 10.0), 0.99), _START, _FOOTPRINT, _WRITE_FRACTION)
    start, size = _region("zipf", options, vm_pages)
    pages_bits, write_bits, structure = _bit_generators(seed, 3)
    sampler = _zipf_sampler(size, options["alpha"], structure)
    return RegionWorkload(vm_pages, start, sampler, pages_bits, _WriteMask(write_bits, options["write_fraction"]))


def make_scan(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``scan``: the region's pages in increasing order, wrapping around (options: start,
    footprint, write_fraction)."""
    _check_vm_pages(vm_pages)
    options = _options("scan", spec, _START, _FOOTPRINT, _WRITE_FRACTION)
    start, size = _region("scan", options, vm_pages)
    (write_bits,) = _bit_generators(seed, 1)
    order = np.arange(start, start + size, dtype=np.int64)
    return ScanWorkload(vm_pages, order, _WriteMask(write_bits, options["write_fraction"]))


def make_loop(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``loop``: the region's ``footprint`` pages in one fixed random order, repeated (options:
    footprint (required), start, write_fraction). The classic pattern that defeats LRU once the
    loop is larger than memory."""
    _check_vm_pages(vm_pages)
    footprint = ("footprint", _pages_or_fraction, _REQUIRED)
    options = _options("loop", spec, _START, footprint, _WRITE_FRACTION)
    start, size = _region("loop", options, vm_pages)
    write_bits, structure = _bit_generators(seed, 2)
    order = start + _permutation(size, structure)
    return ScanWorkload(vm_pages, order, _WriteMask(write_bits, options["write_fraction"]))


def make_phased(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``phased``: a working set of ``footprint`` pages (default 10% of the VM) that moves to
    another of the VM's ``vm_pages // footprint`` disjoint slots every ``phase_accesses``
    accesses (default 1,000,000); within a phase accesses follow ``distribution`` (``zipf``,
    the default, with ``alpha``, or ``uniform``). Options also: write_fraction."""
    _check_vm_pages(vm_pages)
    options = _options(
        "phased",
        spec,
        ("footprint", _pages_or_fraction, 0.1),
        ("phase_accesses", _integer(1), 1_000_000),
        ("distribution", _text("zipf", "uniform"), "zipf"),
        ("alpha", _number(0.0, 10.0), 0.99),
        _WRITE_FRACTION,
    )
    options["start"] = 0
    _, size = _region("phased", options, vm_pages)
    if vm_pages // size < 2:
        raise UserError(
            f"workload phased: footprint: {size} pages is more than half the VM's {vm_pages} "
            f"pages, so the working set has nowhere to move"
        )
    pages_bits, write_bits, slot_bits, structure = _bit_generators(seed, 4)
    if options["distribution"] == "zipf":
        sampler = _zipf_sampler(size, options["alpha"], structure)
    else:
        sampler = _UniformSampler(size)
    return PhasedWorkload(
        vm_pages,
        size,
        options["phase_accesses"],
        sampler,
        pages_bits,
        slot_bits,
        _WriteMask(write_bits, options["write_fraction"]),
    )


def make_mixture(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``mixture``: ``parts``, a list of workload tables each with a positive ``weight``,
    interleaved at random in proportion to the weights. A ``write_fraction`` here is the
    default of parts that set none."""
    _check_vm_pages(vm_pages)
    options = _options("mixture", spec, ("parts", _parts, _REQUIRED), ("write_fraction", _number(0.0, 1.0), None))
    (choice_bits,) = _bit_generators(seed, 1)
    parts, weights = [], []
    for index, part in enumerate(options["parts"]):
        sub = {key: value for key, value in part.items() if key != "weight"}
        if options["write_fraction"] is not None:
            sub.setdefault("write_fraction", options["write_fraction"])
        try:
            parts.append(make_workload(sub, vm_pages, _derive_seed(seed, 1, index)))
        except UserError as error:
            raise UserError(f"workload mixture: parts[{index}]: {error}") from None
        weights.append(part["weight"])
    return MixtureWorkload(vm_pages, parts, MixtureWorkload.edges_for(np.asarray(weights, np.float64)), choice_bits)


def _parts(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Problem(f"expected a non-empty list of workload tables, got {value!r}")
    for index, part in enumerate(value):
        if not isinstance(part, Mapping):
            raise _Problem(f"[{index}]: expected a workload table, got {part!r}")
        weight = part.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise _Problem(f"[{index}]: weight: expected a positive number, got {weight!r}")
    return list(value)


def make_trace(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``trace``: replay ``path`` (any format :func:`memvisor.traces.load_trace` reads). Pages
    are renumbered 0..D-1 (plus ``start``) in ``order`` (``first_touch``, the default, or
    ``address``, which keeps neighbouring pages neighbours). Options also: ``address`` (the file
    holds byte addresses), ``format``, ``loop`` (start again at the end rather than finish) and
    ``write_fraction`` (used only when the trace has no write flags)."""
    from memvisor.traces import compact_pages, load_trace  # traces pulls in zstandard

    _check_vm_pages(vm_pages)
    options = _options(
        "trace",
        spec,
        ("path", _text(), _REQUIRED),
        ("address", _boolean, False),
        ("format", _text(), None),
        ("loop", _boolean, False),
        ("order", _text("first_touch", "address"), "first_touch"),
        ("start", _integer(0), 0),
        _WRITE_FRACTION,
    )
    trace = load_trace(options["path"], address=options["address"], fmt=options["format"])
    dense, originals = compact_pages(trace.pages, options["order"])
    if options["start"] + len(originals) > vm_pages:
        raise UserError(
            f"workload trace: {trace.path}: touches {len(originals)} distinct pages, more than "
            f"fit in the VM's {vm_pages} pages from page {options['start']}"
        )
    (write_bits,) = _bit_generators(seed, 1)
    return TraceWorkload(
        vm_pages,
        dense,
        options["start"],
        trace.writes,
        _WriteMask(write_bits, options["write_fraction"]),
        options["loop"],
    )


@attrs.define(eq=False)
class PageCacheWorkload(Workload):
    """A guest that reads files: the ``pagecache`` kind.

    Accesses go to the VM's anonymous memory (zipf over the pages below the page cache) or, a
    ``read_fraction`` of them, to file blocks of the VM's disk (zipf over the disk's blocks).
    The page cache is the last ``cache`` pages of the VM, direct-mapped: block ``b`` lives in
    cache page ``b % cache``. A file access whose block is not in its cache page reads it from
    the disk first; a ``file_write_fraction`` of file accesses write the cached page, which is
    then written back to its block. The disk I/O of each batch is taken by the runner with
    :meth:`take_io` (reads before the batch's accesses, write-backs after). The accesses do not
    depend on how the stream is cut into batches; the I/O does a little (a block is read once
    per batch that misses it).
    """

    vm_pages: int
    cache_start: int
    cache_pages: int
    anon: _AliasSampler | _CompactZipfSampler | _UniformSampler
    anon_bits: np.random.PCG64
    choice_bits: np.random.PCG64
    block_bits: np.random.PCG64
    structure: np.random.PCG64
    writes: _WriteMask
    file_writes: _WriteMask
    read_fraction: float
    alpha: float
    disk: str | None = None
    blocks: _AliasSampler | _CompactZipfSampler | None = None
    tags: np.ndarray | None = None
    _io: list = attrs.field(factory=list)

    def bind_disk(self, disk) -> None:
        """Read files from ``disk`` (the runner binds the VM's disk named by the ``disk``
        option, or its first disk)."""
        self.blocks = _zipf_sampler(disk.blocks, self.alpha, self.structure)
        self.tags = np.full(self.cache_pages, -1, dtype=np.int32 if disk.blocks < 2**31 else np.int64)

    def next_batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`Workload.next_batch`; never exhausted."""
        threshold = np.uint64(min(int(self.read_fraction * 2.0**64), 2**64 - 1))
        is_file = self.choice_bits.random_raw(n) < threshold if self.read_fraction > 0 else np.zeros(n, bool)
        gpps = self.anon.offsets(self.anon_bits.random_raw(n))
        writes = self.writes.draw(n)
        files = np.flatnonzero(is_file)
        file_writes = self.file_writes.draw(n)[files]
        if self.blocks is None or not len(files):
            gpps[files] = self.cache_start + gpps[files] % self.cache_pages
            writes[files] = file_writes
            return gpps, writes
        blocks = self.blocks.offsets(self.block_bits.random_raw(len(files)))
        slots = blocks % self.cache_pages
        miss = self.tags[slots] != blocks
        self.tags[slots] = blocks  # the last block of a slot in the batch stays cached
        gpps[files] = self.cache_start + slots
        writes[files] = file_writes
        self._io.append(("read", self.cache_start + slots[miss], blocks[miss]))
        written = np.unique(slots[file_writes])
        self._io.append(("write", self.cache_start + written, self.tags[written]))
        return gpps, writes

    def take_io(self) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """The disk I/O of the batches since the last call: ``((read pages, read blocks),
        (written pages, written blocks))``."""
        def joined(kind):
            parts = [(g, b) for k, g, b in self._io if k == kind]
            if not parts:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            return np.concatenate([g for g, _ in parts]), np.concatenate([b for _, b in parts])

        out = joined("read"), joined("write")
        self._io.clear()
        return out


def make_pagecache(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """``pagecache``: a guest reading files of its disk into its page cache (options: disk
    (the disk's name; default the VM's first disk), cache (pages or fraction of the VM at its
    end that hold the page cache; default 0.5), read_fraction (share of accesses that are file
    accesses; default 0.05), file_write_fraction (share of file accesses that write and write
    back; default 0), alpha (zipf over disk blocks and anonymous pages; default 0.99),
    write_fraction (of anonymous accesses))."""
    _check_vm_pages(vm_pages)
    options = _options(
        "pagecache", spec,
        ("disk", _text(), None),
        ("cache", _pages_or_fraction, 0.5),
        ("read_fraction", _number(0.0, 1.0), 0.05),
        ("file_write_fraction", _number(0.0, 1.0), 0.0),
        ("alpha", _number(0.0, 10.0), 0.99),
        _WRITE_FRACTION,
    )
    cache = options["cache"]
    cache_pages = int(round(cache * vm_pages)) if isinstance(cache, float) else cache
    if not 1 <= cache_pages < vm_pages:
        raise UserError(f"workload pagecache: cache: must leave between 1 and {vm_pages - 1} pages, got {cache!r}")
    anon_bits, choice_bits, block_bits, structure, write_bits, file_bits = _bit_generators(seed, 6)
    cache_start = vm_pages - cache_pages
    return PageCacheWorkload(
        vm_pages, cache_start, cache_pages, _zipf_sampler(cache_start, options["alpha"], structure), anon_bits,
        choice_bits, block_bits, structure, _WriteMask(write_bits, options["write_fraction"]),
        _WriteMask(file_bits, options["file_write_fraction"]), options["read_fraction"], options["alpha"],
        options["disk"])


WORKLOADS: dict[str, Callable[[Mapping[str, Any], int, int], Workload]] = {
    "uniform": make_uniform,
    "zipf": make_zipf,
    "scan": make_scan,
    "loop": make_loop,
    "phased": make_phased,
    "mixture": make_mixture,
    "trace": make_trace,
}
"""The built-in workload kinds: ``kind`` to ``factory(spec, vm_pages, seed)``. The single source
of the built-in kinds (the core registers them through ``memvisor_register_workloads``)."""


def make_workload(spec: Mapping[str, Any], vm_pages: int, seed: int) -> Workload:
    """Build the workload a scenario table describes.

    :param spec: the table, with ``kind`` and the kind's options.
    :param vm_pages: the VM's size in pages.
    :param seed: the integer that makes the stream reproducible.
    :raises UserError: an unknown kind or a bad option, naming the kind and the key.
    """
    if not isinstance(spec, Mapping):
        raise UserError(f"workload: expected a table with a kind, got {spec!r}")
    kind = spec.get("kind")
    if kind is None:
        raise UserError(f"workload: kind: missing (known: {', '.join(sorted(WORKLOADS))})")
    if not isinstance(kind, str) or kind not in WORKLOADS:
        raise UserError(f"workload {kind}: kind: unknown workload kind (known: {', '.join(sorted(WORKLOADS))})")
    return WORKLOADS[kind](spec, vm_pages, seed)
