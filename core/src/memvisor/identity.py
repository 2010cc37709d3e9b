"""Pages by content identity: what a page holds, named by 12 bytes instead of 4096.

The emulator's identity model (``[host] contents = "identity"``) keeps, per machine page, a
64-bit *content identity* and the guest's *write stamp* instead of the page's bytes. The pair
(identity, stamp) is the page's contents:

- identity ``0`` is the page of zeros;
- ``RANDOM_TAG | key`` and ``TEXT_TAG | key`` (the top two bits say which, the low 62 are the
  key) are the pages :mod:`memvisor.contents` generates: the generator makes their bytes from
  the identity alone (:func:`materialise`), so the bytes model and the identity model hold the
  same bytes for the same scenario, and two generated pages are byte-equal exactly when their
  identities are (duplicate pages of two VMs, a page read from a disk block);
- ``LITERAL_TAG | hash`` is a page whose bytes came from outside (written with ``write`` or
  ``populate`` as bytes: tests, memory errors flipping a bit): its bytes are kept in a
  :class:`LiteralTable`, its identity derived from them (:meth:`LiteralTable.intern`);
- the stamp is 0 for a page the guest has not written, else the value its last write stored in
  the first 8 bytes (``Backend.access`` stores the VM's write epoch there).

Equal pairs are equal bytes, always. Equal bytes are equal pairs for everything the identity
model makes itself (generated pages, stamps, identities copied from page to page, disk, file or
host); bytes written from outside are interned as literals and are not recognised as equal to a
generated page with the same bytes (sharing then misses them; it never maps a wrong page).

Contents travel between hosts, disks, checkpoints and migration streams as :class:`Identities`
(arrays of identities and stamps): a backend with the identity model hands them out
(``Backend.contents``) and takes them back (``populate``, ``write``, ``hold_page``). The helpers
at the end (:func:`rows_equal`, :func:`take`, :func:`zero_rows`, :func:`fingerprints`) work on
either form, bytes or identities, so a technique needs no branch per model.

:class:`SizeModel` gives the compressed size of identity pages: per-class byte costs measured by
compressing generated pages of each class with the same zstd level and block size, so a
checkpoint or a migration of an identity-model VM reports (and is charged for) the bytes the
bytes model would write.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import attrs
import numpy as np
import xxhash

from memvisor import PAGE_SIZE
from memvisor.errors import BackendError

MODELS = ("bytes", "identity")
"""The machine models of page contents (``[host] contents``)."""

IDENTITY_AUTO_BYTES = 8 << 30
"""Hosts with more machine memory than this use the identity model unless a scenario says
otherwise (a bytes-model host keeps every page's 4 KiB in this machine's memory)."""

IDENTITY_PAGE_BYTES = 48
"""Memory a machine page of an identity-model host costs, every technique on (measured 12.8 MiB
per GiB of guest memory: ``memory-per-gib`` of ``memvisor bench scale``, docs/performance.md):
what a scenario's host is checked against this machine's memory with (a bytes-model host: 4 KiB
and more a page)."""


def auto_model(memory_pages: int, supported: tuple[str, ...] = MODELS) -> str:
    """The model of a host that names none: identity above :data:`IDENTITY_AUTO_BYTES` when
    its backend offers it (``supported``), else bytes."""
    large = memory_pages * PAGE_SIZE > IDENTITY_AUTO_BYTES
    return "identity" if large and "identity" in supported else "bytes"


def host_memory_bytes(memory_pages: int, model: str) -> int:
    """About what a host of ``memory_pages`` machine pages in ``model`` needs of this machine's
    memory: at least its pages' bytes, or :data:`IDENTITY_PAGE_BYTES` a page by identity."""
    return memory_pages * (IDENTITY_PAGE_BYTES if model == "identity" else PAGE_SIZE)


TAG_SHIFT = 62
"""An identity's top two bits say its class: the tag is ``identity >> TAG_SHIFT``."""
KEY_MASK = (1 << TAG_SHIFT) - 1
"""The low 62 bits of an identity: its key within its class."""
RANDOM_TAG = 1 << TAG_SHIFT
"""The class of generated random pages."""
TEXT_TAG = 2 << TAG_SHIFT
"""The class of generated text pages."""
LITERAL_TAG = 3 << TAG_SHIFT
"""The class of pages whose bytes came from outside (kept in a :class:`LiteralTable`)."""
ZERO_ID = 0
"""The identity of the page of zeros."""

