"""Meta-tests of the API reference (docs/api.md, tools/api_reference.py): every public name a
plugin may use is documented, and the plugins of this repository use only what it lists — the
names they import from memvisor, and the members of the host and the backend they touch."""

import ast
import importlib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reference():
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "tools" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _reference()


def plugin_sources() -> list[Path]:
    """The source files of every distribution of this repository but the core."""
    return sorted(p for folder in ("plugins", "hypervisor_backends") for p in (ROOT / folder).glob("*/src/**/*.py"))


def test_every_public_name_of_the_reference_has_a_docstring():
    """A public name without a docstring would be in the reference with nothing to say."""
    assert REF.undocumented() == []


def test_the_plugins_import_only_public_names_of_the_reference():
    """`from memvisor.X import Y` in a plugin: X is a module of the reference and Y one of its
    public names (or a public submodule of it)."""
    public = REF.public_names()
    modules = set(public)
    bad = []
    for path in plugin_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "memvisor":
                if node.module not in modules:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: module {node.module} is internal")
                    continue
                for alias in node.names:
                    if alias.name not in public[node.module] and f"{node.module}.{alias.name}" not in modules:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name} is not public")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("memvisor.") and alias.name not in modules:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: module {alias.name} is internal")
    assert not bad, "\n".join(bad)


def _host_expression(node: ast.AST) -> str | None:
    """``"host"`` for ``host``, ``self.host``, ``x.host``; ``"backend"`` for ``host.backend``,
    ``backend``; else None."""
    if isinstance(node, ast.Name) and node.id in ("host", "backend"):
        return node.id
    if isinstance(node, ast.Attribute) and node.attr in ("host", "backend"):
        if node.attr == "backend" and _host_expression(node.value) != "host" and not (
                isinstance(node.value, ast.Name) and node.value.id == "self"):
            return None
        return node.attr if not (node.attr == "backend" and isinstance(node.value, ast.Name)
                                 and node.value.id == "self") else None
    return None


def test_the_plugins_touch_only_public_members_of_the_host_and_the_backend():
    """`host.X` and `host.backend.X` in a plugin: X is a public member of Host or Backend
    (a method, a property, or an attribute their docstring documents). A backend's own
    distribution may reach into its own backend (its benchmarks do)."""
    from memvisor.backend import Backend
    from memvisor.host import Host

    members = {"host": REF.public_members(Host), "backend": REF.public_members(Backend)}
    bad = []
    for path in plugin_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                kind = _host_expression(node.value)
                if kind == "backend" and "hypervisor_backends" in path.parts:
                    continue
                if kind is not None and node.attr not in members[kind] and not node.attr.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {kind}.{node.attr} is not public")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_reference_lists_the_internal_modules():
    """Every module of the core is either in the reference or listed as internal."""
    text = (ROOT / "docs" / "api.md").read_text()
    for module in REF.internal_modules():
        assert f"- `{module}`" in text
    assert "memvisor.isolation" in REF.internal_modules() and "memvisor.host" not in REF.internal_modules()
