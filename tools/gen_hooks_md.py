"""Write docs/hooks.md from memvisor/hookspecs.py (run after changing a hook specification).

    python tools/gen_hooks_md.py

tests/test_docs.py fails while docs/hooks.md and the specifications disagree.
"""

import inspect
import re
from pathlib import Path

from memvisor import hookspecs

ROOT = Path(__file__).resolve().parents[1]

INTRO = """# Hooks

Every hook that memvisor calls, generated from `core/src/memvisor/hookspecs.py` by
`python tools/gen_hooks_md.py` (the test suite checks that this page and the specifications
agree). Kinds of call:

- **decision** -- `firstresult`: the first implementation that returns a value other than
  `None` decides, the rest are not called;
- **observer** -- every implementation is called and return values are ignored;
- **collector** -- every implementation is called and every non-`None` result is kept.

Implement a hook with `@memvisor.hookimpl` on a method (or a module-level function) named
like the hook. An implementation may take fewer arguments than the specification lists.
`tryfirst=True` / `trylast=True` order implementations. See docs/writing-a-plugin.md.
"""


def main() -> None:
    source = inspect.getsource(hookspecs)
    sections: list[tuple[str, list[str]]] = []
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# ---") and i + 1 < len(lines) and lines[i + 1].startswith("# ") \
                and not lines[i + 1].startswith("# ---"):
            sections.append((lines[i + 1][2:].strip(), []))
        m = re.match(r"def (memvisor_\w+)\(", line)
        if m and sections:
            sections[-1][1].append(m.group(1))
    out = [INTRO]
    for title, names in sections:
        if not names:
            continue
        out.append(f"\n## {title.capitalize()}\n")
        for name in names:
            function = getattr(hookspecs, name)
            doc = inspect.cleandoc(function.__doc__ or "")
            out.append(f"### `{name}{str(inspect.signature(function)).replace(chr(39), '')}`\n")
            out.append(doc + "\n")
    (ROOT / "docs" / "hooks.md").write_text("\n".join(out))


if __name__ == "__main__":
    main()
