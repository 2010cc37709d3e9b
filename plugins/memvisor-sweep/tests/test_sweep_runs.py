"""memvisor sweep without a cluster: axes and paths, the plan and its keys, the table, failures,
resume, the comparison report and the command's one-line errors."""

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from memvisor.errors import UserError
from memvisor_sweep import load_sweep, parse_vary, read_table, run_sweep, sweep_from_scenario
from memvisor_sweep.driver import SerialExecutor
from memvisor_sweep.run import RunTask, run_one, to_toml
from memvisor_sweep.spec import apply_setting, parse_values
from memvisor_sweep.table import WALL_CLOCK_COLUMNS, flatten_report, write_table

MISSING_TRACE = '{kind="trace", path="/nonexistent/memvisor-sweep-test.npy"}'


def deterministic(rows):
    """Rows without the wall-clock columns, the only ones two equal sweeps may differ in."""
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_COLUMNS} for r in rows]


# -- values and paths ----------------------------------------------------------------------------

def test_vary_values_are_toml_with_bare_words_as_strings():
    """Numbers, booleans, tables and bare words (64MiB) all parse; commas inside tables do not split."""
    assert parse_values("1,2,3") == [1, 2, 3]
    assert parse_values("0.8, 0.99") == [0.8, 0.99]
    assert parse_values("64MiB,128MiB") == ["64MiB", "128MiB"]
    assert parse_values('{kind="zipf", alpha=0.9},{kind="scan"}') == [{"kind": "zipf", "alpha": 0.9}, {"kind": "scan"}]
    assert parse_values('zipf,{kind="scan", footprint=0.5}') == ["zipf", {"kind": "scan", "footprint": 0.5}]
    assert parse_values("true,false") == [True, False]
    with pytest.raises(ValueError):
        parse_values("1,,2")
    with pytest.raises(ValueError):
        parse_values("{kind='zipf'")


def test_paths_address_vms_plugins_seed_and_arrays(tiny):
    """vm.NAME, vm.*, plugins.NAME.KEY (enabling it), plugins sets, seed aliases, array indexes."""
    data = tomllib.loads(tiny.read_text())
    apply_setting(data, "vm.web.workload.alpha", 0.99)
    apply_setting(data, "vm.*.memory", "2MiB")
    apply_setting(data, "host.seed", 5)
    apply_setting(data, "plugins.sharing.pages_per_tick", 10)
    apply_setting(data, "timeline.0.for", "3ms")
    apply_setting(data, "host.costs.dram_remote_ns", 200)
    assert data["vm"][0]["workload"] == {"kind": "zipf", "alpha": 0.99}
    assert [v["memory"] for v in data["vm"]] == ["2MiB", "2MiB"]
    assert data["seed"] == 5 and data["timeline"][0]["for"] == "3ms" and data["host"]["costs"]["dram_remote_ns"] == 200
    assert data["plugins"] == {"counter": {}, "sharing": {"pages_per_tick": 10}}
    apply_setting(data, "plugins", "sharing")  # the set of plugins keeps the named ones' settings
    assert data["plugins"] == {"sharing": {"pages_per_tick": 10}}
    apply_setting(data, "plugins", "none")
    assert data["plugins"] == {}
    apply_setting(data, "workload", "scan")  # shorthand for vm.*.workload; a string is a kind
    assert all(v["workload"] == {"kind": "scan"} for v in data["vm"])
    with pytest.raises(ValueError, match="no VM named 'nosuch'"):
        apply_setting(data, "vm.nosuch.memory", "1MiB")
    with pytest.raises(ValueError, match="index out of range"):
        apply_setting(data, "timeline.3.for", "1ms")


