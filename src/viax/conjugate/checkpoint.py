"""Checkpoints: global natural parameters, step count and RNG key in one ``.npz``; for
CAVI also the local natural parameters and the ELBO trace; for the naive method the
optimiser's state (``extra``).

Written atomically (a temporary file in the same folder, flushed and fsynced, then
``os.replace``), so a run killed at any moment leaves either the previous checkpoint or
the new one, never half of one.  Plain arrays only: loading uses
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from pathlib import Path

import jax
import numpy as np

__all__ = [
    "CheckpointError",
    "data_fingerprint",
    "load_checkpoint",
    "resume_checkpoint",
    "resume_path",
    "save_checkpoint",
]

FORMAT_VERSION = 1
_REQUIRED = ("format_version", "model_name", "step", "rng_key")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: missing, empty, truncated, or not one."""


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
    extra: dict | None = None,
) -> Path:
    """Write ``{global_natural, step, rng_key}`` (and, for CAVI, ``local_natural`` and
    ``elbo_trace``; ``extra``: any other named arrays) to ``path`` atomically."""
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
    for name, value in (extra or {}).items():
        arrays[f"extra/{name}"] = np.asarray(value)
    return write_npz_atomic(path, arrays)


def write_npz_atomic(path: Path, arrays: dict) -> Path:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``: into a temporary file
    beside it, synced, then renamed over it, so a killed process leaves the old file or
    the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict:
    """``{"global_natural", "step", "rng_key", "model_name", "method", "fingerprint",
    "extra"}`` from ``save_checkpoint``, with ``"local_natural"`` and ``"elbo_trace"``
    where saved.

    Raises:
        CheckpointError: (a ValueError) naming the file and what is wrong with it: it
            does not exist, is empty, is not a ``.npz`` archive, is truncated or damaged,
            or lacks a checkpoint's entries.
    """
    return read_npz_checkpoint(path, _read)


def read_npz_checkpoint(path, read_fn) -> dict:
    """``read_fn(path, npz_file)`` on the opened archive, every way the file can be
    wrong (missing, empty, not an archive, truncated, damaged, holding pickled objects)
    turned into one :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(
            f"checkpoint {path}: not a viax checkpoint (a .npz archive starts with a zip "
            f"header; this file starts with {magic!r})"
        )
    try:
        # Our own file handle: np.load leaks its own when the archive is damaged.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            return read_fn(path, f)
    except CheckpointError:
        raise
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise CheckpointError(f"checkpoint {path}: damaged ({err})") from None
        raise CheckpointError(
            f"checkpoint {path}: holds an object array, which only pickle could load; viax "
            "checkpoints hold plain arrays and are never unpickled: not a viax checkpoint"
        ) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {path}: truncated or damaged ({size} bytes; {type(err).__name__}: "
            f"{err}); write it again or resume from an older copy"
        ) from None


def _read(path: Path, f) -> dict:
    missing = [key for key in _REQUIRED if key not in f.files]
    if missing:
        raise CheckpointError(
            f"checkpoint {path}: a .npz archive but not a viax checkpoint (no {', '.join(missing)})"
        )
    if int(f["format_version"]) != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: unknown checkpoint format {int(f['format_version'])}"
        )
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
    out["extra"] = {
        key.removeprefix("extra/"): np.asarray(f[key])
        for key in f.files
        if key.startswith("extra/")
    }
    return out


def resume_path(resume, checkpoint_path):
    """The file a run's ``resume=`` argument names: None (also for False) when the run
    does not resume, ``checkpoint_path`` for True, else ``resume`` itself."""
    if resume is None or resume is False:
        return None
    path = checkpoint_path if resume is True else resume
    if path is None:
        raise ValueError("resume=True needs checkpoint_path")
    return path


def resume_checkpoint(path, method: str, model_name: str, fingerprint: str | None = None) -> dict:
    """:func:`load_checkpoint` of a run of ``method`` on this model (and, with
    ``fingerprint``, these data), or a ValueError saying which it is not."""
    saved = load_checkpoint(path)
    if saved["method"] != method:
        raise ValueError(f"{path} was written by {saved['method']}, not by {method}")
    if saved["model_name"] != model_name:
        raise ValueError(f"{path} holds a {saved['model_name']!r} model, not {model_name!r}")
    if fingerprint is not None and saved["fingerprint"] != fingerprint:
        raise ValueError(f"{path} was written for other data: resume with the same data")
    return saved


def data_fingerprint(batch: dict) -> str:
    """A digest of a prepared batch's arrays: a resumed run must see the same data."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(batch):
        value = np.ascontiguousarray(np.asarray(batch[name]))
        digest.update(f"{name}{value.shape}{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _is_typed(key) -> bool:
    return jax.dtypes.issubdtype(getattr(key, "dtype", np.uint32), jax.dtypes.prng_key)
