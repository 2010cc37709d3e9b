"""The API reference of memvisor (docs/api.md): every public name a plugin may use, read from the
code (signatures) and its docstrings. tools/gen_docs.py writes it; tests/test_api_reference.py
fails when a public name has no docstring, when the page is stale, and when a plugin of this
repository uses a name of memvisor that is not in it.

A name is public when it is in a module of :data:`REFERENCE` (in the module's ``__all__`` when it
has one, else defined there), does not start with an underscore, and its docstring does not
start with "Internal". Everything else is private, and so is every module not in
:data:`REFERENCE` (docs/api.md lists them as internal).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re

REFERENCE: tuple[tuple[str, str], ...] = (
    ("memvisor", "markers and constants"),
    ("memvisor.backend", "the Backend interface a policy acts through"),
    ("memvisor.events", "the values hooks receive"),
    ("memvisor.host", "the host and its VMs"),
    ("memvisor.errors", "errors for people and for bugs"),
    ("memvisor.settings", "declared settings"),
    ("memvisor.report", "report sections: headlines, tables and plots"),
    ("memvisor.units", "figures in the units a person reads"),
    ("memvisor.report_html", "report.html's pieces, for pages of a plugin's own (the sweep's)"),
    ("memvisor.registry", "what registration hooks receive"),
    ("memvisor.runner", "running scenarios; the timeline step an action receives"),
    ("memvisor.scenario", "scenario files, sizes and durations"),
    ("memvisor.bench", "benchmark cases"),
    ("memvisor.cli", "the command line: parameter types for plugin commands"),
    ("memvisor.files", "files from outside and outputs"),
    ("memvisor.limits", "bounds on input"),
    ("memvisor.contents", "generated page contents"),
    ("memvisor.identity", "pages by content identity: what Backend.contents hands out, helpers for either form"),
    ("memvisor.workloads", "workloads"),
    ("memvisor.traces", "trace files"),
    ("memvisor.disks", "virtual disks"),
    ("memvisor.budgets", "per-VM budgets"),
    ("memvisor.arrays", "fast array helpers"),
    ("memvisor.metrics", "the core's counters"),
    ("memvisor.footprint", "what a host's state costs in memory (benchmarks)"),
    ("memvisor.plugins", "finding and loading plugins"),
    ("memvisor.logs", "structured logs"),
    ("memvisor.builtins.checkpoint", "the checkpoint format (a built-in technique)"),
    ("memvisor.builtins.checkpoint.vm", "saving and restoring a running VM"),
    ("memvisor.builtins.checkpoint.writer", "writing checkpoint files"),
    ("memvisor.builtins.checkpoint.reader", "reading checkpoint files"),
    ("memvisor.builtins.migration", "live migration (a built-in technique)"),
    ("memvisor.builtins.migration.live", "the migration itself"),
    ("memvisor.builtins.migration.stream", "the migration stream's records (a backend that speaks it)"),
    ("memvisor.testing", "the test kit"),
    ("memvisor.testing.builders", "event batches for tests"),
    ("memvisor.testing.recorder", "recording hook calls"),
    ("memvisor.testing.reference", "the reference model of guest memory"),
    ("memvisor.testing.report_checks", "checks of a written report"),
    ("memvisor.testing.distributions", "plugins built and installed for a test"),
    ("memvisor.testing.fixtures", "pytest fixtures (pytest11)"),
    ("memvisor.testing.integration", "the all-techniques machine (memvisor selftest)"),
)
"""The modules of the reference, in the order of docs/api.md, each with what it is for."""

_SKIPPED_CALLS = ("get_logger", "TypeVar")


def _source(module) -> ast.Module:
    return ast.parse(inspect.getsource(module))


def _attribute_docs(body: list[ast.stmt]) -> dict[str, str]:
    """``NAME = value`` followed by a string: the string, by name."""
    docs = {}
    for statement, following in zip(body, body[1:]):
        targets = statement.targets if isinstance(statement, ast.Assign) else \
            [statement.target] if isinstance(statement, ast.AnnAssign) else []
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                and isinstance(following.value.value, str):
            for target in targets:
                if isinstance(target, ast.Name):
                    docs[target.id] = following.value.value
    return docs


def _skipped(statement: ast.stmt) -> bool:
    value = getattr(statement, "value", None)
    func = getattr(value, "func", None)
    name = getattr(func, "attr", None) or getattr(func, "id", None)
    return name in _SKIPPED_CALLS


def module_names(module) -> list[str]:
    """The public names of ``module``: its ``__all__``, else what it defines without an
    underscore (loggers left out)."""
    if hasattr(module, "__all__"):
        return [n for n in module.__all__ if not n.startswith("_") or n == "__version__"]
    out = []
    for statement in _source(module).body:
        if isinstance(statement, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names = [statement.name]
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)) and not _skipped(statement):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        else:
            continue
        out += [n for n in names if not n.startswith("_") and n not in out]
    return out


def _doc(obj) -> str:
    """An object's own docstring: a class's, a function's or a module's, not the docstring an
    instance inherits from its class (a constant's is its attribute docstring)."""
    import click

    if isinstance(obj, click.Command):  # a command's docstring is its help
        return inspect.cleandoc(obj.help or "")
    if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) or hasattr(obj, "__wrapped__"):
        return inspect.cleandoc(obj.__doc__ or "")
    return ""


