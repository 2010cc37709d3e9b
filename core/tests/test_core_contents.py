"""Page contents: parsing, determinism per page, kinds in proportion, sharing and compressibility."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from memvisor import PAGE_SIZE
from memvisor.contents import DUPLICATE, KINDS, RANDOM, TEXT, ZERO, ContentSpec
from memvisor.errors import UserError

VM = 20_000
WHERE = "scenario.toml: vms.a.contents"


def ratio(pages: np.ndarray) -> np.ndarray:
    """zstd level-1 compression ratio of each page on its own."""
    compressor = zstandard.ZstdCompressor(level=1)
    return np.array([PAGE_SIZE / len(compressor.compress(page.tobytes())) for page in pages])


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "fractions"),
    [
        ("zero", {"zero": 1.0}),
        ("random", {"random": 1.0}),
        ("text", {"text": 1.0}),
        ("compressible", {"text": 1.0}),
        ("duplicate", {"duplicate": 1.0}),
        ("mixed", {"zero": 0.25, "random": 0.2, "text": 0.45, "duplicate": 0.1}),
        (
            {"zero": 0.6, "text": 0.2, "random": 0.1, "duplicate": 0.1},
            {"zero": 0.6, "text": 0.2, "random": 0.1, "duplicate": 0.1},
        ),
        ({"compressible": 0.5, "zero": 0.5}, {"text": 0.5, "zero": 0.5}),
        ({"zero": 0.1, "text": 0.2, "random": 0.7000000001}, {"zero": 0.1, "text": 0.2, "random": 0.7000000001}),
        ({"random": 1}, {"random": 1.0}),
    ],
)
def test_parse_accepts_kinds_presets_and_tables(value, fractions):
    spec = ContentSpec.parse(value, WHERE)
    assert spec.fractions == {kind: fractions.get(kind, 0.0) for kind in KINDS}


def test_parse_pool_options():
    spec = ContentSpec.parse({"duplicate": 1.0, "pool_seed": 9, "pool_pages": 3, "run_pages": 512}, WHERE)
    assert (spec.pool_seed, spec.pool_pages, spec.run_pages) == (9, 3, 512)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("disk", "unknown content kind 'disk'"),
        ({"zero": 0.5, "swap": 0.5}, "swap: unknown content kind"),
        ({"zero": 0.5, "text": 0.4}, "fractions sum to 0.9, not 1"),
        ({"zero": 0.7, "text": 0.4}, "fractions sum to 1.1, not 1"),
        ({"zero": 1.2, "text": -0.2}, "zero: a fraction must be in"),
        ({"zero": 1.0, "text": -0.0001}, "text: a fraction must be in"),
        ({"zero": "all"}, "zero: expected a fraction"),
        ({"zero": True}, "zero: expected a fraction"),
        ({"text": 0.5, "compressible": 0.5}, "compressible: is another name for text"),
        ({"duplicate": 1.0, "pool_pages": 0}, "pool_pages: expected a whole number from 1 to"),
        ({"duplicate": 1.0, "pool_seed": -1}, "pool_seed: expected a whole number"),
        ({"duplicate": 1.0, "run_pages": 1.5}, "run_pages: expected a whole number"),
        (["zero"], "expected a content kind or a table"),
        (0.5, "expected a content kind or a table"),
    ],
)
def test_parse_errors_name_where(value, message):
    with pytest.raises(UserError, match=message) as caught:
        ContentSpec.parse(value, WHERE)
    assert str(caught.value).startswith(WHERE + ": ")
    assert "\n" not in str(caught.value)


# -- kinds --------------------------------------------------------------------------------------


def test_kinds_follow_fractions():
    spec = ContentSpec.parse({"zero": 0.6, "text": 0.2, "random": 0.1, "duplicate": 0.1}, WHERE)
    codes = spec.kinds(100_000, 3, np.arange(100_000))
    assert codes.dtype == np.uint8
    shares = np.bincount(codes, minlength=4) / len(codes)
    np.testing.assert_allclose(shares[[ZERO, TEXT, RANDOM, DUPLICATE]], [0.6, 0.2, 0.1, 0.1], atol=0.01)
    other_seed = spec.kinds(100_000, 4, np.arange(100_000))
    assert (other_seed != codes).mean() > 0.3  # a different VM has its kinds elsewhere


def test_kinds_never_pick_a_kind_with_fraction_zero():
    spec = ContentSpec.parse({"zero": 0.1, "text": 0.2, "random": 0.6999999999}, WHERE)
    assert not (spec.kinds(200_000, 1, np.arange(200_000)) == DUPLICATE).any()


def test_run_pages_give_whole_runs_one_kind():
    spec = ContentSpec.parse({"zero": 0.5, "random": 0.5, "run_pages": 512}, WHERE)
    codes = spec.kinds(64 * 512, 2, np.arange(64 * 512)).reshape(64, 512)
    assert (codes == codes[:, :1]).all()
    assert 0 < (codes[:, 0] == ZERO).sum() < 64


# -- fill ---------------------------------------------------------------------------------------


def test_fill_is_deterministic_per_page_for_any_subset_and_order():
    spec = ContentSpec.parse("mixed", WHERE)
    everything = spec.fill(VM, 11, np.arange(VM))
    assert everything.shape == (VM, PAGE_SIZE) and everything.dtype == np.uint8
    subset = np.random.default_rng(0).choice(VM, 700, replace=False)
    np.testing.assert_array_equal(spec.fill(VM, 11, subset), everything[subset])
    np.testing.assert_array_equal(spec.fill(VM, 11, subset[::-1]), everything[subset[::-1]])
    np.testing.assert_array_equal(spec.fill(VM, 11, np.arange(VM)), everything)


def test_fill_matches_kinds():
    spec = ContentSpec.parse("mixed", WHERE)
    gpps = np.arange(0, VM, 7)
    codes = spec.kinds(VM, 5, gpps)
    pages = spec.fill(VM, 5, gpps)
    nonzero = pages.any(axis=1)
    np.testing.assert_array_equal(nonzero, codes != ZERO)


def test_different_seeds_give_different_private_pages():
    spec = ContentSpec.parse({"random": 0.5, "text": 0.5}, WHERE)
    a = spec.fill(VM, 1, np.arange(500))
    b = spec.fill(VM, 2, np.arange(500))
    assert not (a == b).all(axis=1).any()


def test_private_pages_are_all_distinct():
    # Page sharing must find only the duplicate kind: random and text pages never repeat.
    spec = ContentSpec.parse({"random": 0.5, "text": 0.5}, WHERE)
    pages = spec.fill(VM, 3, np.arange(5000))
    assert len(np.unique(pages, axis=0)) == 5000


def test_duplicate_pages_are_shared_across_vms_through_the_pool():
    spec = ContentSpec.parse({"duplicate": 0.5, "zero": 0.5, "pool_pages": 16}, WHERE)
    gpps = np.arange(4000)
    a, b = spec.fill(VM, 1, gpps), spec.fill(VM, 2, gpps)
    dup_a = a[spec.kinds(VM, 1, gpps) == DUPLICATE]
    dup_b = b[spec.kinds(VM, 2, gpps) == DUPLICATE]
    pool_a = {page.tobytes() for page in dup_a}
    pool_b = {page.tobytes() for page in dup_b}
    assert len(pool_a) == 16 and pool_a == pool_b  # both VMs hold the same 16 pool pages
    other_pool = ContentSpec.parse({"duplicate": 1.0, "pool_pages": 16, "pool_seed": 1}, WHERE)
    pool_c = {page.tobytes() for page in other_pool.fill(VM, 1, gpps)}
    assert not pool_c & pool_a


@pytest.mark.parametrize("kind", ["text", "compressible", "duplicate"])
def test_compressible_pages_compress_two_to_five_times(kind):
    pages = ContentSpec.parse(kind, WHERE).fill(VM, 4, np.arange(0, VM, 97))
    ratios = ratio(pages)
    assert ratios.min() > 2.0 and ratios.max() < 5.0


def test_random_pages_do_not_compress():
    pages = ContentSpec.parse("random", WHERE).fill(VM, 4, np.arange(0, VM, 97))
    assert ratio(pages).max() < 1.01


def test_text_pages_look_like_text():
    page = ContentSpec.parse("text", WHERE).fill(VM, 4, np.array([17]))[0]
    letters = np.isin(page, np.frombuffer(b"abcdefghijklmnopqrstuvwxyz ,.\n", np.uint8))
    assert letters.all()


def test_fill_rejects_pages_outside_the_vm():
    spec = ContentSpec.parse("random", WHERE)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        spec.fill(100, 1, np.array([5, 100]))
    with pytest.raises(ValueError, match="seed"):
        spec.fill(100, 1.5, np.array([5]))
    assert spec.fill(100, 1, np.array([], np.int64)).shape == (0, PAGE_SIZE)