def test_bad_axes_are_one_line_naming_the_axis(tiny):
    """A malformed option, an unknown VM or a value the scenario refuses names the axis and value."""
    with pytest.raises(UserError, match=r"^--vary 'vm\.web\.memory': expected PATH="):
        parse_vary("vm.web.memory")
    for option, expected in [
        ("vm.nosuch.memory=1MiB", "axis vm.nosuch.memory=1MiB: vm.nosuch.memory: no VM named 'nosuch'"),
        ("vm.web.memory=1MiB,lots", "axis vm.web.memory=lots: "),
        ("host.nosuch=1", "axis host.nosuch=1: "),
        ("plugins=counter,nosuchplugin", "axis plugins=nosuchplugin: unknown plugin 'nosuchplugin'"),
    ]:
        spec = sweep_from_scenario(tiny, [parse_vary(option)])
        with pytest.raises(UserError) as info:
            spec.check({"counter"})
        message = str(info.value)
        assert message.startswith(f"{tiny}: {expected}") and "\n" not in message, message


def test_keys_hash_the_resolved_scenario(tiny):
    """Equal resolved scenarios share a key whatever the axes that made them; any change alters it."""
    a = sweep_from_scenario(tiny, [parse_vary("vm.*.memory=1MiB,2MiB")]).plan()
    b = sweep_from_scenario(tiny, [parse_vary("vm.web.memory=1MiB,2MiB"), parse_vary("vm.db.memory=1MiB,2MiB")]).plan()
    assert len({r.key for r in a}) == 2
    assert a[0].key == b[0].key and a[1].key == b[3].key
    assert b[1].key not in {r.key for r in a}


def test_sweep_file_with_vary_variants_and_compare(tmp_path, tiny):
    """A sweep file names the base scenario, nested [vary] tables, named variants and [compare]."""
    sweep = tmp_path / "s.toml"
    sweep.write_text('scenario = "tiny.toml"\n'
                     '[vary]\nvm.web.workload.alpha = [0.8, 0.99]\n"seed" = [1, 2]\n'
                     '[variants.policy.plain]\n"plugins" = "none"\n'
                     '[variants.policy.counted]\n"plugins.counter" = {}\n"host.tick" = "2ms"\n'
                     '[compare]\npolicy = "policy"\nworkload = "vm.web.workload.alpha"\n')
    spec = load_sweep(sweep)
    assert [a.name for a in spec.axes] == ["vm.web.workload.alpha", "seed", "policy"]
    plan = spec.check({"counter"})
    assert len(plan) == 8 and plan[-1].axes == {"vm.web.workload.alpha": 0.99, "seed": 2, "policy": "counted"}
    assert plan[-1].data["host"]["tick"] == "2ms" and plan[0].data["plugins"] == {}
    sweep.write_text('scenario = "tiny.toml"\n[compare]\npolicy = "nope"\n[vary]\nseed = [1]\n')
    with pytest.raises(UserError, match="compare.policy: no axis named 'nope'"):
        load_sweep(sweep).check()
    inline_tables = re.sub(r"(?m)^(\[+)", r"\1scenario.", tiny.read_text())
    sweep.write_text('[vary]\n"vm.*.memory" = ["1MiB", "2MiB"]\n[scenario]\n' + inline_tables)
    inline = load_sweep(sweep)  # the base scenario inline, as a [scenario] table
    assert inline.base_path == sweep
    assert [r.data["vm"][1]["memory"] for r in inline.check({"counter"})] == ["1MiB", "2MiB"]
    sweep.write_text('scenario = "tiny.toml"\nvary = 3\n')
    with pytest.raises(UserError, match=r"s\.toml: vary: must be a table"):
        load_sweep(sweep)


def test_scenario_toml_round_trips(tiny):
    """runs/KEY/scenario.toml reads back as the resolved scenario (memvisor run repeats the run)."""
    data = tomllib.loads(tiny.read_text())
    data["host"]["costs"] = {"dram_remote_ns": 150}
    data["vm"][0]["name"] = "web server"
    assert tomllib.loads(to_toml(data)) == data


# -- running -------------------------------------------------------------------------------------

