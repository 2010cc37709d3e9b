"""Workload generators: ranges, determinism, the shape of each access pattern, spec errors."""

from __future__ import annotations

import numpy as np
import pytest

from memvisor.errors import UserError
from memvisor.traces import save_trace
from memvisor.workloads import DEFAULT_WRITE_FRACTION, WORKLOADS, Workload, make_workload

VM = 10_000

SYNTHETIC = [
    {"kind": "uniform"},
    {"kind": "uniform", "footprint": 0.25, "start": 100},
    {"kind": "zipf", "alpha": 0.99},
    {"kind": "zipf", "alpha": 1.3, "footprint": 500},
    {"kind": "scan", "start": 10, "footprint": 777},
    {"kind": "loop", "footprint": 321},
    {"kind": "phased", "footprint": 1000, "phase_accesses": 3000},
    {"kind": "phased", "footprint": 0.2, "phase_accesses": 999, "distribution": "uniform"},
    {"kind": "mixture", "parts": [{"weight": 2, "kind": "zipf"}, {"weight": 1, "kind": "scan"}]},
]


def take(workload: Workload, n: int) -> tuple[np.ndarray, np.ndarray]:
    batch = workload.next_batch(n)
    assert batch is not None
    return batch


def ids(spec):
    return "-".join(f"{v}" if k == "kind" else f"{k}={v}" for k, v in spec.items() if k != "parts")


@pytest.mark.parametrize("spec", SYNTHETIC, ids=ids)
def test_batches_are_in_range_and_typed(spec):
    pages, writes = take(make_workload(spec, VM, 1), 50_000)
    assert pages.dtype == np.int64 and writes.dtype == np.bool_
    assert len(pages) == len(writes) == 50_000
    assert pages.min() >= 0 and pages.max() < VM


@pytest.mark.parametrize("spec", SYNTHETIC, ids=ids)
def test_deterministic_under_seed_and_independent_of_batch_size(spec):
    whole = take(make_workload(spec, VM, 7), 10_000)
    pieces = make_workload(spec, VM, 7)
    parts = [take(pieces, n) for n in (1, 999, 0, 4000, 5000)]
    for got, expected in zip((np.concatenate([p[i] for p in parts]) for i in (0, 1)), whole, strict=True):
        np.testing.assert_array_equal(got, expected)
    other = take(make_workload(spec, VM, 8), 10_000)
    if spec["kind"] != "scan":  # a scan's pages do not depend on the seed, its writes do
        assert not np.array_equal(other[0], whole[0])
    assert not np.array_equal(other[1], whole[1])


def test_write_fraction_default_and_explicit():
    _, writes = take(make_workload({"kind": "uniform"}, VM, 1), 200_000)
    assert abs(writes.mean() - DEFAULT_WRITE_FRACTION) < 0.01
    _, writes = take(make_workload({"kind": "zipf", "write_fraction": 0.05}, VM, 1), 200_000)
    assert abs(writes.mean() - 0.05) < 0.005
    assert not take(make_workload({"kind": "scan", "write_fraction": 0}, VM, 1), 1000)[1].any()
    assert take(make_workload({"kind": "loop", "footprint": 9, "write_fraction": 1}, VM, 1), 1000)[1].all()


