"""Hostile input with a bounded budget (``memvisor selftest`` runs the same fuzzers for
longer): checkpoint files, migration records (decoded, and through the destination's whole
path), migration links that damage, replay, duplicate or reorder records before and after the
switch-over, scenario files and values at the edges of every type, and trace files give one
clear error or the exact original; the command line turns each error into exit status 2, for
every subcommand and every kind of bad argument (the CLI matrix)."""

import numpy as np
import pytest
from click.testing import CliRunner

from memvisor.cli import _register_commands, cli
from memvisor.testing import fuzz

BUDGET = {"checkpoint": 60, "migration_record": 80, "migration_destination": 100, "migration_stream": 15,
          "migration_link": 25, "scenario": 80, "scenario_values": 25, "trace": 80}


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_integration_hostile_input(name):
    """Each fuzzer's contract holds for its CI budget of hostile inputs."""
    figures = fuzz.run_all(examples=BUDGET[name], names=[name])[name]
    assert figures["inputs"] >= 1


def test_integration_a_damaged_migration_stream_never_leaves_a_wrong_page():
    """Every record damaged: the migration aborts with one line; a few damaged: it completes."""
    assert fuzz.check_migration(lambda i, w: w[:-1] + bytes([w[-1] ^ 1])) == "aborted"
    assert fuzz.check_migration(lambda i, w: w[:10] if i in (1, 3) else w) == "migrated"


@pytest.mark.parametrize("fault", [("replay", 2), ("duplicate", 0), ("reorder", 0)])
@pytest.mark.parametrize("postcopy", [False, True])
def test_integration_a_replayed_duplicated_or_reordered_record_aborts(fault, postcopy):
    """An intact record delivered again, twice or out of order is never installed: the
    migration aborts with the source running (on main, a replay migrated with wrong pages)."""
    assert fuzz.check_link({5: fault}, postcopy) == "aborted"


@pytest.mark.parametrize("fault", [("replay", 0), ("duplicate", 0), ("reorder", 0)])
def test_integration_a_bad_record_after_the_switch_over_is_the_documented_abort(fault):
    """During post-copy (pages pulled on the destination's faults), a record replayed,
    duplicated or reordered aborts: MigrationAborted, the destination's VM and fault handler
    gone, the source running; a lost one is asked for again."""
    touches = tuple(range(0, 128, 3))
    pulls = _pull_records(touches)
    assert pulls, "this migration pulls no page after its switch-over"
    for index in pulls[:2]:
        assert fuzz.check_link({index: fault}, True, touches) == "aborted after the switch-over"
        assert fuzz.check_link({index: ("drop", 0)}, True, touches) == "migrated"


def _pull_records(touches) -> list[int]:
    """Numbers of the records a post-copy migration of check_link sends after its switch-over."""
    from memvisor.builtins.migration import stream

    kinds = []
    assert fuzz.check_link({}, True, touches, sent=lambda wire: kinds.append(stream.decode(wire).kind)) == "migrated"
    return list(range(kinds.index(stream.SWITCH) + 1, len(kinds)))


def test_integration_a_decompression_bomb_record_costs_no_memory():
    """A page record whose zstd frame declares 256 MiB (or declares nothing and holds it) is
    refused before it is decompressed: the fuzzer's 64 MiB bound holds."""
    from memvisor.builtins.migration import stream

    record = stream.decode(fuzz.owed_records()[0])
    for bomb in fuzz.zstd_bombs():
        wire = fuzz.seal(b"page", record.gpps.astype("<i8").tobytes(), bomb, record.seq)
        assert fuzz.check_destination(wire) == "refused"


@pytest.mark.parametrize("changes, outcome", [
    ([(("timeline", 0, "for"), float("nan"))], "refused"),
    ([(("host", "tick"), "1ns")], "refused"),
    ([(("timeline", 9, "bits"), 40000)], "refused"),
    ([(("timeline", 6, "block_pages"), 10**9)], "refused"),
    ([(("timeline", 6, "name"), "../../x")], "refused"),
    ([(("timeline", 6, "name"), fuzz.SANDBOX)], "refused"),
    ([(("host", "handler_threads"), 10**8)], "refused"),
    ([(("host", "memory"), "1" + "0" * 400 + "TiB")], "refused"),
    ([(("host", "low_watermark"), float("nan"))], "refused"),
    ([(("timeline", 6, "name"), "ck-2.final"), (("timeline", 7, "name"), "ck-2.final")], "ran"),
])
def test_integration_the_issues_scenario_values(changes, outcome):
    """The scenario values that hung, crashed or wrote outside the run folder (issue 16)
    are refused in one line; a good name still runs."""
    assert fuzz.check_scenario_values(changes) == outcome


@pytest.mark.parametrize("args, content", [
    (["run", "{path}", "--out", "{out}"], b"[host]\nmemory = \"nope\"\n"),
    (["run", "{path}", "--out", "{out}"], b"\xff\xfe not toml"),
    (["checkpoint", "inspect", "{path}"], b"MVCK" + bytes(100)),
    (["checkpoint", "verify", "{path}"], bytes(range(256)) * 8),
])
def test_integration_hostile_files_exit_2(tmp_path, args, content):
    """On the command line a hostile file is one line on standard error and exit status 2."""
    _register_commands()
    path = tmp_path / "hostile.in"
    path.write_bytes(content)
    argv = [a.format(path=path, out=tmp_path / "out") for a in args]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memvisor: error:") and "hostile.in" in lines[0]


def test_integration_selftest_command_runs_briefly(tmp_path):
    """``memvisor selftest`` runs the state machine and the fuzzers and writes its figures."""
    import json

    _register_commands()
    out = tmp_path / "selftest.json"
    result = CliRunner().invoke(cli, ["selftest", "--examples", "2", "--steps", "8", "--seed", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["integration"]["examples"] == 2 and set(figures["fuzz"]) == set(BUDGET)
    assert figures["cli_matrix"]["inputs"] == figures["cli_matrix"]["of"] == 40
    assert np.all([f["inputs"] >= 1 for f in figures["fuzz"].values()])
    inputs = sum(f["inputs"] for f in figures["fuzz"].values())
    assert result.stdout.splitlines()[-1] == (
        f"selftest passed: 2 random interleavings of every technique ({figures['integration']['steps']:,} steps, "
        f"every page checked after each), {inputs:,} hostile inputs to {len(BUDGET)} parsers, 40 bad command "
        f"lines, in {figures['seconds']:g} s.")


def test_integration_selftest_ends_with_one_sentence_when_a_check_fails(monkeypatch):
    """A failing check ends `memvisor selftest` with one sentence saying so and status 1
    (the traceback and hypothesis's steps come before it)."""
    from memvisor.testing import integration

    def broken(**_):
        raise AssertionError("guest page 7 of vm a reads other bytes")

    monkeypatch.setattr(integration, "run", broken)
    _register_commands()
    result = CliRunner().invoke(cli, ["selftest", "--examples", "1", "--no-fuzz"])
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("selftest failed after ") and "guest page 7 of vm a reads other bytes" in last


def test_integration_selftest_without_hypothesis_says_how_in_one_line(monkeypatch):
    """Without hypothesis (an install without the selftest extra), `memvisor selftest` is one
    line saying what to install, not a ModuleNotFoundError."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hypothesis" else real(name, *a))
    _register_commands()
    result = CliRunner().invoke(cli, ["selftest", "--examples", "1"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        'memvisor: error: memvisor selftest needs hypothesis: pip install "memvisor[selftest]" '
        "(requirements-all.txt installs it)"]
