"""Devices: a one-axis mesh named "data", the batch axis split over it, parameters
replicated; XLA inserts the all-reduce of the gradient sums.

The mesh lists the devices ordered by ``(process_index, id)``, so the devices of process
``p`` hold the contiguous slice ``[p B/P, (p+1) B/P)`` of a global batch: exactly the rows
that :meth:`viax.data.Source.batches` hands to process ``p``.  A global array is then
assembled from the per-process slices by ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "batch_sharding",
    "data_mesh",
    "put",
    "process_share",
    "replicated",
]

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """A one-dimensional :class:`jax.sharding.Mesh` with axis ``"data"``.

    Args:
        devices: the devices to use; default all devices of the run: the local ones, or,
            after ``jax.distributed.initialize()``, those of every process.  An integer
            n takes the first n devices of a single-process run.

    Example:
        >>> import viax
        >>> viax.data.data_mesh().axis_names
        ('data',)
    """
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        available = jax.devices()
        if jax.process_count() > 1:
            raise ValueError(
                f"devices={devices} with {jax.process_count()} processes: pass None (every "
                "device of every process) or a list of devices"
            )
        if not 1 <= devices <= len(available):
            raise ValueError(f"devices={devices}: this process has {len(available)} device(s)")
        devices = available[: int(devices)]
    elif devices is not None and (
        isinstance(devices, bool | str) or not hasattr(devices, "__iter__")
    ):
        raise TypeError(f"devices must be None, an integer or a list of devices, got {devices!r}")
    devices = list(jax.devices() if devices is None else devices)
    if not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be a list of jax devices, got {devices!r}")
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices, dtype=object), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, *, stacked: bool = False) -> NamedSharding:
    """Rows split over the mesh's ``"data"`` axis.

    Args:
        mesh: from :func:`data_mesh`.
        stacked: for chunks of K stacked batches, shape ``(K, B, ...)``, the batch axis is
            axis 1 (the scan axis, axis 0, is not split).
    """
    spec = PartitionSpec(None, DATA_AXIS) if stacked else PartitionSpec(DATA_AXIS)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (parameters, optimiser state, static data)."""
    return NamedSharding(mesh, PartitionSpec())


def process_share() -> tuple[int, int]:
    """``(process_index, process_count)`` of this process, for
    :meth:`viax.data.Source.batches`."""
    return jax.process_index(), jax.process_count()


def put(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """Move a pytree of this process's NumPy arrays to the devices.

    With a sharding that spans several processes, each process passes its own slice and
    the global array is assembled by ``jax.make_array_from_process_local_data`` (the
    global batch axis is P times the local one).  Otherwise ``jax.device_put``.
    """
    if sharding is None:
        return jax.device_put(tree)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )
