"""Plugin isolation in hook delivery: one plugin's bug does not take the host down with it.

The host wraps every installed plugin's implementation of the hooks below (the core's
built-ins are not wrapped: a bug there is the core's). What happens when one raises depends on
whether the core has a safe fallback for the event:

**Observer hooks** (:data:`OBSERVED`: the traps on traced pages, disk I/O, ticks, NUMA moves,
migration phases, VM creation and destruction, a restore starting, the host stopping, report
sections) and **collectors whose empty answer is safe** (``memvisor_memory_pressure``: nothing
reclaimed; ``memvisor_memory_error``: nothing repaired, the pages are reported lost;
``memvisor_describe_pages``: the pages go as data): the failure is logged with the plugin's
name and kept in :attr:`memvisor.host.Host.plugin_failures` (and the report); the plugin's
answer counts as None (a failed report hook contributes no section), the other plugins still
run, and the VM goes on.

**Fault and write hooks** (:data:`FATAL`): there is no safe fallback — the failing plugin may
own the faulting page (zero-filling it would hand the guest a wrong page) or may need to act
before the write lands (a copy before write). The VM is stopped cleanly
(:meth:`memvisor.host.Host.stop_vm`) with the reason, and the exception reaches the caller; the
VM's next batch raises :class:`memvisor.errors.VMStoppedError`. A fault hook that returns pages
it did not make present fails the same way.

**``memvisor_host_started``**: a plugin that cannot start refuses the run. Its
:class:`memvisor.errors.UserError` (bad settings, a capability the backend lacks) is its one
line; any other exception becomes a :class:`memvisor.errors.PluginError` of one line naming the
plugin (``plugin 'x' failed to start: ValueError: ...``).

**Not isolated**, because a failure there has no safe answer and the caller reports it: the
decision hooks of checkpoints (``memvisor_checkpoint_save`` / ``_restore``: the step fails),
``memvisor_resolve_records`` (the restore or migration is refused before the VM changes),
hooks that plugins offer each other (the asking plugin decides), and the registration hooks
(a failing one is logged and skipped when the registries are filled).

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

from memvisor.errors import PluginError, UserError

if TYPE_CHECKING:  # pragma: no cover
    from memvisor.host import Host

ENV_ISOLATE = "MEMVISOR_ISOLATE_PLUGINS"

OBSERVED = ("memvisor_traced_access", "memvisor_page_accessed", "memvisor_disk_io", "memvisor_tick",
            "memvisor_vcpus_moved", "memvisor_migration_phase", "memvisor_memory_pressure", "memvisor_memory_error",
            "memvisor_vm_created", "memvisor_vm_destroyed", "memvisor_restore_starting", "memvisor_host_stopping",
            "memvisor_report", "memvisor_describe_pages")
"""Hooks whose failing implementation is logged and skipped (its answer counts as None)."""

FATAL = ("memvisor_page_fault", "memvisor_write_trap", "memvisor_page_write")
"""Hooks whose failing implementation stops the VM (no safe fallback)."""

STARTING = ("memvisor_host_started",)
"""Hooks whose failing implementation refuses the run in one line naming the plugin."""

NOT_ISOLATED = ("memvisor_checkpoint_save", "memvisor_checkpoint_restore", "memvisor_resolve_records",
                "memvisor_selftest", "memvisor_register_actions", "memvisor_register_backends",
                "memvisor_register_benchmarks", "memvisor_register_commands", "memvisor_register_hookspecs",
                "memvisor_register_settings", "memvisor_register_workloads")
"""Hooks whose failure reaches the caller, which reports it (docs/reliability.md): the decisions
of checkpoints (the step fails), the resolution of records (the restore or migration is refused
before the VM changes), ``memvisor selftest``'s contributions (the selftest fails) and the
registration hooks (the registry logs and skips a failing one)."""

log = structlog.get_logger("memvisor.isolation")


def enabled() -> bool:
    """Whether observer hooks are isolated (``MEMVISOR_ISOLATE_PLUGINS``, on by default)."""
    return os.environ.get(ENV_ISOLATE, "1") not in ("0", "", "false", "no")


def isolate(host: Host, builtins: tuple[str, ...]) -> None:
    """Wrap the hook implementations of every plugin of ``host`` not named in ``builtins``."""
    observe = enabled()
    for name in OBSERVED + FATAL + STARTING:
        for impl in getattr(host.pm.hook, name).get_hookimpls():
            if impl.plugin_name in builtins or getattr(impl.function, "_memvisor_guarded", False):
                continue
            # Plugins registered as objects (tests, embedding programs) are named by their id:
            # name them by their class instead.
            plugin = impl.plugin_name if not impl.plugin_name.isdigit() else type(impl.plugin).__name__
            vm_at = impl.argnames.index("vm") if "vm" in impl.argnames else None
            impl.function = _guard(host, name, plugin, impl.function, swallow=observe and name in OBSERVED,
                                   refuse=observe and name in STARTING, vm_at=vm_at)


def _guard(host: Host, hook: str, plugin: str, function, *, swallow: bool, refuse: bool, vm_at: int | None):
    @functools.wraps(function)
    def guarded(*args):
        try:
            result = function(*args)
            if result is None:
                return None
            if hook == "memvisor_memory_pressure" and result:
                host.reclaimed_by[plugin] = host.reclaimed_by.get(plugin, 0) + int(result)
            elif hook == "memvisor_page_fault" and vm_at is not None:
                host.served_faults(args[vm_at], plugin, result)
            return result
        except UserError:
            raise
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
            if refuse:
                raise PluginError(f"plugin {plugin!r} failed to start: {message}") from exc
            host.record_plugin_failure(plugin, hook, message, handled=swallow)
            if swallow:
                return None
            exc.memvisor_plugin = plugin  # the host names it when it stops the VM
            raise

    guarded._memvisor_guarded = True
    return guarded