def internal(doc: str) -> bool:
    """Whether a docstring says its name is internal."""
    return doc.lstrip().startswith("Internal")


def class_members(cls) -> list[tuple[str, object, str]]:
    """``(name, object, docstring)`` of the public methods, properties and documented class
    attributes defined in ``cls`` itself."""
    try:
        tree = _source(cls)
    except (OSError, TypeError):
        return []
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    attribute_docs = _attribute_docs(body)
    out = []
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = statement.name
            if (name.startswith("_") and name != "__call__") or _foreign(cls, name):
                continue
            member = cls.__dict__.get(name)
            target = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            doc = getattr(target, "__doc__", None) or inspect.getdoc(getattr(cls, name)) or ""
            out.append((name, member, inspect.cleandoc(doc)))
        elif isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name) and not target.id.startswith("_") and not _foreign(cls, target.id):
                    out.append((target.id, None, attribute_docs.get(target.id, "")))
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            name = statement.target.id
            ivar = re.search(rf":ivar {re.escape(name)}:", cls.__doc__ or "")
            if not name.startswith("_") and not ivar and not hasattr(cls, "__attrs_attrs__"):
                out.append((name, None, attribute_docs.get(name, "")))
    return out


def _foreign(cls, name: str) -> bool:
    """Whether ``name`` comes from a base class outside memvisor (click's ``convert``)."""
    return any(name in base.__dict__ for base in cls.__mro__[1:] if not base.__module__.startswith("memvisor"))


def entries(module_name: str) -> list[tuple[str, object, str, list]]:
    """``(name, object, docstring, members)`` of every public name of a module of the
    reference; constants get their attribute docstring."""
    module = importlib.import_module(module_name)
    tree = _source(module)
    tree_docs = _attribute_docs(tree.body)
    for statement in tree.body:  # names a package re-exports: their docs where they are defined
        if isinstance(statement, ast.ImportFrom) and statement.module and statement.module.startswith("memvisor"):
            tree_docs = {**_attribute_docs(_source(importlib.import_module(statement.module)).body), **tree_docs}
    out = []
    for name in module_names(module):
        obj = getattr(module, name)
        doc = tree_docs.get(name) or _doc(obj)
        if internal(doc):
            continue
        members = [m for m in class_members(obj) if not internal(m[2])] if inspect.isclass(obj) else []
        out.append((name, obj, inspect.cleandoc(doc), members))
    return out