def test_run_function_is_pure_and_records_errors(tiny):
    """The same task gives the same report (but for real time); a run that raises gives a status."""
    spec = sweep_from_scenario(tiny)
    (run,) = spec.plan()
    task = RunTask(run.key, run.data, str(tiny))
    first, second = run_one(task), run_one(task)
    assert first.status == "ok"
    for outcome in (first, second):
        outcome.report["time"].pop("real_seconds")
    assert first.report == second.report
    bad = dict(run.data, vm=[dict(run.data["vm"][0], workload={"kind": "trace", "path": "/nonexistent.npy"})])
    failed = run_one(RunTask("k", bad, str(tiny)))
    assert failed.status == "error" and "nonexistent.npy" in failed.error and "Traceback" in failed.detail


def test_serial_sweep_writes_reports_table_and_index(tmp_path, tiny):
    """Every combination has a row, a report.json and a scenario.toml; a failing run is recorded
    with its message and the others finish."""
    spec = sweep_from_scenario(tiny, [parse_vary(f"vm.web.workload=zipf,uniform,{MISSING_TRACE}"),
                                      parse_vary("plugins=none,counter")])
    summary = run_sweep(spec, tmp_path / "out", SerialExecutor())
    assert (summary.runs, summary.ok, summary.failed) == (6, 4, 2)
    (message,) = summary.errors
    assert "memvisor-sweep-test.npy" in message and summary.errors[message] == 2
    rows = read_table(summary.table)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "ok", "error", "error"]
    assert rows[0]["vm.web.workload"] == "zipf" and rows[1]["plugins"] == "counter"
    assert rows[0]["total.accesses"] > 0 and rows[1]["counter.ticks"] >= 1
    assert rows[4]["error"] == message and rows[4]["total.accesses"] is None
    for row in rows:
        run_dir = summary.out_dir / "runs" / row["key"]
        assert (run_dir / "report.json").exists() == (row["status"] == "ok")
        outcome = json.loads((run_dir / "outcome.json").read_text())
        assert outcome["status"] == row["status"]
        assert tomllib.loads((run_dir / "scenario.toml").read_text())["name"] == "tiny"
    page = (summary.out_dir / "index.html").read_text()
    assert "Best policy per workload" in page and "Failed runs (2)" in page and "sweep-best.png" in page


def test_resume_skips_finished_runs_and_retries_failed_ones(tmp_path, tiny):
    """--resume keeps every report already written (even for a larger sweep) and runs the rest;
    without it a folder holding a sweep is refused."""
    out = tmp_path / "out"
    first = run_sweep(sweep_from_scenario(tiny, [parse_vary("seed=1,2,3"),
                                                 parse_vary(f"vm.db.workload=uniform,{MISSING_TRACE}")]), out)
    assert (first.ran, first.ok, first.failed) == (6, 3, 3)
    kept = {r["key"] for r in read_table(first.table) if r["status"] == "ok"}
    with pytest.raises(UserError, match="already holds a sweep: pass --resume"):
        run_sweep(sweep_from_scenario(tiny, [parse_vary("seed=1,2")]), out)
    ran = []
    bigger = sweep_from_scenario(tiny, [parse_vary("seed=1,2,3,4"),
                                        parse_vary(f"vm.db.workload=uniform,{MISSING_TRACE}")])
    second = run_sweep(bigger, out, resume=True, on_outcome=ran.append)
    assert (second.resumed, second.ran) == (3, 5)  # seeds 1-3 uniform kept; 3 failed and seed 4's two run
    assert len(kept) == 3 and not {o.key for o in ran} & kept
    rows = read_table(second.table)
    assert len(rows) == 8 and [r["seed"] for r in rows] == [1, 1, 2, 2, 3, 3, 4, 4]
    fresh = run_sweep(bigger, tmp_path / "fresh")
    assert deterministic(read_table(fresh.table)) == deterministic(rows)


