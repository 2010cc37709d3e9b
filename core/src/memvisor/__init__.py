"""memvisor: a framework for hypervisor memory-management techniques.

The kernel sits at the top of the package: the hook specifications (:mod:`memvisor.hookspecs`),
the plugin manager (:mod:`memvisor.plugins`), the Backend interface (:mod:`memvisor.backend`),
the host and VM models (:mod:`memvisor.host`), events, scenarios, reports, the ``memvisor``
command and the test kit (:mod:`memvisor.testing`). The features that ship with the core sit
below it in :mod:`memvisor.builtins`, registered as plugins through the same hooks: the built-in
techniques (:mod:`memvisor.builtins.checkpoint`, the checkpoint format and the stop-the-world
save and eager restore; :mod:`memvisor.builtins.migration`, live migration), the workload
kinds, timeline actions and commands. Other techniques and backends are plugins found through
the ``memvisor`` entry-point group.
"""

import pluggy

from memvisor import _moved

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

_moved.install()  # memvisor.checkpoint and memvisor.migration, for one release

__all__ = ["LARGE_PAGE_PAGES", "PAGE_SIZE", "PROJECT_NAME", "__version__", "hookimpl", "hookspec"]
