"""Examples that cannot drift: every ```python block of README.md and docs/**/*.md runs.

One test per page; the blocks of a page run in order in one namespace, as a reader
would paste them into one session.  A block preceded by the line
``<!-- norun: reason -->`` is only compiled (a syntax check), not run.  Blocks run in a
scratch directory whose top-level entries link to the repository's, so the relative
paths of the examples (``examples/data/...``) resolve and the files they write land in
the scratch directory.  Warnings are errors here as everywhere in the suite: an example
that warns must say so and catch it.

The tutorials (``docs/tutorials/*.py``) are run by the site build (``make docs``), which
fails when one raises; here they are compiled only.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")
NORUN = re.compile(r"^\s*<!--\s*norun:\s*(?P<reason>\S.*?)\s*-->\s*$")


def markdown_pages() -> list[Path]:
    pages = [ROOT / "README.md"]
    pages += sorted(p for p in (ROOT / "docs").rglob("*.md") if "_hooks" not in p.parts)
    return [p for p in pages if p.exists()]


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """[(first line number, code, norun reason or None)] of the ```python blocks."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), m.group("indent")
        language = m.group("info").strip().split(" ")[0].lstrip("{.").rstrip("}")
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if language in ("python", "py"):
            body = [
                line[len(indent) :] if line.startswith(indent) else line for line in lines[start:j]
            ]
            previous = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            norun = NORUN.match(previous)
            blocks.append(
                (
                    start + 1,
                    textwrap.dedent("\n".join(body)),
                    norun.group("reason") if norun else None,
                )
            )
        i = j + 1
    return blocks


PAGES = [p for p in markdown_pages() if python_blocks(p.read_text(encoding="utf-8"))]


def test_block_parser():
    text = (
        "# t\n\n```python\nx = 1\n```\n\n<!-- norun: needs a GPU -->\n```python\ny = 2\n```\n"
        "- item\n\n  ```python\n  z = x + 1\n  ```\n\n```text\nnot code\n```\n"
    )
    assert python_blocks(text) == [
        (4, "x = 1", None),
        (9, "y = 2", "needs a GPU"),
        (14, "z = x + 1", None),
    ]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_examples_run(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    # As from the repository root: `import examples.eight_schools` works.
    monkeypatch.syspath_prepend(str(tmp_path))
    relative = page.relative_to(ROOT)
    namespace = {"__name__": "__docs__"}
    try:
        for line, code, norun in python_blocks(page.read_text(encoding="utf-8")):
            compiled = compile(code, f"{relative}, block at line {line}", "exec")
            if norun is None:
                exec(compiled, namespace)
    finally:
        plt.close("all")


def test_tutorial_scripts_compile():
    for script in sorted((ROOT / "docs" / "tutorials").glob("*.py")):
        compile(script.read_text(encoding="utf-8"), str(script), "exec")
