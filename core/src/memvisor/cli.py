"""The ``memvisor`` command. Every subcommand is registered through
:func:`memvisor.hookspecs.memvisor_register_commands`, the core's own ones included.

Bad input is one line on standard error and exit status 2; tracebacks are for bugs. That holds
for click's own usage errors too (a missing argument, an unknown option, a value of the wrong
type). Commands declare the files they read and write with the parameter types of this module
(:class:`InputFile`, :class:`OutputFile`, :class:`OutputDir`): an input must be a regular file,
an output must be writable and is never one of the inputs (also through links), and an output
folder is checked before any work; a socket of another program is a :class:`UnixSocket`.
"""

from __future__ import annotations

import sys

import click

from memvisor import __version__
from memvisor.errors import UserError

PLUGIN_COMMANDS = {"diskmap": "memvisor-diskmap", "mrc": "memvisor-mrc", "numa": "memvisor-numa",
                   "sharing": "memvisor-sharing"}
"""Subcommands of this repository's plugins, with the distribution that provides each: named
when the command is missing (the core imports no plugin, it only knows their names)."""


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
        if name is not None and name in PLUGIN_COMMANDS and self is cli and self.get_command(ctx, name) is None:
            raise click.UsageError(_missing_command(name), ctx)
        return super().resolve_command(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # a group without its command
            group = exc.ctx.command
            names = ", ".join(group.list_commands(exc.ctx)) if isinstance(group, click.Group) else ""
            _fail(f"{exc.ctx.command_path}: give a command ({names}; see {exc.ctx.command_path} --help)")
        except click.UsageError as exc:  # click's own: a missing argument, an unknown option...
            where = exc.ctx.command_path if exc.ctx is not None else "memvisor"
            _fail(f"{where}: {exc.format_message()} (see {where} --help)")
        except click.ClickException as exc:
            _fail(exc.format_message())
        except click.exceptions.Abort:
            click.echo("memvisor: interrupted", err=True)
            sys.exit(130)
        except KeyboardInterrupt:
            click.echo("memvisor: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def _missing_command(name: str) -> str:
    from memvisor.plugins import ENV_ALLOW, ENV_BLOCK, _entry_points

    distribution = PLUGIN_COMMANDS[name]
    if any(ep.name == name for ep in _entry_points()):
        return (f"'{name}' comes from plugin {name!r} ({distribution}), which {ENV_ALLOW} or {ENV_BLOCK} "
                f"leaves out")
    return f"'{name}' comes from the {distribution} distribution, which is not installed (pip install {distribution})"


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
        from memvisor.files import check_regular

        check_regular(value, self.what)


class OutputFile(_File):
    """A file the command writes: its folder must exist, it must be absent or a regular file,
    and it must not be one of the command's input files."""

    kind = "out"

    def __init__(self, what: str = "output file", allow_dash: bool = False):
        super().__init__(what, allow_dash)

    def check(self, value: str) -> None:
        from memvisor.files import check_output

        check_output(value, self.what)


class OutputDir(click.ParamType):
    """A folder the command writes into: checked writable before the command does any work."""

    name = "folder"

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

    def __init__(self, low: int = 1, high: int | None = None):
        self.low, self.high = low, high

    def convert(self, value, param, ctx):
        from memvisor.scenario import parse_size

        try:
            size = value if isinstance(value, int) else parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if size < self.low or (self.high is not None and size > self.high):
            from memvisor.limits import format_bytes

            top = f" and {format_bytes(self.high)}" if self.high is not None else ""
            self.fail(f"must be between {format_bytes(self.low)}{top}, got {value!r}", param, ctx)
        return size


class Number(click.ParamType):
    """A finite number within ``[low, high]`` (int when ``integer``): never NaN or infinite."""

    name = "number"

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
    from memvisor.logs import configure_logging

    cleanup_on_signals()
    try:
        configure_logging()
    except UserError as exc:
        _fail(exc)
    _register_commands()
    cli.main(args=argv, prog_name="memvisor")
