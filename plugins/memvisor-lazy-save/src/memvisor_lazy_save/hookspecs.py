"""The hook lazy save asks other plugins (declared through ``memvisor_register_hookspecs``;
numa declares it alike)."""

from __future__ import annotations

import numpy as np

from memvisor import hookspec


@hookspec(firstresult=True)
def memvisor_page_heat(host, vm, gpps: np.ndarray) -> np.ndarray | None:
    """Decision. A float per page of ``gpps``, higher meaning hotter, from a plugin that
    measures page use; None when no plugin can tell.

    A lazy save writes the heat of every page into its access-order sidecar, which a lazy
    restore prefetches by (hottest storage blocks first); without an answer it uses the
    accessed bits it read during the save.

    :param host: the host.
    :param vm: the VM.
    :param gpps: the pages to rate.
    :returns: float64 array, one heat per page of ``gpps``, or ``None``.
    """
