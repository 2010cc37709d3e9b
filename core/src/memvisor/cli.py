"""The ``memvisor`` command. Every subcommand is registered through
:func:`memvisor.hookspecs.memvisor_register_commands`, the core's own ones included.

Bad input is one line on standard error and exit status 2; tracebacks are for bugs. That holds
for click's own usage errors too (a missing argument, an unknown option, a value of the wrong
type). Commands declare the files they read and write with the parameter types of this module
(:class:`InputFile`, :class:`OutputFile`, :class:`OutputDir`): an input must be a regular file,
an output must be writable and is never one of the inputs (also through links), and an output
folder is checked before any work; a socket of another program is a :class:`UnixSocket`.

Every command speaks to a terminal and to a pipe alike (:func:`console`, :func:`table`): on a
terminal, rich's tables at the terminal's width; into a pipe or a file, plain columns at full
width, never cut. ``--json FILE`` (:func:`json_option`) writes a command's figures as JSON to
FILE, ``--json -`` to standard output, which then holds the JSON alone (the human summary is
left out); sizes on the command line are written as in scenarios (:class:`Size`: ``4MiB``,
``2G``; decimal units are refused).
"""

from __future__ import annotations

import sys

import click

from memvisor import __version__
from memvisor.errors import UserError


def one_line(text: object) -> str:
    """``text`` on one line: line breaks and other control characters become spaces."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def _fail(message: object, code: int = 2):
    click.echo(f"memvisor: error: {one_line(message)}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """A click group that turns :class:`UserError` and click's usage errors into one line and
    exit status 2, and names the distribution of a plugin command that is not installed."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            _fail(exc)

    def resolve_command(self, ctx, args):
        name = click.utils.make_str(args[0]) if args else None
        if name is not None and self is cli and self.get_command(ctx, name) is None:
            missing = _missing_command(name)
            if missing:
                raise click.UsageError(missing, ctx)
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        if self is cli:  # logs to standard error at MEMVISOR_LOG's level, however the command line is called
            from memvisor.logs import command_logging

            try:
                with command_logging():
                    return self._main(args, prog_name, complete_var, **extra)
            except UserError as exc:  # MEMVISOR_LOG is not a level
                _fail(exc)
        return self._main(args, prog_name, complete_var, **extra)

    def _main(self, args, prog_name, complete_var, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # a group without its command
            group = exc.ctx.command
            names = ", ".join(group.list_commands(exc.ctx)) if isinstance(group, click.Group) else ""
            _fail(f"{exc.ctx.command_path}: give a command ({names}; see {exc.ctx.command_path} --help)")
        except click.UsageError as exc:  # click's own: a missing argument, an unknown option...
            where = exc.ctx.command_path if exc.ctx is not None else "memvisor"
            said = exc.format_message() if where == "memvisor" else f"{where}: {exc.format_message()}"
            _fail(f"{said} (see {where} --help)")  # "memvisor: error: " says the root already
        except click.ClickException as exc:
            _fail(exc.format_message())
        except click.exceptions.Abort:
            click.echo("memvisor: interrupted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("memvisor: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def _missing_command(name: str) -> str | None:
    """Where command ``name`` would come from: an installed plugin that the allow- or
    block-list leaves out (its commands are asked for on a group of their own); None when no
    installed plugin has it."""
    from memvisor.plugins import _entry_points, _instantiate, _load, left_out

    for ep in _entry_points():
        reason = left_out(ep.name)
        plugin = _load(ep) if reason else None
        register = getattr(_instantiate(plugin.target), "memvisor_register_commands", None) if plugin and \
            plugin.error is None else None
        if register is None:
            continue
        group = click.Group()
        try:
            register(cli=group)
        except Exception:  # a broken plugin says nothing here
            continue
        if name in group.commands:
            return f"'{name}' comes from plugin {ep.name!r} ({plugin.distribution}): {reason}"
    return None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="memvisor")
def cli() -> None:
    """memvisor: write, evaluate and run hypervisor memory-management techniques."""


# -- parameter types of files ------------------------------------------------------------------


def _remember(ctx: click.Context | None, kind: str, value: str, param) -> None:
    """Record a file parameter; refuse an output that is one of the inputs (either order)."""
    if ctx is None or value == "-":
        return
    from memvisor.files import same_file

    files = ctx.meta.setdefault("memvisor.files", [])
    for other_kind, other, other_param in files:
        if {kind, other_kind} == {"in", "out"} and same_file(value, other):
            (out, out_param), (inp, in_param) = ((value, param), (other, other_param)) if kind == "out" else \
                ((other, other_param), (value, param))
            raise UserError(f"{_label(out_param)} {out}: the output is the input {_label(in_param)} {inp}; "
                            f"writing it would destroy the input")
    files.append((kind, value, param))


def _checked(check, value, param) -> None:
    """``check(value)``; an option's error names the option first (``--json: x: ...``)."""
    if not value:
        raise UserError(f"{_label(param)}: an empty path")
    try:
        check(value)
    except UserError as exc:
        label = _label(param)
        raise UserError(f"{label}: {exc}" if label.startswith("-") else str(exc)) from None


def _label(param) -> str:
    if param is None:
        return "?"
    return param.opts[0] if param.opts and param.opts[0].startswith("-") else param.name.upper()


class _File(click.ParamType):
    """A path the command reads (``kind = "in"``) or writes (``"out"``), checked by
    :meth:`check`; ``allow_dash``: ``-`` means standard input or output."""

    name = "file"
    kind = "in"

    def __init__(self, what: str, allow_dash: bool = False):
        self.what, self.allow_dash = what, allow_dash

    def check(self, value: str) -> None:  # pragma: no cover - each subclass has its own
        raise NotImplementedError

    def convert(self, value, param, ctx):
        value = str(value)
        if not (self.allow_dash and value == "-"):
            _checked(self.check, value, param)
            _remember(ctx, self.kind, value, param)
        return value


class InputFile(_File):
    """A file the command reads: it must exist and be a regular file (a FIFO or a device is
    refused at once, a folder too)."""

    def __init__(self, what: str = "file", allow_dash: bool = False):
        super().__init__(what, allow_dash)

    def check(self, value: str) -> None:
        """:class:`UserError` unless ``value`` is a regular file that exists."""
        from memvisor.files import check_regular

        check_regular(value, self.what)


class OutputFile(_File):
    """A file the command writes: its folder must exist, it must be absent or a regular file,
    and it must not be one of the command's input files."""

    kind = "out"
    """What the command does with the file: writes it."""

    def __init__(self, what: str = "output file", allow_dash: bool = False):
        super().__init__(what, allow_dash)

    def check(self, value: str) -> None:
        """:class:`UserError` unless ``value`` can be written (its folder exists, it is absent or
        a regular file)."""
        from memvisor.files import check_output

        check_output(value, self.what)


class OutputDir(click.ParamType):
    """A folder the command writes into: checked writable before the command does any work."""

    name = "folder"
    """How click names the type in messages."""

    def convert(self, value, param, ctx):
        from memvisor.files import check_out_dir

        value = str(value)
        _checked(check_out_dir, value, param)
        return value


class UnixSocket(click.ParamType):
    """A Unix socket another program listens on (a QEMU's QMP socket): it must exist and be a
    socket with a path short enough to connect to; a regular file, a folder, a FIFO or a
    missing path is refused in one line before the command does anything."""

    name = "socket"
    """How click names the type in messages."""

    def __init__(self, what: str = "Unix socket"):
        self.what = what

    def convert(self, value, param, ctx):
        from memvisor.files import check_socket

        value = str(value)
        _checked(lambda path: check_socket(path, self.what), value, param)
        return value


class Size(click.ParamType):
    """A size in bytes (``"4MiB"``, binary units) within ``[low, high]``."""

    name = "size"
    """How click names the type in messages."""

    def __init__(self, low: int = 1, high: int | None = None):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        from memvisor.scenario import parse_size

        try:
            size = value if isinstance(value, int) else parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size < self.low or (self.high is not None and size > self.high):
            from memvisor.units import size as human

            bounds = f"between {human(self.low)} and {human(self.high)}" if self.high is not None else \
                f"at least {human(self.low)}"
            self.fail(f"must be {bounds}, got {value!r}", param, ctx)
        return size


class Number(click.ParamType):
    """A finite number within ``[low, high]`` (int when ``integer``): never NaN or infinite."""

    name = "number"
    """How click names the type in messages (``integer`` for whole numbers)."""

    def __init__(self, low: float | None = None, high: float | None = None, integer: bool = False):
        self.low, self.high, self.integer = low, high, integer
        self.name = "integer" if integer else "number"

    def convert(self, value, param, ctx):
        import math

        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        else:
            text = str(value).strip()
            try:
                number = int(text) if self.integer else float(text)
            except ValueError:
                self.fail(f"{value!r} is not {'a whole number' if self.integer else 'a number'}", param, ctx)
        if not self.integer and not math.isfinite(number):
            self.fail(f"must be a finite number, got {value!r}", param, ctx)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            self.fail(f"must be between {self.low} and {self.high}, got {value!r}", param, ctx)
        return number


# -- output: terminals, pipes and JSON ----------------------------------------------------------


def console(stderr: bool = False):
    """A rich console for standard output (or error): on a terminal, its width and colours;
    into a pipe or a file, no colour and no width limit, so no line is cut or wrapped."""
    from rich.console import Console

    terminal = Console(stderr=stderr)
    if terminal.is_terminal:
        return terminal
    return Console(file=_Unpadded(sys.stderr if stderr else sys.stdout), width=100_000, soft_wrap=True,
                   no_color=True, highlight=False)


class _Unpadded:
    """A text stream that drops the spaces rich pads a table's last column with (a pipe's
    reader gets the cells, not a screen's width of blanks)."""

    def __init__(self, stream):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            self.stream.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()


def table(*columns: str, title: str | None = None, numbers: tuple[str, ...] = ()):
    """A rich table with these column headings (``numbers``: the ones aligned right): boxed
    on a terminal; plain columns separated by spaces into a pipe or a file."""
    from rich import box
    from rich.table import Table

    boxed = console().is_terminal
    out = Table(title=title, title_justify="left", box=box.HEAVY_HEAD if boxed else None,
                pad_edge=boxed, show_edge=boxed)
    for column in columns:
        out.add_column(column, justify="right" if column in numbers else "left", overflow="fold")
    return out


def json_option(what: str = "the figures"):
    """The ``--json FILE|-`` option every command that writes JSON takes: its value is the
    parameter ``json_out`` (None when not given)."""
    return click.option("--json", "json_out", default=None, metavar="FILE|-",
                        type=OutputFile("JSON file", allow_dash=True),
                        help=f"Write {what} as JSON to FILE ('-': standard output, and nothing else there).")


def write_json(target: str | None, value) -> None:
    """Write ``value`` as JSON to ``target`` (``--json``'s value): ``"-"`` standard output,
    a file written under a temporary name and renamed, None nothing. NaN becomes null."""
    import json

    from memvisor.report import to_jsonable

    if target is None:
        return
    text = json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n"
    if target == "-":
        click.echo(text, nl=False)
        return
    from memvisor.files import atomic_write

    try:
        atomic_write(target, text)
    except OSError as exc:
        raise UserError(f"--json: cannot write {target}: {exc.strerror or exc}") from None


# -- the entry point ---------------------------------------------------------------------------


def _register_commands() -> None:
    from memvisor.plugins import new_plugin_manager

    try:
        pm = new_plugin_manager(None, strict=False)
    except UserError as exc:
        _fail(exc)
    from memvisor.plugins import log

    for impl in reversed(pm.hook.memvisor_register_commands.get_hookimpls()):
        try:
            impl.function(cli=cli) if "cli" in impl.argnames else impl.function()
        except Exception as exc:  # one broken plugin must not take the command line down
            log.warning("plugin failed to register commands", plugin=pm.get_name(impl.plugin),
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``memvisor`` script."""
    from memvisor.files import cleanup_on_signals
    from memvisor.logs import command_logging

    cleanup_on_signals()
    try:
        with command_logging():  # before the plugins load: a plugin that fails to is a warning on stderr
            _register_commands()
            cli.main(args=argv, prog_name="memvisor")
    except UserError as exc:  # MEMVISOR_LOG is not a level
        _fail(exc)
