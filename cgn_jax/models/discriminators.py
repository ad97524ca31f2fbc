"""The two class-conditional MNIST discriminators of the official CGN training.

They are only ever trained from scratch (no pretrained discriminator is published), so
the aim is the official behaviour, not a weight-for-weight layout: initialisers match
what PyTorch gives the official modules (the linear one keeps PyTorch's default
uniform init, the conv one gets the official `init_net` N(0, 0.02)); inputs are NHWC,
so the linear discriminator flattens in HWC order rather than PyTorch's CHW.

Dropout draws one mask per example from `fold_in(dropout key, example id)`. With the
global example id passed in (`example_ids`), a batch split over any number of devices
drops exactly the units the unsplit batch would, so a training run does not depend on
the device count. BatchNorm averages its batch statistics over `axis_name` for the
same reason.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from cgn_jax.models.torch_batch_norm import normal_scale_init, torch_batch_norm

KINDS = ("linear", "conv")


def torch_linear_kernel_init():
    """PyTorch's default `nn.Linear` weight init, U(±1/sqrt(fan_in))."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
    bound = 1.0 / max(fan_in, 1) ** 0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class ExampleDropout(nn.Module):
    """Inverted dropout whose mask for example i depends only on (`dropout` key, example id i)."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool, example_ids=None):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        ids = jnp.arange(x.shape[0]) if example_ids is None else example_ids
        chex.assert_shape(ids, (x.shape[0],))
        keys = jax.vmap(jax.random.fold_in, (None, 0))(self.make_rng("dropout"), ids)
        keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - self.rate, x.shape[1:]))(keys)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)


class LinearDiscriminator(nn.Module):
    """concat(flatten(x), emb(y)) -> Dense-LReLU -> 2x (Dense-Dropout-LReLU) -> Dense(1)."""

    n_classes: int = 10
    ndf: int = 512
    dropout: float = 0.4
    dtype: Any = jnp.float32
    axis_name: str | None = None  # unused (no BatchNorm); accepted so both kinds build alike

    @nn.compact
    def __call__(self, x, y, train: bool = False, example_ids=None):
        chex.assert_rank(x, 4)
        chex.assert_shape(y, (x.shape[0],))
        emb = nn.Embed(self.n_classes, self.n_classes, embedding_init=nn.initializers.normal(1.0),
                       name="label_emb")(y)
        h = jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32), emb], axis=-1).astype(self.dtype)

        def dense(h, features, name):
            return nn.Dense(features, dtype=self.dtype, kernel_init=torch_linear_kernel_init(),
                            bias_init=torch_linear_bias_init(h.shape[-1]), name=name)(h)

        h = nn.leaky_relu(dense(h, self.ndf, "fc1"), 0.2)
        for i in (2, 3):
            h = dense(h, self.ndf, f"fc{i}")
            h = ExampleDropout(self.dropout, name=f"dropout{i}")(h, not train, example_ids)
            h = nn.leaky_relu(h, 0.2)
        return dense(h, 1, "fc4")[:, 0].astype(jnp.float32)


class ConvDiscriminator(nn.Module):
    """concat(x, emb(y) as a constant channel) -> 4x (conv-BN-LReLU) -> avg-pool 3 -> 1x1 conv."""

    n_classes: int = 10
    ndf: int = 32
    dropout: float = 0.0  # the official conv discriminator has none; accepted so both kinds build alike
    dtype: Any = jnp.float32
    axis_name: str | None = None  # pmap axis over which BatchNorm averages batch statistics

    @nn.compact
    def __call__(self, x, y, train: bool = False, example_ids=None):
        chex.assert_rank(x, 4)
        chex.assert_shape(y, (x.shape[0],))
        n, h, w, _ = x.shape
        emb = nn.Embed(self.n_classes, 1, embedding_init=nn.initializers.normal(1.0), name="label_emb")(y)
        emb = jnp.broadcast_to(emb[:, None, None, :], (n, h, w, 1))
        out = jnp.concatenate([x.astype(jnp.float32), emb], axis=-1).astype(self.dtype)
        blocks = ((self.ndf, 3, 1), (self.ndf * 2, 3, 1), (self.ndf * 4, 4, 2), (self.ndf * 4, 4, 2))
        for i, (features, k, s) in enumerate(blocks, start=1):
            out = nn.Conv(features, (k, k), strides=(s, s), padding="VALID", use_bias=False, dtype=self.dtype,
                          kernel_init=nn.initializers.normal(0.02), name=f"conv{i}")(out)
            out = torch_batch_norm(train, f"bn{i}", dtype=self.dtype, axis_name=self.axis_name,
                                   scale_init=normal_scale_init(0.02))(out)
            out = nn.leaky_relu(out, 0.2)
        out = nn.avg_pool(out, (3, 3), strides=(3, 3), padding="VALID")
        out = nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                      name="conv_out")(out)
        chex.assert_shape(out, (n, 1, 1, 1))
        return out.reshape(n).astype(jnp.float32)


def make_discriminator(kind: str, n_classes: int, ndf: int, dropout: float = 0.4, dtype=jnp.float32,
                       axis_name: str | None = None) -> nn.Module:
    if kind == "linear":
        return LinearDiscriminator(n_classes=n_classes, ndf=ndf, dropout=dropout, dtype=dtype, axis_name=axis_name)
    if kind == "conv":
        return ConvDiscriminator(n_classes=n_classes, ndf=ndf, dtype=dtype, axis_name=axis_name)
    raise ValueError(f"unknown discriminator kind {kind!r}; valid: {', '.join(KINDS)}")


def from_config(config, dtype=jnp.float32, axis_name: str | None = None) -> nn.Module:
    """Build the discriminator from a full config (`config.disc` and `config.model.n_classes`)."""
    return make_discriminator(config.disc.kind, config.model.n_classes, config.disc.ndf, config.disc.dropout,
                              dtype=dtype, axis_name=axis_name)


def init_variables(model: nn.Module, key: jax.Array, img_size: int = 32, channels: int = 3):
    """Fresh {'params'[, 'batch_stats']} (BatchNorm only for the conv discriminator).

    Jitted: one compilation instead of one per initialiser call.
    """
    x = jnp.zeros((2, img_size, img_size, channels), jnp.float32)
    y = jnp.zeros((2,), jnp.int32)
    return dict(jax.jit(lambda k: model.init({"params": k}, x, y, train=False))(key))
