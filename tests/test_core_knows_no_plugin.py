"""The core distribution holds no module that names a plugin of this repository: no import of
one, no string that is one's entry-point name, distribution or module (a capability that shares
a plugin's name, such as ``numa``, is the backend's word), and no docstring naming one's
distribution or module. Plugins take part through hooks and entry points only."""

import ast
import re
import tomllib
from pathlib import Path

from memvisor.backend import Capability

ROOT = Path(__file__).resolve().parents[1]

MOVED = {"sweep.py"}
"""Modules of the core that only fail with one line naming where they went (kept one release)."""


def plugin_names() -> tuple[set[str], set[str]]:
    """(entry-point names, distribution and module names) of every plugin under plugins/ and
    every backend under hypervisor_backends/ but the emulator (which the core depends on)."""
    entry_points, packages = set(), set()
    pyprojects = [*(ROOT / "plugins").glob("*/pyproject.toml"),
                  *(ROOT / "hypervisor_backends").glob("*/pyproject.toml")]
    for pyproject in pyprojects:
        if pyproject.parent.name == "memvisor-backend-emulator":  # the core's dependency, its default backend
            continue
        project = tomllib.loads(pyproject.read_text())["project"]
        packages.add(project["name"])
        for name, target in project.get("entry-points", {}).get("memvisor", {}).items():
            entry_points.add(name)
            packages.add(target.split(":")[0].split(".")[0])
    return entry_points, packages


def docstrings(tree: ast.AST) -> set[int]:
    """Ids of the docstring constants of a module (attribute docstrings included)."""
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            for statement in body:
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                    out.add(id(statement.value))
    return out


def test_the_core_names_no_plugin_of_this_repository():
    entry_points, packages = plugin_names()
    assert {"balloon", "diskmap", "mrc", "numa", "sharing", "stats"} <= entry_points
    found = []
    for path in sorted((ROOT / "core" / "src").rglob("*.py")):
        if path.name in MOVED and path.parent.name == "memvisor":
            continue
        tree = ast.parse(path.read_text())
        docs = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names]
                if isinstance(node, ast.ImportFrom) and node.module:
                    modules.append(node.module)
                found += [f"{path.name}:{node.lineno} imports {m}" for m in modules if m.split(".")[0] in packages]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                words = set(re.findall(r"[\w.-]+", node.value))
                named = words & packages if id(node) in docs else (words & (entry_points | packages))
                named -= set(Capability.ALL) if node.value in Capability.ALL else set()
                found += [f"{path.name}:{node.lineno} names {sorted(named)}"] if named else []
    assert not found, "the core names plugins of this repository:\n" + "\n".join(found)


def test_an_old_import_path_of_a_moved_module_names_the_new_one():
    """`import memvisor.sweep` (the sweep was in the core) fails in one line naming memvisor_sweep."""
    import pytest

    with pytest.raises(ImportError, match=r"^memvisor.sweep moved out of the core: .*import memvisor_sweep"):
        import memvisor.sweep  # noqa: F401


def test_the_old_paths_of_the_built_in_techniques_still_import_with_a_warning():
    """memvisor.checkpoint and memvisor.migration moved below memvisor.builtins: a plugin
    written against the old paths still imports the same objects, warned once per module with
    the new path."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "from memvisor.builtins.migration.live import LiveMigration\n"
            "from memvisor.builtins.checkpoint import CheckpointReader\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    from memvisor.migration.live import LiveMigration as old_live\n"
            "    from memvisor.checkpoint import CheckpointReader as old_reader\n"
            "assert old_live is LiveMigration and old_reader is CheckpointReader\n"
            "for w in caught: print(w.category.__name__, w.message)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "DeprecationWarning memvisor.migration moved to memvisor.builtins.migration; import it from there "
        "(the old path goes in the next release)",
        "DeprecationWarning memvisor.migration.live moved to memvisor.builtins.migration.live; import it from there "
        "(the old path goes in the next release)",
        "DeprecationWarning memvisor.checkpoint moved to memvisor.builtins.checkpoint; import it from there "
        "(the old path goes in the next release)",
    ]


def test_the_kernel_sits_above_the_built_in_techniques():
    """The core's folder shows which is which: the built-in techniques are packages below
    memvisor.builtins, and no kernel module imports them at its top (they are plugins of the
    kernel, as pytest's built-ins are of its hook specs)."""
    core = ROOT / "core" / "src" / "memvisor"
    assert {"checkpoint", "migration"} <= {p.name for p in (core / "builtins").iterdir() if p.is_dir()}
    assert not (core / "checkpoint").exists() and not (core / "migration").exists()
    kernel = ("backend", "events", "host", "hookspecs", "plugins", "scenario", "report", "runner", "settings",
              "registry", "errors", "metrics", "budgets", "disks", "isolation")
    found = []
    for name in kernel:
        tree = ast.parse((core / f"{name}.py").read_text())
        for node in tree.body:  # imports at module level only: a lazy import inside a function is a call
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memvisor.builtins"):
                found.append(f"{name}.py:{node.lineno} imports {node.module}")
    assert not found, "\n".join(found)
