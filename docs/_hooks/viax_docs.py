"""MkDocs hook: the generated parts of the viax site.

* API reference: one page per namespace (``viax``, ``viax.conjugate``) plus one per public
  module, listing every name in ``__all__`` as a mkdocstrings ``:::`` block, so a name
  added to ``__all__`` appears on the next build with no edit here.
* Benchmarks: one page per ``benchmarks/results/*.json`` (command, date, machine, tables).
* Tutorials: every ``docs/tutorials/<name>.py`` (a script in the "percent" format:
  ``# %% [markdown]`` cells of text, ``# %%`` cells of code) is run by
  ``docs/_hooks/run_tutorial.py`` in a fresh process when the site is built; its text,
  code, printed output and matplotlib figures become ``tutorials/<name>.md``.
  A tutorial that raises fails the build.
* Navigation: the tutorials, the reference, the benchmark pages and every page under
  ``docs/guide/`` are added to the nav by glob, so guide pages written later need no edit.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.viax_docs")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
NAMESPACES = ("viax", "viax.conjugate")

# Tutorials that other work will add; until their scripts exist the nav shows a page
# pointing at the guide that documents the feature: {stem: (title, guide page, what)}.
# Empty now: the minibatch/Parquet and VAE tutorials are real scripts.
PLACEHOLDERS: dict[str, tuple[str, str, str]] = {}


# --------------------------------------------------------------------------- nav


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").replace("_", " ").capitalize()


def _tutorial_scripts() -> list[Path]:
    return sorted(p for p in (DOCS / "tutorials").glob("*.py") if not p.name.startswith("_"))


def _script_title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#\s*#\s+(.*)", line)
        if m:
            return m.group(1).strip()
    return path.stem


def _reference_pages() -> list[tuple[str, str, str]]:
    """(title, page path, namespace or module) for the API reference."""
    pages = []
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        pages.append((f"{namespace}", f"reference/{namespace}.md", namespace))
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.ismodule(value) and value.__name__ not in NAMESPACES:
                pages.append((value.__name__, f"reference/{value.__name__}.md", value.__name__))
    return pages


def _benchmark_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def _static_benchmark_pages() -> list[Path]:
    """Hand-written pages under docs/benchmarks/ (readings of the generated tables)."""
    return sorted(p for p in (DOCS / "benchmarks").glob("*.md") if p.name != "index.md")


def _guide_pages() -> list[Path]:
    return sorted(p for p in (DOCS / "guide").glob("*.md") if p.name != "index.md")


def _guide_index() -> str:
    lines = [
        "# Guides",
        "",
        "One page per feature: what it does, how to call it, what was measured.",
        "",
    ]
    for page in _guide_pages():
        paragraphs = [
            block.strip()
            for block in page.read_text(encoding="utf-8").split("\n\n")
            if block.strip() and not block.lstrip().startswith(("#", "```", "<!--", "|", "!!!"))
        ]
        summary = paragraphs[0].replace("\n", " ") if paragraphs else ""
        if len(summary) > 300:
            summary = summary[:300].rsplit(" ", 1)[0] + " …"
        # Relative links of the page's first paragraph would point elsewhere from here.
        summary = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", summary)
        lines += [f"- [{_title(page)}]({page.name}): {summary}"]
    return "\n".join(lines) + "\n"


def on_config(config):
    sys.path.insert(0, str(ROOT / "src"))
    nav = config["nav"]
    for entry in nav:
        (section,) = entry
        if section == "Tutorials":
            items = [{_script_title(p): f"tutorials/{p.stem}.md"} for p in _tutorial_scripts()]
            present = {p.stem for p in _tutorial_scripts()}
            items += [
                {title: f"tutorials/{stem}.md"}
                for stem, (title, _, _) in PLACEHOLDERS.items()
                if stem not in present
            ]
            entry[section] = ["tutorials/index.md", *items]
        elif section == "Guides":
            entry[section] = ["guide/index.md"] + [
                {_title(p): f"guide/{p.name}"} for p in _guide_pages()
            ]
        elif section == "API reference":
            entry[section] = ["reference/index.md"] + [
                {title: path} for title, path, _ in _reference_pages()
            ]
        elif section == "Benchmarks":
            entry[section] = (
                ["benchmarks/index.md"]
                + [{_title(p): f"benchmarks/{p.name}"} for p in _static_benchmark_pages()]
                + [
                    {p.stem.replace("_", " "): f"benchmarks/{p.stem}.md"}
                    for p in _benchmark_files()
                ]
            )
    config["nav"] = [e for e in nav if not (isinstance(e, dict) and list(e.values()) == [[]])]
    return config


# --------------------------------------------------------------------------- reference


def _reference_markdown(namespace: str) -> str:
    module = importlib.import_module(namespace)
    lines = [f"# `{namespace}`", ""]
    doc = inspect.getdoc(module) or ""
    names = getattr(module, "__all__", None)
    if names is None or namespace not in NAMESPACES:
        # A public module: its docstring and members, rendered by mkdocstrings.
        lines += [f"::: {namespace}", "    options:", "      show_root_heading: false", ""]
        return "\n".join(lines)
    lines += [doc, "", f"Every name in `{namespace}.__all__`, in order.", ""]
    for name in names:
        value = getattr(module, name)
        if inspect.ismodule(value):
            lines += [
                f"## `{namespace}.{name}`",
                "",
                f"Module: see [`{value.__name__}`]({value.__name__}.md).",
                "",
            ]
            continue
        home = getattr(value, "__module__", "") or ""
        other = next(
            (
                ns
                for ns in NAMESPACES
                if ns != namespace
                and home.startswith(ns + ".")
                and name in importlib.import_module(ns).__all__
                and len(ns) > len(namespace)
            ),
            None,
        )
        if other is not None:
            # Documented once, under the namespace it lives in.
            lines += [
                f"## `{namespace}.{name}`",
                "",
                f"The same object as [`{other}.{name}`]({other}.md#{other}.{name}).",
                "",
            ]
            continue
        if name in vars(module) or not hasattr(value, "__qualname__"):
            lines += [f"::: {namespace}.{name}", ""]
        else:
            # Provided lazily (a module __getattr__), which static analysis cannot see:
            # rendered from where it is defined, under its public name.
            lines += [
                f"## `{namespace}.{name}` {{ #{namespace}.{name} }}",
                "",
                f"::: {home}.{value.__qualname__}",
                "    options:",
                "      show_root_heading: false",
                "",
            ]
    return "\n".join(lines)


def _reference_index() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings of every public name: `viax.__all__` and "
        "`viax.conjugate.__all__` (anything else may move between versions).",
        "",
    ]
    for title, path, target in _reference_pages():
        module = importlib.import_module(target)
        lines += [f"## [`{title}`]({Path(path).name})", ""]
        names = getattr(module, "__all__", None)
        if names and target in NAMESPACES:
            lines += [", ".join(f"`{n}`" for n in names), ""]
        else:
            summary = (inspect.getdoc(module) or "").split("\n\n")[0].replace("\n", " ")
            lines += [summary, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- benchmarks


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text


def _table(rows: list[dict], first: str | None = None) -> str:
    columns: list[str] = [first] if first else []
    for row in rows:
        for key, value in row.items():
            if key not in columns and not isinstance(value, (dict, list)):
                columns.append(key)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(out)


def _machine(payload) -> str:
    machine = payload.get("machine") if isinstance(payload, dict) else None
    if isinstance(machine, dict):
        return ", ".join(f"{k} {v}" for k, v in machine.items())
    if machine:
        extra = f", jax {payload['jax']}" if "jax" in payload else ""
        return f"{machine}{extra}"
    return "not recorded in the file"


def _date(path: Path, payload) -> str:
    if isinstance(payload, dict) and payload.get("date"):
        return str(payload["date"])
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cd", "--date=format:%Y-%m-%d %H:%M", "--", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return f"{out} (when the file was committed; the run does not record its date)"
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return f"{stamp:%Y-%m-%d %H:%M} UTC (file time; the run does not record its date)"


def _command(path: Path, payload) -> str:
    if isinstance(payload, dict) and payload.get("command"):
        return f"`{payload['command']}`"
    script = ROOT / "benchmarks" / f"{path.stem}.py"
    if script.exists():
        return f"`python benchmarks/{script.name}` (the script that writes this file)"
    return "not recorded in the file"


def _benchmark_markdown(path: Path) -> str:
    payload = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        f"# {path.stem.replace('_', ' ')}",
        "",
        f"- **Command:** {_command(path, payload)}",
        f"- **Date:** {_date(path, payload)}",
        f"- **Machine:** {_machine(payload)}",
        f"- **Raw results:** `benchmarks/results/{path.name}`",
        "",
    ]
    if isinstance(payload, list):
        lines += [_table([r for r in payload if isinstance(r, dict)]), ""]
    elif isinstance(payload.get("markdown"), str):
        # Rendered from the same JSON by the benchmark's own report function.
        text = payload["markdown"]
        text = re.sub(r"^#+ ", "## ", text, flags=re.M)
        lines += [text, ""]
    else:
        scalars = {
            k: v
            for k, v in payload.items()
            if not isinstance(v, (dict, list)) and k not in ("command", "date", "machine", "jax")
        }
        for key, value in scalars.items():
            lines += [f"**{key}**: {_fmt(value)}", ""]
        # Lists of records become tables; dicts sharing one key set become one table.
        for key, value in payload.items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                lines += [f"## {key}", "", _table(value), ""]
        keyed = {
            k: v
            for k, v in payload.items()
            if isinstance(v, dict)
            and k != "machine"
            and v
            and all(not isinstance(x, (dict, list)) for x in v.values())
        }
        groups: dict[tuple, list[str]] = {}
        for key, value in keyed.items():
            groups.setdefault(tuple(value), []).append(key)
        for keys, fields in groups.items():
            if len(fields) < 2:
                for field in fields:
                    lines += [f"## {field}", "", _table([keyed[field]]), ""]
                continue
            rows = [{"": k, **{f: keyed[f][k] for f in fields}} for k in keys]
            lines += [f"## {', '.join(fields)}", "", _table(rows), ""]
    figure = path.with_suffix(".png")
    if figure.exists():
        lines += [f"![{path.stem}]({figure.name})", ""]
    return "\n".join(lines)


def _benchmarks_index() -> str:
    lines = [
        "# Benchmarks",
        "",
        "Each page is generated, when the site is built, from one file of "
        "`benchmarks/results/*.json` written by the benchmark scripts (`make bench`, or "
        "`python benchmarks/run_all.py`). Speed numbers are from one shared 2-core CPU "
        "machine unless the page says otherwise; compare ratios within one run, not "
        "absolute seconds across runs.",
        "",
    ]
    for path in _benchmark_files():
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            payload = {}
        lines.append(
            f"- [{path.stem.replace('_', ' ')}]({path.stem}.md) — {_command(path, payload)}, "
            f"{_date(path, payload).split(' (')[0]}"
        )
    notes = sorted(RESULTS.glob("*.md"))
    if notes:
        lines += ["", "Reports written beside the JSON files by the scripts (with readings):", ""]
        lines += [f"- `benchmarks/results/{p.name}`" for p in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- tutorials


def _source_digest() -> str:
    """A digest of everything a tutorial's output depends on besides its own script."""
    digest = hashlib.sha256()
    paths = [Path(__file__).with_name("run_tutorial.py"), ROOT / "constraints.txt"]
    paths += sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "examples").rglob("*"))
    for path in paths:
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _run_tutorials(scripts: list[Path]) -> dict[str, Path]:
    """Run each tutorial script in its own process; {stem: directory of its outputs}.

    Outputs are kept in build/docs-tutorials/ (git-ignored), keyed by a digest of the
    script, the library's sources, the examples and the pinned versions, so a rebuild
    with nothing changed does not rerun them; VIAX_DOCS_RERUN=1 reruns them anyway.
    """
    runner = Path(__file__).with_name("run_tutorial.py")
    cache = ROOT / "build" / "docs-tutorials"
    common = _source_digest()
    rerun = os.environ.get("VIAX_DOCS_RERUN", "") not in ("", "0")
    jobs = {}
    workers = int(os.environ.get("VIAX_DOCS_JOBS", "2"))
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for script in scripts:
            key = hashlib.sha256((common + script.read_text(encoding="utf-8")).encode())
            target = cache / f"{script.stem}-{key.hexdigest()[:16]}"
            if (target / "page.md").exists() and not rerun:
                log.info("tutorial %s: unchanged, output reused from %s", script.name, target)
                results[script.stem] = target
                continue
            stale = sorted(cache.glob(f"{script.stem}-*/page.md"))
            if stale and os.environ.get("VIAX_DOCS_REUSE", "") not in ("", "0"):
                # For editing the prose around the tutorials: an earlier run's output.
                log.warning("tutorial %s: reusing an earlier run (VIAX_DOCS_REUSE)", script.name)
                results[script.stem] = stale[-1].parent
                continue
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            command = [sys.executable, str(runner), str(script), str(target)]
            jobs[script.stem] = (target, pool.submit(_run, command, script))
        for stem, (target, future) in jobs.items():
            try:
                future.result()
            except Exception:
                shutil.rmtree(target, ignore_errors=True)
                raise
            results[stem] = target
    return {stem: results[stem] for stem in sorted(results)}


