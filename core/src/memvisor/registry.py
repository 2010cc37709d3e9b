"""Named registries that plugins fill through ``memvisor_register_*`` hooks.

A registry is the ``register`` object those hooks receive. Names are unique: registering a name
twice is an error naming both plugins, never silent shadowing.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from memvisor.errors import PluginError

log = structlog.get_logger("memvisor.registry")


class Registry:
    """A mapping from names to registered things, filled by calling the registry.

    :param kind: what is registered ("backend", "workload", ...), used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}
        self._owners: dict[str, str] = {}
        self._owner_types: dict[str, type] = {}
        self.current_plugin = "?"
        self.current_type: type | None = None

    def __call__(self, name: str, value: Any) -> None:
        """Register ``value`` under ``name``; a second registration of a name is an error."""
        if name in self._entries:
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by {self._owners[name]} "
                f"and by {self.current_plugin}"
            )
        self._entries[name] = value
        self._owners[name] = self.current_plugin
        if self.current_type is not None:
            self._owner_types[name] = self.current_type

    def __getitem__(self, name: str) -> Any:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # a name from input may be any value: a list, a table
            from memvisor.plugins import left_out

            reason = left_out(name) if isinstance(name, str) else None
            if reason:
                raise PluginError(f"{self.kind} {name!r}: {reason}") from None
            known = ", ".join(sorted(self._entries)[:20]) or "none"
            raise PluginError(f"unknown {self.kind} {str(name)[:60]!r} (installed: {known})") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def owner(self, name: str) -> str:
        """The plugin that registered ``name``."""
        return self._owners[name]

    def owner_in(self, pm, name: str) -> object | None:
        """The plugin object of plugin manager ``pm`` that registered ``name`` (by its name, or
        an object of the same class registered as it is), or None when ``pm`` has none."""
        plugin = pm.get_plugin(self._owners[name])
        if plugin is None and name in self._owner_types:
            plugin = next((p for p in pm.get_plugins() if type(p) is self._owner_types[name]), None)
        return plugin

    def items(self) -> list[tuple[str, Any]]:
        """``(name, value)`` pairs sorted by name."""
        return sorted(self._entries.items())


class GroupedRegistry(Registry):
    """A registry of named things in groups: ``register(group, thing)`` where ``thing.name``
    is unique within its group (benchmark cases)."""

    def __call__(self, group: str, value: Any) -> None:  # type: ignore[override]
        super().__call__(f"{group}/{value.name}", value)

    def groups(self) -> dict[str, list[Any]]:
        """Registered things by group, in registration order within a group."""
        out: dict[str, list[Any]] = {}
        for key, value in self._entries.items():
            out.setdefault(key.split("/", 1)[0], []).append(value)
        return out


class SettingsRegistry(Registry):
    """The settings classes of plugins, by plugin name (:func:`memvisor_register_settings`):
    ``register(NAME, cls)`` checks that ``cls`` declares every field with
    :func:`memvisor.settings.setting`."""

    def __init__(self):
        super().__init__("settings of plugin")

    def __call__(self, name: str, value: Any) -> None:
        from memvisor.settings import declared

        try:
            declared(value)
        except TypeError as exc:
            raise PluginError(f"plugin {self.current_plugin} declares the settings of {name!r} wrongly: "
                              f"{exc}") from None
        super().__call__(name, value)


def fill(hook_caller: Callable[..., Any], registry: Registry, plugin_manager, only=None) -> Registry:
    """Call a registration hook implementation by implementation, so that a duplicate names
    the plugin that registered each side; ``only``: the plugin objects whose implementations
    are called (all when None)."""
    for impl in reversed(hook_caller.get_hookimpls()):
        if only is not None and not any(impl.plugin is plugin for plugin in only):
            continue
        registry.current_plugin = plugin_manager.get_name(impl.plugin) or repr(impl.plugin)
        # An object registered as it is finds its class's registrations (not a module's).
        registry.current_type = None if isinstance(impl.plugin, types.ModuleType) else type(impl.plugin)
        try:
            impl.function(**{name: registry for name in impl.argnames})
        except PluginError:
            raise
        except Exception as exc:  # one broken plugin must not take the others' entries down
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("plugin failed to register", plugin=registry.current_plugin, kind=registry.kind, error=message)
    registry.current_plugin, registry.current_type = "?", None
    return registry
