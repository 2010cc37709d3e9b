"""Page contents: deterministic, realistic bytes for a VM's memory.

A scenario gives a VM's contents as one kind or as fractions of kinds::

    contents = "mixed"
    contents = {zero = 0.6, text = 0.2, random = 0.1, duplicate = 0.1}

Kinds:

``zero``
    All zero bytes (free memory, fresh allocations).
``random``
    Incompressible bytes (encrypted or already-compressed data).
``text`` (also ``compressible``)
    Text-like bytes, words from a small vocabulary; zstd compresses a page about 3x on its own
    and a stream of them a little better, as it does real text.
``duplicate``
    Copies of a small pool of pages (shared libraries, common files). The pool depends only on
    ``pool_seed``, not on the VM, so two VMs with duplicate pages hold byte-identical pages:
    what page sharing finds.

``"mixed"`` is ``{zero = 0.25, random = 0.2, text = 0.45, duplicate = 0.1}``. A table may also
set ``pool_seed`` (default 0), ``pool_pages`` (pages in the duplicate pool, default 256) and
``run_pages`` (pages that share one kind: 512 makes whole 2 MiB large pages one kind; default 1).

Every page's kind and bytes are a function of ``(seed, gpp)`` alone, computed with a counter
hash rather than a sequential generator, so any subset of pages can be filled in any order.
A page's 64-bit content identity (:meth:`ContentSpec.identities`, :mod:`memvisor.identity`) is
the key its bytes are generated from: the emulator's identity model keeps that instead of the
bytes, and both models hold the same bytes for the same scenario.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import attrs
import numpy as np

from memvisor import PAGE_SIZE
from memvisor.errors import UserError

KINDS = ("zero", "random", "text", "duplicate")
"""Content kinds; a kind's code (what :meth:`ContentSpec.kinds` returns) is its index here."""

ZERO, RANDOM, TEXT, DUPLICATE = range(len(KINDS))
"""Kind codes."""

ALIASES = {"compressible": "text"}
"""Other names of kinds."""

PRESETS: dict[str, dict[str, float]] = {
    "mixed": {"zero": 0.25, "random": 0.2, "text": 0.45, "duplicate": 0.1},
}
"""Named mixtures a scenario can give as a string."""

_WORDS_PER_PAGE = PAGE_SIZE // 8
_CHUNK_PAGES = 256  # pages generated at once: 1 MiB of scratch stays in cache
_MASK64 = (1 << 64) - 1
_C1, _C2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Domain separation: the same (seed, page) gives unrelated hashes for each purpose.
_KIND, _RANDOM, _TEXT, _POOL_PICK, _POOL = 0x4B494E44, 0x52414E44, 0x54455854, 0x5049434B, 0x504F4F4C