def _run(command: list[str], script: Path) -> None:
    # examples/ on the path as in the test suite: `from eight_schools import model`.
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples")])
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=path)
    started = datetime.datetime.now()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = (datetime.datetime.now() - started).total_seconds()
    if proc.returncode != 0:
        raise RuntimeError(
            f"tutorial {script.relative_to(ROOT)} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    log.info("tutorial %s ran in %.1f s", script.name, seconds)


def _placeholder(stem: str, files) -> str:
    title, guide, what = PLACEHOLDERS[stem]
    exists = files.get_file_from_path(guide) is not None
    where = (
        f"Until then, the [guide page]({'../' + guide}) documents the feature."
        if exists
        else "Its guide page is not written yet either."
    )
    return (
        f'# {title}\n\n!!! note "Not written yet"\n    {what} This tutorial will be an '
        f"executed script, `docs/tutorials/{stem}.py`, once the feature lands. {where}\n"
    )


def on_files(files, config):
    def add(path: str, content: str | bytes) -> None:
        files.append(File.generated(config, path, content=content))

    if not (DOCS / "guide" / "index.md").exists():
        add("guide/index.md", _guide_index())
    add("reference/index.md", _reference_index())
    for _, path, target in _reference_pages():
        add(path, _reference_markdown(target))

    add("benchmarks/index.md", _benchmarks_index())
    for path in _benchmark_files():
        add(f"benchmarks/{path.stem}.md", _benchmark_markdown(path))
        if path.with_suffix(".png").exists():
            add(f"benchmarks/{path.stem}.png", path.with_suffix(".png").read_bytes())

    outputs = _run_tutorials(_tutorial_scripts())
    for stem, target in outputs.items():
        add(f"tutorials/{stem}.md", (target / "page.md").read_text(encoding="utf-8"))
        for figure in sorted(target.glob("*.png")):
            add(f"tutorials/{figure.name}", figure.read_bytes())
    for stem in PLACEHOLDERS:
        if stem not in outputs:
            add(f"tutorials/{stem}.md", _placeholder(stem, files))
    return files