MAX_STAMP = 2**32 - 1
"""Largest write stamp an identity-model page holds (stamps are uint32; the host's write epochs
start at 1 and grow by one per batch)."""

ID_DTYPE = np.dtype(np.uint64)
"""The dtype of identities."""
STAMP_DTYPE = np.dtype(np.uint32)
"""The dtype of write stamps."""
RECORD_DTYPE = np.dtype([("id", "<u8"), ("stamp", "<u4")])
"""One page as 12 bytes on disk and on the wire (checkpoints, migration streams)."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_C1, _C2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


# -- the contents of pages, by identity ---------------------------------------------------------


@attrs.frozen(eq=False)
class Identities:
    """The contents of ``n`` pages by identity: ``ids`` (uint64) and ``stamps`` (uint32)."""

    ids: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=ID_DTYPE).reshape(-1))
    stamps: np.ndarray = attrs.field(converter=lambda a: np.asarray(a, dtype=STAMP_DTYPE).reshape(-1))

    def __attrs_post_init__(self) -> None:
        if len(self.ids) != len(self.stamps):
            raise ValueError(f"{len(self.ids)} identities with {len(self.stamps)} stamps")

    @classmethod
    def zeros(cls, n: int) -> Identities:
        """``n`` pages of zeros."""
        return cls(np.zeros(n, ID_DTYPE), np.zeros(n, STAMP_DTYPE))

    @classmethod
    def concat(cls, parts: Sequence[Identities]) -> Identities:
        """The pages of ``parts``, one after the other."""
        if not parts:
            return cls.zeros(0)
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.stamps for p in parts]))

    @classmethod
    def from_records(cls, raw) -> Identities:
        """From :data:`RECORD_DTYPE` bytes (12 per page)."""
        records = np.frombuffer(raw, dtype=RECORD_DTYPE)
        return cls(records["id"], records["stamp"])

    def to_records(self) -> bytes:
        """As :data:`RECORD_DTYPE` bytes (12 per page)."""
        out = np.empty(len(self), dtype=RECORD_DTYPE)
        out["id"], out["stamp"] = self.ids, self.stamps
        return out.tobytes()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, rows) -> Identities:
        return Identities(self.ids[rows], self.stamps[rows])

    def copy(self) -> Identities:
        """A copy that owns its arrays."""
        return Identities(self.ids.copy(), self.stamps.copy())

    def is_zero(self) -> np.ndarray:
        """Per page, whether it is all zeros."""
        return (self.ids == ZERO_ID) & (self.stamps == 0)

    def equal(self, other: Identities) -> np.ndarray:
        """Per page, whether it holds the same bytes as the page at the same row of ``other``."""
        return (self.ids == other.ids) & (self.stamps == other.stamps)

    def literal(self) -> np.ndarray:
        """Per page, whether its bytes came from outside (kept in a :class:`LiteralTable`)."""
        return (self.ids >> np.uint64(TAG_SHIFT)) == np.uint64(3)

    def fingerprints(self) -> np.ndarray:
        """One uint64 per page, 0 exactly for pages of zeros (:func:`fingerprints`)."""
        return identity_fingerprints(self.ids, self.stamps)


def _mix(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection with ``_mix(0) == 0``)."""
    x = x ^ (x >> np.uint64(33))
    x *= _C1
    x ^= x >> np.uint64(33)
    x *= _C2
    x ^= x >> np.uint64(33)
    return x


