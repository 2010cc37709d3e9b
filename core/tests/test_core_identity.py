"""Pages by content identity: the bytes an identity names, equality, fingerprints, literal pages,
the size model against real compression, and which model a host gets."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from memvisor import PAGE_SIZE
from memvisor.contents import ContentSpec
from memvisor.errors import UserError
from memvisor.host import HostConfig
from memvisor.identity import (
    IDENTITY_AUTO_BYTES,
    Identities,
    LiteralTable,
    byte_fingerprints,
    materialise,
    rows_equal,
    size_model,
    zero_rows,
)

MIX = ContentSpec.parse({"zero": 0.3, "random": 0.2, "text": 0.3, "duplicate": 0.2, "pool_pages": 16}, "mix")


def generated(n: int = 3000, seed: int = 4) -> Identities:
    """Identities of a generated VM, about a third of them stamped by guest writes."""
    ids = MIX.identities(n, seed, np.arange(n))
    rng = np.random.default_rng(seed)
    stamps = np.where(rng.random(n) < 0.3, rng.integers(1, 6, n), 0)
    return Identities(ids, stamps)


def test_identities_name_the_bytes_the_generator_makes():
    """The bytes an identity names are the generator's bytes for the page (both models hold the
    same bytes), and a stamp is the first 8 bytes, little-endian."""
    n = 2000
    ids = MIX.identities(n, 9, np.arange(n))
    np.testing.assert_array_equal(materialise(Identities(ids, np.zeros(n))), MIX.fill(n, 9, np.arange(n)))
    stamped = materialise(Identities(ids[:5], [7, 0, 1, 2**32 - 1, 3]))
    assert stamped.view(np.uint64)[:, 0].tolist()[0] == 7
    assert stamped.view(np.uint64)[3, 0] == 2**32 - 1
    np.testing.assert_array_equal(stamped[1], MIX.fill(n, 9, np.arange(1, 2))[0])


def test_equal_identities_are_equal_bytes_and_back():
    """For generated and stamped pages, two pages hold equal bytes exactly when their
    (identity, stamp) pairs are equal; their fingerprints agree, and 0 is the zero page only."""
    contents = generated()
    data = materialise(contents)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, len(contents), 20000), rng.integers(0, len(contents), 20000)
    same_bytes = ~np.any(data.view(np.uint64)[a] != data.view(np.uint64)[b], axis=1)
    np.testing.assert_array_equal(contents[a].equal(contents[b]), same_bytes)
    np.testing.assert_array_equal(rows_equal(contents[a], contents[b]), same_bytes)
    assert same_bytes.sum() > 500 and (~same_bytes).sum() > 500  # both cases are tested
    fp = contents.fingerprints()
    assert np.all(fp[a][same_bytes] == fp[b][same_bytes])
    np.testing.assert_array_equal(fp == 0, zero_rows(data))
    np.testing.assert_array_equal(byte_fingerprints(data) == 0, zero_rows(data))
    np.testing.assert_array_equal(zero_rows(contents), zero_rows(data))


def test_literal_pages_round_trip_and_equal_bytes_get_one_identity():
    """Bytes from outside are interned: zeros are the zero page, zeros with a first word are a
    stamped zero page (as a guest write makes it), anything else a literal whose identity the
    same bytes get again."""
    table = LiteralTable()
    pages = np.zeros((5, PAGE_SIZE), np.uint8)
    pages[1].view(np.uint64)[0] = 12
    pages[2, 100] = 1
    pages[3] = np.arange(PAGE_SIZE) % 251
    pages[4] = pages[2]
    ids = table.intern(pages)
    assert ids.ids[0] == 0 and ids.stamps[0] == 0
    assert ids.ids[1] == 0 and ids.stamps[1] == 12
    assert ids.literal().tolist() == [False, False, True, True, True]
    assert ids.ids[2] == ids.ids[4] != ids.ids[3]
    assert len(table) == 2
    np.testing.assert_array_equal(materialise(ids, table), pages)


def test_size_model_predicts_real_compression_within_five_percent():
    """The per-class costs, fitted on one sample of generated blocks, predict the zstd size of
    other blocks of generated pages (a VM's memory, in 64-page blocks) within 5% in total."""
    contents = generated(64 * 120, seed=11)
    keep = ~contents.is_zero()
    contents = contents[keep]
    compressor = zstandard.ZstdCompressor(level=1)
    data = materialise(contents)
    starts = np.arange(0, len(contents), 64)
    real = sum(min(len(compressor.compress(data[s : s + 64].tobytes())), len(data[s : s + 64]) * PAGE_SIZE)
               for s in starts)
    model = int(size_model(1, 64).blocks_bytes(contents, starts).sum())
    assert abs(model / real - 1) < 0.05, (model, real)


def test_hosts_larger_than_the_threshold_get_the_identity_model():
    """No ``contents``: bytes for small hosts, identity above the threshold when the backend has
    it; a model the backend lacks is refused in one line."""
    small = IDENTITY_AUTO_BYTES // PAGE_SIZE
    assert HostConfig(memory_pages=small).contents_model() == "bytes"
    assert HostConfig(memory_pages=small + 512).contents_model() == "identity"
    assert HostConfig(memory_pages=small + 512).contents_model(("bytes",)) == "bytes"
    assert HostConfig(memory_pages=512, contents="identity").contents_model() == "identity"
    with pytest.raises(UserError, match="host.contents: backend 'linux' holds page contents as bytes, not 'identity'"):
        HostConfig(memory_pages=512, backend="linux", contents="identity").contents_model(("bytes",))
