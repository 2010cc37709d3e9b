"""The core's default answers to hooks that nobody else answers (``trylast``)."""

from __future__ import annotations

from memvisor import hookimpl


class CoreDefaults:
    """Zero-fill on a page fault that no plugin served."""

    @hookimpl(trylast=True)
    def memvisor_page_fault(self, host, vm, fault):
        """Fill every page of the fault that is still missing with zeros: a guest reads zeros
        from memory nobody has written."""
        missing = fault.gpps[~host.backend.present(vm, fault.gpps)]
        if not len(missing):
            return None
        host.backend.populate(vm, missing)
        host.served_faults(vm, "zero-fill", missing)
        return missing


PLUGIN = CoreDefaults