def test_zipf_is_skewed_and_hot_pages_are_scattered():
    vm = 100_000
    pages, _ = take(make_workload({"kind": "zipf", "alpha": 0.99}, vm, 3), 2_000_000)
    counts = np.sort(np.bincount(pages, minlength=vm))[::-1]
    top = counts[: vm // 100].sum() / len(pages)
    ranks = np.arange(1, vm + 1) ** -0.99
    expected = ranks[: vm // 100].sum() / ranks.sum()  # about 0.58
    assert abs(top - expected) < 0.01
    hottest = np.argsort(np.bincount(pages, minlength=vm))[::-1][:20]
    assert np.ptp(hottest) > vm // 4  # not the first pages of the region


def test_zipf_alpha_zero_is_uniform():
    pages, _ = take(make_workload({"kind": "zipf", "alpha": 0.0, "footprint": 100}, VM, 3), 100_000)
    counts = np.bincount(pages, minlength=100)
    assert counts.min() > 800 and counts.max() < 1200


def test_uniform_covers_its_region_only():
    pages, _ = take(make_workload({"kind": "uniform", "start": 0.5, "footprint": 1000}, VM, 2), 50_000)
    assert set(np.unique(pages).tolist()) == set(range(5000, 6000))


def test_scan_sweeps_sequentially_and_wraps():
    workload = make_workload({"kind": "scan", "start": 20, "footprint": 5}, VM, 2)
    np.testing.assert_array_equal(take(workload, 7)[0], [20, 21, 22, 23, 24, 20, 21])
    np.testing.assert_array_equal(take(workload, 4)[0], [22, 23, 24, 20])


def test_loop_repeats_exactly_its_pages_in_a_fixed_shuffled_order():
    size = 250
    pages, _ = take(make_workload({"kind": "loop", "footprint": size, "start": 1000}, VM, 4), 3 * size)
    assert len(np.unique(pages)) == size
    assert set(pages.tolist()) == set(range(1000, 1000 + size))
    np.testing.assert_array_equal(pages[:size], pages[size : 2 * size])
    assert not np.array_equal(pages[:size], np.sort(pages[:size]))


def test_phased_working_set_moves_between_disjoint_regions():
    size, phase = 1000, 5000
    pages, _ = take(make_workload({"kind": "phased", "footprint": size, "phase_accesses": phase}, VM, 5), 6 * phase)
    slots = [np.unique(pages[i * phase : (i + 1) * phase] // size) for i in range(6)]
    assert all(len(s) == 1 for s in slots)  # each phase stays in one region
    sequence = [int(s[0]) for s in slots]
    assert all(a != b for a, b in zip(sequence, sequence[1:], strict=False))  # and then moves
    assert len(set(sequence)) >= 3


def test_mixture_respects_weights():
    spec = {
        "kind": "mixture",
        "parts": [
            {"weight": 0.7, "kind": "uniform", "footprint": 1000},
            {"weight": 0.2, "kind": "scan", "start": 2000, "footprint": 1000},
            {"weight": 0.1, "kind": "zipf", "start": 5000, "footprint": 1000},
        ],
    }
    pages, _ = take(make_workload(spec, VM, 6), 200_000)
    shares = np.bincount(pages // 1000, minlength=10)[[0, 2, 5]] / len(pages)
    np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], atol=0.01)
    # Each part keeps its own pattern: the scan part's accesses are still a sequential sweep.
    scan = pages[(pages >= 2000) & (pages < 3000)]
    np.testing.assert_array_equal(scan[:1500], 2000 + np.arange(1500) % 1000)


def test_mixture_write_fraction_is_the_parts_default():
    spec = {
        "kind": "mixture",
        "write_fraction": 0.0,
        "parts": [{"weight": 1, "kind": "uniform"}, {"weight": 1, "kind": "scan", "write_fraction": 1.0}],
    }
    pages, writes = take(make_workload(spec, 2, 1), 10_000)  # uniform over 2 pages; scan 0, 1, 0...
    assert 0.45 < writes.mean() < 0.55


# -- trace replay -------------------------------------------------------------------------------


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "t.npy"
    save_trace(path, np.array([7 << 30, 12, 7 << 30, 99, 12]), np.array([1, 0, 0, 1, 1], bool))
    return str(path)


def test_trace_replays_compacted_pages_with_its_writes(trace_file):
    workload = make_workload({"kind": "trace", "path": trace_file}, 8, 1)
    pages, writes = take(workload, 3)
    np.testing.assert_array_equal(pages, [0, 1, 0])  # first-touch order
    np.testing.assert_array_equal(writes, [True, False, False])
    pages, writes = take(workload, 10)  # fewer than asked at the end
    np.testing.assert_array_equal(pages, [2, 1])
    np.testing.assert_array_equal(writes, [True, True])
    assert workload.next_batch(10) is None


def test_trace_loop_address_order_and_start(trace_file):
    spec = {"kind": "trace", "path": trace_file, "loop": True, "order": "address", "start": 4}
    pages, _ = take(make_workload(spec, 8, 1), 7)
    np.testing.assert_array_equal(pages, [6, 4, 6, 5, 4, 6, 4])


def test_trace_without_mask_uses_write_fraction(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("\n".join(str(i % 50) for i in range(20_000)))
    _, writes = take(make_workload({"kind": "trace", "path": str(path), "write_fraction": 0.5}, 64, 1), 20_000)
    assert 0.48 < writes.mean() < 0.52


def test_trace_larger_than_vm_is_an_error_naming_the_file(trace_file):
    with pytest.raises(UserError, match=f"workload trace: {trace_file}: touches 3 distinct pages"):
        make_workload({"kind": "trace", "path": trace_file}, 2, 1)


def test_mixture_ends_when_a_trace_part_ends(trace_file):
    spec = {
        "kind": "mixture",
        "parts": [{"weight": 1, "kind": "trace", "path": trace_file}, {"weight": 1, "kind": "scan"}],
    }
    workload = make_workload(spec, 16, 1)
    batch = workload.next_batch(1000)
    assert batch is not None and len(batch[0]) < 20
    assert workload.next_batch(1000) is None


# -- specs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({}, "workload: kind: missing"),
        ({"kind": "bogus"}, "workload bogus: kind: unknown workload kind"),
        ({"kind": "zipf", "alfa": 1}, "workload zipf: alfa: unknown option"),
        ({"kind": "zipf", "alpha": "high"}, "workload zipf: alpha: expected a number"),
        ({"kind": "zipf", "alpha": -0.5}, "workload zipf: alpha: must be in"),
        ({"kind": "uniform", "write_fraction": 1.5}, "workload uniform: write_fraction: must be in"),
        ({"kind": "uniform", "write_fraction": True}, "workload uniform: write_fraction: expected a number"),
        ({"kind": "uniform", "footprint": 20_000}, "workload uniform: footprint: 20000 pages"),
        ({"kind": "uniform", "footprint": 1.5}, "workload uniform: footprint: a fraction"),
        ({"kind": "uniform", "footprint": 0}, "workload uniform: footprint: must be at least one page"),
        ({"kind": "scan", "start": VM}, "workload scan: start: page 10000 is beyond"),
        ({"kind": "scan", "start": "zero"}, "workload scan: start: expected a page count"),
        ({"kind": "loop"}, "workload loop: footprint: missing"),
        ({"kind": "phased", "footprint": 0.6}, "workload phased: footprint: 6000 pages is more than half"),
        ({"kind": "phased", "phase_accesses": 0}, "workload phased: phase_accesses: must be from 1 to"),
        ({"kind": "phased", "distribution": "normal"}, "workload phased: distribution: must be one of"),
        ({"kind": "mixture"}, "workload mixture: parts: missing"),
        ({"kind": "mixture", "parts": []}, "workload mixture: parts: expected a non-empty list"),
        ({"kind": "mixture", "parts": [{"kind": "scan"}]}, "workload mixture: parts: \\[0\\]: weight"),
        ({"kind": "mixture", "parts": [{"kind": "scan", "weight": -1}]}, "weight: expected a positive number"),
        (
            {"kind": "mixture", "parts": [{"kind": "zipf", "weight": 1, "alpha": "x"}]},
            "workload mixture: parts\\[0\\]: workload zipf: alpha: expected a number",
        ),
        ({"kind": "trace"}, "workload trace: path: missing"),
        ({"kind": "trace", "path": "/nonexistent/t.npy"}, "/nonexistent/t.npy: no such trace file"),
        ({"kind": "trace", "path": "x.npy", "loop": "yes"}, "workload trace: loop: expected true or false"),
    ],
)
def test_bad_specs_raise_user_error(spec, message):
    with pytest.raises(UserError, match=message) as caught:
        make_workload(spec, VM, 1)
    assert "\n" not in str(caught.value)


def test_workloads_dict_is_the_registry_make_workload_uses(monkeypatch):
    assert set(WORKLOADS) == {"uniform", "zipf", "scan", "loop", "phased", "mixture", "trace"}

    class Constant(Workload):
        vm_pages = 4

        def next_batch(self, n):
            return np.zeros(n, np.int64), np.zeros(n, np.bool_)

    monkeypatch.setitem(WORKLOADS, "constant", lambda spec, vm_pages, seed: Constant())
    assert isinstance(make_workload({"kind": "constant"}, 4, 0), Constant)


@pytest.mark.parametrize("alpha", [0.99, 1.0, 1.3])
def test_zipf_over_a_large_region_follows_zipf_with_no_table_per_page(alpha):
    """Above EXACT_ZIPF_RANKS the sampler keeps no array per page, yet the share of accesses to
    the k most popular pages matches Zipf's law (the exact sum) within half a percentage point
    for k from the head into the tail, and every page of the region can be drawn."""
    from memvisor.workloads import EXACT_ZIPF_RANKS, _CompactZipfSampler

    size = 4 * EXACT_ZIPF_RANKS
    workload = make_workload({"kind": "zipf", "alpha": alpha}, size, 7)
    assert isinstance(workload.sampler, _CompactZipfSampler)
    assert sum(a.nbytes for a in (workload.sampler.head.table, workload.sampler.head.threshold)) < 4 << 20
    pages, _ = take(workload, 4_000_000)
    assert pages.min() >= 0 and pages.max() < size
    sampler = workload.sampler
    ranks = np.arange(size, dtype=np.uint64)
    offsets = (ranks * np.uint64(sampler.multiplier) + np.uint64(sampler.shift)) % np.uint64(size)
    assert len(np.unique(offsets)) == size  # ranks to offsets is a bijection
    rank_of = np.empty(size, np.int64)
    rank_of[offsets.astype(np.int64)] = np.arange(size)
    drawn = np.bincount(rank_of[pages], minlength=size)  # accesses per popularity rank
    weights = np.arange(1, size + 1, dtype=np.float64) ** -alpha
    expected = np.cumsum(weights) / weights.sum()
    observed = np.cumsum(drawn) / len(pages)
    for k in (10, 1000, 65536, 200_000, 1_000_000):
        assert abs(observed[k - 1] - expected[k - 1]) < 0.005, (k, observed[k - 1], expected[k - 1])
