"""Data-parallel plumbing shared by the training loops (pmap over the local devices).

A config gives the global batch; how it splits depends on the machine, so the
check lives here, with an error that says what to change. Keeping replicate /
unreplicate in one place also keeps the "leading device axis" convention in one place.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

AXIS = "devices"  # the pmap axis name used by every training step


class BatchSplitError(ValueError):
    pass


def local_devices(n: int | None = None) -> list:
    """The first `n` local devices (all of them when n is None)."""
    devices = jax.local_devices()
    if n is None:
        return devices
    if not 1 <= n <= len(devices):
        raise BatchSplitError(f"asked for {n} devices but this process has {len(devices)}")
    return devices[:n]


def per_device_batch(global_batch: int, n_devices: int, what: str = "train.batch_size") -> int:
    """global_batch // n_devices, or an error naming both numbers and how to fix it."""
    if global_batch <= 0:
        raise BatchSplitError(f"{what} must be positive, got {global_batch}")
    if global_batch % n_devices:
        lower = max(n_devices, global_batch - global_batch % n_devices)
        upper = global_batch + n_devices - global_batch % n_devices
        raise BatchSplitError(
            f"{what}={global_batch} (global batch) does not split evenly over {n_devices} devices; "
            f"use a multiple of {n_devices}, e.g. --config.{what}={lower} or --config.{what}={upper}, "
            f"or run on a number of devices that divides {global_batch}")
    return global_batch // n_devices


def _stacked_sharding(devices: Sequence) -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree, devices: Sequence | None = None):
    """Copy every leaf onto each device, giving it a leading device axis (the layout pmap takes)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    sharding = _stacked_sharding(devices)

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x[None], (len(devices), *x.shape)), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree):
    """The first replica of a replicated tree (still on device)."""
    return jax.tree.map(lambda x: x[0], tree)


def to_host(tree):
    """The first replica of a replicated tree as numpy arrays (a host sync)."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x[0])), tree)
