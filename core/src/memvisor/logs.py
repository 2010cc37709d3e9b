"""structlog set-up for the ``memvisor`` command: warnings and above to standard error by
default, everything with ``MEMVISOR_LOG=debug`` (or ``info``)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging() -> None:
    """Route structlog to standard error at the level ``MEMVISOR_LOG`` names (default warning)."""
    level_name = os.environ.get("MEMVISOR_LOG", "warning").upper()
    level = getattr(logging, level_name, logging.WARNING)
    if os.environ.get("MEMVISOR_TRACE_HOOKS", "0") not in ("", "0"):
        level = min(level, logging.INFO)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