@attrs.frozen
class ContentSpec:
    """What a VM's pages hold: fractions of each kind and the duplicate pool's parameters.

    Build it with :meth:`parse` from a scenario value; fractions sum to 1.

    :ivar zero: fraction of zero pages (likewise ``random``, ``text``, ``duplicate``).
    :ivar pool_seed: seed of the duplicate pool; VMs with the same one share its pages.
    :ivar pool_pages: number of distinct pages in the duplicate pool.
    :ivar run_pages: consecutive pages (aligned) that get one kind.
    """

    zero: float = 1.0
    random: float = 0.0
    text: float = 0.0
    duplicate: float = 0.0
    pool_seed: int = 0
    pool_pages: int = 256
    run_pages: int = 1

    @property
    def fractions(self) -> dict[str, float]:
        """Fraction of pages of each kind, by kind name."""
        return dict(zip(KINDS, self._fraction_array().tolist(), strict=True))

    def _fraction_array(self) -> np.ndarray:
        return np.array([self.zero, self.random, self.text, self.duplicate], np.float64)

    @classmethod
    def parse(cls, value: Any, where: str) -> ContentSpec:
        """The spec a scenario value describes: a kind or preset name, or a table of fractions.

        :param where: names the value in error messages (file and key).
        :raises UserError: an unknown kind or option, a negative fraction, fractions not
            summing to 1 (within 1e-6), or a bad pool option.
        """
        if isinstance(value, str):
            name = ALIASES.get(value, value)
            if name in KINDS:
                return cls(**{kind: float(kind == name) for kind in KINDS})
            if name in PRESETS:
                return cls(**PRESETS[name])
            known = ", ".join([*KINDS, *ALIASES, *PRESETS])
            raise UserError(f"{where}: unknown content kind {value!r} (known: {known})")
        if not isinstance(value, Mapping):
            raise UserError(f"{where}: expected a content kind or a table of fractions, got {value!r}")
        fractions = dict.fromkeys(KINDS, 0.0)
        options: dict[str, int] = {}
        for key, amount in value.items():
            if key in ("pool_seed", "pool_pages", "run_pages"):
                least, most = (0, 2**63 - 1) if key == "pool_seed" else (1, 2**32)
                if isinstance(amount, bool) or not isinstance(amount, int) or not least <= amount <= most:
                    raise UserError(f"{where}: {key}: expected a whole number from {least} to {most}, got {amount!r}")
                options[key] = amount
                continue
            kind = ALIASES.get(key, key)
            if kind not in KINDS:
                known = ", ".join([*KINDS, *ALIASES, "pool_seed", "pool_pages", "run_pages"])
                raise UserError(f"{where}: {key}: unknown content kind (known: {known})")
            if kind != key and key in value and kind in value:
                raise UserError(f"{where}: {key}: is another name for {kind}; give one of them")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)):
                raise UserError(f"{where}: {key}: expected a fraction, got {amount!r}")
            if not 0.0 <= amount <= 1.0:
                raise UserError(f"{where}: {key}: a fraction must be in [0, 1], got {amount!r}")
            fractions[kind] = float(amount)
        total = sum(fractions.values())
        if abs(total - 1.0) > 1e-6:
            raise UserError(f"{where}: fractions sum to {total:g}, not 1")
        return cls(**fractions, **options)

    # -- pages ----------------------------------------------------------------------------------

    def kinds(self, vm_pages: int, seed: int, gpps: np.ndarray) -> np.ndarray:
        """The kind code (index in :data:`KINDS`) of each page, without generating bytes.

        Cheap: callers use it to skip zero pages.
        """
        gpps = _check_pages(vm_pages, gpps)
        fractions = self._fraction_array()
        nonzero = np.flatnonzero(fractions)
        if len(nonzero) == 1:
            return np.full(len(gpps), nonzero[0], np.uint8)
        edges = np.cumsum(fractions / fractions.sum())
        # Fractions sum to 1 only within rounding: draws above the last edge belong to the last
        # kind that has pages, never to a kind with fraction 0.
        edges[nonzero[-1] :] = 2.0
        uniform = (_keys(seed, _KIND, gpps // self.run_pages) >> np.uint64(11)) * 2.0**-53
        return np.searchsorted(edges, uniform, "right").astype(np.uint8)

    def fill(self, vm_pages: int, seed: int, gpps: np.ndarray) -> np.ndarray:
        """The contents of pages ``gpps`` of a VM: ``(len(gpps), PAGE_SIZE)`` uint8.

        Each page depends only on ``(seed, gpp)`` (and this spec), so memory can be filled in
        chunks, in any order. The bytes are those of :meth:`identities` (zero pages are left
        untouched in a zeroed array).
        """
        ids = self.identities(vm_pages, seed, gpps)
        out = np.zeros((len(ids), PAGE_SIZE), np.uint8)
        nonzero = np.flatnonzero(ids)
        for first in range(0, len(nonzero), _CHUNK_PAGES):
            rows = nonzero[first : first + _CHUNK_PAGES]
            out[rows] = generate_pages(ids[rows])
        return out

    def identities(self, vm_pages: int, seed: int, gpps: np.ndarray) -> np.ndarray:
        """The content identity (:mod:`memvisor.identity`) of each page of ``gpps``: 0 for a zero
        page, ``RANDOM_TAG | key`` or ``TEXT_TAG | key`` for the others (duplicate pages are text
        pages whose key comes from the shared pool). Cheap: a few hashes per page, no bytes."""
        from memvisor.identity import KEY_MASK, RANDOM_TAG, TEXT_TAG

        gpps = _check_pages(vm_pages, gpps)
        codes = self.kinds(vm_pages, seed, gpps)
        ids = np.zeros(len(gpps), np.uint64)
        mask = np.uint64(KEY_MASK)
        for code, domain, tag in ((RANDOM, _RANDOM, RANDOM_TAG), (TEXT, _TEXT, TEXT_TAG)):
            rows = np.flatnonzero(codes == code)
            if len(rows):
                ids[rows] = (_keys(seed, domain, gpps[rows]) & mask) | np.uint64(tag)
        rows = np.flatnonzero(codes == DUPLICATE)
        if len(rows):
            pick = _keys(seed, _POOL_PICK, gpps[rows])
            index = ((pick >> np.uint64(32)) * np.uint64(self.pool_pages)) >> np.uint64(32)
            ids[rows] = (_keys(self.pool_seed, _POOL, index) & mask) | np.uint64(TEXT_TAG)
        return ids


def generate_pages(ids: np.ndarray) -> np.ndarray:
    """The bytes of generated pages from their identities (random or text, no zero pages):
    ``(len(ids), PAGE_SIZE)`` uint8. The identity is the generator's key."""
    from memvisor.identity import TAG_SHIFT

    ids = np.asarray(ids, dtype=np.uint64)
    out = np.empty((len(ids), PAGE_SIZE), np.uint8)
    tags = ids >> np.uint64(TAG_SHIFT)
    for tag, generator in ((1, _random_pages), (2, _text_pages)):
        rows = np.flatnonzero(tags == tag)
        for first in range(0, len(rows), _CHUNK_PAGES):
            part = rows[first : first + _CHUNK_PAGES]
            out[part] = generator(ids[part])
    if len(ids) and not np.isin(tags, (1, 2)).all():
        raise ValueError("generate_pages takes random and text identities only")
    return out


def _check_pages(vm_pages: int, gpps: np.ndarray) -> np.ndarray:
    gpps = np.asarray(gpps)
    if gpps.ndim != 1 or (gpps.dtype.kind not in "iu" and len(gpps)):
        raise ValueError(f"gpps must be a 1-d integer array, not {gpps.dtype} of shape {gpps.shape}")
    gpps = gpps.astype(np.int64, copy=False)
    if len(gpps) and (gpps.min() < 0 or gpps.max() >= vm_pages):
        raise ValueError(f"page numbers must be in [0, {vm_pages})")
    return gpps


# -- hashing ------------------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place (uint64 arithmetic wraps, as it should)."""
    x ^= x >> np.uint64(33)
    x *= _C1
    x ^= x >> np.uint64(33)
    x *= _C2
    x ^= x >> np.uint64(33)
    return x


def _mix_int(value: int) -> int:
    """:func:`_mix` of one Python integer."""
    value &= _MASK64
    value ^= value >> 33
    value = (value * int(_C1)) & _MASK64
    value ^= value >> 33
    value = (value * int(_C2)) & _MASK64
    return value ^ (value >> 33)


def _seed_word(seed: int) -> int:
    """A 64-bit word from a seed of any size (every 64-bit limb counts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, not {seed!r}")
    seed, word = int(seed) % 2**128 if seed < 0 else int(seed), 0
    while True:
        word = _mix_int(word ^ (seed & _MASK64) ^ 0x5EED)
        seed >>= 64
        if not seed:
            return word


def _keys(seed: int, domain: int, indices: np.ndarray) -> np.ndarray:
    """One well-mixed 64-bit key per index, for ``(seed, domain)``."""
    base = np.uint64(_mix_int(_seed_word(seed) ^ domain))
    return _mix(indices.astype(np.uint64) * _GOLDEN + base)


# -- generators ---------------------------------------------------------------------------------


def _random_pages(keys: np.ndarray) -> np.ndarray:
    """Incompressible pages: every 8-byte word a hash of (page key, word index)."""
    words = keys[:, None] + _word_offsets(_WORDS_PER_PAGE)
    return _mix(words).astype("<u8", copy=False).view(np.uint8)


def _text_pages(keys: np.ndarray) -> np.ndarray:
    """Text-like pages: 512 eight-byte phrases each, picked Zipf-wise from a fixed table.

    One hash gives four 16-bit draws; a 65,536-entry table turns a draw into a phrase.
    """
    phrases, pick = _phrase_table()
    hashes = _mix(keys[:, None] + _word_offsets(_WORDS_PER_PAGE // 4))
    draws = (hashes[:, :, None] >> _SHIFTS16) & np.uint64(0xFFFF)
    words = phrases[pick[draws.reshape(len(keys), _WORDS_PER_PAGE)]]
    return words.view(np.uint8)


_SHIFTS16 = np.array([0, 16, 32, 48], np.uint64)


@functools.cache
def _word_offsets(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.uint64) * _GOLDEN


_VOCABULARY = (  # noqa: SIM905 (a sentence of words reads better than 95 quoted ones)
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were their one all we can her has there been if more when will would "
    "who so no data page memory file value error return int self none true false time user "
    "system table index query select where order group count state node list key name type "
    "size read write open close start stop first last next new old set get add use run test"
).split()
_PHRASES = 2048  # distinct 8-byte phrases
_PHRASE_ALPHA = 1.2  # Zipf exponent of phrase use; with 2048 phrases zstd -1 gives ~3.3x a page


@functools.cache
def _phrase_table() -> tuple[np.ndarray, np.ndarray]:
    """The phrase table (``<u8``, 8 bytes of text each) and the 16-bit-draw-to-phrase table.

    Built from the counter hash, not numpy's generators, so pages are the same bytes under
    every numpy version.
    """
    count = _PHRASES * 3  # enough words for _PHRASES * 8 bytes of text (words average > 3)
    hashes = _mix(np.arange(count, dtype=np.uint64) * _GOLDEN + np.uint64(_TEXT))
    word_weights = np.arange(1, len(_VOCABULARY) + 1, dtype=np.float64) ** -1.0
    word_of = _inverse_cdf(word_weights, (hashes >> np.uint64(48)).astype(np.int64))
    punctuation = (hashes & np.uint64(0xFF)).tolist()
    pieces = []
    for word, mark in zip(word_of.tolist(), punctuation, strict=True):
        pieces.append(_VOCABULARY[word])
        pieces.append(", " if mark < 16 else ".\n" if mark < 26 else " ")
    text = "".join(pieces).encode("ascii")[: _PHRASES * 8]
    phrases = np.frombuffer(text, "<u8")
    pick = _inverse_cdf(np.arange(1, _PHRASES + 1, dtype=np.float64) ** -_PHRASE_ALPHA, np.arange(65536))
    return phrases, pick


def _inverse_cdf(weights: np.ndarray, draws16: np.ndarray) -> np.ndarray:
    """Items for 16-bit draws, each item taking a share of the draws proportional to its weight."""
    cdf = np.cumsum(weights / weights.sum())
    return np.minimum(np.searchsorted(cdf, (draws16 + 0.5) / 65536.0), len(weights) - 1)
