"""Scenario files: a bad one is one line naming the file and the key; a good one runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memvisor.errors import ScenarioError
from memvisor.runner import ScenarioRun
from memvisor.scenario import load_scenario, parse_duration, parse_size

GOOD = """
name = "small"
seed = 3
[host]
memory = "64MiB"
numa_nodes = 2
tick = "1ms"
batch = 4096
[[vm]]
name = "a"
memory = "8MiB"
contents = { zero = 0.5, text = 0.5 }
workload = { kind = "zipf", alpha = 0.9, write_fraction = 0.3 }
[[vm]]
name = "b"
memory = "4MiB"
node = 1
workload = { kind = "loop", footprint = 100 }
[[timeline]]
do = "run"
for = "5ms"
[[timeline]]
do = "move_vcpus"
vm = "b"
node = 0
[[timeline]]
do = "run"
accesses = 20000
"""


def write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sizes_and_durations_parse():
    """Sizes use binary units and durations accept s, ms, us."""
    assert parse_size("1GiB") == 1 << 30 and parse_size("4KiB") == 4096 and parse_size(8192) == 8192
    assert parse_duration("10ms") == pytest.approx(0.01) and parse_duration(2) == 2.0
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("mutation, key", [
    (('memory = "64MiB"', 'memory = "64 apples"'), "host.memory"),
    (('numa_nodes = 2', 'numa_nodes = 0'), "host.numa_nodes"),
    (('tick = "1ms"', 'tick = "soon"'), "host.tick"),
    (('node = 1', 'node = 5'), "vm[1].node"),
    (('name = "b"', 'name = "a"'), "vm[1].name"),
    (('batch = 4096', 'batch = 4096\nbogus = 1'), "host.bogus"),
    (('contents = { zero = 0.5, text = 0.5 }', 'contents = { zero = 0.9, text = 0.5 }'), "vm[0].contents"),
    (('do = "move_vcpus"', 'go = "move_vcpus"'), "timeline[1].do"),
])
def test_bad_scenario_names_the_key(tmp_path, mutation, key):
    """Each kind of mistake is reported with the file and the dotted key."""
    path = write(tmp_path, GOOD.replace(*mutation, 1))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: {key}: ")


@pytest.mark.parametrize("mutation, message", [
    (('memory = "64MiB"', 'memory = "1GB"'),
     'host.memory: \'1GB\': GB is a decimal unit; memory sizes use binary units ("1GiB")'),
    (('memory = "64MiB"', 'memory = "1' + "0" * 400 + 'TiB"'), "host.memory: '1000"),
    (('memory = "64MiB"', 'memory = "64TiB"\ncontents = "bytes"'),
     "host.memory: a host of 64.0 TiB is larger than this machine's memory"),
    (('memory = "64MiB"', 'memory = "64TiB"'),  # by identity (the default above 8 GiB): 48 bytes a page
     "host.memory: a host of 64.0 TiB by content identity needs about 768.0 GiB (48 bytes a page), more than"),
    (('memory = "64MiB"', 'memroy = "64MiB"'), "host.memroy: unknown key (did you mean 'memory'?)"),
    (('tick = "1ms"', 'tick = nan'), "host.tick: a duration must be a finite number, got nan"),
    (('tick = "1ms"', 'tick = "1ns"'), "host.tick: must be from 1 us to a week"),
    (('tick = "1ms"', 'tick = 1e-300'), "host.tick: must be from 1 us to a week"),
    (('batch = 4096', 'batch = 1000000000000'), "host.batch: must be a whole number from 1 to 16,777,216"),
    (('batch = 4096', 'handler_threads = 100000000'), "host.handler_threads: must be a whole number from 1 to 1,024"),
    (('batch = 4096', 'low_watermark = nan'), "host.low_watermark: must be a finite number, got nan"),
    (('name = "a"', 'name = "../a"'), "vm[0].name: the name '../a' may hold only letters"),
    (('seed = 3', 'seed = -1'), "seed: must be a whole number from 0"),
    (('for = "5ms"', 'for = "1e400s"'), None),
])
def test_hostile_values_are_one_line(tmp_path, mutation, message):
    """Sizes in decimal units or beyond the machine, non-finite and out-of-range numbers,
    misspelt keys and names that would become paths: one line naming the key (found when the
    file is loaded, or when its step runs)."""
    path = write(tmp_path, GOOD.replace(*mutation, 1))
    with pytest.raises(ScenarioError) as info:
        ScenarioRun(load_scenario(path)).run()
    assert "\n" not in str(info.value)
    assert message is None or str(info.value).startswith(f"{path}: {message}"), str(info.value)


def test_hostile_files_are_one_line(tmp_path):
    """A binary file, nesting 100,000 deep, 2,000 VMs, a FIFO: one line each, at once."""
    import os

    from memvisor.errors import UserError

    cases = {"binary.toml": b"\xe1\xff\x00name = 1", "deep.toml": b"a = " + b"[" * 100_000 + b"]" * 100_000,
             "vms.toml": b'[host]\nmemory = "64MiB"\n' + b'[[vm]]\nmemory = "4KiB"\n' * 2000}
    expect = {"binary.toml": "not a text file: byte 0 is not UTF-8", "deep.toml": "nested too deeply",
              "vms.toml": "vm: 2,000 VMs; a scenario has at most 1,024", "fifo.toml": "a FIFO, not a regular file"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    os.mkfifo(tmp_path / "fifo.toml")
    for name, message in expect.items():
        with pytest.raises(UserError) as info:
            load_scenario(tmp_path / name)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_errors_found_when_running_name_the_step(tmp_path):
    """An unknown action or workload kind is refused before any step runs."""
    path = write(tmp_path, GOOD.replace('do = "move_vcpus"', 'do = "teleport"'))
    with pytest.raises(ScenarioError, match=r"timeline\[1\]\.do: unknown action 'teleport'"):
        ScenarioRun(load_scenario(path)).run()
    path = write(tmp_path, GOOD.replace('kind = "loop"', 'kind = "spiral"'))
    with pytest.raises(ScenarioError, match=r"vm\[1\]\.workload\.kind: unknown workload 'spiral'"):
        ScenarioRun(load_scenario(path))


def test_cli_bad_scenario_is_one_line_and_exit_2(tmp_path):
    """`memvisor run` on a bad scenario prints one line, no traceback, and exits with 2."""
    path = write(tmp_path, GOOD.replace('memory = "8MiB"', 'memory = "8MiB"\ncolour = "red"'))
    proc = subprocess.run([sys.executable, "-m", "memvisor", "run", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"memvisor: error: {path}: vm[0].colour: unknown key"]


def test_run_writes_json_html_and_plots(tmp_path):
    """A run writes report.json with every VM's counters, report.html and the PNGs it shows."""
    path = write(tmp_path, GOOD)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "memvisor", "run", str(path), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["vms"]["a"]["accesses"] > 0 and report["vms"]["b"]["remote"] > 0
    assert report["time"]["virtual_seconds"] >= 0.005
    html = (out / "report.html").read_text()
    for png in Path(out).glob("*.png"):
        assert png.name in html
    assert (out / "core-memory.png").exists() and (out / "core-local-fraction.png").exists()


def test_same_seed_same_report(tmp_path):
    """A run is a pure function of its scenario and seed."""
    scenario = load_scenario(write(tmp_path, GOOD))
    first = ScenarioRun(scenario).run().data
    second = ScenarioRun(scenario).run().data
    for d in (first, second):
        d["time"].pop("real_seconds")
    assert first == second
