"""SVI checkpoints: global natural parameters, step count and RNG key in one ``.npz``.

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


def save_checkpoint(path, global_natural: dict, step: int, rng_key, model_name: str) -> Path:
    """Write ``{global_natural, step, rng_key}`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "format_version": np.asarray(FORMAT_VERSION),
        "model_name": np.asarray(model_name),
        "step": np.asarray(int(step), np.int64),
        "rng_key": np.asarray(jax.random.key_data(rng_key) if _is_typed(rng_key) else rng_key),
    }
    for name, natural in global_natural.items():
        for i, value in enumerate(natural):
            arrays[f"global/{name}/{i}"] = np.asarray(value)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict:
    """``{"global_natural", "step", "rng_key", "model_name"}`` from ``save_checkpoint``."""
    with np.load(Path(path), allow_pickle=False) as f:
        if int(f["format_version"]) != FORMAT_VERSION:
            raise ValueError(f"{path}: unknown checkpoint format {int(f['format_version'])}")
        global_natural: dict[str, list] = {}
        for key in f.files:
            if key.startswith("global/"):
                _, name, i = key.split("/")
                global_natural.setdefault(name, []).append((int(i), np.asarray(f[key])))
        return {
            "global_natural": {
                name: tuple(v for _, v in sorted(parts)) for name, parts in global_natural.items()
            },
            "step": int(f["step"]),
            "rng_key": np.asarray(f["rng_key"]),
            "model_name": str(f["model_name"]),
        }


def _is_typed(key) -> bool:
    return jax.dtypes.issubdtype(getattr(key, "dtype", np.uint32), jax.dtypes.prng_key)
