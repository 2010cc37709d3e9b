"""Meta-tests: the docs and the tests are held to the hook specifications (the datasette way).

Every hook must have a heading in docs/hooks.md with its exact signature, and a test named
test_hook_<name> somewhere in the repository's tests.
"""

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from memvisor import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def _offered() -> tuple[str, ...]:
    from memvisor.plugins import new_plugin_manager, offered_hooks

    return tuple(sorted(offered_hooks(new_plugin_manager(None, strict=False))))


OFFERED = _offered()
"""Hooks the installed plugins offer each other (memvisor_register_hookspecs)."""
HOOKS = hookspecs.HOOK_NAMES + OFFERED


def signature(name: str) -> str:
    """The signature as docs/hooks.md must show it: name(arg: type, ...) -> return."""
    if name in OFFERED:
        from memvisor.plugins import new_plugin_manager, offered_hooks

        function = offered_hooks(new_plugin_manager(None, strict=False))[name].spec
    else:
        function = getattr(hookspecs, name)
    sig = inspect.signature(function)
    sig = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "self"])
    return f"{name}{sig}".replace("'", "")


def test_every_hook_is_in_hookspecs():
    """The spec module lists the hooks that the core is built around."""
    for name in ("memvisor_page_fault", "memvisor_traced_access", "memvisor_write_trap", "memvisor_memory_pressure",
                 "memvisor_tick", "memvisor_report"):
        assert name in HOOKS


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_docs_heading_with_exact_signature(name):
    """docs/hooks.md has a heading with the hook's exact signature."""
    docs = (ROOT / "docs" / "hooks.md").read_text()
    headings = re.findall(r"^### `(.+)`$", docs, flags=re.M)
    assert signature(name) in headings, f"docs/hooks.md lacks the heading ### `{signature(name)}`"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_test(name):
    """Some test in the repository is named test_hook_<name>."""
    pattern = re.compile(rf"^(def |async def )?test_hook_{name}\b|^test_hook_{name} =", flags=re.M)
    files = [p for p in ROOT.glob("**/tests/**/*.py") if ".venv" not in p.parts and ".tox" not in p.parts]
    assert any(pattern.search(p.read_text()) for p in files), f"no test named test_hook_{name}"


def test_docs_hooks_md_lists_no_stale_hook():
    """docs/hooks.md documents no hook that the specs no longer have."""
    docs = (ROOT / "docs" / "hooks.md").read_text()
    documented = {h.split("(")[0] for h in re.findall(r"^### `(.+)`$", docs, flags=re.M)}
    assert documented == set(HOOKS)


def test_the_plugins_of_this_repository_offer_page_heat_and_giveable_pages():
    """The two hooks the core used to specify are declared by the plugins that ask them."""
    assert {"memvisor_page_heat", "memvisor_giveable_pages"} <= set(OFFERED)
    assert not {"memvisor_page_heat", "memvisor_giveable_pages"} & set(hookspecs.HOOK_NAMES)


def test_generated_docs_are_current():
    """docs/hooks.md and every plugin's settings table in the docs are what tools/gen_docs.py
    writes from the code now."""
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
    gen_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_docs)
    stale = [str(path.relative_to(ROOT)) for path, text in gen_docs.generated().items() if path.read_text() != text]
    assert not stale, f"stale (run python tools/gen_docs.py): {', '.join(stale)}"


def test_every_installed_plugin_with_settings_has_them_in_its_docs():
    """A plugin of this repository that declares settings has its generated table in the docs."""
    from memvisor.settings import installed

    docs = "".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    blocks = set(re.findall(r"<!-- settings: ([\w-]+) ", docs))
    in_repo = {name for name in installed() if name != "stats"}  # stats has none to show
    assert in_repo <= blocks, f"no settings table for {sorted(in_repo - blocks)}"
