"""Registers the core's workload kinds (:mod:`memvisor.workloads`) like any plugin would."""

from memvisor import hookimpl


class CoreWorkloads:
    """uniform, zipf, scan, loop, phased, mixture, trace replay and pagecache (disk I/O)."""

    @hookimpl
    def memvisor_register_workloads(self, register):
        """Register every kind in :data:`memvisor.workloads.WORKLOADS`, and ``pagecache``."""
        from memvisor.workloads import WORKLOADS, make_pagecache

        for kind, factory in WORKLOADS.items():
            register(kind, factory)
        register("pagecache", make_pagecache)


PLUGIN = CoreWorkloads
