"""memvisor: a framework for hypervisor memory-management techniques.

The core defines the hook specifications (:mod:`memvisor.hookspecs`), the Backend interface
(:mod:`memvisor.backend`), the host and VM models (:mod:`memvisor.host`), scenarios, reports and
the ``memvisor`` command. Techniques and backends are plugins found through the ``memvisor``
entry-point group.
"""

import pluggy

__version__ = "0.1.0"
"""The version of the memvisor distribution."""

PROJECT_NAME = "memvisor"
"""The pluggy project name and the entry-point group of every plugin and backend."""

PAGE_SIZE = 4096
"""Bytes in a small page."""

LARGE_PAGE_PAGES = 512
"""Small pages in one 2 MiB large page."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for hook implementations: ``@memvisor.hookimpl`` (``tryfirst``, ``trylast``,
``optionalhook`` for a hook another plugin may declare, ``wrapper``)."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marker for hook specifications: the core's (:mod:`memvisor.hookspecs`) and those a plugin
offers other plugins (:func:`memvisor.hookspecs.memvisor_register_hookspecs`)."""

__all__ = ["LARGE_PAGE_PAGES", "PAGE_SIZE", "PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
