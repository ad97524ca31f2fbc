"""The MNIST classifier of the paper's Table 1, layer for layer the official `CNN`.

Table 1 compares training *data* (real, IRM environments, GAN or CGN samples), so the
classifier must be the one the paper used, down to details that change numbers:
PyTorch's default initialisation (uniform, bound 1/sqrt(fan_in), weights and biases),
BatchNorm on the raw input, and the official pooling. The official head is
`nn.AvgPool2d(7)` applied to an 8x8 feature map: it averages the top-left 7x7 window only
(the last row and column never reach the classifier). `pool="official"` keeps that;
`pool="global"` averages all 8x8 positions (what "global average pool" would mean).
"""

from __future__ import annotations

import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from cgn_jax.models import cpu_grads

POOLS = ("official", "global")
NUM_CLASSES = 10


def torch_kernel_init():
    """PyTorch's default Conv/Linear weight init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias init, U(+-1/sqrt(fan_in)); flax's bias init does not see fan_in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class CNN(nn.Module):
    """BN(input) -> conv5x5-32 -> ReLU -> maxpool 3/2 -> conv3x3-32 -> ReLU -> conv3x3-64 /2 -> ReLU
    -> conv3x3-64 -> ReLU -> average pool -> Dense(10) -> log-softmax.

    Input (N, 32, 32, 3) in [-1, 1]; output (N, num_classes) float32 log-probabilities.
    `axis_name`: the pmap axis over which the input BatchNorm averages its batch statistics.
    """

    num_classes: int = NUM_CLASSES
    pool: str = "official"
    axis_name: str | None = None
    dtype: Any = jnp.float32
    # how the first convolution's and the max pool's gradients are computed: "custom" (fast on
    # XLA:CPU, see cgn_jax.models.cpu_grads), "xla", or "auto" (custom on the CPU). Same values
    # up to float rounding, same parameters.
    grad_kernels: str = "auto"

    def _conv(self, x, features, kernel, stride, name, custom=False):
        fan_in = kernel * kernel * x.shape[-1]
        if custom and stride == 1:
            return _SameConv(features, kernel, self.dtype, fan_in, name=name)(x)
        return nn.Conv(features, (kernel, kernel), strides=stride, padding=kernel // 2, dtype=self.dtype,
                       kernel_init=torch_kernel_init(), bias_init=torch_bias_init(fan_in), name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.pool not in POOLS:
            raise ValueError(f"unknown classifier pool {self.pool!r}; valid: {', '.join(POOLS)}")
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, 3, 3)
        # torch BatchNorm2d: momentum 0.1 (flax counts the other way), eps 1e-5, affine.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                         axis_name=self.axis_name if train else None, name="bn_in")(x.astype(self.dtype))
        custom = cpu_grads.resolve(self.grad_kernels) == "custom"
        x = nn.relu(self._conv(x, 32, 5, 1, "conv1", custom))
        # MaxPool2d(3, stride 2, padding 1): torch pads with -inf, as flax's max_pool does.
        if custom:
            x = cpu_grads.max_pool(x, 3, 2, 1)
        else:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        x = nn.relu(self._conv(x, 32, 3, 1, "conv2"))
        x = nn.relu(self._conv(x, 64, 3, 2, "conv3"))
        x = nn.relu(self._conv(x, 64, 3, 1, "conv4"))
        if self.pool == "official":
            x = x[:, :7, :7, :]  # AvgPool2d(7) on the 8x8 map: one window, the top-left 7x7
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=torch_kernel_init(),
                     bias_init=torch_bias_init(x.shape[-1]), name="fc")(x)
        return jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)


def init_variables(model: CNN, key: jax.Array, image_size: int = 32) -> dict:
    """Fresh {'params', 'batch_stats'} for 32x32 RGB input."""
    return model.init(key, jnp.zeros((2, image_size, image_size, 3), jnp.float32), train=False)


class _SameConv(nn.Module):
    """`nn.Conv(features, (kernel, kernel), padding=kernel // 2)` (same parameters and initial
    values) with the weight gradient of `cpu_grads.conv_same`."""

    features: int
    kernel: int
    dtype: Any
    fan_in: int

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", torch_kernel_init(), (self.kernel, self.kernel, x.shape[-1], self.features),
                       jnp.float32)
        b = self.param("bias", torch_bias_init(self.fan_in), (self.features,), jnp.float32)
        y = cpu_grads.conv_same(x.astype(self.dtype), k.astype(self.dtype), self.kernel // 2)
        return y + b.astype(self.dtype)
