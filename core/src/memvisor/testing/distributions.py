"""Plugins built and installed for a test: a plugin's tests that need another plugin (one that
reports, one that offers a hook) install a small one of their own rather than depend on a
distribution of this repository, and a third party's plugin is tested as its users install it.

:func:`build_plugin` writes a distribution of one module and pip-installs it into a folder;
:func:`plugins_at` makes the plugins of that folder visible to this process and to the ones it
starts (``memvisor`` subprocesses, Dask workers), and clears memvisor's caches of the
installed plugins on the way in and out.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{distribution}"
version = "{version}"

[project.entry-points.memvisor]
{name} = "{module}:{target}"

[tool.setuptools]
py-modules = ["{module}"]
"""
"""The pyproject.toml of a plugin :func:`build_plugin` writes (setuptools, one module)."""


def build_plugin(folder: Path | str, name: str, source: str, *, target: str, distribution: str | None = None,
                 module: str | None = None, version: str = "0.1.0") -> Path:
    """Write plugin ``name`` as a distribution of one module (``source``, whose ``target`` the
    entry point names) under ``folder`` and pip-install it, without dependencies, into
    ``folder/site``; returns that folder (several plugins may share it).

    :param distribution: the distribution's name (``memvisor-NAME`` by default).
    :param module: the module's name (``memvisor_NAME`` by default).
    """
    folder = Path(folder)
    distribution = distribution or f"memvisor-{name}"
    module = module or f"memvisor_{name.replace('-', '_')}"
    src = folder / distribution
    src.mkdir(parents=True)
    (src / "pyproject.toml").write_text(PYPROJECT.format(distribution=distribution, version=version, name=name,
                                                         module=module, target=target))
    (src / f"{module}.py").write_text(textwrap.dedent(source))
    site = folder / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(src)],
                   check=True, capture_output=True)
    return site


def _forget_installed() -> None:
    from memvisor import plugins, settings

    plugins._entry_points.cache_clear()
    settings._installed.cache_clear()


@contextlib.contextmanager
def plugins_at(site: Path | str) -> Iterator[None]:
    """Within the block, the plugins installed in ``site`` are installed for memvisor: in this
    process (``sys.path``) and in the processes it starts (``PYTHONPATH``)."""
    import importlib

    site = str(site)
    old = os.environ.get("PYTHONPATH")
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = site if not old else f"{site}{os.pathsep}{old}"
    importlib.invalidate_caches()
    _forget_installed()
    try:
        yield
    finally:
        sys.path.remove(site)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        _forget_installed()
