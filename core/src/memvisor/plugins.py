"""Finding, loading and registering plugins: one fresh plugin manager per host, no global.

Plugins and backends are found through one entry-point group, ``memvisor``: a backend is a
plugin that implements ``memvisor_register_backends``, so both load, list, allow and block the
same way. An entry point names a module or a class; a class is instantiated once per plugin
manager, so two hosts in one process (the two ends of a live migration) never share state.

Environment variables:

``MEMVISOR_PLUGINS``
    Comma-separated allow-list of entry-point names; only these load (the core's built-ins
    always do).
``MEMVISOR_DISABLE_PLUGINS``
    Comma-separated block-list of entry-point names.
``MEMVISOR_TRACE_HOOKS``
    When set (to anything but ``0``), every hook call is logged through structlog with its
    arguments and results.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Iterable
from importlib import metadata

import attrs
import pluggy
import structlog

from memvisor import PROJECT_NAME, hookspecs
from memvisor.errors import PluginError

ENV_ALLOW = "MEMVISOR_PLUGINS"
ENV_BLOCK = "MEMVISOR_DISABLE_PLUGINS"
ENV_TRACE = "MEMVISOR_TRACE_HOOKS"

BUILTIN_MODULES = (
    "memvisor.builtins.defaults",
    "memvisor.builtins.workloads",
    "memvisor.builtins.actions",
    "memvisor.builtins.commands",
    "memvisor.builtins.checkpoints",
    "memvisor.builtins.sweep",
    "memvisor.builtins.migration",
    "memvisor.builtins.selftest",
    "memvisor.builtins.budgets",
)
"""The core's own features, registered as plugins like any other (``trylast`` where they are
defaults that a policy may override)."""

log = structlog.get_logger("memvisor.plugins")


@attrs.frozen
class InstalledPlugin:
    """A plugin found through an entry point, loaded or not.

    :ivar name: the entry-point name, used to select, block and configure the plugin.
    :ivar distribution: the distribution that provides it, e.g. ``memvisor-stats``.
    :ivar version: that distribution's version.
    :ivar target: the loaded module or class, or None when loading failed.
    :ivar error: one line saying why loading failed, or None.
    """

    name: str
    distribution: str
    version: str
    value: str
    target: object = None
    error: str | None = None


def _env_names(variable: str) -> set[str] | None:
    raw = os.environ.get(variable)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _load(ep: metadata.EntryPoint) -> InstalledPlugin:
    dist = ep.dist
    info = dict(
        name=ep.name,
        distribution=dist.metadata["Name"] if dist else "?",
        version=dist.version if dist else "?",
        value=ep.value,
    )
    try:
        return InstalledPlugin(target=ep.load(), **info)
    except Exception as exc:  # a broken plugin must not take the others down
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.warning("plugin failed to load", plugin=ep.name, error=message)
        return InstalledPlugin(error=message, **info)


@functools.cache
def _entry_points() -> tuple[metadata.EntryPoint, ...]:
    return tuple(sorted(metadata.entry_points(group=PROJECT_NAME), key=lambda ep: ep.name))


def left_out(name: str) -> str | None:
    """Why installed plugin ``name`` does not load here (the allow- or block-list leaves it
    out), or None when it is not installed or not left out."""
    if not any(ep.name == name for ep in _entry_points()):
        return None
    allow, block = os.environ.get(ENV_ALLOW), _env_names(ENV_BLOCK) or set()
    if name in block:
        return f"installed, but {ENV_BLOCK}={os.environ[ENV_BLOCK]} leaves it out"
    if allow is not None and name not in (_env_names(ENV_ALLOW) or set()):
        return f"installed, but {ENV_ALLOW}={allow} leaves it out (add {name} to it)"
    return None


def installed_plugins() -> list[InstalledPlugin]:
    """Every plugin installed in this environment that the allow- and block-lists let through,
    loaded (imports are cached by Python, so this is cheap after the first call)."""
    allow, block = _env_names(ENV_ALLOW), _env_names(ENV_BLOCK) or set()
    seen: dict[str, InstalledPlugin] = {}
    for ep in _entry_points():
        if ep.name in block or (allow is not None and ep.name not in allow):
            continue
        if ep.name in seen:  # two distributions claim one name: refuse the ambiguity
            raise PluginError(f"plugin name {ep.name!r} is provided twice ({seen[ep.name].value} and {ep.value})")
        seen[ep.name] = _load(ep)
    return list(seen.values())


def _instantiate(target: object) -> object:
    return target() if inspect.isclass(target) else target


def _trace_hooks(pm: pluggy.PluginManager) -> None:
    trace_log = structlog.get_logger("memvisor.hooks")

    def before(hook_name, hook_impls, kwargs):
        trace_log.info("hook call", hook=hook_name, plugins=[impl.plugin_name for impl in hook_impls],
                       args=sorted(kwargs))

    def after(outcome, hook_name, hook_impls, kwargs):
        exc = outcome.exception
        trace_log.info("hook done", hook=hook_name, error=None if exc is None else repr(exc))

    pm.add_hookcall_monitoring(before, after)


def new_plugin_manager(
    enabled: Iterable[str] | None = None,
    *,
    extra: Iterable[object] = (),
    strict: bool = True,
) -> pluggy.PluginManager:
    """A fresh plugin manager with the hook specifications, the core's built-ins, the installed
    plugins named in ``enabled`` (all installed plugins when None) and ``extra`` objects.

    :param enabled: entry-point names to register; naming one that is not installed, blocked or
        failed to load raises :class:`PluginError` with one line when ``strict``.
    :param extra: plugin objects to register as they are (tests, embedding programs).
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module in BUILTIN_MODULES:
        pm.register(_instantiate(importlib.import_module(module).PLUGIN), name=module)
    installed = {p.name: p for p in installed_plugins()}
    wanted = list(installed) if enabled is None else list(enabled)
    for name in wanted:
        plugin = installed.get(name)
        if plugin is None:
            if strict:
                reason = left_out(name)
                if reason:
                    raise PluginError(f"plugin {name!r}: {reason}")
                known = ", ".join(sorted(installed)) or "none"
                raise PluginError(f"unknown plugin {str(name)[:60]!r} (installed: {known})")
            continue
        if plugin.error is not None:
            if strict and enabled is not None:
                raise PluginError(f"plugin {name!r} ({plugin.distribution}) failed to load: {plugin.error}")
            continue
        pm.register(_instantiate(plugin.target), name=name)
    for obj in extra:
        pm.register(obj)
    pm.check_pending()
    if os.environ.get(ENV_TRACE, "0") not in ("", "0"):
        _trace_hooks(pm)
    return pm


def hooks_of(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Names of the hooks ``plugin`` implements, sorted."""
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
