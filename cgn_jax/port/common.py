"""Shared machinery of the PyTorch -> Flax converters.

A converter walks the PyTorch state dict through a `StateDict`, taking each tensor
by name with the shape it expects. Every tensor must be taken exactly once: a
missing, mis-shaped or left-over tensor is an error that names it, so a converter
cannot silently ignore part of a checkpoint.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class PortError(ValueError):
    pass


class StateDict:
    def __init__(self, tensors: dict[str, np.ndarray], source: str = "checkpoint",
                 ignore: Iterable[str] = ("num_batches_tracked",)):
        self.tensors = dict(tensors)
        self.source = source
        self.ignore = tuple(ignore)
        self.taken: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self.tensors:
            raise PortError(f"{self.source}: missing tensor {name!r}; is this the right checkpoint for this model/config?")
        value = np.asarray(self.tensors[name])
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise PortError(f"{self.source}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        if name in self.taken:
            raise PortError(f"converter bug: tensor {name!r} taken twice")
        self.taken.add(name)
        return value

    def has(self, name: str) -> bool:
        return name in self.tensors

    def finish(self) -> None:
        left = [k for k in self.tensors if k not in self.taken and not k.endswith(self.ignore)]
        if left:
            raise PortError(f"{self.source}: {len(left)} tensor(s) not consumed by the converter, first {left[0]!r}; "
                            "the checkpoint is for a different model or config")


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch (out, in, kh, kw) -> Flax (kh, kw, in, out)."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)).astype(np.float32))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch (out, in) -> Flax (in, out)."""
    return np.ascontiguousarray(w.T.astype(np.float32))


def batchnorm(sd: StateDict, prefix: str, channels: int) -> tuple[dict, dict]:
    """(params, batch_stats) of a PyTorch BatchNorm at `prefix`."""
    params = {"scale": sd.take(f"{prefix}.weight", (channels,)).astype(np.float32),
              "bias": sd.take(f"{prefix}.bias", (channels,)).astype(np.float32)}
    stats = {"mean": sd.take(f"{prefix}.running_mean", (channels,)).astype(np.float32),
             "var": sd.take(f"{prefix}.running_var", (channels,)).astype(np.float32)}
    return params, stats


def read_state_dict(path) -> dict[str, np.ndarray]:
    """Read a `.pth` with the torch-free reader (torch itself is not needed to port)."""
    from cgn_jax.port.torch_pickle import load_state_dict
    return load_state_dict(path)
