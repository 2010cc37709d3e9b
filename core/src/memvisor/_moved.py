"""Old import paths of modules that moved inside the core, kept for one release.

The built-in techniques moved below :mod:`memvisor.builtins` (the kernel stays at the top of
the package): ``memvisor.checkpoint`` is :mod:`memvisor.builtins.checkpoint` and
``memvisor.migration`` is :mod:`memvisor.builtins.migration`. An import of an old path (or of a
module below it) gives the module at its new path, the same object, with a
:class:`DeprecationWarning` naming that path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {"memvisor.checkpoint": "memvisor.builtins.checkpoint", "memvisor.migration": "memvisor.builtins.migration"}
"""Old module path: new module path."""


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.target}; import it from there (the old path goes in the next "
                      "release)", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.target)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.real_spec  # the import system set the old path's spec on it


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        for old, new in MOVED.items():
            if fullname == old or fullname.startswith(old + "."):
                return importlib.util.spec_from_loader(fullname, _Alias(new + fullname[len(old):]))
        return None


def install() -> None:
    """Make the old paths importable (once per process)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finder, which would load a second copy
