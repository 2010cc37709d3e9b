"""Registers the core's workload kinds (:mod:`memvisor.workloads`) like any plugin would."""

from memvisor import hookimpl


class CoreWorkloads:
    """uniform, zipf, scan, loop, phased, mixture and trace replay."""

    @hookimpl
    def memvisor_register_workloads(self, register):
        """Register every kind in :data:`memvisor.workloads.WORKLOADS`."""
        from memvisor.workloads import WORKLOADS

        for kind, factory in WORKLOADS.items():
            register(kind, factory)


PLUGIN = CoreWorkloads
