"""BatchNorm computed as PyTorch computes it, for layers ported from or checked against PyTorch.

Two-pass variance (`use_fast_variance=False`): the one-pass E[x^2] - E[x]^2 cancels where a
channel's mean dwarfs its spread. It made the 1- and 8-device Wildlife CGN steps differ by 2 %
(tests/test_train_mnist.py) and lost precision on U2-Net's 2x2 deep maps. Momentum 0.9 is
PyTorch's 0.1. The MNIST classifier keeps Flax's one-pass default on purpose (its Table 1 runs
were made with it).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def normal_scale_init(gain: float) -> Callable:
    """BatchNorm weights ~ N(1, gain), as the official CGN's `init_net`."""
    def init(key, shape, dtype=jnp.float32):
        return 1.0 + gain * jax.random.normal(key, shape, dtype)
    return init


def torch_batch_norm(train: bool, name: str, *, dtype: Any = None, axis_name: str | None = None,
                     scale_init: Callable = nn.initializers.ones) -> nn.BatchNorm:
    """Batch statistics in training (averaged over `axis_name` when given), running ones otherwise."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                        dtype=dtype, param_dtype=jnp.float32, axis_name=axis_name if train else None,
                        scale_init=scale_init, name=name)
