"""``memvisor selftest``: run the all-techniques integration state machine
(:mod:`memvisor.testing.integration`) and the hostile-input fuzzers for as long as asked.

CI runs both with small budgets through pytest (``tests/integration/``); this command is the
long budget: ``memvisor selftest --long`` runs for 10 minutes, ``--seconds S`` for ``S``
seconds, ``--examples N`` for at most ``N`` examples. A failure prints the sequence of steps
that led to it and exits with status 1; ``--replay FILE`` runs those steps again from what was
printed (saved to FILE), to debug the failure.
"""

from __future__ import annotations

import sys
import time
import traceback

import click

from memvisor import hookimpl
from memvisor.cli import InputFile, Number, json_option, one_line, write_json


@click.command("selftest")
@click.option("--long", "long_", is_flag=True, help="Run for 10 minutes (unless --seconds says otherwise).")
@click.option("--examples", type=click.IntRange(1, 10**9), default=None,
              help="Examples of the state machine at most (default 20, or unbounded with --long/--seconds).")
@click.option("--seconds", type=Number(0, 7 * 86400), default=None,
              help="Stop starting examples after this long (at most a week).")
@click.option("--steps", type=click.IntRange(1, 10_000), default=40, show_default=True, help="Steps per example.")
@click.option("--fuzz/--no-fuzz", default=True, show_default=True, help="Also fuzz the hostile-input parsers.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Start from the same examples every time (the first batch is derandomized).")
@json_option()
@click.option("--replay", type=InputFile("selftest output"), default=None,
              help="Replay the failing example printed in this file (saved output of a run), then stop.")
def selftest(long_, examples, seconds, steps, fuzz, seed, json_out, replay):
    """Drive one host with every installed plugin through random interleavings and check every
    guest page, machine page and plugin record after each step; fuzz checkpoint files,
    migration records and links, scenario files and values, traces and the command line."""
    _need_hypothesis()
    from memvisor.testing import fuzz as fuzzers
    from memvisor.testing.integration import run

    if replay is not None:
        _replay(replay)

    if seconds is None and long_:
        seconds = 600.0
    if examples is None:
        examples = 10**9 if seconds is not None else 20
    started = time.monotonic()
    share = None if seconds is None else (seconds * 0.8 if fuzz else seconds)
    try:
        figures = {"integration": run(max_examples=examples, steps=steps, seconds=share, seed=seed)}
        if fuzz:
            from memvisor.testing import cli_matrix

            left = None if seconds is None else max(1.0, seconds - (time.monotonic() - started))
            figures["fuzz"] = fuzzers.run_all(examples=min(examples, 200) if left is None else 10**9, seconds=left)
            # Every case with a time budget (about 10 s), else 20 per example.
            figures["cli_matrix"] = cli_matrix.run(limit=None if seconds is not None else examples * 20)
    except Exception as exc:  # a broken check: hypothesis printed the steps that led to it above
        traceback.print_exc()
        click.echo(f"selftest failed after {time.monotonic() - started:.0f} s: {one_line(exc)[:300]} (save this "
                   "output and run memvisor selftest --replay FILE to replay the steps)", err=True)
        sys.exit(1)
    figures["seconds"] = round(time.monotonic() - started, 1)
    write_json(json_out, figures)
    click.echo(passed_sentence(figures), err=json_out == "-")
    sys.exit(0)


def passed_sentence(figures: dict) -> str:
    """The one sentence a passing selftest ends with: what it ran, in counts."""
    state = figures["integration"]
    parts = [f"{state['examples']:,} random interleavings of every technique ({state['steps']:,} steps, every "
             "page checked after each)"]
    if "fuzz" in figures:
        inputs = sum(f["inputs"] for f in figures["fuzz"].values())
        parts.append(f"{inputs:,} hostile inputs to {len(figures['fuzz'])} parsers")
    if "cli_matrix" in figures:
        parts.append(f"{figures['cli_matrix']['inputs']:,} bad command lines")
    return f"selftest passed: {', '.join(parts)}, in {figures['seconds']:g} s."


def _need_hypothesis() -> None:
    """One line, not a traceback, when the test extra is missing (the state machine and the
    fuzzers are hypothesis tests)."""
    import importlib.util

    from memvisor.errors import UserError

    if importlib.util.find_spec("hypothesis") is None:
        raise UserError("memvisor selftest needs hypothesis: pip install \"memvisor[selftest]\" "
                        "(requirements-all.txt installs it)")


def _replay(path: str) -> None:
    """Replay the example printed in ``path``: exit 0 when every step and check passes, 1 with
    the failure, 2 when the file holds no example."""
    from memvisor.errors import UserError
    from memvisor.testing.integration import replay

    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        count = replay(text)
    except (ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: {exc}") from None
    except AssertionError as exc:
        click.echo(f"{path}: the example fails again: {exc}", err=True)
        sys.exit(1)
    click.echo(f"{path}: {count} steps replayed, every check passed")
    sys.exit(0)


class CoreSelftest:
    """Registers ``memvisor selftest``."""

    @hookimpl
    def memvisor_register_commands(self, cli):
        """Add ``memvisor selftest``."""
        cli.add_command(selftest)


PLUGIN = CoreSelftest
