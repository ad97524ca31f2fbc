"""U^2-Net (Qin et al., 2020) in Flax, as CGN uses it to turn pre-masks into masks.

CGN never trains U^2-Net: it loads the public pretrained weights and applies the
network in inference mode, both to sharpen the shape mechanism's pre-mask and for
the background loss. The port therefore has to reproduce the PyTorch forward pass
exactly, which is why two details are spelled out here instead of using library
defaults:

* PyTorch's max-pools use `ceil_mode=True`, so an odd-sized map keeps its last
  row/column (the output is ceil(H/2), not floor(H/2)).
* Upsampling is bilinear with `align_corners=True`; `jax.image.resize` samples at
  half-pixel centres and gives different values.

Layer names follow the PyTorch module names (`stage1/rebnconvin/conv_s1`, `side3`,
`outconv`) so the converter is a rename plus kernel transposes. The layer layout of
each RSU block is described once, by `rsu_layers`, and used both to build the Flax
modules and by the converter to know which tensors to expect with which shapes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax.models.torch_batch_norm import torch_batch_norm

Dtype = Any


class StageSpec(NamedTuple):
    name: str
    height: int       # L of RSU-L (7, 6, 5, 4); RSU-4F has height 4 and dilated=True
    dilated: bool     # RSU-4F: no pooling, dilations 1, 2, 4, 8 instead
    in_ch: int
    mid_ch: int
    out_ch: int


class LayerSpec(NamedTuple):
    name: str
    in_ch: int
    out_ch: int
    dilation: int


def _rsu(name, height, in_ch, mid_ch, out_ch, dilated=False):
    return StageSpec(name, height, dilated, in_ch, mid_ch, out_ch)


# The encoder/decoder stages, in the order of the PyTorch `U2NET` / `U2NETP`.
VARIANTS: dict[str, tuple[StageSpec, ...]] = {
    "u2net": (
        _rsu("stage1", 7, 3, 32, 64),
        _rsu("stage2", 6, 64, 32, 128),
        _rsu("stage3", 5, 128, 64, 256),
        _rsu("stage4", 4, 256, 128, 512),
        _rsu("stage5", 4, 512, 256, 512, dilated=True),
        _rsu("stage6", 4, 512, 256, 512, dilated=True),
        _rsu("stage5d", 4, 1024, 256, 512, dilated=True),
        _rsu("stage4d", 4, 1024, 128, 256),
        _rsu("stage3d", 5, 512, 64, 128),
        _rsu("stage2d", 6, 256, 32, 64),
        _rsu("stage1d", 7, 128, 16, 64),
    ),
    "u2netp": (
        _rsu("stage1", 7, 3, 16, 64),
        _rsu("stage2", 6, 64, 16, 64),
        _rsu("stage3", 5, 64, 16, 64),
        _rsu("stage4", 4, 64, 16, 64),
        _rsu("stage5", 4, 64, 16, 64, dilated=True),
        _rsu("stage6", 4, 64, 16, 64, dilated=True),
        _rsu("stage5d", 4, 128, 16, 64, dilated=True),
        _rsu("stage4d", 4, 128, 16, 64),
        _rsu("stage3d", 5, 128, 16, 64),
        _rsu("stage2d", 6, 128, 16, 64),
        _rsu("stage1d", 7, 128, 16, 64),
    ),
}

# side output i reads the decoder stage at scale i (the bottleneck stage6 for i = 6)
SIDE_SOURCES = ("stage1d", "stage2d", "stage3d", "stage4d", "stage5d", "stage6")

INTERMEDIATES = ("stage1", "stage6", "side1", "side2", "side3", "side4", "side5", "side6", "outconv")


def variant_stages(variant: str) -> tuple[StageSpec, ...]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown U2-Net variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def side_in_channels(variant: str) -> tuple[int, ...]:
    out = {s.name: s.out_ch for s in variant_stages(variant)}
    return tuple(out[name] for name in SIDE_SOURCES)


def rsu_layers(spec: StageSpec) -> tuple[LayerSpec, ...]:
    """The REBNCONV layers of one RSU block, with their channels and dilations."""
    L, mid, out = spec.height, spec.mid_ch, spec.out_ch
    if spec.dilated:
        enc_dil = [2 ** (i - 1) for i in range(1, L + 1)]
        dec_dil = [2 ** (i - 1) for i in range(1, L)]
    else:
        enc_dil = [1] * (L - 1) + [2]
        dec_dil = [1] * (L - 1)
    layers = [LayerSpec("rebnconvin", spec.in_ch, out, 1), LayerSpec("rebnconv1", out, mid, enc_dil[0])]
    layers += [LayerSpec(f"rebnconv{i}", mid, mid, enc_dil[i - 1]) for i in range(2, L + 1)]
    layers += [LayerSpec(f"rebnconv{i}d", 2 * mid, mid, dec_dil[i - 1]) for i in range(L - 1, 1, -1)]
    layers.append(LayerSpec("rebnconv1d", 2 * mid, out, dec_dil[0]))
    return tuple(layers)


def max_pool_ceil(x: jax.Array) -> jax.Array:
    """2x2 stride-2 max-pool with PyTorch's `ceil_mode=True` (NHWC)."""
    h, w = x.shape[1], x.shape[2]
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)))


