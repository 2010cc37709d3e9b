"""The memvisor command: listings, benchmarks and one-line errors with exit status 2."""

import json
import subprocess
import sys


def memvisor(*args, env=None):
    import os

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "memvisor", *args], capture_output=True, text=True, env=full_env)


def test_backends_lists_the_emulator():
    """`memvisor backends --json` lists the emulator with its capabilities."""
    proc = memvisor("backends", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = [r for r in json.loads(proc.stdout) if r["name"] == "emulator"]
    assert row["plugin"] == "emulator" and "fault" in row["capabilities"]


def test_plugins_all_includes_builtins_and_hook_filter_works():
    """--all shows the core's built-ins; --hook keeps only plugins implementing that hook."""
    rows = json.loads(memvisor("plugins", "--json", "--all").stdout)
    assert any(r["builtin"] and "memvisor_page_fault" in r["hooks"] for r in rows)
    rows = json.loads(memvisor("plugins", "--json", "--hook", "memvisor_register_backends").stdout)
    assert "emulator" in [r["name"] for r in rows]
    assert all("memvisor_register_backends" in r["hooks"] for r in rows)
    bad = memvisor("plugins", "--hook", "memvisor_nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_block_and_allow_lists():
    """MEMVISOR_DISABLE_PLUGINS hides a plugin; MEMVISOR_PLUGINS keeps only the ones named."""
    names = lambda env: [r["name"] for r in json.loads(memvisor("plugins", "--json", env=env).stdout)]
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
    proc = memvisor("bench", "emulator", "--json", "--runs", "1", "--case", "zipf-untraced")
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
    ]:
        proc = memvisor(*args, env=env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("memvisor: error: ") and message in proc.stderr, (args, proc.stderr)


def test_a_plugin_command_that_is_missing_names_its_distribution():
    """`memvisor sharing` when the plugin is blocked (or not installed) says where it comes
    from, not "No such command"."""
    proc = memvisor("sharing", "estimate", env={"MEMVISOR_DISABLE_PLUGINS": "sharing"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "'sharing' comes from" in proc.stderr and "memvisor-sharing" in proc.stderr


def test_an_allow_list_without_the_backend_says_so(tmp_path):
    """MEMVISOR_PLUGINS=stats leaves the emulator out: the line says so, not 'unknown backend'."""
    path = tmp_path / "s.toml"
    path.write_text('[host]\nmemory = "16MiB"\n[[vm]]\nmemory = "4MiB"\n')
    proc = memvisor("run", str(path), "--out", str(tmp_path / "o"), env={"MEMVISOR_PLUGINS": "stats"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "backend 'emulator': installed, but MEMVISOR_PLUGINS=stats leaves it out" in proc.stderr
