"""Tests of the MRC algorithm library: exact stack distances, sampled curves, untraced periods."""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor_mrc import synthetic
from memvisor_mrc.curve import Curve
from memvisor_mrc.shards import (
    OnlineLRU,
    OnlineShards,
    page_hash,
    sample_mask,
    sampled_mrc,
)
from memvisor_mrc.stack_distance import (
    COLD,
    count_earlier_greater,
    exact_mrc,
    histogram_to_mrc,
    stack_distances,
)
from memvisor_mrc.untrace import simulate_traps, untrace_mrc

TRACES = Path("/work/shared/traces")

small_traces = st.lists(st.integers(0, 40), min_size=0, max_size=300).map(lambda xs: np.asarray(xs, dtype=np.uint64))


def brute_distances(pages: np.ndarray) -> np.ndarray:
    stack: list[int] = []
    out = []
    for p in pages.tolist():
        if p in stack:
            out.append(len(stack) - stack.index(p))
            stack.remove(p)
        else:
            out.append(COLD)
        stack.append(p)
    return np.asarray(out, dtype=np.int64)


def lru_miss_ratio(pages: np.ndarray, size: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    misses = 0
    for p in pages.tolist():
        if p in cache:
            cache.move_to_end(p)
        else:
            misses += 1
            cache[p] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return misses / len(pages)


@settings(max_examples=150, deadline=None)
@given(small_traces)
def test_stack_distances_equal_brute_force(pages):
    """Vectorised stack distances equal a brute-force LRU stack simulation."""
    assert np.array_equal(stack_distances(pages), brute_distances(pages))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 30), st.integers(0, 3)), min_size=0, max_size=200))
def test_count_earlier_greater_equals_brute_force(pairs):
    """The offline dominance count equals the quadratic definition, weighted and unweighted."""
    v = np.asarray([a for a, _ in pairs], dtype=np.int64)
    w = np.asarray([b for _, b in pairs], dtype=np.int64)
    n = len(pairs)
    ref_w = [sum(int(w[k]) for k in range(i) if v[k] > v[i]) for i in range(n)]
    ref_1 = [sum(1 for k in range(i) if v[k] > v[i]) for i in range(n)]
    assert count_earlier_greater(v, w).tolist() == ref_w
    assert count_earlier_greater(v).tolist() == ref_1


def test_count_earlier_greater_blocks_and_tail():
    """Lengths around powers of two (full blocks and a partial tail) count correctly."""
    rng = np.random.default_rng(3)
    for n in (2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 1024, 1025):
        v = rng.permutation(n)
        ref = [int(np.sum(v[:i] > v[i])) for i in range(n)]
        assert count_earlier_greater(v).tolist() == ref


def test_exact_mrc_equals_lru_simulation_at_many_sizes():
    """The exact curve equals a brute-force LRU cache's miss ratio at every size 1..D."""
    rng = np.random.default_rng(1)
    pages = synthetic.zipf_trace(300, 5000, 0.8, seed=1)
    pages = np.concatenate([pages, rng.permutation(np.unique(pages))])
    curve = exact_mrc(pages)
    d = len(np.unique(pages))
    assert curve.max_pages == d
    for size in list(range(1, 40)) + list(range(40, d + 1, 17)) + [d]:
        assert curve.at(size) == pytest.approx(lru_miss_ratio(pages, size), abs=1e-12)
    assert curve.at(d) == pytest.approx(d / len(pages))


