"""Checkpoints of a minibatch run: the whole algorithm state (parameters, optimiser
moments, per-row parameters, step counter and RNG key, which together fix the data
position: step t is batch t mod (batches per epoch) of epoch t div it), the stopping
rule's state, the ELBO trace, the whitening and the control variate's anchor.

One atomic ``.npz`` (written to a temporary file, fsynced, then ``os.replace``d, as
the conjugate checkpoints of :mod:`viax.conjugate.checkpoint`), plain arrays only,
loaded with ``allow_pickle=False``.  A run killed at any moment and resumed from its
last checkpoint gives the uninterrupted run's numbers: the batches of step t are a
function of (seed, t) and step t's draws of ``fold_in(key, t)``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from viax.conjugate.checkpoint import (
    CheckpointError,
    read_npz_checkpoint,
    resume_path,
    write_npz_atomic,
)

__all__ = [
    "format_reader",
    "load",
    "restore_state",
    "restore_tracker",
    "resume_path",
    "save",
    "state_arrays",
]

FORMAT = "viax-minibatch-1"


def _tracker_arrays(tracker) -> dict:
    """The stopping rule's host state as named arrays (its settings are not saved: the
    resumed run passes the same ones)."""
    out = {}
    for name, value in vars(tracker).items():
        if name in ("config", "_scale"):
            continue
        key = f"rule/{name}"
        if isinstance(value, list):
            out[f"{key}#len"] = np.asarray(len(value))
            for i, item in enumerate(value):
                for j, part in enumerate(item):
                    out[f"{key}#{i}#{j}"] = np.asarray(part)
        elif value is None:
            out[f"{key}#none"] = np.asarray(0)
        else:
            out[key] = np.asarray(value)
    return out


def restore_tracker(tracker, saved: dict) -> None:
    """Put the saved stopping-rule state into a fresh ``tracker`` of the same settings."""
    for name, value in list(vars(tracker).items()):
        if name in ("config", "_scale"):
            continue
        key = f"rule/{name}"
        if f"{key}#len" in saved:
            items = []
            template = type(value[0]) if value else None
            for i in range(int(saved[f"{key}#len"])):
                parts = []
                j = 0
                while f"{key}#{i}#{j}" in saved:
                    parts.append(_scalar(saved[f"{key}#{i}#{j}"]))
                    j += 1
                items.append(tuple(parts))
            if template is not None and hasattr(template, "_fields"):
                items = [template(*p) for p in items]
            elif name == "levels":
                from viax.infer.stopping import _Level

                items = [_Level(*p) for p in items]
            setattr(tracker, name, items)
        elif f"{key}#none" in saved:
            setattr(tracker, name, None)
        elif key in saved:
            setattr(tracker, name, _scalar(saved[key], like=value))


def _scalar(array: np.ndarray, like=None):
    if array.ndim == 0:
        value = array.item()
        if isinstance(like, bool):
            return bool(value)
        return value
    return np.array(array)


def save(path, state, tracker, elbo_trace, whitening, anchor, info: dict) -> Path | None:
    """Write the checkpoint (process 0 only: every process holds the same state)."""
    if jax.process_index() != 0:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state)]
    arrays = state_arrays(FORMAT, state.step, np.asarray(elbo_trace, np.float64), leaves)
    arrays.update(_tracker_arrays(tracker))
    for field in whitening._fields:
        if getattr(whitening, field) is not None:
            arrays[f"whitening/{field}"] = np.asarray(getattr(whitening, field))
    for field in anchor._fields:
        arrays[f"anchor/{field}"] = np.asarray(getattr(anchor, field))
    for key, value in info.items():
        arrays[f"info/{key}"] = np.asarray(value)
    return write_npz_atomic(path, arrays)


def state_arrays(format_name: str, step, trace, leaves) -> dict:
    """The arrays every checkpoint of a run holds: its format, the step counter, the
    objective trace and the state's leaves (``state/i``, restored by
    :func:`restore_state`); learning (:mod:`viax.infer.learn`) adds its fingerprint,
    minibatch fitting its stopping rule, whitening and anchor."""
    arrays = {
        "format": np.asarray(format_name),
        "step": np.asarray(step),
        "elbo_trace": np.asarray(trace),
    }
    arrays.update({f"state/{i}": leaf for i, leaf in enumerate(leaves)})
    return arrays


def format_reader(format_name: str, kind: str):
    """A reader for :func:`~viax.conjugate.checkpoint.read_npz_checkpoint`: every array
    of a file of ``format_name``, else a CheckpointError saying it is not a ``kind``
    checkpoint."""

    def read(path: Path, f) -> dict:
        if "format" not in f.files or str(f["format"]) != format_name:
            raise CheckpointError(f"checkpoint {path}: not a {kind} checkpoint")
        return {key: np.asarray(f[key]) for key in f.files}

    return read


def load(path) -> dict:
    """The saved arrays by name, with ``"info"`` gathered into a dict; a missing, empty,
    truncated or foreign file is a :class:`~viax.conjugate.checkpoint.CheckpointError`
    naming it."""
    saved = read_npz_checkpoint(path, format_reader(FORMAT, "viax minibatch"))
    saved["info"] = {
        key.removeprefix("info/"): _scalar(value)
        for key, value in list(saved.items())
        if key.startswith("info/")
    }
    return saved


def restore_state(state, saved: dict):
    """``state`` (a fresh one of the same run) with the saved leaves, checked leaf by
    leaf: a checkpoint of another model, family or data size is refused."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    restored = []
    for i, leaf in enumerate(leaves):
        key = f"state/{i}"
        if key not in saved or saved[key].shape != np.shape(leaf):
            raise ValueError(
                "the checkpoint was written by another run (model, family, batch size or "
                "data differ): its state does not match this one's"
            )
        restored.append(jax.numpy.asarray(saved[key], dtype=np.asarray(leaf).dtype))
    if f"state/{len(leaves)}" in saved:
        raise ValueError("the checkpoint was written by another run: its state is larger")
    return jax.tree_util.tree_unflatten(treedef, restored)
