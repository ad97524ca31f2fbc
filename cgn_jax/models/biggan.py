"""BigGAN-deep generator, numerically faithful to pytorch-pretrained-BigGAN.

CGN's ImageNet mechanisms (shape, foreground texture, background) all start from
the pretrained BigGAN-deep-256, so the port must reproduce the published model
number for number, quirks included:

* Conditional BatchNorm never uses batch statistics. Each BN layer stores 51 sets of
  running statistics, one per truncation 0, 0.02, ..., 1, and the reference mixes
  two neighbouring sets as `stats[i] * f + stats[i + 1] * (1 - f)` where
  `f, i = modf(truncation / step)` in float64, except that an exact step (`f == 0`)
  uses `stats[i]` alone. The weight on `i` is the fractional part, i.e. the mixing
  is reversed relative to linear interpolation, and a truncation a hair above a step
  picks (almost) the *next* set. `truncation_stats` reproduces this on the host in
  float64 and hands the model two indices and two weights as arrays, so a jitted
  model can take any truncation without recompiling.
* Spectral norm (every conv and linear except the class embedding) has two modes,
  `BigGANDeep.spectral_norm`:
  - "folded" (default): in eval mode the reference divides each weight by
    `sigma = u . (W v)` from its stored `u` and `v` (no power iteration); the converter
    folds that division into the weights (`cgn_jax.port.biggan`), so the model holds
    plain, already-normalised weights. Exact for inference and for the frozen x_gt
    BigGAN, but training these weights is not training the reference's parametrisation.
  - "power_iteration": what the official CGN trains (`torch.nn.utils.spectral_norm`,
    eps = config.eps). Each layer holds its unnormalised `kernel` (param, same path as
    in folded mode) and `u` (out,), `v` (kernel.shape[:-1], i.e. torch's `v` in Flax's
    (kh, kw, in) order) in the "spectral" collection, and uses `W / sigma`. With
    `train=True` (and "spectral" mutable) it first does one power iteration under
    stop_gradient, `v = normalize(W^T u)`, `u = normalize(W v)` (normalize divides by
    max(norm, eps)), returns the new u, v, and gradients flow through `W` in both `W`
    and `sigma`; otherwise it uses the stored u, v (torch's eval mode). sigma and the
    power iteration are float32 whatever the compute dtype.
* `conv_to_rgb` has `channel_width` outputs of which only the first 3 are used; the
  folded port keeps just those 3 (the same numbers for 1/40th of the last conv's work).
  In power-iteration mode the kernel keeps all `channel_width` outputs, because sigma is
  the norm of the whole matrix (the unused outputs still get gradients through sigma);
  only the first 3 are convolved, and the bias has 3 entries.

Parameters are float32; `dtype` selects the compute dtype (BN statistics and the
attention softmax stay in float32).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (up-sample?, in-channel multiplier, out-channel multiplier) per GenBlock, as in the
# published config.json files. Every resolution has a plain block then an up-sampling one.
LAYERS_128 = ((False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
              (True, 8, 4), (False, 4, 4), (True, 4, 2), (False, 2, 2), (True, 2, 1))
LAYERS_256 = ((False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
              (True, 8, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
              (False, 2, 2), (True, 2, 1))
LAYERS_512 = ((False, 16, 16), (True, 16, 16), (False, 16, 16), (True, 16, 8), (False, 8, 8),
              (True, 8, 8), (False, 8, 8), (True, 8, 4), (False, 4, 4), (True, 4, 2),
              (False, 2, 2), (True, 2, 1), (False, 1, 1), (True, 1, 1))
_LAYERS = {128: LAYERS_128, 256: LAYERS_256, 512: LAYERS_512}


@dataclasses.dataclass(frozen=True)
class BigGANConfig:
    """Mirror of `pytorch_pretrained_biggan.BigGANConfig` (same field names, same JSON).

    Defaults are BigGAN-deep-256, the model CGN uses. As in the reference, the class
    embedding has `z_dim` outputs; `class_embed_dim` is carried for JSON round trips and
    must equal `z_dim`.
    """

    output_dim: int = 256
    z_dim: int = 128
    class_embed_dim: int = 128
    channel_width: int = 128
    num_classes: int = 1000
    layers: tuple = LAYERS_256
    attention_layer_position: int = 8
    eps: float = 1e-4
    n_stats: int = 51

    def __post_init__(self):
        layers = tuple((bool(u), int(a), int(b)) for u, a, b in self.layers)
        object.__setattr__(self, "layers", layers)
        if self.class_embed_dim != self.z_dim:
            raise ValueError(f"class_embed_dim ({self.class_embed_dim}) must equal z_dim ({self.z_dim}): the "
                             "reference embeds classes into z_dim and ignores class_embed_dim")
        ups = sum(u for u, _, _ in layers)
        if 4 * 2**ups != self.output_dim:
            raise ValueError(f"layers up-sample 4x4 by 2^{ups}, which is not output_dim {self.output_dim}")
        for (_, _, out), (_, nxt, _) in zip(layers, layers[1:]):
            if out != nxt:
                raise ValueError(f"layer channels do not chain: {layers}")
        for _, cin, cout in layers:
            if cout not in (cin, cin // 2):  # the skip path can only keep all or the first half
                raise ValueError(f"a GenBlock must keep or halve its channels, got {cin} -> {cout}")
        if layers[0][1] != 16:
            raise ValueError("the first GenBlock must take 16 * channel_width channels (gen_z's output)")
        if layers[-1][2] != 1:
            raise ValueError("the last GenBlock must output channel_width channels")
        if self.n_stats < 2:
            raise ValueError("n_stats must be at least 2")

    @classmethod
    def variant(cls, output_dim: int | str, **overrides) -> "BigGANConfig":
        """The published biggan-deep-{128,256,512} config (optionally with overrides)."""
        output_dim = int(output_dim)
        if output_dim not in _LAYERS:
            raise ValueError(f"unknown BigGAN-deep variant {output_dim}; valid: 128, 256, 512")
        return cls(**{"output_dim": output_dim, "layers": _LAYERS[output_dim], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "BigGANConfig":
        """From a pytorch-pretrained-BigGAN `config.json` dict (or `to_dict` output)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown BigGAN config key(s) {unknown}; known: {sorted(fields)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = [list(layer) for layer in self.layers]
        return d

    @property
    def cond_dim(self) -> int:
        return 2 * self.z_dim


class TruncationStats(NamedTuple):
    """Which two of the stored BN statistics to mix, and with which weights.

    `index` (2,) int32, `weight` (2,) float32. A pytree of arrays: pass it to a jitted
    model in place of the truncation and a new truncation costs no recompile.
    """

    index: Any
    weight: Any


def truncation_stats(truncation: float, n_stats: int = 51) -> TruncationStats:
    """Host-side, float64 reproduction of the reference's statistic selection (see module doc)."""
    truncation = float(truncation)
    if not 0.0 < truncation <= 1.0:
        raise ValueError(f"truncation must be in (0, 1], got {truncation}")
    step_size = 1.0 / (n_stats - 1)
    coef, start = math.modf(truncation / step_size)
    start = int(start)
    if coef != 0.0:
        index, weight = (start, start + 1), (coef, 1.0 - coef)
    else:
        index, weight = (start, start), (1.0, 0.0)
    return TruncationStats(np.asarray(index, np.int32), np.asarray(weight, np.float32))


def truncated_noise(key: jax.Array, batch: int, z_dim: int = 128, truncation: float = 1.0) -> jax.Array:
    """Normal noise truncated to [-2, 2], times `truncation` (the reference's `truncated_noise_sample`)."""
    return truncation * jax.random.truncated_normal(key, -2.0, 2.0, (batch, z_dim), jnp.float32)


def upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 (each pixel becomes a 2x2 block), as F.interpolate(mode='nearest')."""
    return einops.repeat(x, "n h w c -> n (h a) (w b) c", a=2, b=2)


FOLDED, POWER_ITERATION = "folded", "power_iteration"
SPECTRAL_NORM_MODES = (FOLDED, POWER_ITERATION)
SPECTRAL = "spectral"  # the variable collection holding each layer's u, v in power-iteration mode
_HIGHEST = jax.lax.Precision.HIGHEST  # sigma and the power iteration in full float32 (no TF32 on GPUs)


def check_spectral_norm(mode: str) -> str:
    if mode not in SPECTRAL_NORM_MODES:
        raise ValueError(f"unknown spectral norm mode {mode!r}; valid: {', '.join(SPECTRAL_NORM_MODES)}")
    return mode


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """torch's `F.normalize(x, dim=0, eps=eps)` of the whole array: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x)), eps)


def _w_v(kernel: jax.Array, v: jax.Array) -> jax.Array:
    """`W_mat @ v` (out,) for a Flax kernel (..., out) and `v` shaped kernel.shape[:-1]."""
    return jnp.tensordot(v, kernel, axes=v.ndim, precision=_HIGHEST)


def _wt_u(kernel: jax.Array, u: jax.Array) -> jax.Array:
    """`W_mat^T @ u`, shaped kernel.shape[:-1]."""
    return jnp.tensordot(kernel, u, axes=1, precision=_HIGHEST)


def _random_unit(key: jax.Array, shape, eps: float) -> jax.Array:
    return _l2_normalize(jax.random.normal(key, shape, jnp.float32), eps)


def spectral_normalize(module: nn.Module, kernel: jax.Array, eps: float, update: bool) -> jax.Array:
    """`kernel / sigma` with torch's spectral norm state (`u`, `v` in the "spectral" collection of `module`).

    `update`: one power iteration first (torch's train mode), storing the new u, v.
    Gradients flow through `kernel` only (u, v are constants, as under torch's no_grad).
    """
    kernel = kernel.astype(jnp.float32)
    u_var = module.variable(SPECTRAL, "u", lambda: _random_unit(module.make_rng("params"), kernel.shape[-1:], eps))
    v_var = module.variable(SPECTRAL, "v", lambda: _random_unit(module.make_rng("params"), kernel.shape[:-1], eps))
    u, v = u_var.value, v_var.value
    if update:
        w = jax.lax.stop_gradient(kernel)
        v = _l2_normalize(_wt_u(w, u), eps)
        u = _l2_normalize(_w_v(w, v), eps)
        u_var.value, v_var.value = u, v
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = jnp.dot(u, _w_v(kernel, v), precision=_HIGHEST)
    return kernel / sigma


class SNDense(nn.Module):
    """Dense layer with torch-style spectral norm (see `spectral_normalize`); `kernel` (in, out)."""

    features: int
    eps: float
    update: bool = False
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        w = spectral_normalize(self, kernel, self.eps, self.update)
        y = jax.lax.dot_general(x.astype(self.dtype), w.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


class SNConv(nn.Module):
    """Stride-1 'same' conv with torch-style spectral norm; `kernel` (k, k, in, features).

    `keep_out`: convolve with only the first `keep_out` outputs (sigma still over all of them).
    """

    features: int
    kernel_size: int
    eps: float
    update: bool = False
    use_bias: bool = True
    keep_out: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        n_out = self.keep_out or self.features
        w = spectral_normalize(self, kernel, self.eps, self.update)[..., :n_out]
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (1, 1), [(k // 2, k // 2)] * 2,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (n_out,), jnp.float32).astype(self.dtype)
        return y


def _dense(features, name, sn, eps, update, use_bias=True, dtype=None):
    if sn == FOLDED:
        return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)
    return SNDense(features, eps, update, use_bias, dtype or jnp.float32, name=name)


def _conv(features, k, name, sn, eps, update, use_bias=True, dtype=jnp.float32, keep_out=None):
    if sn == FOLDED:
        return nn.Conv(keep_out or features, (k, k), padding=k // 2, use_bias=use_bias, dtype=dtype, name=name)
    return SNConv(features, k, eps, update, use_bias, keep_out, dtype, name=name)


def _mix_stats(stats: jax.Array, ts: TruncationStats) -> jax.Array:
    rows = jnp.take(stats, ts.index, axis=0)  # (2, C)
    return rows[0] * ts.weight[0] + rows[1] * ts.weight[1]


class ConditionalBatchNorm(nn.Module):
    """BN with stored per-truncation statistics; gain `1 + scale(cond)`, bias `offset(cond)`."""

    features: int
    eps: float
    n_stats: int
    dtype: Any = jnp.float32
    spectral_norm: str = FOLDED
    update_sn: bool = False

    @nn.compact
    def __call__(self, x, cond, ts: TruncationStats):
        means = self.variable("batch_stats", "running_means", jnp.zeros, (self.n_stats, self.features))
        variances = self.variable("batch_stats", "running_vars", jnp.ones, (self.n_stats, self.features))
        mean, var = _mix_stats(means.value, ts), _mix_stats(variances.value, ts)
        dense = lambda name: _dense(self.features, name, self.spectral_norm, self.eps, self.update_sn,  # noqa: E731
                                    use_bias=False)
        gain = 1.0 + dense("scale")(cond.astype(jnp.float32))
        bias = dense("offset")(cond.astype(jnp.float32))
        # (x - mean) / sqrt(var + eps) * gain + bias, folded into one per-sample multiply-add.
        a = gain * jax.lax.rsqrt(var + self.eps)  # (N, C)
        b = bias - mean * a
        return x * a[:, None, None, :].astype(self.dtype) + b[:, None, None, :].astype(self.dtype)


class GenBlock(nn.Module):
    """Bottleneck residual block: BN-ReLU-1x1, BN-ReLU-(up)-3x3, BN-ReLU-3x3, BN-ReLU-1x1."""

    in_size: int
    out_size: int
    up_sample: bool
    eps: float
    n_stats: int
    reduction_factor: int = 4
    dtype: Any = jnp.float32
    spectral_norm: str = FOLDED
    update_sn: bool = False

    @nn.compact
    def __call__(self, x, cond, ts):
        mid = self.in_size // self.reduction_factor
        sn, up = self.spectral_norm, self.update_sn
        bn = lambda c, name: ConditionalBatchNorm(c, self.eps, self.n_stats, self.dtype, sn, up, name=name)
        conv = lambda c, k, name: _conv(c, k, name, sn, self.eps, up, dtype=self.dtype)
        h = conv(mid, 1, "conv_0")(nn.relu(bn(self.in_size, "bn_0")(x, cond, ts)))
        h = nn.relu(bn(mid, "bn_1")(h, cond, ts))
        if self.up_sample:
            h = upsample2x(h)
        h = conv(mid, 3, "conv_1")(h)
        h = conv(mid, 3, "conv_2")(nn.relu(bn(mid, "bn_2")(h, cond, ts)))
        h = conv(self.out_size, 1, "conv_3")(nn.relu(bn(mid, "bn_3")(h, cond, ts)))
        skip = x
        if self.in_size != self.out_size:  # the reference keeps the first half of the channels
            skip = skip[..., : self.in_size // 2]
        if self.up_sample:
            skip = upsample2x(skip)
        return h + skip


class SelfAttention(nn.Module):
    """SAGAN attention with 2x2-max-pooled keys/values and a learned residual gain `gamma`."""

    channels: int
    dtype: Any = jnp.float32
    spectral_norm: str = FOLDED
    eps: float = 1e-4
    update_sn: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.channels
        if self.spectral_norm == FOLDED:
            conv = lambda f, name: nn.Conv(f, (1, 1), use_bias=False, dtype=self.dtype, name=name)
        else:
            conv = lambda f, name: SNConv(f, 1, self.eps, self.update_sn, use_bias=False, dtype=self.dtype,
                                          name=name)
        pool = lambda t: nn.max_pool(t, (2, 2), strides=(2, 2))
        n, h, w, _ = x.shape
        theta = einops.rearrange(conv(c // 8, "snconv1x1_theta")(x), "n h w c -> n (h w) c")
        phi = einops.rearrange(pool(conv(c // 8, "snconv1x1_phi")(x)), "n h w c -> n (h w) c")
        g = einops.rearrange(pool(conv(c // 2, "snconv1x1_g")(x)), "n h w c -> n (h w) c")
        logits = jnp.einsum("npc,nqc->npq", theta, phi, preferred_element_type=jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = einops.rearrange(jnp.einsum("npq,nqc->npc", attn, g), "n (h w) c -> n h w c", h=h, w=w)
        out = conv(c, "snconv1x1_o_conv")(out)
        gamma = self.param("gamma", nn.initializers.zeros, (1,), jnp.float32)
        return x + gamma.astype(self.dtype) * out


class BigGANDeep(nn.Module):
    """BigGAN-deep generator: `(z, class_vector, truncation) -> images` (N, H, W, 3) in [-1, 1].

    Submodule names follow the PyTorch state dict (`layers_<i>` is `generator.layers.<i>`,
    the attention layer taking its own index), so the converter is a plain renaming.
    `spectral_norm`: "folded" or "power_iteration" (see the module docstring); the latter
    adds the "spectral" collection (u, v per layer) and keeps conv_to_rgb's full kernel.
    """

    config: BigGANConfig = BigGANConfig()
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise each GenBlock in the backward pass (same parameters and outputs)
    spectral_norm: str = FOLDED

    def stats(self, truncation: float) -> TruncationStats:
        return truncation_stats(truncation, self.config.n_stats)

    @nn.compact
    def __call__(self, z, class_vector, truncation, train: bool = False):
        """`class_vector`: (N, num_classes) one-hot or soft, or (N,) integer labels.

        `truncation`: a Python float in (0, 1] or a `TruncationStats` (e.g. from
        `model.stats(t)`), the latter traceable. The reference BN always uses its stored
        statistics, so `train` only matters in power-iteration mode: one power iteration per
        spectrally normalised layer, whose new u, v come back through
        `apply(..., mutable=["spectral"])` (torch's train mode). Folded mode ignores it.
        """
        sn = check_spectral_norm(self.spectral_norm)
        update = bool(train) and sn == POWER_ITERATION
        cfg = self.config
        if isinstance(truncation, TruncationStats):
            ts = truncation
        else:
            try:
                truncation = float(truncation)
            except jax.errors.ConcretizationTypeError:
                raise TypeError("a traced truncation cannot reproduce the reference's float64 statistic "
                                "selection; pass `model.stats(t)` (a TruncationStats of arrays) instead") from None
            ts = self.stats(truncation)
        ts = TruncationStats(jnp.asarray(ts.index, jnp.int32), jnp.asarray(ts.weight, jnp.float32))
        chex.assert_shape(ts.index, (2,))
        chex.assert_rank(z, 2)
        n = z.shape[0]
        chex.assert_shape(z, (n, cfg.z_dim))
        if class_vector.ndim == 1 and jnp.issubdtype(class_vector.dtype, jnp.integer):
            class_vector = jax.nn.one_hot(class_vector, cfg.num_classes)
        chex.assert_shape(class_vector, (n, cfg.num_classes))

        ch = cfg.channel_width
        embed = nn.Dense(cfg.z_dim, use_bias=False, dtype=self.dtype, name="embeddings")(class_vector)
        cond = jnp.concatenate([z.astype(self.dtype), embed.astype(self.dtype)], axis=-1)
        h = _dense(4 * 4 * 16 * ch, "gen_z", sn, cfg.eps, update, dtype=self.dtype)(cond)
        # The TF-derived gen_z output is laid out (h, w, c): already NHWC.
        h = einops.rearrange(h, "n (h w c) -> n h w c", h=4, w=4)

        # remat recomputes each block's activations in the backward pass (fine-tuning memory)
        block = nn.remat(GenBlock) if self.remat else GenBlock
        index = 0
        for i, (up, cin, cout) in enumerate(cfg.layers):
            if i == cfg.attention_layer_position:
                h = SelfAttention(ch * cin, dtype=self.dtype, spectral_norm=sn, eps=cfg.eps, update_sn=update,
                                  name=f"layers_{index}")(h)
                index += 1
            h = block(ch * cin, ch * cout, up, cfg.eps, cfg.n_stats, dtype=self.dtype, spectral_norm=sn,
                      update_sn=update, name=f"layers_{index}")(h, cond, ts)
            index += 1

        h = _FinalBatchNorm(ch, cfg.eps, cfg.n_stats, self.dtype, name="bn")(h, ts)
        h = _conv(ch, 3, "conv_to_rgb", sn, cfg.eps, update, dtype=self.dtype, keep_out=3)(nn.relu(h))
        out = jnp.tanh(h.astype(jnp.float32))
        chex.assert_shape(out, (n, cfg.output_dim, cfg.output_dim, 3))
        return out

    def init_shapes(self, batch: int = 1):
        """`jax.eval_shape` of `init`: the variable tree this config expects, without allocating it."""
        z = jnp.zeros((batch, self.config.z_dim), jnp.float32)
        y = jnp.zeros((batch, self.config.num_classes), jnp.float32)
        return jax.eval_shape(lambda k: self.init(k, z, y, 1.0), jax.random.PRNGKey(0))


class _FinalBatchNorm(nn.Module):
    """Unconditional BN before `conv_to_rgb` (affine `scale`, `bias`; stored statistics)."""

    features: int
    eps: float
    n_stats: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, ts):
        means = self.variable("batch_stats", "running_means", jnp.zeros, (self.n_stats, self.features))
        variances = self.variable("batch_stats", "running_vars", jnp.ones, (self.n_stats, self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        mean, var = _mix_stats(means.value, ts), _mix_stats(variances.value, ts)
        a = scale * jax.lax.rsqrt(var + self.eps)
        b = bias - mean * a
        return x * a.astype(self.dtype) + b.astype(self.dtype)


# ---------------------------------------------------------------------------- host-side spectral norm helpers

def spectral_layers(spectral) -> dict[tuple, dict]:
    """{path of a spectrally normalised layer (tuple of names): its {"u", "v"}} from a "spectral" tree."""
    found = {}

    def walk(node, path):
        if not isinstance(node, Mapping):
            raise ValueError(f"spectral tree: {'/'.join(path)} is a leaf outside a layer's u, v")
        if "u" in node and not isinstance(node["u"], Mapping):
            found[path] = node
            return
        for name, child in node.items():
            walk(child, (*path, name))

    walk(spectral, ())
    return found


def _copy_tree(tree):
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _get(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def fold_spectral_norm(variables) -> dict:
    """Power-iteration variables -> folded ones: each kernel divided by its eval-mode sigma.

    `variables` has "params" and "spectral" (any other collection, e.g. "batch_stats",
    passes through). sigma = u . (W v) from the stored u, v, in float64 on the host, as
    the converter folds the pretrained weights; conv_to_rgb keeps its first 3 outputs.
    This is exactly what the reference computes in eval mode, so a folded `BigGANDeep`
    with the result gives the power-iteration model's `train=False` output.
    """
    variables = dict(variables)
    spectral = variables.pop(SPECTRAL)
    params = _copy_tree(variables["params"])
    for path, uv in spectral_layers(spectral).items():
        layer = _get(params, path)
        kernel = np.asarray(layer["kernel"], np.float64)
        u, v = np.asarray(uv["u"], np.float64), np.asarray(uv["v"], np.float64)
        sigma = float(u @ np.tensordot(v, kernel, axes=v.ndim))
        folded = (kernel / sigma).astype(np.float32)
        if path[-1] == "conv_to_rgb":
            folded = np.ascontiguousarray(folded[..., :3])
        layer["kernel"] = folded
    variables["params"] = params
    return variables


def power_iterate_host(variables, eps: float, steps: int = 1) -> dict:
    """`steps` power iterations of every layer's u, v on the host (float64, stored as float32).

    Random u, v (as torch draws them) make the eval-mode sigma = u . (W v) a random
    number near 0; one iteration leaves what torch's first train-mode forward leaves,
    with sigma = ||W v|| > 0. Used for random-weight models only.
    """
    variables = dict(variables)
    spectral = _copy_tree(variables[SPECTRAL])
    for path, uv in spectral_layers(spectral).items():
        kernel = np.asarray(_get(variables["params"], path)["kernel"], np.float64)
        u, v = np.asarray(uv["u"], np.float64), np.asarray(uv["v"], np.float64)
        for _ in range(steps):
            v = np.tensordot(kernel, u, axes=1)
            v = v / max(np.linalg.norm(v), eps)
            u = np.tensordot(v, kernel, axes=v.ndim)
            u = u / max(np.linalg.norm(u), eps)
        uv["u"], uv["v"] = u.astype(np.float32), v.astype(np.float32)
    variables[SPECTRAL] = spectral
    return variables