def test_exact_mrc_on_real_trace_prefix():
    """On the first 100,000 accesses of a real trace the exact curve equals brute force."""
    path = TRACES / "sqlite.npy.zst"
    if not path.exists():
        pytest.skip("real traces not present")
    zstandard = pytest.importorskip("zstandard")
    with path.open("rb") as f:
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(f)
        head = reader.read(128 + 8 * 100_000)
    # the .npy header is followed by the uint64 pages; parse only the header
    buf = io.BytesIO(head)
    version = np.lib.format.read_magic(buf)
    reader_fn = getattr(np.lib.format, f"read_array_header_{version[0]}_{version[1]}")
    shape, _, dtype = reader_fn(buf)
    offset = buf.tell()
    pages = np.frombuffer(head[offset:], dtype=dtype, count=(len(head) - offset) // 8)[:100_000]
    dist = stack_distances(pages)
    hist = np.bincount(dist)
    # brute-force LRU stack on the same prefix
    ref = np.bincount(brute_distances(pages), minlength=hist.size)
    assert np.array_equal(hist, ref[: hist.size])
    assert shape[0] >= pages.size


def test_histogram_to_mrc_scales_distances():
    """A scaled histogram puts distance d at 1 + (d - 1) * scale pages."""
    hist = np.array([0, 5, 0, 5], dtype=float)  # 5 hits at d=1, 5 at d=3
    curve = histogram_to_mrc(hist, cold=10, total=20, scale=10.0)
    assert curve.cache_pages.tolist() == [0, 1, 11, 21]
    assert curve.at(1) == pytest.approx(0.75)
    assert curve.at(21) == pytest.approx(0.5)


def test_curve_methods_and_json_round_trip():
    """Curve interpolates, measures MAE, finds working sets and survives to_json/from_json."""
    c = Curve(cache_pages=[0, 10, 20], miss_ratio=[1.0, 0.5, 0.1], accesses=100)
    assert c.at(5) == pytest.approx(0.75)
    assert c.at(1000) == pytest.approx(0.1)
    assert c.working_set(0.5) == 10
    assert c.working_set(0.3) == 15
    assert c.working_set(0.05) is None
    flat = Curve(cache_pages=[0, 20], miss_ratio=[1.0, 0.1])
    assert c.mae(c, 20) == 0.0
    assert c.mae(flat, 20) > 0.0
    again = Curve.from_json(json.loads(json.dumps(c.to_json())))
    assert again.cache_pages.tolist() == c.cache_pages.tolist()
    assert again.accesses == 100
    with pytest.raises(ValueError):
        Curve(cache_pages=[0, 5], miss_ratio=[1.0, 1.1])


def test_page_hash_is_fixed():
    """The splitmix64-based page hash is a fixed function of page and seed."""
    h = page_hash(np.array([0, 1, 2**40], dtype=np.uint64))
    assert h.dtype == np.uint64
    assert h[0] == np.uint64(0xE220A8397B1DCDAF)  # splitmix64's first output from state 0
    assert not np.array_equal(h, page_hash(np.array([0, 1, 2**40], dtype=np.uint64), seed=1))


@settings(max_examples=60, deadline=None)
@given(small_traces, st.lists(st.integers(0, 300), max_size=4))
def test_online_lru_equals_exact_on_sampled_subsequence(pages, cuts):
    """OnlineLRU fed the sampled accesses in batches gives their exact stack distances."""
    sub = pages[sample_mask(pages, 0.5, seed=2)]
    lru = OnlineLRU(capacity=16)
    bounds = sorted({min(c, len(sub)) for c in cuts} | {0, len(sub)})
    got = [lru.access(sub[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    got = np.concatenate(got) if got else np.zeros(0, np.int64)
    assert np.array_equal(got, stack_distances(sub))


def test_online_lru_vectorised_batch_path():
    """A large batch (vectorised path) and single accesses (loop path) agree with exact distances."""
    pages = synthetic.zipf_trace(2000, 20_000, 0.9, seed=4)
    lru = OnlineLRU()
    got = np.concatenate([lru.access(pages[:300]), lru.access(pages[300:310]), lru.access(pages[310:])])
    assert np.array_equal(got, stack_distances(pages))


def test_sampled_mrc_of_loop_drops_near_loop_size():
    """The sampled curve of a loop over L pages stays near 1 below L and drops to ~0 just past L."""
    length = 20_000
    pages = synthetic.loop_trace(length, 20 * length, seed=5)
    for kw in (dict(rate=0.02), dict(rate=0.02, rate_estimate="nominal")):
        curve = sampled_mrc(pages, **kw)
        assert curve.at(0.9 * length) > 0.9
        assert curve.at(1.1 * length) < 0.1
    curve = sampled_mrc(pages, rate=0.02)  # calibrated by the footprint: the step ends at L
    assert curve.at(0.99 * length) > 0.9
    assert curve.at(length) < 0.06


def test_sampled_mae_on_zipf_is_small():
    """At R = 0.01 the sampled curve of a 50K-page zipf trace is within 0.02 MAE of the exact one."""
    pages = synthetic.zipf_trace(50_000, 1_000_000, 0.99, seed=6)
    exact = exact_mrc(pages)
    curve = sampled_mrc(pages, rate=0.01)
    assert curve.traced_accesses < 0.03 * len(pages)
    assert curve.mae(exact, exact.max_pages) < 0.02


def test_fixed_size_keeps_at_most_s_pages():
    """In fixed-size mode the online sampler never tracks more than S pages."""
    pages = synthetic.zipf_trace(5000, 30_000, 0.8, seed=7)
    online = OnlineShards(sample_size=64)
    for a in range(0, len(pages), 1000):
        online.process(pages[a : a + 1000])
        assert len(online.lru) <= 64
    curve = sampled_mrc(pages, sample_size=64)
    assert curve.sampled_pages <= 64


@settings(max_examples=40, deadline=None)
@given(small_traces, st.integers(1, 12))
def test_fixed_size_offline_equals_online(pages, size):
    """Vectorised fixed-size SHARDS equals the online loop with evictions from the LRU."""
    if len(pages) == 0:
        return
    offline = sampled_mrc(pages, sample_size=size)
    online = OnlineShards(sample_size=size)
    online.process(pages)
    ref = online.curve()
    xs = np.arange(0, 200)
    assert np.allclose(offline.at(xs), ref.at(xs), atol=1e-9)
    assert offline.traced_accesses == ref.traced_accesses


@settings(max_examples=40, deadline=None)
@given(small_traces)
def test_fixed_rate_offline_equals_online(pages):
    """Vectorised fixed-rate SHARDS (nominal rate, adj) equals the online sampler."""
    if len(pages) == 0:
        return
    offline = sampled_mrc(pages, rate=0.5, rate_estimate="nominal")
    online = OnlineShards(rate=0.5)
    online.process(pages)
    xs = np.arange(0, 200)
    assert np.allclose(offline.at(xs), online.curve().at(xs), atol=1e-9)


def brute_traps(pages: np.ndarray, rate: float, untrace: int) -> list[int]:
    sampled = sample_mask(pages, rate)
    last: dict[int, int] = {}
    out = []
    for t, (p, s) in enumerate(zip(pages.tolist(), sampled.tolist())):
        if s and (p not in last or t >= last[p] + untrace):
            last[p] = t
            out.append(t)
    return out


@settings(max_examples=80, deadline=None)
@given(small_traces, st.integers(0, 120), st.sampled_from([0.3, 1.0]))
def test_untrace_simulator_never_traps_inside_window(pages, untrace, rate):
    """Trapped accesses never fall inside their page's untraced window and match a brute force."""
    traps = simulate_traps(pages, rate, untrace)
    last: dict[int, int] = {}
    for t, p in zip(traps.times.tolist(), traps.pages.tolist()):
        assert p not in last or t - last[p] >= max(untrace, 1)
        last[p] = t
    assert traps.times.tolist() == brute_traps(pages, rate, untrace)


def test_untrace_estimator_is_accurate_with_few_traps():
    """With an untraced period the estimate from traps alone stays close to the exact curve."""
    pages = synthetic.phased_zipf(5000, 400_000, 2, 0.5, alpha=1.1, seed=8)
    exact = exact_mrc(pages)
    traps = simulate_traps(pages, 0.2, 2000)
    assert traps.trap_rate < 0.5 * traps.sampled_accesses / len(pages)
    curve = untrace_mrc(traps, distinct_pages=exact.max_pages)
    assert curve.mae(exact, exact.max_pages) < 0.03
    plain = untrace_mrc(traps, distinct_pages=exact.max_pages, virtual_touch=False, hidden_hits=False)
    assert curve.mae(exact, exact.max_pages) < plain.mae(exact, exact.max_pages)
