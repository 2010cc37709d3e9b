"""Every subcommand on every kind of bad argument (memvisor.testing.cli_matrix): exit status 2,
one line on standard error naming the parameter, bounded time and memory, no file changed
outside the output."""

import json

import pytest
from click.testing import CliRunner

from memvisor.testing import cli_matrix


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return cli_matrix.Sandbox(tmp_path_factory.mktemp("cli-matrix"))


@pytest.mark.parametrize("command", sorted(cli_matrix.commands()))
def test_integration_cli_matrix(command, sandbox):
    """Every bad invocation of this command is refused as the contract says."""
    cases = [c for c in cli_matrix.cases(sandbox) if c.command == command]
    assert cases
    for case in cases:
        cli_matrix.check(case, sandbox)


def test_integration_every_file_parameter_says_whether_it_is_read_or_written():
    """No command takes a path as a bare click.Path: inputs, outputs and output folders go
    through the types that check them (regular files, same file in and out, writable)."""
    assert cli_matrix.untyped_files() == []


@pytest.mark.parametrize("command", sorted(set(cli_matrix.baselines()) - {"bench"}))
def test_integration_cli_matrix_baselines_run(command, sandbox):
    """Each valid invocation the matrix starts from runs (exit 0): a case fails because of
    the one bad argument, not because its baseline was broken. (bench is slow and is
    exercised by test_core_cli; the qemu commands' baselines run in memvisor-qemu's tests.)
    A command that writes JSON runs with ``--json -``: standard output is the JSON alone."""
    from memvisor.cli import cli

    commands = cli_matrix.commands()
    if command not in commands:
        pytest.skip(f"{command}: its plugin is not installed")
    if any(p in str(v) for v in cli_matrix.baselines()[command].values() for p in cli_matrix.LIVE_SOCKETS):
        pytest.skip(f"{command}: needs a running QEMU (hypervisor_backends/memvisor-qemu/tests/test_qemu_cli.py "
                    "runs this baseline against real ones)")
    sandbox.clear_out()
    baseline = dict(cli_matrix.baselines()[command])
    if "json_out" in baseline:
        baseline["json_out"] = "-"
    args = cli_matrix._argv(commands[command], baseline, sandbox)
    result = CliRunner().invoke(cli, [*command.split(), *args])
    assert result.exit_code == 0, result.stderr
    if "json_out" in baseline:
        json.loads(result.stdout)  # nothing but the JSON: a summary line would not parse
