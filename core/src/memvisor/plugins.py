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
"""The environment variable of the allow-list of plugins."""
ENV_BLOCK = "MEMVISOR_DISABLE_PLUGINS"
"""The environment variable of the block-list of plugins."""
ENV_TRACE = "MEMVISOR_TRACE_HOOKS"
"""The environment variable that turns the hook trace on."""

BUILTIN_MODULES = (
    "memvisor.builtins.defaults",
    "memvisor.builtins.workloads",
    "memvisor.builtins.actions",
    "memvisor.builtins.commands",
    "memvisor.builtins.checkpoint.plugin",
    "memvisor.builtins.migration.plugin",
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
    :ivar distribution: the distribution that provides it, e.g. ``memvisor-hotcount``.
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
    add_offered_hookspecs(pm)
    _accept_formerly_core(pm)
    pm.check_pending()
    if os.environ.get(ENV_TRACE, "0") not in ("", "0"):
        _trace_hooks(pm)
    return pm


FORMERLY_CORE = ("memvisor_page_heat", "memvisor_giveable_pages")
"""Hooks that the core specified until plugins declared them themselves
(:func:`memvisor_register_hookspecs`): an implementation written for the core's spec still
loads where no plugin declares them (with a deprecation warning) for one release."""


@attrs.frozen
class OfferedHook:
    """A hook that plugins offer each other: its specification (the first declaration) and
    the plugins that declare it."""

    name: str
    spec: object
    opts: dict
    plugins: tuple[str, ...]


def offered_hooks(pm: pluggy.PluginManager) -> dict[str, OfferedHook]:
    """The hooks the plugins of ``pm`` declare (:func:`memvisor_register_hookspecs`), checked:
    a hook declared by several plugins (each that asks it: plugins never import each other)
    must be declared alike, the same arguments and the same kind of call, else
    :class:`PluginError` names both; a name must start with ``memvisor_`` and not be the
    core's."""
    found: dict[str, OfferedHook] = {}
    for impl in reversed(pm.hook.memvisor_register_hookspecs.get_hookimpls()):
        owner = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(namespace, owner=owner):
            _declared(pm, namespace, owner, found)

        impl.function(register=register) if "register" in impl.argnames else impl.function()
    return found


def _declared(pm: pluggy.PluginManager, namespace, owner: str, found: dict[str, OfferedHook]) -> None:
    names = [name for name in dir(namespace) if pm.parse_hookspec_opts(namespace, name) is not None]
    if not names:
        raise PluginError(f"plugin {owner!r} registers hook specifications but {namespace!r} has none "
                          f"(mark them with @memvisor.hookspec)")
    for name in names:
        if not name.startswith(f"{PROJECT_NAME}_"):
            raise PluginError(f"plugin {owner!r} declares hook {name!r}: hook names start with {PROJECT_NAME}_")
        if name in hookspecs.HOOK_NAMES:
            raise PluginError(f"plugin {owner!r} declares {name}, which is a hook of the core")
        spec, opts = getattr(namespace, name), dict(pm.parse_hookspec_opts(namespace, name))
        if name in found:
            first = found[name]
            if _shape(spec, opts) != _shape(first.spec, first.opts):
                raise PluginError(f"plugin {owner!r} declares {name} otherwise than plugin {first.plugins[0]!r} "
                                  f"(arguments {_shape(spec, opts)[0]} against {_shape(first.spec, first.opts)[0]}, "
                                  f"or the kind of call)")
            found[name] = attrs.evolve(first, plugins=(*first.plugins, owner))
        else:
            found[name] = OfferedHook(name, spec, opts, (owner,))


def _shape(spec, opts: dict) -> tuple:
    arguments = tuple(p.name for p in inspect.signature(spec).parameters.values() if p.name != "self")
    return arguments, bool(opts.get("firstresult")), bool(opts.get("historic"))


def add_offered_hookspecs(pm: pluggy.PluginManager) -> dict[str, OfferedHook]:
    """Add to ``pm`` the specifications of the hooks its plugins offer each other."""
    offered = offered_hooks(pm)
    for hook in offered.values():
        pm.add_hookspecs(type(f"{hook.plugins[0]}_specs", (), {hook.name: hook.spec}))
    return offered


def _accept_formerly_core(pm: pluggy.PluginManager) -> None:
    import warnings

    for name in FORMERLY_CORE:
        caller = getattr(pm.hook, name, None)
        if caller is None or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                warnings.warn(DeprecationWarning(
                    f"plugin {impl.plugin_name!r} implements {name}, which plugins now declare themselves: "
                    f"mark it @hookimpl(optionalhook=True); it is required in the next release"), stacklevel=2)
                impl.optionalhook = True


def hooks_of(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Names of the hooks ``plugin`` implements, sorted."""
    return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
