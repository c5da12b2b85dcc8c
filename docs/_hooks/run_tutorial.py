"""Run one tutorial script and write its page: ``run_tutorial.py SCRIPT OUT_DIR``.

The script is in the "percent" format (as jupytext and VS Code read it): ``# %% [markdown]``
starts a cell of text written as ``# `` comments, ``# %%`` starts a cell of code.  The code
cells run in order in one namespace, from the repository root; what each prints is kept,
and every matplotlib figure left open by a cell is saved as ``OUT_DIR/<stem>-<n>.png``
and closed.  ``OUT_DIR/page.md`` gets the text, the code, its output and the figures.
"""

from __future__ import annotations

import contextlib
import io
import platform
import re
import sys
import time
import traceback
import warnings
from pathlib import Path


def cells(source: str) -> list[tuple[str, str, int]]:
    """[(kind, text, first line)] with kind "markdown" or "code"."""
    out: list[tuple[str, list[str], int]] = []
    kind, lines, first = "code", [], 1
    for number, line in enumerate(source.splitlines(), 1):
        m = re.match(r"#\s*%%(.*)$", line)
        if m:
            if any(x.strip() for x in lines):
                out.append((kind, lines, first))
            kind = "markdown" if "[markdown]" in m.group(1) else "code"
            lines, first = [], number + 1
            continue
        if kind == "markdown":
            line = re.sub(r"^# ?", "", line)
        lines.append(line)
    if any(x.strip() for x in lines):
        out.append((kind, lines, first))
    result = []
    for kind, lines, first in out:
        while lines and not lines[0].strip():
            lines, first = lines[1:], first + 1
        result.append((kind, "\n".join(lines).rstrip("\n"), first))
    return result


def main(script: Path, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Warnings read as the user would see them in a notebook: category and message.
    warnings.formatwarning = lambda message, category, *args, **kwargs: (
        f"{category.__name__}: {message}\n"
    )
    page: list[str] = []
    namespace = {"__name__": "__main__", "__file__": str(script)}
    figure_count = 0
    started = time.perf_counter()
    for kind, text, first in cells(script.read_text(encoding="utf-8")):
        if kind == "markdown":
            page += [text, ""]
            if len(page) == 2:
                page += [
                    f"*This page is the output of [`{script.name}`]({script.name}), run when "
                    "the site was built: the numbers and figures below come from that run.*",
                    "",
                ]
            continue
        page += ["```python", text, "```", ""]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            try:
                # Padded so that a traceback gives the script's own line numbers.
                exec(compile("\n" * (first - 1) + text, str(script), "exec"), namespace)
            except BaseException:
                sys.__stderr__.write(buffer.getvalue())
                traceback.print_exc(file=sys.__stderr__)
                raise SystemExit(1) from None
        output = buffer.getvalue()
        # Progress bars redraw with carriage returns; keep what the last draw shows.
        output = "\n".join(line.split("\r")[-1] for line in output.splitlines()).strip("\n")
        if output.strip():
            page += ["```text", output, "```", ""]
        for number in plt.get_fignums():
            figure_count += 1
            name = f"{script.stem}-{figure_count}.png"
            plt.figure(number).savefig(out_dir / name, dpi=90, bbox_inches="tight")
            page += [f"![figure {figure_count}]({name})", ""]
        plt.close("all")
    seconds = time.perf_counter() - started
    page += [
        "---",
        "",
        f"*Ran in {seconds:.0f} s on {platform.machine()} ({platform.system()}, "
        f"Python {platform.python_version()}) when this site was built.*",
        "",
    ]
    (out_dir / "page.md").write_text("\n".join(page), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
