"""Data parallelism for :func:`~perturbax.inference.fit`: the cells of each step split over a mesh.

A step's minibatch (``B`` cells x genes, and every per-cell array that travels with it) is laid
out over a one-axis :class:`jax.sharding.Mesh` along the cell axis (``NamedSharding(mesh,
P("cells"))``); parameters, optimiser state and the (small) index tables stay replicated. The
jitted step is the same program on 1 or n devices: XLA's SPMD partitioner splits the per-cell work
and inserts the reductions (means over cells, the energy objective's cross-group terms), so a fit
on n devices follows the 1-device trajectory up to the order of floating-point sums. Random draws
do not depend on the layout (``jax_threefry_partitionable``, on by default).

The energy objective lays a step out as ``n_groups`` contiguous blocks of ``m`` cells; the mesh
size is chosen to divide ``n_groups`` so that every group lies whole on one device (its
within-group distances need no communication; only the source-block gather and the means cross
devices).

Multi-host: call ``jax.distributed.initialize()`` in every process before the first fit; then
``jax.devices()`` lists the devices of all hosts and ``fit(..., devices=None)`` uses them all (see
docs/scaling.md for the launch commands).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["CELL_AXIS", "make_mesh", "replicate", "shard_cells", "put_cells"]

CELL_AXIS = "cells"

DeviceSpec = int | Sequence[Any] | None


def _available(devices: DeviceSpec) -> list:
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        have = jax.devices()
        if not 1 <= int(devices) <= len(have):
            raise ValueError(
                f"devices={int(devices)} but {len(have)} {have[0].platform} device(s) are available; pass "
                f"devices between 1 and {len(have)} (or None for all)."
            )
        return list(have[: int(devices)])
    devs = list(devices)
    if not devs or not all(isinstance(d, jax.Device) for d in devs):
        raise TypeError("devices must be None, a number of devices, or a list of jax devices (jax.devices()).")
    return devs


def make_mesh(devices: DeviceSpec = None, *, units: int | None = None) -> Mesh:
    """A one-axis mesh (axis ``"cells"``) over ``devices``: ``None`` all devices (of all hosts
    after ``jax.distributed.initialize()``), a number ``n`` the first ``n``, or a list of devices.

    ``units``: how many pieces a step divides into (cells for the ELBO, groups for the energy
    objective); the mesh uses the most devices that divide it evenly (a warning says so when that
    is fewer than asked for explicitly)."""
    devs = _available(devices)
    n = len(devs)
    if units is not None and units % n:
        fit_n = max(k for k in range(1, n + 1) if units % k == 0)
        if devices is not None:
            warnings.warn(
                f"A step's {units} cells/groups do not split evenly over {n} devices; using {fit_n}. "
                f"Choose batch_size (ELBO) or the conditions per step (energy) as a multiple of {n}.",
                RuntimeWarning,
                stacklevel=3,
            )
        devs = devs[:fit_n]
    return Mesh(np.asarray(devs), (CELL_AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """``tree`` placed whole on every device of ``mesh`` (nothing to do on one device)."""
    if mesh.size == 1:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _cell_spec(a) -> PartitionSpec:
    return PartitionSpec(CELL_AXIS, *([None] * (a.ndim - 1)))


def shard_cells(tree: Any, mesh: Mesh) -> Any:
    """Inside ``jit``: the arrays of ``tree`` (leading axis = cells) laid out along the mesh."""
    if mesh.size == 1:
        return tree
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, _cell_spec(a))), tree)


def put_cells(tree: Any, mesh: Mesh, axis: int = 0) -> Any:
    """Host arrays placed with their axis ``axis`` (cells) split over the mesh: each device
    receives only its share (the streamed path's minibatches)."""
    if mesh.size == 1:  # uncommitted, like the in-memory path's arrays (a committed one would recompile the step)
        return jax.device_put(tree)

    def put(a):
        spec = PartitionSpec(*([None] * axis), CELL_AXIS, *([None] * (a.ndim - axis - 1)))
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree.map(put, tree)
