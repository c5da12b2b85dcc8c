"""Shared helpers for the benchmarks: paths, result files, markdown tables, machine info."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
REFERENCE_DIR = BENCH_DIR / "reference"
# Shared data lives beside the repository and is never copied into it.
SHARED_DATA_DIR = REPO_DIR.parent / "shared" / "data"
POSTERIORDB_DIR = SHARED_DATA_DIR / "posteriordb"

# Benchmarks time compilation honestly: viax's on-disk compiled-code cache is off unless
# a benchmark turns it on for a run it labels as such (speed.py's "rerun" rows).
os.environ.setdefault("VIAX_CACHE_DIR", "off")

for _path in (str(REPO_DIR / "examples"), str(BENCH_DIR)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def command_line() -> str:
    """The command that is running, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_DIR))
    except ValueError:
        script_text = str(script)
    # XLA_FLAGS changes the devices JAX sees (forced host devices), so it is part of the command.
    flags = os.environ.get("XLA_FLAGS")
    env = [f"XLA_FLAGS={shlex.quote(flags)}"] if flags else []
    return " ".join([*env, "python", shlex.quote(script_text), *map(shlex.quote, sys.argv[1:])])


def today() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import jax

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
    }
    for name in ("numpyro", "optax", "pymc", "pytensor"):
        try:
            module = __import__(name)
            info[name] = module.__version__
        except Exception:  # not installed: the benchmark that needs it says so
            continue
    try:
        import viax

        info["viax"] = viax.__version__
    except Exception:
        pass
    try:
        import subprocess

        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        pass
    return info


def run_child(script: str, argv: list[str]) -> dict[str, Any]:
    """Run ``script --child *argv`` in a fresh Python and parse the JSON object on the
    last line of its output (its stderr's end is printed and the run stopped if it
    fails)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, script, "--child", *argv], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(out.returncode)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return path


def read_json(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / name
    if not path.exists():
        return None
    return json.loads(path.read_text())


def _jsonable(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if value != 0 and abs(value) < 0.001:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(x) if not isinstance(x, str) else x for x in row) + " |")
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return float(ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid]))


def as_arrays(data: dict[str, Any]):
    """JSON data for NumPyro/PyMC: lists become float64 arrays, scalars stay Python."""
    import numpy as np

    return {k: (np.asarray(v, dtype=float) if isinstance(v, list) else v) for k, v in data.items()}


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM, not ``getrusage``'s ru_maxrss, which Linux
    carries over an exec from the forking parent (a parent that computed a reference
    would set every child's floor)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def interleaved(
    runs: dict[str, Callable[[], Any]], rounds: int, steps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], float, float]:
    """Time ``runs`` (each call runs ``steps`` steps and blocks until done) in turn,
    ``rounds`` times, so that the load's drift falls on every contender alike: wall and
    CPU milliseconds per step by run, and the 1-minute load average before and after."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    load_start = os.getloadavg()[0]
    for _ in range(rounds):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(1e3 * (time.perf_counter() - t0) / steps)
            cpu[name].append(1e3 * (time.process_time() - c0) / steps)
    return wall, cpu, load_start, os.getloadavg()[0]
