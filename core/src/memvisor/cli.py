"""The ``memvisor`` command. Every subcommand is registered through
:func:`memvisor.hookspecs.memvisor_register_commands`, the core's own ones included.

Bad input is one line on standard error and exit status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import sys

import click

from memvisor import __version__
from memvisor.errors import UserError


class _Group(click.Group):
    """A click group that turns :class:`UserError` into one line and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"memvisor: error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="memvisor")
def cli() -> None:
    """memvisor: write, evaluate and run hypervisor memory-management techniques."""


def _register_commands() -> None:
    from memvisor.plugins import new_plugin_manager

    try:
        pm = new_plugin_manager(None, strict=False)
    except UserError as exc:
        click.echo(f"memvisor: error: {exc}", err=True)
        sys.exit(2)
    from memvisor.plugins import log

    for impl in reversed(pm.hook.memvisor_register_commands.get_hookimpls()):
        try:
            impl.function(cli=cli) if "cli" in impl.argnames else impl.function()
        except Exception as exc:  # one broken plugin must not take the command line down
            log.warning("plugin failed to register commands", plugin=pm.get_name(impl.plugin),
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0])


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``memvisor`` script."""
    from memvisor.logs import configure_logging

    configure_logging()
    _register_commands()
    cli.main(args=argv, prog_name="memvisor")
