"""Every subcommand on every kind of bad argument.

The matrix walks the ``memvisor`` command tree as installed (the core's commands and every
plugin's), and for each command runs a valid invocation (:func:`baselines`) with one parameter
made bad in each way its type can be — a missing, folder, FIFO, device or over-long file; an
output that is one of the inputs, directly or through a link; an output folder under /proc, or
a file; a socket that is missing, a file, a folder or too long a path; NaN, infinite, huge and
non-numeric numbers; sizes in decimal units, zero or absurd; unknown choices; empty, binary,
path-like and very long strings; a flag given a value — plus an unknown option, missing
arguments and an extra one. Each case must end with exit status 2 and one line on standard
error, in bounded time (:data:`CASE_SECONDS`) and memory (:data:`MEMORY_LIMIT`), without
changing any file but the command's output (its inputs, the working folder and the temp folder
are checked).

:func:`cases` lists the cases; :func:`check` runs one; :func:`run` runs many and returns the
outcomes. pytest runs every case (``tests/integration/test_integration_cli_matrix.py``);
``memvisor selftest`` runs them too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import attrs
import click
import numpy as np

from memvisor import PAGE_SIZE

CASE_SECONDS = 20.0
"""Wall-clock limit of one case (bad input is refused before any work)."""

MEMORY_LIMIT = 256 << 20
"""Peak Python memory of one case (a command's first use imports what it needs)."""

BASELINES: dict[str, dict[str, object]] = {
    "run": {"scenario": "{scenario}", "out_dir": "{out}/report", "quiet": True},
    "compare": {"reports": ["{run_a}", "{run_b}"], "out_dir": "{out}/compare", "json_out": "{out}/compare.json"},
    "plugins": {"json_out": "{out}/plugins.json"},
    "backends": {"json_out": "{out}/backends.json"},
    "bench": {"groups": ["emulator"], "runs": "1", "cases": ["zipf-untraced"], "json_out": "{out}/bench.json"},
    "checkpoint save": {"image": "{image}", "out": "{out}/saved.ckpt", "key_file": "{key}",
                        "json_out": "{out}/save.json"},
    "checkpoint restore": {"ckpt": "{ckpt}", "image": "{out}/restored.raw", "key_file": "{key}",
                           "json_out": "{out}/restore.json"},
    "checkpoint inspect": {"ckpt": "{ckpt}", "rows": "5", "json_out": "{out}/inspect.json"},
    "checkpoint verify": {"ckpt": "{ckpt}", "key_file": "{key}"},
    "migrate": {"image": "{image}", "disk": "{disk}", "json_out": "{out}/migrate.json"},
    "selftest": {"examples": "1", "steps": "1", "fuzz": False, "json_out": "{out}/selftest.json"},
}
"""A valid invocation of each of the core's commands, by parameter name (values may name the
sandbox's files): the matrix makes one parameter bad at a time. Plugins give theirs through
:func:`memvisor_selftest` (``selftest.command``); :func:`baselines` has both. A command without
an entry is run with no arguments but the bad one. The sandbox's sockets (``{qmp}``, a
running VM's monitor, and ``{qmp_incoming}``, one waiting for an incoming migration) have no
server behind them: the matrix's cases are refused before anything connects, and the plugin
whose commands take them runs its baselines against real servers (:data:`LIVE_SOCKETS`)."""

LIVE_SOCKETS = ("{qmp}", "{qmp_incoming}")
"""Placeholders of a baseline that runs only with a real server listening on the socket."""


@functools.cache
def baselines() -> dict[str, dict[str, object]]:
    """A valid invocation of every installed command that has one: the core's
    (:data:`BASELINES`) and the plugins' (``selftest.command``)."""
    from memvisor.testing.integration import contributions

    return {**contributions().commands, **BASELINES}


@attrs.frozen
class Case:
    """One bad invocation: ``command`` (``"checkpoint save"``), the parameter made bad (or
    ``-`` for the whole command line), the kind of badness and the arguments."""

    command: str
    param: str
    kind: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        shown = " ".join(a if len(a) < 40 else a[:37] + "..." for a in self.args)
        return f"memvisor {self.command} [{self.param}: {self.kind}] {shown!r}"


@functools.cache
def _register_all() -> None:
    """Every installed plugin's commands on ``memvisor``, once per process (a test may have
    added one command to it, which does not make the tree whole)."""
    from memvisor.cli import _register_commands

    _register_commands()


def commands(group: click.Group | None = None, prefix: str = "") -> dict[str, click.Command]:
    """Every leaf command of the ``memvisor`` tree by its path (``"checkpoint save"``), and
    every group with subcommands by its own (invoked bare, it is a bad invocation too)."""
    if group is None:
        from memvisor.cli import cli

        _register_all()
        group = cli
    out: dict[str, click.Command] = {}
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            out[path] = command
            out.update(commands(command, path + " "))
        elif command is not None:
            out[path] = command
    return out


def untyped_files() -> list[str]:
    """Parameters that take a path without saying whether it is read or written (a bare
    ``click.Path`` or ``click.File``): they escape the checks of
    :class:`~memvisor.cli.InputFile`, :class:`~memvisor.cli.OutputFile` and
    :class:`~memvisor.cli.OutputDir`. Should be none."""
    return [f"memvisor {path} {param.name}" for path, command in commands().items() for param in command.params
            if isinstance(param.type, (click.Path, click.File))]


class Sandbox:
    """A folder of valid inputs for the baselines, a FIFO, a link to an input, two Unix sockets
    (nobody listens on them), an ``out`` folder for outputs, and a working folder;
    :meth:`snapshot` lists every file's size and modification time."""

    def __init__(self, root: Path):
        from memvisor.builtins.checkpoint import CheckpointWriter

        self.root = root
        (root / "out").mkdir()
        (root / "cwd").mkdir()
        rng = np.random.default_rng(3)
        pages = np.zeros((64, PAGE_SIZE), np.uint8)
        pages[:32] = rng.integers(97, 123, (32, PAGE_SIZE), dtype=np.uint8)
        (root / "image.raw").write_bytes(pages.tobytes())
        (root / "disk.raw").write_bytes(pages[::-1].tobytes())
        (root / "key").write_bytes(bytes(range(32)))
        with CheckpointWriter(root / "vm.ckpt", 64, key=root / "key", threads=1) as writer:
            writer.add_pages(0, pages)
        np.save(root / "trace.npy", rng.integers(0, 500, 5000).astype(np.int64))
        (root / "s.toml").write_text('[host]\nmemory = "16MiB"\n[[vm]]\nname = "a"\nmemory = "4MiB"\n'
                                     'workload = { kind = "uniform" }\n[[timeline]]\ndo = "run"\nfor = "1ms"\n')
        for name, seed in (("run_a", 1), ("run_b", 2)):  # two runs' reports (compare's inputs)
            (root / name).mkdir()
            (root / name / "report.json").write_text(json.dumps(_report(root / "s.toml", seed)))
        (root / "folder").mkdir()
        (root / ("d" * 100)).mkdir()  # reaches a socket by a path too long to connect to
        os.mkfifo(root / "fifo")
        (root / "link.ckpt").symlink_to(root / "vm.ckpt")
        for name in ("qmp.sock", "incoming.sock"):
            _bind(root, name)
        self.files = {"scenario": root / "s.toml", "image": root / "image.raw", "disk": root / "disk.raw",
                      "ckpt": root / "vm.ckpt", "trace": root / "trace.npy", "key": root / "key",
                      "run_a": root / "run_a", "run_b": root / "run_b", "out": root / "out", "qmp": root / "qmp.sock",
                      "qmp_incoming": root / "incoming.sock"}

    def fill(self, value: str) -> str:
        """``value`` with the sandbox's files in place of ``{scenario}``, ``{out}``..."""
        return value.format(**{k: str(v) for k, v in self.files.items()})

    def clear_out(self) -> None:
        """Empty the outputs' folder."""
        import shutil

        shutil.rmtree(self.root / "out")
        (self.root / "out").mkdir()

    def snapshot(self) -> dict[str, tuple]:
        """Every path under the sandbox but ``out`` (the outputs' place), with its size and
        modification time; and this process's memvisor temporaries in the temp folder."""
        found = {}
        for folder, dirs, files in os.walk(self.root):
            if Path(folder) == self.root:
                dirs[:] = [d for d in dirs if d != "out"]
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                found[os.path.relpath(path, self.root)] = (st.st_size, st.st_mtime_ns, st.st_mode)
        temp = tempfile.gettempdir()
        mine = f".{os.getpid()}."
        for name in os.listdir(temp):
            if name.startswith("memvisor-") and mine in name:
                found[f"$TMP/{name}"] = ()
        return found


def _report(scenario: Path, seed: int) -> dict:
    """report.json of the sandbox's scenario run with ``seed``."""
    from memvisor.runner import ScenarioRun
    from memvisor.scenario import load_scenario

    return ScenarioRun(load_scenario(scenario).with_seed(seed)).run().data


def _bind(folder: Path, name: str) -> None:
    """A Unix socket file ``folder/name`` that nobody listens on (bound from inside ``folder``:
    its full path may be too long to bind)."""
    import socket

    cwd = os.getcwd()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chdir(folder)
        sock.bind(name)
    finally:
        os.chdir(cwd)
        sock.close()


def _bad_values(param: click.Parameter, sandbox: Sandbox, inputs: list[str]) -> list[tuple[str, str]]:
    """``(kind, value)`` of every way ``param``'s value can be bad."""
    from memvisor.cli import InputFile, Number, OutputDir, OutputFile, Size, UnixSocket

    root = sandbox.root
    long_name = str(root / ("x" * 300))
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag:
        return []  # given a value, see _flag_cases
    if isinstance(kind, InputFile):
        return [("missing file", str(root / "absent")), ("folder", str(root / "folder")),
                ("FIFO", str(root / "fifo")), ("device", "/dev/zero"), ("name too long", long_name),
                ("empty", "")]
    if isinstance(kind, OutputFile):
        out = [("no such folder", "/proc/memvisor-absent/out"), ("folder", str(root / "folder")),
               ("FIFO", str(root / "fifo")), ("device", "/dev/null"), ("name too long", long_name)]
        if inputs:
            out.append(("the input itself", inputs[0]))
            if any(Path(i).resolve() == (root / "vm.ckpt").resolve() for i in inputs):
                out.append(("a link to the input", str(root / "link.ckpt")))
        return out
    if isinstance(kind, UnixSocket):
        return [("missing socket", str(root / "absent.sock")), ("regular file", str(root / "image.raw")),
                ("folder", str(root / "folder")), ("FIFO", str(root / "fifo")), ("device", "/dev/null"),
                ("name too long", long_name), ("path too long to connect", str(root / ("d" * 100) / ".." / "qmp.sock")),
                ("empty", "")]
    if isinstance(kind, OutputDir):
        return [("under /proc", "/proc/memvisor-absent"), ("under /sys", "/sys/memvisor-absent"),
                ("a file", str(root / "image.raw")), ("name too long", long_name)]
    if isinstance(kind, Size):
        return [("decimal unit", "1GB"), ("zero", "0"), ("negative", "-1MiB"), ("huge", "1" + "0" * 400 + "TiB"),
                ("NaN", "nan"), ("not a size", "lots")]
    if isinstance(kind, (click.IntRange, Number, click.FloatRange)) or kind in (click.INT, click.FLOAT):
        return [("NaN", "nan"), ("infinite", "inf"), ("overflow", "1e400"), ("not a number", "abc"),
                ("huge", "9" * 40), ("huge negative", "-" + "9" * 40), ("empty", "")]
    if isinstance(kind, click.Choice):
        return [("unknown choice", "nosuch"), ("empty", "")]
    return [("empty", ""), ("control characters", "\x00bad\n"), ("path-like", "../../etc/passwd"),
            ("very long", "x" * 5000)]


def _argv(command: click.Command, values: dict[str, object], sandbox: Sandbox) -> list[str]:
    """Arguments for ``command`` from ``values`` by parameter name: positionals in order,
    then options (a list repeats a ``multiple`` option; True gives a flag)."""
    positional, options = [], []
    for param in command.params:
        if param.name not in values:
            continue
        value = values[param.name]
        items = value if isinstance(value, list) else [value]
        if isinstance(param, click.Argument):
            positional += [sandbox.fill(str(v)) for v in items]
        elif isinstance(param, click.Option):
            if param.is_flag:
                flag = param.opts[0] if value else (param.secondary_opts or param.opts)[0]
                options.append(flag)
            else:
                for v in items:
                    options += [param.opts[0], sandbox.fill(str(v))]
    return positional + options


def cases(sandbox: Sandbox) -> Iterator[Case]:
    """Every bad invocation of every installed command."""
    from memvisor.cli import InputFile

    for path, command in commands().items():
        if isinstance(command, click.Group):
            yield Case(path, "-", "no subcommand", ())
            yield Case(path, "-", "unknown subcommand", ("nosuch",))
            continue
        base = dict(baselines().get(path, {}))
        inputs = [sandbox.fill(str(v)) for p in command.params if isinstance(p.type, InputFile) and p.name in base
                  for v in (base[p.name] if isinstance(base[p.name], list) else [base[p.name]])]
        yield Case(path, "-", "unknown option", tuple(_argv(command, base, sandbox) + ["--no-such-option"]))
        required = [p for p in command.params if p.required]
        if required:
            yield Case(path, "-", "required arguments missing",
                       tuple(_argv(command, {k: v for k, v in base.items()
                                             if k not in {p.name for p in required}}, sandbox)))
        if not any(isinstance(p, click.Argument) and p.nargs == -1 for p in command.params):
            yield Case(path, "-", "an extra argument", tuple(_argv(command, base, sandbox) + ["extra"]))
        for param in command.params:
            if param.name in ("help",) or (isinstance(param, click.Option) and param.hidden):
                continue
            if isinstance(param, click.Option) and param.is_flag:
                yield Case(path, param.name, "a flag given a value",
                           tuple(_argv(command, base, sandbox) + [f"{param.opts[0]}=1"]))
                continue
            for kind, value in _bad_values(param, sandbox, inputs):
                values = dict(base)
                values[param.name] = [value] if param.multiple or param.nargs == -1 else value
                yield Case(path, param.name, kind, tuple(_argv(command, values, sandbox)))


class _Expired(BaseException):
    """A case ran past :data:`CASE_SECONDS`."""


@contextlib.contextmanager
def _deadline(seconds: float):
    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _names(case: Case) -> list[str]:
    """What the error line of a case should name: the parameter (option or argument) or the
    bad value (its start, for long ones)."""
    from memvisor.cli import cli

    command = commands(cli)[case.command]
    param = next(p for p in command.params if p.name == case.param)
    names = [o for o in param.opts if o.startswith("-")] + [param.name.upper(), param.name.replace("_", "-")]
    bad = [a for a in case.args if a not in _argv(command, baselines().get(case.command, {}), _SANDBOX[0])]
    return names + [b[:30] for b in bad if b.strip()] + [repr(b)[1:31] for b in bad if b.strip()]


_SANDBOX: list = []


def check(case: Case, sandbox: Sandbox) -> float:
    """Run one case in the sandbox's working folder; assert exit status 2, one line on
    standard error starting ``memvisor: error:``, bounded time and memory, and no file changed
    outside ``out``. Returns the seconds it took."""
    from click.testing import CliRunner

    from memvisor.cli import cli

    _SANDBOX[:] = [sandbox]
    sandbox.clear_out()  # what an earlier case wrote must not decide this one
    before = sandbox.snapshot()
    cwd = os.getcwd()
    os.chdir(sandbox.root / "cwd")
    tracemalloc.start()
    started = time.monotonic()
    try:
        with _deadline(CASE_SECONDS):
            result = CliRunner().invoke(cli, [*case.command.split(), *case.args], catch_exceptions=True)
    except _Expired:
        raise AssertionError(f"{case}: still running after {CASE_SECONDS:g} s") from None
    finally:
        seconds = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        os.chdir(cwd)
    stderr = result.stderr if hasattr(result, "stderr") else result.output
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"{case}: raised {type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == 2, f"{case}: exit status {result.exit_code}, stderr {stderr[-300:]!r}"
    assert len(lines) == 1 and lines[0].startswith("memvisor: error: "), f"{case}: stderr {stderr[-500:]!r}"
    assert peak < MEMORY_LIMIT, f"{case}: {peak >> 20} MiB"
    if case.param != "-":  # refused for the parameter made bad, not for something else
        names = _names(case)
        assert any(n in lines[0] for n in names), f"{case}: the line names none of {names}: {lines[0][:300]!r}"
    after = sandbox.snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{case}: changed {changed[:5]} outside its output"
    return seconds


def run(limit: int | None = None, seconds: float | None = None, seed: int = 0) -> dict:
    """Run the matrix (every case, or ``limit`` of them drawn with ``seed``, stopping after
    ``seconds``) in a fresh sandbox; returns the cases run and the slowest. Raises on the
    first broken contract."""
    import random

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memvisor-cli-matrix-") as folder:
        sandbox = Sandbox(Path(folder))
        todo = list(cases(sandbox))
        if limit is not None and limit < len(todo):
            todo = random.Random(seed).sample(todo, limit)
        slowest, done = (0.0, ""), 0
        for case in todo:
            if seconds is not None and time.monotonic() - started > seconds:
                break
            took = check(case, sandbox)
            slowest = max(slowest, (took, str(case)))
            done += 1
    return {"inputs": done, "of": len(todo), "slowest_s": round(slowest[0], 2), "slowest": slowest[1]}
