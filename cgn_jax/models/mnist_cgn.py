"""The MNIST CGN generator: shape, texture and background mechanisms.

Layer for layer this follows the official PyTorch model, so its pretrained
weights can be ported and reproduce the official outputs. Each mechanism reads
`concat(u, label_emb(y))`; the generator owns the label embedding so that every
mechanism sees the same embedding table, and feeding each mechanism its own label
gives counterfactuals. Randomness is explicit: noise comes from the caller or the
`noise` RNG stream, the texture layer draws from the `texture` stream.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from cgn_jax.compose import compose, texture_layer
from cgn_jax.models.torch_batch_norm import normal_scale_init, torch_batch_norm
from cgn_jax.models.upsample_conv import UpsampleConv3x3

MASK_CLAMP = (1e-4, 1.0 - 1e-4)
INIT_TYPES = ("orthogonal", "normal", "xavier", "kaiming")


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """InstanceNorm2d without affine parameters or running statistics (biased variance)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def weight_init(init_type: str, gain: float):
    if init_type == "orthogonal":
        return nn.initializers.orthogonal(scale=gain)
    if init_type == "normal":
        return nn.initializers.normal(stddev=gain)
    if init_type == "xavier":
        return nn.initializers.variance_scaling(gain**2, "fan_avg", "normal")
    if init_type == "kaiming":
        return nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    raise ValueError(f"unknown init_type {init_type!r}; valid: {', '.join(INIT_TYPES)}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def tanh_unsaturating(x: jax.Array, floor: float) -> jax.Array:
    """tanh whose gradient towards 0 never falls below `floor`; forward and floor=0 are plain tanh.

    A GAN can drive a texture mechanism's output for one class deep into saturation
    (a colored-MNIST class whose background went white at pre-activation +6 had tanh'
    ~5e-4), after which no loss can bring it back. Here a saturated unit can always be
    pulled back towards 0, at slope >= `floor`, but is not pushed further out by it.
    """
    return jnp.tanh(x)


def _tanh_unsaturating_fwd(x, floor):
    y = jnp.tanh(x)
    return y, y


def _tanh_unsaturating_bwd(floor, y, g):
    slope = 1.0 - jnp.square(y)
    # descent moves y by -g * slope: towards 0 exactly when g and y share a sign
    slope = jnp.where(g * y > 0, jnp.maximum(slope, floor), slope)
    return ((g * slope).astype(g.dtype),)


tanh_unsaturating.defvjp(_tanh_unsaturating_fwd, _tanh_unsaturating_bwd)


class _Mechanism(nn.Module):
    """Shared pieces of the shape and texture mechanisms."""

    ngf: int = 32
    init_size: int = 8
    init_type: str = "orthogonal"
    init_gain: float = 0.1
    dtype: Any = jnp.float32
    axis_name: str | None = None  # pmap axis over which BatchNorm averages batch statistics
    upsample_conv: str = "auto"  # how upsample+conv is computed (cgn_jax.models.upsample_conv); same result

    def _conv(self, features, name, use_bias=False):
        return nn.Conv(features, (3, 3), padding=1, use_bias=use_bias, dtype=self.dtype,
                       kernel_init=weight_init(self.init_type, self.init_gain), name=name)

    def _bn(self, train, name):
        return torch_batch_norm(train, name, dtype=self.dtype, axis_name=self.axis_name,
                                scale_init=normal_scale_init(self.init_gain))

    def _stem(self, inp):
        h = nn.Dense(self.ngf * 2 * self.init_size**2, dtype=self.dtype,
                     kernel_init=weight_init(self.init_type, self.init_gain), name="linear")(inp)
        # PyTorch views the linear output as NCHW; keep that order so ported weights line up.
        return einops.rearrange(h, "n (c h w) -> n h w c", c=self.ngf * 2, h=self.init_size, w=self.init_size)

    def _up_block(self, h, features, train, idx):
        h = UpsampleConv3x3(features, dtype=self.dtype, kernel_init=weight_init(self.init_type, self.init_gain),
                            mode=self.upsample_conv, name=f"conv{idx}")(h)
        h = self._bn(train, f"bn{idx}")(h)
        return nn.leaky_relu(h, 0.2)


class ShapeMechanism(_Mechanism):
    """Linear -> IN -> up-conv-BN-LReLU -> IN -> up-conv-BN-LReLU -> IN: the raw (unclamped) mask."""

    @nn.compact
    def __call__(self, inp, train: bool = False):
        h = instance_norm(self._stem(inp))
        h = instance_norm(self._up_block(h, self.ngf, train, 1))
        return instance_norm(self._up_block(h, 1, train, 2))


class TextureMechanism(_Mechanism):
    """Linear -> 2x (up-conv-BN-LReLU) -> conv -> BN -> tanh: a texture map before the texture layer."""

    out_channels: int = 3
    tanh_grad_floor: float = 0.0  # > 0: `tanh_unsaturating` (training only; outputs are unchanged)

    @nn.compact
    def __call__(self, inp, train: bool = False):
        h = self._stem(inp)
        h = self._up_block(h, self.ngf * 2, train, 1)
        h = self._up_block(h, self.ngf, train, 2)
        h = self._bn(train, "bn3")(self._conv(self.out_channels, "conv3", use_bias=True)(h))
        return tanh_unsaturating(h, self.tanh_grad_floor) if self.tanh_grad_floor else jnp.tanh(h)


class MnistCGN(nn.Module):
    """Shape (`f_shape`), foreground texture (`f_text1`) and background (`f_text2`) mechanisms."""

    n_classes: int = 10
    latent_dim: int = 32
    ngf: int = 32
    img_size: int = 32
    init_type: str = "orthogonal"
    init_gain: float = 0.1
    texture_mode: str = "tile_crop"
    patch_size: int = 4
    dtype: Any = jnp.float32
    axis_name: str | None = None  # set to the pmap axis so BatchNorm uses the global batch's statistics
    upsample_conv: str = "auto"   # "phase" | "direct" | "auto" (phase on small CPU batches); see models/upsample_conv.py
    tanh_grad_floor: float = 0.0  # texture/background heads; see `tanh_unsaturating`

    def setup(self):
        kw = dict(ngf=self.ngf, init_size=self.img_size // 4, init_type=self.init_type,
                  init_gain=self.init_gain, dtype=self.dtype, axis_name=self.axis_name,
                  upsample_conv=self.upsample_conv)
        # torch.nn.Embedding initialises N(0, 1), and the official init_net leaves it alone.
        self.label_emb = nn.Embed(self.n_classes, self.n_classes, embedding_init=nn.initializers.normal(1.0))
        self.f_shape = ShapeMechanism(**kw)
        self.f_text1 = TextureMechanism(**kw, tanh_grad_floor=self.tanh_grad_floor)
        self.f_text2 = TextureMechanism(**kw, tanh_grad_floor=self.tanh_grad_floor)

    def sample_noise(self, key: jax.Array, n: int) -> jax.Array:
        return jax.random.normal(key, (n, self.latent_dim), jnp.float32)

    def mechanisms(self, u, y_shape, y_texture=None, y_background=None, train: bool = False):
        """Raw mechanism outputs for noise u (N, latent) and per-mechanism labels (N,).

        Returns (mask before clamping (N,H,W,1), foreground and background before the
        texture layer (N,H,W,3)). Labels default to `y_shape` (no counterfactual).
        """
        chex.assert_rank(u, 2)
        chex.assert_axis_dimension(u, 1, self.latent_dim)
        y_texture = y_shape if y_texture is None else y_texture
        y_background = y_shape if y_background is None else y_background
        chex.assert_shape([y_shape, y_texture, y_background], (u.shape[0],))

        return (self.shape(u, y_shape, train), self.texture(u, y_texture, train),
                self.background(u, y_background, train))

    def _inp(self, u, y):
        return jnp.concatenate([u, self.label_emb(y)], axis=-1).astype(self.dtype)

    def shape(self, u, y, train: bool = False):
        """The raw mask (before clamping) alone; lets a sampler reuse one mask for many counterfactuals."""
        return self.f_shape(self._inp(u, y), train)

    def texture(self, u, y, train: bool = False):
        return self.f_text1(self._inp(u, y), train)

    def background(self, u, y, train: bool = False):
        return self.f_text2(self._inp(u, y), train)

    def __call__(self, y_shape, y_texture=None, y_background=None, u=None, train: bool = False):
        """Compose an image. Uses RNG streams `noise` (if u is None) and `texture`.

        Returns a dict with the clamped `mask` (N,H,W,1), `foreground` and `background`
        after the texture layer, and the composite `image` (N,H,W,3), all float32 in the
        generator's value ranges ([0,1] for the mask, [-1,1] for the rest).
        """
        if u is None:
            u = self.sample_noise(self.make_rng("noise"), y_shape.shape[0])
        mask, fg, bg = self.mechanisms(u, y_shape, y_texture, y_background, train)
        mask = jnp.clip(mask.astype(jnp.float32), *MASK_CLAMP)
        fg = fg.astype(jnp.float32)
        bg = bg.astype(jnp.float32)
        if self.texture_mode != "none":
            kf, kb = jax.random.split(self.make_rng("texture"))
            fg = texture_layer(kf, fg, self.texture_mode, self.patch_size)
            bg = texture_layer(kb, bg, self.texture_mode, self.patch_size)
        return {"mask": mask, "foreground": fg, "background": bg, "image": compose(mask, fg, bg)}


def from_config(model_config, dtype=jnp.float32, axis_name: str | None = None) -> MnistCGN:
    """Build the generator from a `config.model` section."""
    floor = float(model_config.get("tanh_grad_floor", 0.0))
    if not 0.0 <= floor < 1.0:
        raise ValueError(f"model.tanh_grad_floor={floor:g} is not in [0, 1): it is a minimum tanh slope "
                         "(0 = plain tanh, the official recipe; 0.25 revived a saturated class)")
    return MnistCGN(n_classes=model_config.n_classes, latent_dim=model_config.latent_dim, ngf=model_config.ngf,
                    img_size=model_config.img_size, init_type=model_config.init_type,
                    init_gain=model_config.init_gain, texture_mode=model_config.texture_mode,
                    patch_size=model_config.patch_size, dtype=dtype, axis_name=axis_name,
                    upsample_conv=model_config.get("upsample_conv", "auto"),
                    tanh_grad_floor=floor)


def init_variables(model: MnistCGN, key: jax.Array, batch: int = 2):
    """Freshly initialised {'params', 'batch_stats'}."""
    y = jnp.zeros((batch,), jnp.int32)
    u = jnp.zeros((batch, model.latent_dim), jnp.float32)
    return model.init({"params": key}, u, y, y, y, train=False, method=MnistCGN.mechanisms)