def undocumented() -> list[str]:
    """Public names of the reference without a docstring."""
    missing = []
    for module_name, _ in REFERENCE:
        for name, _obj, doc, members in entries(module_name):
            if not doc:
                missing.append(f"{module_name}.{name}")
            missing += [f"{module_name}.{name}.{m}" for m, _, mdoc in members if not mdoc]
    return missing


def public_names() -> dict[str, set[str]]:
    """The public names of each module of the reference."""
    return {module_name: {name for name, *_ in entries(module_name)} for module_name, _ in REFERENCE}


def public_members(cls) -> set[str]:
    """Public members of a class of the reference: methods, properties, class attributes,
    and the instance attributes its docstring documents (``:ivar NAME:``)."""
    names = {name for name, _, doc in class_members(cls) if not internal(doc)}
    for klass in cls.__mro__:
        if klass.__module__.startswith("memvisor"):
            names |= set(re.findall(r":ivar (\w+):", klass.__doc__ or ""))
            names |= {name for name, _, doc in class_members(klass) if not internal(doc)}
    return names


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    sig = re.sub(r"<(?:function|class|built-in function) ([\w.]+)(?: at 0x[0-9a-f]+)?>", r"\1", sig)
    return re.sub(r" at 0x[0-9a-f]+", "", f"{name}{sig}").replace("'", "")


def internal_modules() -> list[str]:
    """The modules of the core that are not in the reference (internal)."""
    import memvisor

    listed = {m for m, _ in REFERENCE}
    found = []
    for info in pkgutil.walk_packages(memvisor.__path__, "memvisor."):
        if info.name not in listed and not info.name.rsplit(".", 1)[-1].startswith("_") \
                and info.name not in ("memvisor.sweep", "memvisor.hookspecs"):
            found.append(info.name)
    return sorted(found)


INTRO = """# API reference

Every public name of memvisor that a plugin may use, generated from the code and its docstrings
by `python tools/gen_docs.py` (the test suite fails when a public name has no docstring, when
this page is stale, and when a plugin of this repository uses a name that is not here). The
hooks are in [hooks.md](hooks.md); how to put them together is in
[writing-a-plugin.md](writing-a-plugin.md).

What is not on this page is private: names with a leading underscore, names whose docstring
starts with "Internal", and the modules listed at the end.
"""


def api_md() -> str:
    """docs/api.md."""
    out = [INTRO, "## Modules\n"]
    out += [f"- [`{m}`](#{m.replace('.', '')}): {what}" for m, what in REFERENCE]
    for module_name, _what in REFERENCE:
        module = importlib.import_module(module_name)
        out.append(f"\n## `{module_name}`\n")
        first = inspect.cleandoc(module.__doc__ or "").split("\n\n")[0]
        out.append(first + "\n")
        for name, obj, doc, members in entries(module_name):
            if inspect.isclass(obj):
                bases = [b.__name__ for b in obj.__bases__ if b is not object]
                out.append(f"### class `{name}`" + (f" ({', '.join(bases)})" if bases else "") + "\n")
                out.append(doc + "\n")
                for member, value, mdoc in members:
                    if isinstance(value, property):
                        out.append(f"#### `{name}.{member}` (property)\n")
                    elif value is None:
                        out.append(f"#### `{name}.{member}`\n")
                    else:
                        function = getattr(value, "__func__", value)
                        abstract = " (abstract)" if getattr(function, "__isabstractmethod__", False) else ""
                        out.append(f"#### `{name}.{_signature(member, function)}`{abstract}\n")
                    out.append(mdoc + "\n")
            elif callable(obj) and not isinstance(obj, type):
                out.append(f"### `{_signature(name, obj)}`\n")
                out.append(doc + "\n")
            else:
                out.append(f"### `{name}`\n")
                value = repr(obj)
                if len(value) <= 80 and " at 0x" not in value:
                    out.append(f"`{name} = {value}`\n")
                out.append(doc + "\n")
    out.append("\n## Internal modules\n")
    out.append("These modules of the core are internal (their names may change without notice):\n")
    out += [f"- `{m}`" for m in internal_modules()]
    return "\n".join(out) + "\n"