def identity_fingerprints(ids: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """Fingerprints of pages given by identity: equal pages have equal fingerprints; 0 is the
    page of zeros and no other."""
    with np.errstate(over="ignore"):
        out = _mix(ids.astype(np.uint64) ^ (stamps.astype(np.uint64) * _GOLDEN))
    out[(out == 0) & ((ids != 0) | (stamps != 0))] = 1
    return out


def byte_fingerprints(pages: np.ndarray) -> np.ndarray:
    """Fingerprints of pages given by their bytes (``(n, PAGE_SIZE)`` uint8, or any buffer of
    whole pages): xxh3-64 of each page, with 0 for a page of zeros and no other (a non-zero page
    whose hash is 0 gets 1). One C call per page: measured at 13.7 GiB/s on one core of the
    project's machine, faster than any vectorised numpy hash we tried (docs/sharing.md)."""
    view = memoryview(np.ascontiguousarray(pages)).cast("B")
    n = len(view) // PAGE_SIZE
    if n * PAGE_SIZE != len(view):
        raise ValueError(f"{len(view)} bytes is not a whole number of {PAGE_SIZE}-byte pages")
    hash64 = xxhash.xxh3_64_intdigest
    out = np.array([hash64(view[o : o + PAGE_SIZE]) for o in range(0, n * PAGE_SIZE, PAGE_SIZE)], dtype=np.uint64)
    zero = _zero_pages(pages, n)
    out[(out == 0) & ~zero] = 1
    out[zero] = 0
    return out


def _zero_pages(pages, n: int) -> np.ndarray:
    words = np.frombuffer(memoryview(np.ascontiguousarray(pages)).cast("B"), dtype=np.uint64)
    return words.reshape(n, PAGE_SIZE // 8).max(axis=1) == 0 if n else np.zeros(0, bool)


# -- bytes from identities and back -------------------------------------------------------------


class LiteralTable:
    """The bytes of literal pages (written from outside into an identity-model host), by identity.

    A literal's identity is ``LITERAL_TAG`` and 62 bits of the xxh3-64 hash of its bytes (the
    next free value on the rare collision), so equal bytes written twice get one identity. The
    table only grows: literal pages are few (tests, memory errors), never the bulk of a large
    host. Identities are content-addressed, so one table (:data:`LITERALS`) serves every host
    of a process: a literal page migrates, goes to a disk and comes back by identity.
    """

    def __init__(self) -> None:
        self._rows: dict[int, int] = {}
        self._data = np.zeros((0, PAGE_SIZE), np.uint8)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes this table holds."""
        return self._data.nbytes

    def intern(self, pages: np.ndarray) -> Identities:
        """The contents of ``pages`` (``(n, PAGE_SIZE)`` uint8) as identities: zero pages are
        identity 0; a page of zeros but for its first 8 bytes ``w`` (``1 <= w <= MAX_STAMP``) is
        a stamped zero page ``(0, w)``, as a guest write makes it; every other page a literal."""
        pages = np.ascontiguousarray(np.asarray(pages, dtype=np.uint8).reshape(-1, PAGE_SIZE))
        n = len(pages)
        ids, stamps = np.zeros(n, ID_DTYPE), np.zeros(n, STAMP_DTYPE)
        if not n:
            return Identities(ids, stamps)
        words = pages.view(np.uint64)
        rest_zero = words[:, 1:].max(axis=1) == 0
        first = words[:, 0]
        stamped = rest_zero & (first <= np.uint64(MAX_STAMP))
        stamps[stamped] = first[stamped]
        for row in np.flatnonzero(~stamped).tolist():
            ids[row] = self._add(pages[row])
        return Identities(ids, stamps)

    def _add(self, page: np.ndarray) -> int:
        key = xxhash.xxh3_64_intdigest(memoryview(page)) & KEY_MASK
        while True:
            ident = LITERAL_TAG | key
            row = self._rows.get(ident)
            if row is None:
                break
            if np.array_equal(self._data[row], page):
                return ident
            key = (key + 1) & KEY_MASK  # a hash collision: the next free identity
        if self._count == len(self._data):
            grown = np.zeros((max(16, 2 * len(self._data)), PAGE_SIZE), np.uint8)
            grown[: self._count] = self._data[: self._count]
            self._data = grown
        self._data[self._count] = page
        self._rows[ident] = self._count
        self._count += 1
        return ident

    def bytes_of(self, ids: np.ndarray) -> np.ndarray:
        """The bytes of literal identities (``(n, PAGE_SIZE)``)."""
        try:
            rows = np.array([self._rows[int(i)] for i in ids.tolist()], dtype=np.int64)
        except KeyError as exc:
            raise BackendError(f"literal page {exc.args[0]:#x} is not in this host's table") from None
        return self._data[rows] if len(rows) else np.zeros((0, PAGE_SIZE), np.uint8)


LITERALS = LiteralTable()
"""The process's table of literal pages (content-addressed: shared by every host)."""


def materialise(contents: Identities, literals: LiteralTable | None = None) -> np.ndarray:
    """The bytes of pages given by identity: ``(n, PAGE_SIZE)`` uint8.

    :param literals: where the bytes of literal pages are (default :data:`LITERALS`).
    :raises BackendError: a literal page the table does not hold, or an identity no generator
        makes.
    """
    from memvisor.contents import generate_pages

    ids, stamps = contents.ids, contents.stamps
    out = np.zeros((len(ids), PAGE_SIZE), np.uint8)
    tags = (ids >> np.uint64(TAG_SHIFT)).astype(np.int8)
    bad = (tags == 0) & (ids != 0)
    if bad.any():
        raise BackendError(f"page identity {int(ids[bad][0]):#x} names no contents")
    generated = np.flatnonzero((tags == 1) | (tags == 2))
    if len(generated):
        out[generated] = generate_pages(ids[generated])
    literal = np.flatnonzero(tags == 3)
    if len(literal):
        out[literal] = (LITERALS if literals is None else literals).bytes_of(ids[literal])
    stamped = np.flatnonzero(stamps)
    if len(stamped):
        out.view(np.uint64)[stamped, 0] = stamps[stamped].astype(np.uint64)
    return out


# -- either form: bytes or identities ------------------------------------------------------------


def as_bytes(contents) -> np.ndarray:
    """Page contents of either form as bytes ``(n, PAGE_SIZE)`` (identities materialised)."""
    return materialise(contents) if is_identities(contents) else np.asarray(contents, np.uint8)


def is_identities(contents) -> bool:
    """Whether ``contents`` are :class:`Identities` (else bytes)."""
    return isinstance(contents, Identities)


def take(contents, rows):
    """The rows ``rows`` of page contents in either form."""
    return contents[rows]


def concat(parts: Sequence):
    """Page contents of either form, one after the other (all parts of one form)."""
    if parts and is_identities(parts[0]):
        return Identities.concat(parts)
    return np.concatenate(parts) if parts else np.zeros((0, PAGE_SIZE), np.uint8)


def rows_equal(a, b) -> np.ndarray:
    """Per row, whether two page contents of the same form hold the same bytes."""
    if is_identities(a) != is_identities(b):
        raise BackendError("page contents of two machine models compared")
    if is_identities(a):
        return a.equal(b)
    a = np.asarray(a, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    b = np.asarray(b, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return ~np.any(a.view(np.uint64) != b.view(np.uint64), axis=1)


def zero_rows(contents) -> np.ndarray:
    """Per row, whether page contents of either form are all zeros."""
    if is_identities(contents):
        return contents.is_zero()
    pages = np.asarray(contents, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    return _zero_pages(pages, len(pages))


def fingerprints(contents) -> np.ndarray:
    """Per row, a uint64 fingerprint of page contents of either form: equal contents have equal
    fingerprints, and 0 is the page of zeros and no other. Identities' fingerprints are exact up
    to 64-bit hash collisions, bytes' are xxh3-64: a fingerprint nominates, a comparison
    (:func:`rows_equal`, ``Backend.share``) decides."""
    return contents.fingerprints() if is_identities(contents) else byte_fingerprints(contents)


# -- compressed sizes ------------------------------------------------------------------------------

CLASSES = ("random", "text", "stamped_zero", "literal", "repeat")
"""Classes of non-zero identity pages for the size model: generated random and text pages
(stamped or not: a stamp changes 8 bytes of 4096), zero pages with a stamp, literal pages, and
pages equal to an earlier page of the same block (zstd finds the copy)."""


def page_classes(contents: Identities) -> np.ndarray:
    """The :data:`CLASSES` index of each page (zero pages get -1)."""
    tags = (contents.ids >> np.uint64(TAG_SHIFT)).astype(np.int8)
    out = np.full(len(contents), -1, np.int8)
    out[tags == 1] = 0
    out[tags == 2] = 1
    out[(tags == 0) & (contents.stamps != 0)] = 2
    out[tags == 3] = 3
    return out


@attrs.frozen(eq=False)
class SizeModel:
    """Bytes that zstd at ``level`` makes of pages compressed in blocks of ``block_pages``:
    ``intercept`` per block plus ``per_page[class]`` per page of each class, at most the
    block's raw size (a writer stores a block raw when zstd does not shrink it).

    Measured, not assumed: :meth:`measure` compresses generated blocks of random class mixes with
    the same compressor and fits the costs by least squares (docs/backends/emulator.md has the
    table for level 1 and 64-page blocks, and the test that checks the model against real
    compression).
    """

    level: int
    block_pages: int
    intercept: float
    per_page: np.ndarray  # float64, one per class of CLASSES

    @classmethod
    def measure(cls, level: int, block_pages: int) -> SizeModel:
        """Fit the model for one zstd level and block size (cached: :func:`size_model`)."""
        import zstandard


        compressor = zstandard.ZstdCompressor(level=level)
        rng = np.random.default_rng(20)  # the sample, not the model, depends on it
        rows, sizes = [], []
        keys = iter(rng.integers(1, 2**62, 64 * block_pages * 4, dtype=np.int64).astype(np.uint64))
        literal_bytes = rng.integers(0, 256, (block_pages, PAGE_SIZE), np.uint8)
        for _ in range(64):
            shares = rng.dirichlet(np.ones(4))
            klass = rng.choice(4, size=block_pages, p=shares)
            ids = np.zeros(block_pages, ID_DTYPE)
            stamps = np.zeros(block_pages, STAMP_DTYPE)
            for i, k in enumerate(klass.tolist()):
                if k == 0:
                    ids[i] = RANDOM_TAG | int(next(keys))
                elif k == 1:
                    ids[i] = TEXT_TAG | int(next(keys))
                elif k == 2:
                    stamps[i] = int(next(keys)) & 0xFFFF | 1
            data = materialise(Identities(ids, stamps))
            literal = klass == 3
            data[literal] = literal_bytes[: int(literal.sum())]
            # Some pages repeat an earlier page of the block (copies within a block).
            repeat = np.zeros(block_pages, bool)
            if block_pages > 1 and rng.random() < 0.5:
                repeat[1:] = rng.random(block_pages - 1) < rng.random() * 0.5
                data[repeat] = data[0]
            counts = np.bincount(np.where(repeat, 4, klass), minlength=len(CLASSES))
            raw = data.tobytes()
            sizes.append(min(len(compressor.compress(raw)), len(raw)))
            rows.append(counts)
        design = np.column_stack([np.ones(len(rows)), np.array(rows, dtype=np.float64)])
        coef, *_ = np.linalg.lstsq(design, np.array(sizes, dtype=np.float64), rcond=None)
        return cls(level, block_pages, float(max(coef[0], 0.0)), np.maximum(coef[1:], 0.0))

    def block_bytes(self, contents: Identities) -> int:
        """Modelled compressed bytes of one block of pages (zero pages included, as a writer
        gets them when it does not detect zero pages)."""
        return int(self.blocks_bytes(contents, np.array([0], np.int64))[0])

    def blocks_bytes(self, contents: Identities, starts: np.ndarray) -> np.ndarray:
        """Modelled compressed bytes of the blocks of ``contents`` that begin at ``starts``
        (each runs to the next start, the last to the end): vectorised over blocks."""
        n = len(contents)
        starts = np.asarray(starts, np.int64)
        if not n:
            return np.zeros(len(starts), np.int64)
        block = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
        klass = page_classes(contents).astype(np.int64)
        # A page equal to an earlier page of its block costs what zstd's match costs.
        fp = contents.fingerprints()
        order = np.lexsort((np.arange(n), fp, block))
        same = np.zeros(n, bool)
        same[order[1:]] = (block[order[1:]] == block[order[:-1]]) & (fp[order[1:]] == fp[order[:-1]])
        klass[same & (klass >= 0)] = len(CLASSES) - 1
        cost = np.where(klass >= 0, self.per_page[np.maximum(klass, 0)], 0.0)
        total = np.bincount(block, weights=cost, minlength=len(starts)) + self.intercept
        pages = np.diff(np.append(starts, n))
        return np.minimum(np.round(total), pages * PAGE_SIZE).astype(np.int64)


@functools.cache
def size_model(level: int, block_pages: int) -> SizeModel:
    """The :class:`SizeModel` for a zstd level and block size, measured once per process."""
    return SizeModel.measure(level, block_pages)
