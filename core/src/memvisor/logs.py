"""structlog set-up for the ``memvisor`` command: warnings and above to standard error by
default, everything with ``MEMVISOR_LOG=debug`` (or ``info``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from memvisor.errors import UserError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
"""The values ``MEMVISOR_LOG`` takes (any other is refused in one line)."""


def configure_logging() -> None:
    """Route structlog to standard error at the level ``MEMVISOR_LOG`` names (default warning;
    :class:`UserError` for a value that is not a level)."""
    level_name = os.environ.get("MEMVISOR_LOG", "") or "warning"
    level = LEVELS.get(level_name.strip().lower())
    if level is None:
        raise UserError(f"MEMVISOR_LOG={level_name[:40]!r}: not a log level (use one of {', '.join(LEVELS)})")
    if os.environ.get("MEMVISOR_TRACE_HOOKS", "0") not in ("", "0"):
        level = min(level, logging.INFO)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args) -> structlog.PrintLogger:
    """A logger writing to standard error as it is when the message is logged (a test runner
    that swaps it for one command, such as click's CliRunner, gets that command's logs)."""
    return structlog.PrintLogger(file=sys.stderr)


@contextmanager
def command_logging() -> Iterator[None]:
    """structlog as :func:`configure_logging` sets it, for one command; the configuration
    before it afterwards (a command run inside a test or a notebook leaves theirs alone)."""
    saved = structlog.get_config()
    configure_logging()
    try:
        yield
    finally:
        structlog.configure(**saved)
