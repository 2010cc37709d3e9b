"""`memvisor mrc TRACE`: the JSON it writes, the exact baseline, and one line with exit status 2
for malformed traces and contradictory options (through the real CLI, in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from memvisor.traces import ORACLE_GENERAL_DTYPE
from memvisor_mrc import synthetic
from memvisor_mrc.cli import compute
from memvisor_mrc.stack_distance import exact_mrc


def run_mrc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memvisor", "mrc", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def loop_trace(tmp_path_factory):
    """A 20-pass loop over 3,000 pages as .npy: the sampled curve must fall to 0 at 3,000."""
    path = tmp_path_factory.mktemp("traces") / "loop.npy"
    np.save(path, synthetic.loop_trace(3000, 60_000, seed=1).astype(np.int64))
    return path


def test_json_output_is_a_curve(loop_trace, tmp_path):
    """--json writes cache_pages ascending from 0 and miss_ratio from 1.0, non-increasing, with
    the counts; --plot writes a PNG; the sampled loop curve drops near the loop's length."""
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    done = run_mrc(str(loop_trace), "--rate", "0.1", "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert {"cache_pages", "miss_ratio", "accesses", "traced_accesses", "sampled_pages", "seconds"} <= set(data)
    pages, ratio = np.array(data["cache_pages"]), np.array(data["miss_ratio"])
    assert pages[0] == 0 and ratio[0] == 1.0 and np.all(np.diff(pages) > 0) and np.all(np.diff(ratio) <= 0)
    assert data["accesses"] == 60_000 and 0 < data["traced_accesses"] < 60_000
    at = lambda x: np.interp(x, pages, ratio)  # noqa: E731
    assert at(2700) > 0.9 and at(3300) < 0.1
    assert png.stat().st_size > 1000
    assert "working set" in done.stdout


def test_a_plot_is_written_whole_or_not_at_all(loop_trace, tmp_path):
    """--plot to a name matplotlib cannot draw is one line, exit 2, and leaves the folder as it
    was: no temporary, and an existing file of that name untouched."""
    png = tmp_path / "c.xyz"
    png.write_bytes(b"keep me")
    done = run_mrc(str(loop_trace), "--rate", "0.1", "--quiet", "--plot", str(png))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Format 'xyz' is not supported" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.xyz"] and png.read_bytes() == b"keep me"


def test_summary_says_the_curve_in_human_units(loop_trace):
    """The summary's figures are the loop's, counted by hand: 20 passes over 3,000 pages miss on
    every access below 3,000 pages (11.7 MiB) and only the first pass's 3,000 of 60,000 accesses
    at it (a floor of 5 %); sizes and ratios as the reports write them."""
    done = run_mrc(str(loop_trace), "--exact")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("curve (exact): 60,000 accesses, 60,000 processed, 3,000 pages sampled, in ")
    assert lines[1] == "working set at miss ratio 10 %: 11.7 MiB, 5 %: 11.7 MiB, 1 %: –"  # 5 %: the floor, reached
    assert lines[2] == "recommended: 11.7 MiB (3,000 pages), within 1 point of the curve's floor, a miss ratio of 5 %"


def test_exact_and_untrace_options(loop_trace):
    """--exact gives the exact curve (a step at the loop's length); --untrace-period reports
    traps; both through compute(), the function the command calls."""
    pages = np.load(loop_trace)
    exact = compute(pages, exact=True)
    assert exact.curve.mae(exact_mrc(pages), 3000) == 0.0
    assert exact.curve.at(2999) == 1.0 and exact.curve.at(3000) == pytest.approx(3000 / 60_000)
    untraced = compute(pages, rate=0.1, untrace_period=100)
    # every reuse of a loop is 3,000 accesses apart, longer than the period: every sampled
    # access traps, and the model leaves the step where it is
    assert untraced.trap_rate is not None and 0.05 < untraced.trap_rate < 0.15
    assert untraced.curve.at(2900) > 0.9 and untraced.curve.at(3100) < 0.1
    fixed = compute(pages, sample_size=50)
    assert fixed.curve.sampled_pages <= 50


@pytest.mark.parametrize("kind", ["float-dtype", "empty", "truncated-npy", "truncated-oracle", "missing"])
def test_malformed_trace_is_one_line_exit_2(kind, tmp_path):
    """A trace of the wrong dtype, an empty one, a truncated binary one or a missing file is one
    line on standard error naming the file, and exit status 2."""
    path = tmp_path / "bad.npy"
    if kind == "float-dtype":
        np.save(path, np.linspace(0, 1, 10))
    elif kind == "empty":
        np.save(path, np.zeros(0, np.int64))
    elif kind == "truncated-npy":
        np.save(path, np.arange(1000, dtype=np.int64))
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "truncated-oracle":
        path = tmp_path / "bad.oracleGeneral.bin"
        path.write_bytes(np.zeros(10, ORACLE_GENERAL_DTYPE).tobytes()[:-5])
    else:
        path = tmp_path / "nothing.npy"
    done = run_mrc(str(path), "--exact")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["--exact", "--rate", "0.1"], ["--rate", "0.1", "--sample-size", "5"],
                                  ["--rate", "2"], ["--sample-size", "4", "--untrace-period", "10"]])
def test_contradictory_options_are_one_line_exit_2(args, loop_trace):
    """Options that contradict each other or are out of range are refused before reading."""
    done = run_mrc(str(loop_trace), *args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_csv_trace_with_addresses(tmp_path):
    """--address and --format reach load_trace: byte addresses in a CSV become pages."""
    pages = synthetic.zipf_trace(200, 5000, 0.9, seed=2).astype(np.int64)
    path = tmp_path / "t.txt"
    path.write_text("\n".join(str(p << 12 | 7) for p in pages.tolist()) + "\n")
    out = tmp_path / "c.json"
    done = run_mrc(str(path), "--exact", "--address", "--format", "csv", "--json", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["accesses"] == 5000 and data["cache_pages"][-1] == len(np.unique(pages))
