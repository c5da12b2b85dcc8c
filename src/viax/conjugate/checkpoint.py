"""Checkpoints: global natural parameters, step count and RNG key in one ``.npz``; for
CAVI also the local natural parameters and the ELBO trace.

Written atomically (a temporary file in the same folder, flushed and fsynced, then
``os.replace``), so a run killed at any moment leaves either the previous checkpoint or
the new one, never half of one.  Plain arrays only: loading uses
``allow_pickle=False``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

__all__ = ["load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1


def save_checkpoint(
    path,
    global_natural: dict,
    step: int,
    rng_key,
    model_name: str,
    *,
    local_natural: dict | None = None,
    elbo_trace=None,
    method: str = "svi",
    fingerprint: str = "",
) -> Path:
    """Write ``{global_natural, step, rng_key}`` (and, for CAVI, ``local_natural`` and
    ``elbo_trace``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION),
        "model_name": np.asarray(model_name),
        "method": np.asarray(method),
        "fingerprint": np.asarray(fingerprint),
        "step": np.asarray(int(step), np.int64),
        "rng_key": np.asarray(jax.random.key_data(rng_key) if _is_typed(rng_key) else rng_key),
    }
    for prefix, tree in (("global", global_natural), ("local", local_natural or {})):
        for name, natural in tree.items():
            for i, value in enumerate(natural):
                arrays[f"{prefix}/{name}/{i}"] = np.asarray(value)
    if elbo_trace is not None:
        arrays["elbo_trace"] = np.asarray(elbo_trace, np.float64)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict:
    """``{"global_natural", "step", "rng_key", "model_name", "method"}`` from
    ``save_checkpoint``, with ``"local_natural"`` and ``"elbo_trace"`` where saved."""
    with np.load(Path(path), allow_pickle=False) as f:
        if int(f["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"{path}: unknown checkpoint format {int(f['format_version'])}")
        trees: dict[str, dict[str, list]] = {"global": {}, "local": {}}
        for key in f.files:
            prefix, _, rest = key.partition("/")
            if prefix in trees and rest:
                name, i = rest.split("/")
                trees[prefix].setdefault(name, []).append((int(i), np.asarray(f[key])))
        natural = {
            prefix: {name: tuple(v for _, v in sorted(parts)) for name, parts in tree.items()}
            for prefix, tree in trees.items()
        }
        out = {
            "global_natural": natural["global"],
            "step": int(f["step"]),
            "rng_key": np.asarray(f["rng_key"]),
            "model_name": str(f["model_name"]),
            # Files written before CAVI checkpoints existed are SVI's.
            "method": str(f["method"]) if "method" in f.files else "svi",
            "fingerprint": str(f["fingerprint"]) if "fingerprint" in f.files else "",
        }
        if natural["local"]:
            out["local_natural"] = natural["local"]
        if "elbo_trace" in f.files:
            out["elbo_trace"] = np.asarray(f["elbo_trace"])
        return out


def _is_typed(key) -> bool:
    return jax.dtypes.issubdtype(getattr(key, "dtype", np.uint32), jax.dtypes.prng_key)
