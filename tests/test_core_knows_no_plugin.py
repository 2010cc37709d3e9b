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
    """(entry-point names, distribution and module names) of every plugin under plugins/."""
    entry_points, packages = set(), set()
    for pyproject in (ROOT / "plugins").glob("*/pyproject.toml"):
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
