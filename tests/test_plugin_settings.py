"""Plugin settings from the command line: a misspelt or wrong setting in a scenario is one line
naming the file and the dotted key, exit 2; `memvisor plugins --settings NAME` shows the
declaration; a sweep axis is checked against it before any run."""

import json
import subprocess
import sys


def memvisor(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memvisor", *args], capture_output=True, text=True, cwd=cwd)


def write_scenario(tmp_path, plugins: str) -> str:
    path = tmp_path / "s.toml"
    path.write_text(f'[host]\nmemory = "16MiB"\nnuma_nodes = 2\n{plugins}\n[[vm]]\nmemory = "4MiB"\n'
                    'workload = { kind = "uniform" }\n[[timeline]]\ndo = "run"\nfor = "2ms"\n')
    return str(path)


def test_a_misspelt_key_of_a_plugin_without_settings_is_refused(tmp_path):
    """[plugins.stats] bogus = 3 was silently accepted: now it is one line, exit 2."""
    path = write_scenario(tmp_path, "[plugins.stats]\nbogus = 3\n")
    proc = memvisor("run", path, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"memvisor: error: {path}: plugins.stats.bogus: unknown setting "
                                   "(known: none: this plugin has no settings)")
    assert not (tmp_path / "out" / "report.json").exists()


def test_wrong_values_name_file_and_key(tmp_path):
    """A wrong type, a value out of bounds, NaN: one line naming the file and the dotted key."""
    for table, message in (
        ('heuristic = "lru"', "plugins.numa.heuristic: must be one of scan, hinting, mrc, touch, address, random, "
                              "got 'lru'"),
        ("stop_ticks = 0", "plugins.numa.stop_ticks: must be from 1 to 1_000_000, got 0"),
        ("stop_local = nan", "plugins.numa.stop_local: must be a finite number, got nan"),
        ('split_large = "yes"', "plugins.numa.split_large: must be true or false, got 'yes'"),
    ):
        path = write_scenario(tmp_path, f"[plugins.numa]\n{table}\n")
        proc = memvisor("run", path, "--out", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"memvisor: error: {path}: {message}"


def test_a_host_dependent_setting_is_refused_by_the_plugin_in_one_line(tmp_path):
    """numa's budget above what the interconnect carries in a tick is checked when the host
    starts, still one line naming the file and the key."""
    path = write_scenario(tmp_path, "[plugins.numa]\npages_per_tick = 10486\n")
    proc = memvisor("run", path, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"memvisor: error: {path}: plugins.numa.pages_per_tick: 10486 pages per tick is "
                                   "more than the migration bandwidth carries in one tick (10485 pages)")


def test_plugins_settings_prints_the_declaration():
    """`memvisor plugins --settings numa --json -` lists every key with its type, default and doc."""
    rows = json.loads(memvisor("plugins", "--settings", "numa", "--json", "-").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["heuristic"]["default"] == "scan" and by_name["heuristic"]["type"] == "str"
    assert by_name["pages_per_tick"]["host_dependent"] and by_name["split_large"]["type"] == "bool"
    assert all(r["doc"] for r in rows)
    proc = memvisor("plugins", "--settings", "nosuch")
    assert proc.returncode == 2 and proc.stderr.startswith("memvisor: error: --settings: no plugin named 'nosuch'")


def test_a_sweep_axis_is_checked_against_the_declaration_before_any_run(tmp_path):
    """--vary plugins.numa.heuristic=scan,lru stops before the first run, naming the axis value."""
    path = write_scenario(tmp_path, "[plugins.numa]\n")
    proc = memvisor("sweep", path, "--vary", "plugins.numa.heuristic=scan,lru", "--serial", "--out",
                    str(tmp_path / "sweep"))
    assert proc.returncode == 2, proc.stderr
    assert "axis plugins.numa.heuristic=lru" in proc.stderr and "must be one of scan" in proc.stderr
    assert not (tmp_path / "sweep" / "results.csv").exists() and not list((tmp_path / "sweep").glob("runs/*"))
