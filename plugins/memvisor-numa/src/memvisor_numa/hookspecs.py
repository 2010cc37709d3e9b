"""The hook numa asks other plugins (declared through ``memvisor_register_hookspecs``)."""

from __future__ import annotations

import numpy as np

from memvisor import hookspec


@hookspec(firstresult=True)
def memvisor_page_heat(host, vm, gpps: np.ndarray) -> np.ndarray | None:
    """Decision. How hot each of ``gpps`` is, by a plugin that measures page use.

    A plugin that tracks accesses (an MRC plugin's LRU, for one) answers with a float per page,
    higher meaning hotter (more recently or more often used); pages it knows nothing of get 0.
    NUMA migration moves the hottest pages first (heuristic ``mrc``); lazy save records the
    order for lazy restore to prefetch by (it declares the same hook). ``None`` means no
    plugin can tell: numa falls back to its own measure (accessed bits). Implement it with
    ``@memvisor.hookimpl(optionalhook=True)``.

    :param host: the host.
    :param vm: the VM.
    :param gpps: the pages to rate.
    :returns: float64 array, one heat per page of ``gpps``, or ``None``.
    """
