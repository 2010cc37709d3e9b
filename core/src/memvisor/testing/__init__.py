"""A test kit for plugin authors: test a plugin against the real core.

- :class:`HookRecorder` records every hook call of a host's plugin manager.
- :func:`small_host` builds a small emulated host with your plugin registered.
- :func:`listed_plugin` is your plugin's row of ``memvisor plugins --json`` (the first test of
  every plugin asserts it is there).
- :mod:`memvisor.testing.builders` makes event batches for calling hook implementations
  directly.
- :class:`ReferenceMemory` is the reference model of guest memory: drive the guest through it
  and :meth:`ReferenceMemory.check` asserts every page reads what it should.
- :func:`build_plugin` and :func:`plugins_at` build, install and use a small plugin for a test
  (a plugin's tests that need another plugin install one of their own).

The pytest plugin :mod:`memvisor.testing.fixtures` (registered through ``pytest11``) offers the
same as fixtures. This package imports nothing heavy at import time, because pytest imports it
in every run of an environment where memvisor is installed.
"""

from importlib import import_module

_EXPORTS = {
    "HookCall": "memvisor.testing.recorder",
    "HookRecorder": "memvisor.testing.recorder",
    "ReferenceMemory": "memvisor.testing.reference",
    "small_host": "memvisor.testing.reference",
    "listed_plugin": "memvisor.testing.reference",
    "build_plugin": "memvisor.testing.distributions",
    "plugins_at": "memvisor.testing.distributions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy: pytest imports this package in every run, so numpy and attrs load only when used.
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