def _align_corners_axis(x: jax.Array, size: int, axis: int) -> jax.Array:
    n_in = x.shape[axis]
    if n_in == size:
        return x
    if size == 1 or n_in == 1:
        src = np.zeros(size, np.float64)
    else:
        src = np.arange(size, dtype=np.float64) * ((n_in - 1) / (size - 1))
    i0 = np.clip(np.floor(src).astype(np.int32), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac_shape = [1] * x.ndim
    frac_shape[axis] = size
    frac = jnp.asarray((src - i0).reshape(frac_shape), dtype=x.dtype)
    x0 = jnp.take(x, i0, axis=axis)
    x1 = jnp.take(x, i1, axis=axis)
    return x0 + (x1 - x0) * frac


def upsample_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of an NHWC map to `size` = (H, W) with `align_corners=True`.

    Sample positions are static (they depend on shapes only), so this is two gathers
    and a lerp per axis under jit.
    """
    chex.assert_rank(x, 4)
    x = _align_corners_axis(x, int(size[0]), axis=1)
    return _align_corners_axis(x, int(size[1]), axis=2)


def _upsample_like(x, target):
    return upsample_bilinear_align_corners(x, target.shape[1:3])


class REBNCONV(nn.Module):
    """3x3 conv (dilated) + BatchNorm + ReLU."""
    out_ch: int
    dilation: int = 1
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = self.dilation
        x = nn.Conv(self.out_ch, (3, 3), padding=((d, d), (d, d)), kernel_dilation=(d, d),
                    dtype=self.dtype, param_dtype=jnp.float32, precision=self.precision, name="conv_s1")(x)
        x = torch_batch_norm(train, "bn_s1", dtype=self.dtype)(x)
        return nn.relu(x)


class RSU(nn.Module):
    """Residual U-block RSU-L (or RSU-4F when `spec.dilated`)."""
    spec: StageSpec
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        spec = self.spec
        chex.assert_axis_dimension(x, -1, spec.in_ch)
        layers = {l.name: REBNCONV(l.out_ch, l.dilation, dtype=self.dtype, precision=self.precision,
                                   name=l.name) for l in rsu_layers(spec)}
        L = spec.height
        pool = not spec.dilated

        hxin = layers["rebnconvin"](x, train)
        h, skips = hxin, []
        for i in range(1, L):
            h = layers[f"rebnconv{i}"](h, train)
            skips.append(h)
            if pool and i < L - 1:
                h = max_pool_ceil(h)
        d = layers[f"rebnconv{L}"](h, train)
        for i in range(L - 1, 0, -1):
            d = layers[f"rebnconv{i}d"](jnp.concatenate([d, skips[i - 1]], axis=-1), train)
            if pool and i > 1:
                d = _upsample_like(d, skips[i - 2])
        return d + hxin


class U2Net(nn.Module):
    """U^2-Net salient-object network: NHWC image -> sigmoid map (N, H, W, out_ch).

    `variant` is "u2net" (44.0M parameters, the network CGN uses) or "u2netp"
    (the 1.1M-parameter small model). `dtype` is the compute dtype (float32 or
    bfloat16); parameters are always float32 and the returned map is float32.
    `precision` is passed to every convolution (e.g. `jax.lax.Precision.HIGHEST` to
    avoid TF32 on GPUs when matching the PyTorch reference).

    `train=True` normalises with batch statistics (needs `mutable=["batch_stats"]`);
    the running variance is updated with the biased batch variance, where PyTorch
    uses the unbiased one. CGN keeps U^2-Net frozen, in inference mode.
    """
    variant: str = "u2net"
    out_ch: int = 1
    dtype: Dtype = jnp.float32
    precision: Any = None

    @classmethod
    def small(cls, **kwargs) -> "U2Net":
        """U2-Net-P, the small variant."""
        return cls(variant="u2netp", **kwargs)

    @nn.compact
    def __call__(self, x, train: bool = False, return_intermediates: bool = False):
        stages = variant_stages(self.variant)
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, -1, stages[0].in_ch)
        x = x.astype(self.dtype)
        rsu = {s.name: RSU(s, dtype=self.dtype, precision=self.precision, name=s.name) for s in stages}

        # encoder
        hx1 = rsu["stage1"](x, train)
        hx2 = rsu["stage2"](max_pool_ceil(hx1), train)
        hx3 = rsu["stage3"](max_pool_ceil(hx2), train)
        hx4 = rsu["stage4"](max_pool_ceil(hx3), train)
        hx5 = rsu["stage5"](max_pool_ceil(hx4), train)
        hx6 = rsu["stage6"](max_pool_ceil(hx5), train)

        # decoder
        cat = lambda a, b: jnp.concatenate([_upsample_like(a, b), b], axis=-1)  # noqa: E731
        hx5d = rsu["stage5d"](cat(hx6, hx5), train)
        hx4d = rsu["stage4d"](cat(hx5d, hx4), train)
        hx3d = rsu["stage3d"](cat(hx4d, hx3), train)
        hx2d = rsu["stage2d"](cat(hx3d, hx2), train)
        hx1d = rsu["stage1d"](cat(hx2d, hx1), train)

        sources = dict(stage1d=hx1d, stage2d=hx2d, stage3d=hx3d, stage4d=hx4d, stage5d=hx5d, stage6=hx6)
        sides = [nn.Conv(self.out_ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                         param_dtype=jnp.float32, precision=self.precision, name=f"side{i}")(sources[src])
                 for i, src in enumerate(SIDE_SOURCES, start=1)]
        fused = jnp.concatenate([sides[0]] + [_upsample_like(s, sides[0]) for s in sides[1:]], axis=-1)
        logits = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                         precision=self.precision, name="outconv")(fused)
        y = jax.nn.sigmoid(logits.astype(jnp.float32))
        chex.assert_shape(y, x.shape[:3] + (self.out_ch,))
        if not return_intermediates:
            return y
        inter = {"stage1": hx1, "stage6": hx6, "outconv": logits}
        inter.update({f"side{i}": s for i, s in enumerate(sides, start=1)})
        return y, inter

    def init_shapes(self, image_size: int = 64, batch: int = 1):
        """The variables' `ShapeDtypeStruct`s, without computing anything."""
        x = jax.ShapeDtypeStruct((batch, image_size, image_size, variant_stages(self.variant)[0].in_ch), jnp.float32)
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype)))