def test_csv_table_reads_back_like_parquet(tmp_path):
    """Without pyarrow the table is CSV; read back, its cells have the same types and values."""
    rows = [{"key": "a", "status": "ok", "error": None, "x": 1, "y": 0.5, "b": True, "s": "zipf"},
            {"key": "b", "status": "error", "error": "E: bad, really", "x": None, "y": 2, "b": False, "s": "1"}]
    path = write_table(rows, tmp_path, "csv")
    back = read_table(path)
    assert back[0] == rows[0] and back[1]["error"] == "E: bad, really" and back[1]["y"] == 2.0
    pytest.importorskip("pyarrow")
    parquet = read_table(write_table(rows, tmp_path, "parquet"))
    assert not path.exists() and parquet[1]["y"] == 2.0 and parquet[1]["s"] == "1"


def test_flatten_report_names_columns():
    """report.json becomes time.*, total.*, vms.NAME.* and PLUGIN.* columns; lists stay out."""
    report = {"time": {"virtual_seconds": 1.0, "real_seconds": 0.2},
              "vms": {"a": {"accesses": 10, "remote": 5, "faults": 1}, "b": {"accesses": 30, "remote": 5}},
              "core": {"series": {"used_pages": [1, 3], "free_pages": [9, 7]},
                       "events": [{"kind": "step"}, {"kind": "memory_pressure"}]},
              "sections": [{"plugin": "p", "title": "T", "metrics": {"n": 2, "curve": [1, 2], "by": {"a": 1.5}}}]}
    row = flatten_report(report)
    assert row["total.accesses"] == 40 and row["total.local_fraction"] == 0.75 and row["vms.a.faults"] == 1
    assert row["memory.used_pages.max"] == 3 and row["memory.free_pages.min"] == 7
    assert row["events.memory_pressure"] == 1 and row["p.n"] == 2 and row["p.by.a"] == 1.5
    assert "p.curve" not in row


# -- the command ---------------------------------------------------------------------------------

def memvisor(*args, code=None, cwd=None):
    """Run the memvisor command (or ``python -c code``) in a subprocess."""
    argv = ["-c", code, *args] if code else ["-m", "memvisor", *args]
    # Only the plugins these tests use: others installed beside them must not change the outcome.
    env = dict(os.environ, MEMVISOR_PLUGINS="emulator,counter,sweep")
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


def test_command_serial_sweep_summary_and_exit_status(tmp_path, tiny):
    """`memvisor sweep --serial` writes the results and says how many failed and why (exit 1)."""
    proc = memvisor("sweep", str(tiny), "--serial", "--vary", "seed=1,2",
                    "--vary", f"vm.db.workload=uniform,{MISSING_TRACE}",
                    "--out", str(tmp_path / "o"), "--format", "csv")
    assert proc.returncode == 1, proc.stderr
    assert "4 runs (2 ok, 2 failed)" in proc.stderr and "2 failed: " in proc.stderr
    assert "memvisor-sweep-test.npy" in proc.stderr and (tmp_path / "o" / "results.csv").exists()
    again = memvisor("sweep", str(tiny), "--serial", "--vary", "seed=1,2", "--out", str(tmp_path / "o"), "--resume")
    assert again.returncode == 0 and "2 kept from before" in again.stderr


def test_command_errors_are_one_line_exit_2(tmp_path, tiny):
    """A bad axis, no axis at all, or no Dask is one line on standard error and exit status 2."""
    for args, expected in [
        (["--vary", "vm.nosuch.memory=1MiB"], "axis vm.nosuch.memory=1MiB"),
        ([], "nothing to vary"),
        (["--vary", "seed"], "--vary 'seed': expected PATH="),
    ]:
        proc = memvisor("sweep", str(tiny), "--serial", *args, "--out", str(tmp_path / "o"))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    no_dask = "import sys; sys.modules['distributed'] = None; from memvisor.cli import main; main(sys.argv[1:])"
    proc = memvisor("sweep", str(tiny), "--vary", "seed=1,2", "--out", str(tmp_path / "o2"), code=no_dask)
    assert proc.returncode == 2
    assert proc.stderr == ("memvisor: error: memvisor sweep needs dask[distributed]: "
                           "pip install 'memvisor-sweep[dask]'\n")
