"""Plugin isolation in hook delivery: one plugin's bug does not take the host down with it.

The host wraps every installed plugin's implementation of the hooks below (the core's
built-ins are not wrapped: a bug there is the core's). What happens when one raises depends on
whether the core has a safe fallback for the event:

**Observer hooks** (``memvisor_page_accessed``, ``memvisor_disk_io``, ``memvisor_tick``,
``memvisor_vcpus_moved``, ``memvisor_migration_phase``) and **collectors whose empty answer is
safe** (``memvisor_memory_pressure``: nothing reclaimed; ``memvisor_memory_error``: nothing
repaired, the pages are reported lost): the failure is logged with the plugin's name and kept
in :attr:`memvisor.host.Host.plugin_failures`; the plugin's answer counts as None, the other
plugins still run, and the VM goes on.

**Fault and write hooks** (``memvisor_page_fault``, ``memvisor_page_write``): there is no safe
fallback — the failing plugin may own the faulting page (zero-filling it would hand the guest a
wrong page) or may need to act before the write lands (a copy before write). The VM is
stopped cleanly (:meth:`memvisor.host.Host.stop_vm`) with the reason, and the exception reaches
the caller; the VM's next batch raises :class:`memvisor.errors.VMStoppedError`.

A :class:`memvisor.errors.UserError` raised by a plugin is a deliberate, one-line refusal (a
lazy restore that found its file damaged stops its VM that way): it is never swallowed.

Switch: ``MEMVISOR_ISOLATE_PLUGINS=0`` turns the isolation of observer hooks off (every
exception propagates, as in development).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import structlog

from memvisor.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.host import Host

ENV_ISOLATE = "MEMVISOR_ISOLATE_PLUGINS"

OBSERVED = ("memvisor_page_accessed", "memvisor_disk_io", "memvisor_tick", "memvisor_vcpus_moved",
            "memvisor_migration_phase", "memvisor_memory_pressure", "memvisor_memory_error")
"""Hooks whose failing implementation is logged and skipped (its answer counts as None)."""

FATAL = ("memvisor_page_fault", "memvisor_page_write")
"""Hooks whose failing implementation stops the VM (no safe fallback)."""

log = structlog.get_logger("memvisor.isolation")


def enabled() -> bool:
    """Whether observer hooks are isolated (``MEMVISOR_ISOLATE_PLUGINS``, on by default)."""
    return os.environ.get(ENV_ISOLATE, "1") not in ("0", "", "false", "no")


def isolate(host: Host, builtins: tuple[str, ...]) -> None:
    """Wrap the hook implementations of every plugin of ``host`` not named in ``builtins``."""
    observe = enabled()
    for name in OBSERVED + FATAL:
        for impl in getattr(host.pm.hook, name).get_hookimpls():
            if impl.plugin_name in builtins or getattr(impl.function, "_memvisor_guarded", False):
                continue
            # Plugins registered as objects (tests, embedding programs) are named by their id:
            # name them by their class instead.
            plugin = impl.plugin_name if not impl.plugin_name.isdigit() else type(impl.plugin).__name__
            impl.function = _guard(host, name, plugin, impl.function, swallow=observe and name in OBSERVED)


def _guard(host: Host, hook: str, plugin: str, function, *, swallow: bool):
    @functools.wraps(function)
    def guarded(*args):
        try:
            result = function(*args)
            if hook == "memvisor_memory_pressure" and result:
                host.reclaimed_by[plugin] = host.reclaimed_by.get(plugin, 0) + int(result)
            return result
        except UserError:
            raise
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
            host.record_plugin_failure(plugin, hook, message, handled=swallow)
            if swallow:
                return None
            exc.memvisor_plugin = plugin  # the host names it when it stops the VM
            raise

    guarded._memvisor_guarded = True
    return guarded
