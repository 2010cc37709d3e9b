"""Hostile input with a bounded budget (``memvisor selftest`` runs the same fuzzers for
longer): checkpoint files, migration records and streams, scenario files and trace files give
one clear error or the exact original; the command line turns each error into exit status 2."""

import numpy as np
import pytest
from click.testing import CliRunner

from memvisor.cli import _register_commands, cli
from memvisor.testing import fuzz

BUDGET = {"checkpoint": 60, "migration_record": 80, "migration_stream": 15, "scenario": 80, "trace": 80}


@pytest.mark.parametrize("name", sorted(BUDGET))
def test_integration_hostile_input(name):
    """Each fuzzer's contract holds for its CI budget of hostile inputs."""
    figures = fuzz.run_all(examples=BUDGET[name], names=[name])[name]
    assert figures["inputs"] >= 1


def test_integration_a_damaged_migration_stream_never_leaves_a_wrong_page():
    """Every record damaged: the migration aborts with one line; a few damaged: it completes."""
    assert fuzz.check_migration(lambda i, w: w[:-1] + bytes([w[-1] ^ 1])) == "aborted"
    assert fuzz.check_migration(lambda i, w: w[:10] if i in (1, 3) else w) == "migrated"


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
    assert np.all([f["inputs"] >= 1 for f in figures["fuzz"].values()])
