"""Accuracy and speed figures for the MRC algorithms (a script, not collected by pytest).

Run from the repository root:
    PYTHONPATH=plugins/memvisor-mrc/src .venv/bin/python \
        plugins/memvisor-mrc/tests/bench_mrc_accuracy.py [sampled|untrace|real]
"""

from __future__ import annotations

import io
import json
import sys
import time

import numpy as np

from memvisor_mrc import synthetic
from memvisor_mrc.curve import Curve
from memvisor_mrc.shards import sampled_mrc
from memvisor_mrc.stack_distance import exact_mrc
from memvisor_mrc.untrace import simulate_traps, untrace_mrc

N = 10_000_000


def traces():
    yield "zipf0.99-100K", synthetic.zipf_trace(100_000, N, 0.99, seed=1)
    yield "zipf0.99-1M", synthetic.zipf_trace(1_000_000, N, 0.99, seed=2)
    yield "loop-100K", synthetic.loop_trace(100_000, N, seed=3)
    yield "scan+zipf-100K", synthetic.scan_polluted_zipf(100_000, N, 0.2, 1_000_000, seed=4)
    yield "phases-4x100K", synthetic.phased_zipf(100_000, N, 4, 0.5, seed=5)


def timed(f, *a, **k):
    t = time.perf_counter()
    r = f(*a, **k)
    return r, time.perf_counter() - t


def bench_sampled():
    for name, pages in traces():
        exact, te = timed(exact_mrc, pages)
        d = exact.sampled_pages
        row = {"trace": name, "D": d, "exact_s": round(te, 2)}
        for rate in (0.01, 0.001):
            for label, kw in [
                ("nominal", dict(rate_estimate="nominal", adj=False)),
                ("nominal+adj", dict(rate_estimate="nominal", adj=True)),
                ("pages", dict(rate_estimate="pages", adj=False)),
                ("pages+adj", dict(rate_estimate="pages", adj=True)),
            ]:
                maes = []
                for seed in range(3):
                    c, ts = timed(sampled_mrc, pages, rate=rate, seed=seed, **kw)
                    maes.append(c.mae(exact, d))
                row[f"R={rate} {label}"] = round(float(np.mean(maes)), 4)
                row[f"R={rate} {label} max"] = round(float(np.max(maes)), 4)
                if label == "pages+adj":
                    row[f"R={rate} time_s"] = round(ts, 2)
            s = int(round(rate * d))
            maes = []
            for seed in range(3):
                c, ts = timed(sampled_mrc, pages, sample_size=s, seed=seed)
                maes.append(c.mae(exact, d))
            row[f"R={rate} fixed-size S={s}"] = round(float(np.mean(maes)), 4)
            row[f"R={rate} fixed-size time_s"] = round(ts, 2)
        print(json.dumps(row), flush=True)


def bench_untrace():
    for name, pages in (
        ("zipf0.99-100K-5M", synthetic.zipf_trace(100_000, 5_000_000, 0.99, seed=7)),
        ("phases-4x100K-5M", synthetic.phased_zipf(100_000, 5_000_000, 4, 0.5, seed=8)),
    ):
        exact = exact_mrc(pages)
        d = exact.sampled_pages
        for rate in (0.01, 0.1):
            for u in (0, 1000, 10_000, 100_000, 300_000, 1_000_000):
                traps, tt = timed(simulate_traps, pages, rate, u)
                full, te = timed(untrace_mrc, traps, distinct_pages=d)
                nominal = untrace_mrc(traps)
                plain = untrace_mrc(traps, distinct_pages=d, virtual_touch=False, hidden_hits=False)
                novt = untrace_mrc(traps, distinct_pages=d, virtual_touch=False)
                print(
                    json.dumps(
                        {
                            "trace": name,
                            "rate": rate,
                            "U": u,
                            "trap_rate": round(traps.trap_rate, 5),
                            "mae_model": round(full.mae(exact, d), 4),
                            "mae_model_nominal_rate": round(nominal.mae(exact, d), 4),
                            "mae_no_virtual_touch": round(novt.mae(exact, d), 4),
                            "mae_traps_only": round(plain.mae(exact, d), 4),
                            "sim_s": round(tt, 2),
                            "est_s": round(te, 2),
                        }
                    ),
                    flush=True,
                )


def load_real(name):
    import zstandard

    with open(f"/work/shared/traces/{name}.npy.zst", "rb") as f:
        r = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(f)
        pages = np.load(io.BytesIO(r.read()))
    with open(f"/work/shared/traces/{name}.mrc.json") as f:
        exact = Curve.from_json(json.load(f))
    return pages, exact


def bench_real():
    for name in ("sqlite", "python"):
        pages, exact = load_real(name)
        d = exact.max_pages
        for rate in (1.0, 0.25):
            for u in (0, 100, 1000, 10_000, 100_000):
                traps, tt = timed(simulate_traps, pages, rate, u)
                full = untrace_mrc(traps, distinct_pages=d)
                plain = untrace_mrc(traps, distinct_pages=d, virtual_touch=False, hidden_hits=False)
                x = np.arange(1, d + 1)
                logerr = np.abs(np.log10(np.maximum(full.at(x), 1e-6)) - np.log10(np.maximum(exact.at(x), 1e-6)))
                print(
                    json.dumps(
                        {
                            "trace": name,
                            "rate": rate,
                            "U": u,
                            "trap_rate": round(traps.trap_rate, 5),
                            "mae_model": round(full.mae(exact, d), 5),
                            "mae_traps_only": round(plain.mae(exact, d), 4),
                            "mean_abs_log10_err_model": round(float(logerr.mean()), 3),
                            "sim_s": round(tt, 1),
                        }
                    ),
                    flush=True,
                )
        for rate in (0.25, 0.1):
            c = sampled_mrc(pages, rate=rate)
            print(json.dumps({"trace": name, "sampled_rate": rate, "mae": round(c.mae(exact, d), 5)}), flush=True)


if __name__ == "__main__":
    what = sys.argv[1:] or ["sampled", "untrace", "real"]
    for w in what:
        globals()[f"bench_{w}"]()
