"""The memvisor command: listings, benchmarks and one-line errors with exit status 2."""

import json
import subprocess
import sys

import numpy as np


def memvisor(*args, env=None):
    import os

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "memvisor", *args], capture_output=True, text=True, env=full_env)


def test_backends_lists_the_emulator():
    """`memvisor backends --json` lists the emulator with its capabilities."""
    proc = memvisor("backends", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    (row,) = [r for r in json.loads(proc.stdout) if r["name"] == "emulator"]
    assert row["plugin"] == "emulator" and "fault" in row["capabilities"]


def test_plugins_all_includes_builtins_and_hook_filter_works():
    """--all shows the core's built-ins; --hook keeps only plugins implementing that hook."""
    rows = json.loads(memvisor("plugins", "--json", "-", "--all").stdout)
    assert any(r["builtin"] and "memvisor_page_fault" in r["hooks"] for r in rows)
    rows = json.loads(memvisor("plugins", "--json", "-", "--hook", "memvisor_register_backends").stdout)
    assert "emulator" in [r["name"] for r in rows]
    assert all("memvisor_register_backends" in r["hooks"] for r in rows)
    bad = memvisor("plugins", "--hook", "memvisor_nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_block_and_allow_lists():
    """MEMVISOR_DISABLE_PLUGINS hides a plugin; MEMVISOR_PLUGINS keeps only the ones named."""
    names = lambda env: [r["name"] for r in json.loads(memvisor("plugins", "--json", "-", env=env).stdout)]
    assert "emulator" in names({})
    assert "emulator" not in names({"MEMVISOR_DISABLE_PLUGINS": "emulator"})
    assert names({"MEMVISOR_PLUGINS": "emulator"}) == ["emulator"]


def test_unknown_plugin_or_backend_is_one_line_exit_2(tmp_path):
    """A scenario naming a plugin or backend that is not installed fails in one line."""
    path = tmp_path / "s.toml"
    path.write_text('[host]\nmemory = "16MiB"\n[plugins.nosuch]\n[[vm]]\nmemory = "4MiB"\n')
    proc = memvisor("run", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"memvisor: error: {path}: unknown plugin 'nosuch'") and proc.stderr.count("\n") == 1
    path.write_text('[host]\nmemory = "16MiB"\n[[vm]]\nmemory = "4MiB"\n')
    proc = memvisor("run", str(path), "--backend", "warp", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "unknown backend 'warp'" in proc.stderr and proc.stderr.count("\n") == 1


def test_bench_json_shape():
    """`memvisor bench emulator --json` gives every case with value, baseline, ratio and runs."""
    proc = memvisor("bench", "emulator", "--json", "-", "--runs", "1", "--case", "zipf-untraced")
    assert proc.returncode == 0, proc.stderr
    (case,) = json.loads(proc.stdout)["cases"]
    assert case["name"] == "zipf-untraced" and case["metric"] == "accesses_per_s"
    assert case["value"] > 0 and case["baseline"]["name"] == "numpy-gather" and case["runs"] == 1
    assert case["ratio"] == case["value"] / case["baseline"]["value"]
    bad = memvisor("bench", "nosuchgroup")
    assert bad.returncode == 2 and "no benchmark group" in bad.stderr


def test_trace_workload_on_a_file_that_is_not_a_trace(tmp_path):
    """A trace workload pointing at a file that is not a trace fails in one line, exit 2."""
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"this is not numpy")
    path = tmp_path / "s.toml"
    path.write_text(f'[host]\nmemory = "16MiB"\n[[vm]]\nmemory = "4MiB"\n'
                    f'workload = {{ kind = "trace", path = "{junk}" }}\n')
    proc = memvisor("run", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "junk.npy" in proc.stderr


def test_hook_tracing_logs_every_hook_call(tmp_path):
    """MEMVISOR_TRACE_HOOKS=1 logs each hook call (name and plugins) through structlog."""
    path = tmp_path / "s.toml"
    path.write_text('[host]\nmemory = "16MiB"\ntick = "1ms"\n[[vm]]\nmemory = "4MiB"\n'
                    'workload = { kind = "uniform" }\n[[timeline]]\ndo = "run"\nfor = "2ms"\n')
    proc = memvisor("run", str(path), "--out", str(tmp_path / "o"), "--quiet", env={"MEMVISOR_TRACE_HOOKS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "hook call" in proc.stderr and "memvisor_tick" in proc.stderr and "memvisor_vm_created" in proc.stderr


def test_usage_errors_and_environment_are_one_line():
    """click's own usage errors, a bad MEMVISOR_LOG and a group without its command: one line
    on standard error, exit status 2."""
    for args, env, message in [
        (("checkpoint", "save"), None, "memvisor checkpoint save: Missing argument 'IMAGE'"),
        (("run", "--no-such-option"), None, "No such option '--no-such-option'"),
        (("checkpoint",), None, "memvisor checkpoint: give a command (inspect, restore, save, verify"),
        (("plugins",), {"MEMVISOR_LOG": "bogus"}, "MEMVISOR_LOG='bogus': not a log level"),
        (("checkpoint", "save", "x", "y", "--buffer", "1GB"), None, "GB is a decimal unit"),
        (("bogus",), None, "memvisor: error: No such command 'bogus'. (see memvisor --help)"),
    ]:
        proc = memvisor(*args, env=env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("memvisor: error: ") and message in proc.stderr, (args, proc.stderr)
        assert not proc.stderr.startswith("memvisor: error: memvisor: "), proc.stderr  # no prefix repeated


def test_an_allow_list_without_the_backend_says_so(tmp_path):
    """MEMVISOR_PLUGINS=stats leaves the emulator out: the line says so, not 'unknown backend'."""
    path = tmp_path / "s.toml"
    path.write_text('[host]\nmemory = "16MiB"\n[[vm]]\nmemory = "4MiB"\n')
    proc = memvisor("run", str(path), "--out", str(tmp_path / "o"), env={"MEMVISOR_PLUGINS": "stats"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "backend 'emulator': installed, but MEMVISOR_PLUGINS=stats leaves it out" in proc.stderr


# -- terminals, pipes and JSON ------------------------------------------------------------------


def _scenario_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[host]\nmemory = "32MiB"\ntick = "1ms"\n[[vm]]\nname = "web"\nmemory = "8MiB"\n'
                    'workload = { kind = "zipf", write_fraction = 0.3 }\n[[timeline]]\ndo = "run"\nfor = "4ms"\n')
    return path


def test_a_table_into_a_pipe_is_never_cut():
    """Into a pipe, a table is plain columns at full width: every plugin's hooks whole on its
    line (rich cut them at 80 columns: `memvisor_tick, memvisor_v…`), no trailing blanks."""
    rows = json.loads(memvisor("plugins", "--json", "-").stdout)
    proc = memvisor("plugins")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["name", "distribution", "version", "hooks"]
    for row in rows:
        (line,) = [line for line in lines if line.split()[:1] == [row["name"]]]
        assert line.endswith(", ".join(row["hooks"])), line
    assert "…" not in proc.stdout and not [line for line in lines if line != line.rstrip()]


def test_json_is_a_file_or_standard_output_in_every_command():
    """Every command that writes JSON takes `--json FILE|-` the same way: an output file
    (checked before any work), or '-' for standard output."""
    from memvisor.cli import OutputFile
    from memvisor.testing.cli_matrix import commands

    found = []
    for path, command in commands().items():
        for param in command.params:
            if "--json" in getattr(param, "opts", ()):
                found.append(path)
                assert isinstance(param.type, OutputFile) and param.type.allow_dash, path
                assert param.metavar == "FILE|-" and not param.is_flag, path
    assert {"plugins", "backends", "bench", "checkpoint inspect", "checkpoint save", "migrate"} <= set(found)


def test_json_to_standard_output_is_the_json_alone(tmp_path):
    """`--json -` leaves standard output to the JSON; `--json FILE` writes the same JSON to the
    file and the summary to standard output."""
    from memvisor.builtins.checkpoint import CheckpointWriter

    with CheckpointWriter(tmp_path / "c.ckpt", 8, threads=1) as writer:
        writer.add_pages(0, np.full((8, 4096), 7, np.uint8))
    dash = memvisor("checkpoint", "inspect", str(tmp_path / "c.ckpt"), "--json", "-")
    assert dash.returncode == 0, dash.stderr
    figures = json.loads(dash.stdout)
    to_file = memvisor("checkpoint", "inspect", str(tmp_path / "c.ckpt"), "--json", str(tmp_path / "i.json"))
    assert json.loads((tmp_path / "i.json").read_text()) == figures
    assert "Page map" in to_file.stdout and "8 pages of 4 KiB" in to_file.stdout


def test_checkpoint_inspect_shows_its_blocks_and_page_map(tmp_path):
    """`checkpoint inspect` shows what its help promises: every storage block (the pages it
    holds add up to the data pages) and the page map, each run of pages with its kind and the
    storage block of data, as the reader finds each page."""
    from memvisor.builtins.checkpoint import CheckpointReader, CheckpointWriter

    pages = np.zeros((300, 4096), np.uint8)
    pages[:100] = np.random.default_rng(1).integers(0, 255, (100, 4096), dtype=np.uint8)
    pages[200:] = 3
    with CheckpointWriter(tmp_path / "c.ckpt", 300, block_pages=16, buffer_bytes=64 << 10, threads=1) as writer:
        writer.add_pages(0, pages)
    proc = memvisor("checkpoint", "inspect", str(tmp_path / "c.ckpt"), "--json", "-", "--rows", "1000")
    info = json.loads(proc.stdout)
    assert len(info["page_map"]) == info["page_map_runs"]
    assert sum(b["pages"] for b in info["storage_block_table"]) == info["data_pages"] == 200
    assert len(info["storage_block_table"]) == info["storage_blocks"] > 1
    with CheckpointReader(tmp_path / "c.ckpt") as r:
        kinds = r.kind_names
        expected = [(kinds[k], r.locate(g)[0] if r.locate(g) else None) for g, k in enumerate(r.page_kind(range(300)))]
    drawn = [None] * 300
    for run in info["page_map"]:
        for g in range(run["first"], run["last"] + 1):
            drawn[g] = (run["kind"], run["storage_block"])
    assert drawn == expected
    shown = memvisor("checkpoint", "inspect", str(tmp_path / "c.ckpt"), "--rows", "2").stdout
    assert "Storage blocks" in shown and "Page map" in shown and "more runs (--rows N lists more)" in shown
    cut = json.loads(memvisor("checkpoint", "inspect", str(tmp_path / "c.ckpt"), "--json", "-", "--rows", "2").stdout)
    assert cut["page_map"] == info["page_map"][:2] and cut["page_map_runs"] == info["page_map_runs"] > 2
    first = info["page_map"][0]
    assert f"{first['first']}-{first['last']}" in shown


def test_info_log_shows_the_run(tmp_path):
    """MEMVISOR_LOG=info shows the run's structured log: its start, every step with its
    action and time, its end; the default level shows none of it."""
    path = _scenario_file(tmp_path)
    proc = memvisor("run", str(path), "--out", str(tmp_path / "o"), "--quiet", env={"MEMVISOR_LOG": "info"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any("run started" in line and "vms=1" in line for line in lines)
    assert any("step" in line and "action=run" in line and "for=4ms" in line for line in lines)
    assert any("run finished" in line and "clock_seconds=0.004" in line for line in lines)
    quiet = memvisor("run", str(path), "--out", str(tmp_path / "o"), "--quiet")
    assert "run started" not in quiet.stderr and "step" not in quiet.stderr


def test_run_ends_with_what_each_technique_did(tmp_path):
    """`memvisor run`'s summary is the report's: the VMs' counters, then each VM's headlines
    as report.json has them; no line says nothing ("Event counts (stats): ")."""
    path = _scenario_file(tmp_path)
    proc = memvisor("run", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    texts = [h["text"] for s in data["sections"] for h in s["headlines"]]
    assert texts
    for text in texts:
        assert f"  - {text[:1].upper()}{text[1:]}" in proc.stdout.splitlines()
    assert not [line for line in proc.stdout.splitlines() if line.rstrip().endswith(":")]
    assert proc.stdout.splitlines()[-1] == f"report: {tmp_path / 'o' / 'report.html'}"


def test_every_help_reads_as_text():
    """Each command's --help is plain text: no reStructuredText of a docstring (``verify``,
    :func:) and no Python None."""
    import re

    from click.testing import CliRunner

    from memvisor.cli import _register_commands, cli
    from memvisor.testing.cli_matrix import commands

    _register_commands()
    for path in commands():
        done = CliRunner().invoke(cli, [*path.split(), "--help"])
        assert done.exit_code == 0, path
        assert not re.search(r"``|:(func|class|mod|data|attr):|\bNone\b", done.stdout), (path, done.stdout)
