"""The ImageNet CGN: three BigGAN-deep mechanisms, a frozen BigGAN for targets, a frozen U2-Net.

The official model (`imagenet/models/cgn.py`) is a torch Module owning five networks.
Here the networks are stateless Flax modules and the model is a hashable description
(static under `jit`); the weights travel as two separate pytrees, because they are
treated differently everywhere that matters:

* `params` = {"shape", "texture", "background"}: the trainable BigGAN-deep weights
  (all three start as copies of the pretrained BigGAN). Only these are optimised,
  checkpointed and exported.
* `frozen` = {"biggan": {"params", "batch_stats"}, "u2net": {...}}: the pretrained
  BigGAN (which makes the target x_gt) and U2-Net (which turns the shape
  mechanism's pre-mask into the mask and scores the background's saliency). They are
  never in an optimizer state and are restored from their converted weights, not from
  training checkpoints. BigGAN's stored per-truncation BN statistics are never updated
  (the reference always runs BN in inference mode), so the four BigGANs share the
  frozen copy of them.

`remat` recomputes activations in the backward pass instead of storing them: per
GenBlock for the BigGANs (`BigGANDeep(remat=True)`) and for the whole U2-Net call. It changes
memory, not results.

`spectral_norm` ("folded" or "power_iteration", `model.spectral_norm` in the config)
selects the mechanisms' parametrisation. The official mechanisms train in torch's
`train()` mode: each forward does one spectral-norm power iteration and Adam updates
the unnormalised `weight_orig`. "power_iteration" does the same: `params` then hold the
unnormalised kernels and a third tree, `spectral` = {"shape", "texture", "background"},
holds each mechanism's u, v (passed to `__call__`, updated with `update_spectral=True`).
The frozen x_gt BigGAN stays folded either way: the official keeps it in eval mode,
where folding is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax.models.biggan import (FOLDED, POWER_ITERATION, SPECTRAL, BigGANConfig, BigGANDeep, TruncationStats,
                                   check_spectral_norm, fold_spectral_norm, power_iterate_host, truncated_noise,
                                   truncation_stats)
from cgn_jax.models.u2net import U2Net

MECHANISMS = ("shape", "texture", "background")
MASK_CLAMP = (1e-4, 1.0 - 1e-4)
# Class rows of the official training sample sheets (imagenet/train_cgn.py).
SHEET_CLASSES = (15, 251, 330, 382, 385, 483, 559, 751, 938, 947, 999)


@dataclasses.dataclass(frozen=True)
class ImageNetCGN:
    """Hashable model description; all methods take the weights as arguments.

    `ts` is a `TruncationStats` (see `stats`), so a new truncation does not recompile.
    Class inputs are (N,) integer labels or (N, num_classes) (soft) class vectors.
    """

    biggan_config: BigGANConfig = BigGANConfig()
    u2net_variant: str = "u2net"
    dtype: Any = jnp.float32
    remat: bool = False
    spectral_norm: str = FOLDED  # the mechanisms' spectral norm (x_gt's BigGAN is always folded)

    def __post_init__(self):
        check_spectral_norm(self.spectral_norm)

    @property
    def biggan(self) -> BigGANDeep:
        """The mechanisms' BigGAN-deep (in this model's spectral norm mode)."""
        return BigGANDeep(config=self.biggan_config, dtype=self.dtype, remat=self.remat,
                          spectral_norm=self.spectral_norm)

    @property
    def gt_biggan(self) -> BigGANDeep:
        """The frozen BigGAN that makes x_gt: folded spectral norm (eval mode in the official)."""
        return BigGANDeep(config=self.biggan_config, dtype=self.dtype, remat=self.remat)

    @property
    def power_iteration(self) -> bool:
        return self.spectral_norm == POWER_ITERATION

    @property
    def u2net(self) -> U2Net:
        return U2Net(variant=self.u2net_variant, dtype=self.dtype)

    @property
    def image_size(self) -> int:
        return self.biggan_config.output_dim

    @property
    def num_classes(self) -> int:
        return self.biggan_config.num_classes

    def stats(self, truncation: float) -> TruncationStats:
        return truncation_stats(truncation, self.biggan_config.n_stats)

    def sample_noise(self, key: jax.Array, batch: int, truncation: float) -> jax.Array:
        """The official `truncated_noise_sample`: truncation * truncnorm(-2, 2), (batch, z_dim)."""
        return truncated_noise(key, batch, self.biggan_config.z_dim, truncation)

    # -- the networks

    def generate(self, params, frozen, u, y, ts: TruncationStats, spectral=None, update_spectral: bool = False):
        """One mechanism with weights `params` (and the frozen BN statistics): images in [-1, 1].

        Power-iteration mode needs the mechanism's `spectral` (u, v); with
        `update_spectral` it does torch's train-mode power iteration and returns
        (images, new spectral). Folded mode takes neither.
        """
        variables = {"params": params, "batch_stats": frozen["biggan"]["batch_stats"]}
        if not self.power_iteration:
            if spectral is not None or update_spectral:
                raise ValueError("spectral / update_spectral need spectral_norm='power_iteration'")
            return self.biggan.apply(variables, u, y, ts)
        if spectral is None:
            raise ValueError("spectral_norm='power_iteration' needs the mechanism's spectral state (u, v)")
        variables[SPECTRAL] = spectral
        if not update_spectral:
            return self.biggan.apply(variables, u, y, ts)
        images, new = self.biggan.apply(variables, u, y, ts, train=True, mutable=[SPECTRAL])
        return images, new[SPECTRAL]

    def generate_gt(self, frozen, u, y, ts: TruncationStats) -> jax.Array:
        """x_gt: the frozen, folded pretrained BigGAN."""
        return self.gt_biggan.apply(frozen["biggan"], u, y, ts)

    def saliency(self, frozen, images: jax.Array) -> jax.Array:
        """U2-Net saliency (N, H, W, 1) in (0, 1) of images in [-1, 1] (fed as they are, as the official)."""
        apply = lambda v, x: self.u2net.apply(v, x)  # noqa: E731
        if self.remat:
            apply = jax.checkpoint(apply)
        return apply(frozen["u2net"], images)

    def mask(self, frozen, premask: jax.Array) -> jax.Array:
        return jnp.clip(self.saliency(frozen, premask), *MASK_CLAMP)

    def __call__(self, params, frozen, u, y_shape, y_texture=None, y_background=None, ts=None, *,
                 with_gt: bool = True, with_bg_saliency: bool = True, spectral=None, update_spectral: bool = False):
        """The official `CGN.forward` plus the composite.

        Same noise `u` for every mechanism; labels per mechanism (default: `y_shape`).
        Returns premask, mask, texture (the official "foreground"), background, composite
        and, when asked, x_gt (frozen BigGAN on (u, y_shape), gradient stopped) and
        bg_saliency (U2-Net on the background, for the background loss).

        Power-iteration mode: `spectral` = {"shape", "texture", "background"} u, v trees.
        Without `update_spectral` they are used as stored (torch's eval mode, e.g. sample
        sheets); with it every mechanism does one power iteration (torch's train mode) and
        the call returns (outputs, new spectral).
        """
        if ts is None:
            raise ValueError("pass ts=model.stats(truncation)")
        y_texture = y_shape if y_texture is None else y_texture
        y_background = y_shape if y_background is None else y_background
        chex.assert_rank(u, 2)
        new_spectral = {}

        def mechanism(name, y):
            if not self.power_iteration:
                return self.generate(params[name], frozen, u, y, ts)
            if spectral is None:
                raise ValueError("spectral_norm='power_iteration' needs spectral={'shape', 'texture', 'background'}")
            res = self.generate(params[name], frozen, u, y, ts, spectral[name], update_spectral)
            if update_spectral:
                res, new_spectral[name] = res
            return res

        if update_spectral and not self.power_iteration:
            raise ValueError("update_spectral needs spectral_norm='power_iteration'")
        out = {}
        if with_gt:
            out["x_gt"] = jax.lax.stop_gradient(self.generate_gt(frozen, u, y_shape, ts))
        out["premask"] = mechanism("shape", y_shape)
        out["mask"] = self.mask(frozen, out["premask"])
        out["texture"] = mechanism("texture", y_texture)
        out["background"] = mechanism("background", y_background)
        if with_bg_saliency:
            out["bg_saliency"] = self.saliency(frozen, out["background"])
        out["composite"] = compose_images(out["mask"], out["texture"], out["background"])
        return (out, new_spectral) if update_spectral else out


def compose_images(mask, texture, background):
    """mask * texture + (1 - mask) * background in float32 (mask (N,H,W,1) broadcasts)."""
    m = mask.astype(jnp.float32)
    return m * texture.astype(jnp.float32) + (1.0 - m) * background.astype(jnp.float32)


# ---------------------------------------------------------------------------- building and loading

RANDOM = "random"


def biggan_config_from(arch) -> BigGANConfig:
    """`BigGANConfig` from a config's `model.arch` (used only for random initialisation)."""
    d = {k: arch[k] for k in arch.keys()}
    if "layers" in d:
        d["layers"] = tuple(tuple(layer) for layer in d["layers"])
        return BigGANConfig(**d)
    return BigGANConfig.variant(d.pop("output_dim", 256), **d)


def random_variables(shapes, seed: int):
    """Random weights for a variable tree of `ShapeDtypeStruct`s, drawn on the host.

    Flax's initialisers under `jit` compile for minutes on a CPU (a truncated-normal
    program per tensor), and random weights only serve tests and timing, so this uses
    numpy with Flax's default scales: kernels N(0, 1/fan_in) (LeCun), biases, offsets,
    means and attention gains 0, norm scales and variances 1; spectral-norm u, v (the
    "spectral" collection) unit vectors in random directions, as torch initialises them.
    """
    from cgn_jax.checkpoint import flatten_with_names

    rng = np.random.default_rng(seed)
    ones = ("scale", "running_vars", "var")

    def make(name, leaf):
        last = name.rsplit("/", 1)[-1]
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if name.startswith(f"{SPECTRAL}/") and last in ("u", "v"):
            x = rng.standard_normal(shape)
            return (x / np.linalg.norm(x)).astype(dtype)
        if last == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)).astype(dtype)
        return np.full(shape, 1.0 if last in ones else 0.0, dtype)

    flat = flatten_with_names(shapes)
    leaves = [make(name, leaf) for name, leaf in flat.items()]
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def random_biggan(config: BigGANConfig, seed: int, spectral_norm: str = FOLDED):
    """Random BigGAN-deep variables (tests and timing: no weight file needed).

    Power-iteration variables get random u, v plus one power iteration on the host
    (`power_iterate_host`: the state after torch's first train-mode forward), so that
    their eval-mode sigma, and the folded x_gt BigGAN made from them, is sane.
    """
    variables = random_variables(BigGANDeep(config, spectral_norm=spectral_norm).init_shapes(), seed)
    if spectral_norm == POWER_ITERATION:
        variables = power_iterate_host(variables, config.eps)
    return variables


def random_u2net(variant: str, seed: int):
    return random_variables(U2Net(variant=variant).init_shapes(), seed)


def spectral_norm_mode(model_config) -> str:
    """`model_config.spectral_norm`, "folded" when absent (configs written before it existed)."""
    return check_spectral_norm(str(model_config.get("spectral_norm", FOLDED)))


def load_networks(model_config, seed: int = 0):
    """(BigGANConfig, frozen {"biggan", "u2net"}, sources) from `model_config.biggan` / `.u2net`.

    Each is an Orbax directory from `cgn-jax port biggan|u2net`, or "random" (random
    init from `seed`, the BigGAN architecture from `model_config.arch`). `sources` names
    where the weights came from (what checkpoints record instead of the weights).
    The frozen BigGAN is folded in both spectral norm modes; with a random power-iteration
    BigGAN it is the fold of the mechanisms' random start (`initial_mechanisms`).
    """
    if model_config.biggan == RANDOM:
        cfg = biggan_config_from(model_config.arch)
        if spectral_norm_mode(model_config) == POWER_ITERATION:
            biggan = fold_spectral_norm(random_biggan(cfg, seed, POWER_ITERATION))
        else:
            biggan = random_biggan(cfg, seed)
        biggan_src = f"{RANDOM}:{seed}"
    else:
        from cgn_jax.port.biggan import load_biggan

        if not model_config.biggan:
            raise FileNotFoundError("model.biggan is not set: pass --config.model.biggan=DIR (from `cgn-jax port "
                                    "biggan --src biggan-deep-256 --dst DIR`), or 'random' for random weights")
        module, biggan = load_biggan(model_config.biggan)
        cfg = module.config
        biggan_src = str(_abs(model_config.biggan))
    if model_config.u2net == RANDOM:
        u2net = random_u2net(model_config.u2net_variant, seed + 1)
        u2net_src = f"{RANDOM}:{seed}"
    else:
        from cgn_jax.port.u2net import load_u2net

        if not model_config.u2net:
            raise FileNotFoundError("model.u2net is not set: pass --config.model.u2net=DIR (from `cgn-jax port "
                                    "u2net`), or 'random' for random weights")
        _, u2net = load_u2net(model_config.u2net, model_config.u2net_variant)
        u2net_src = str(_abs(model_config.u2net))
    frozen = {"biggan": {"params": biggan["params"], "batch_stats": biggan["batch_stats"]},
              "u2net": {"params": u2net["params"], "batch_stats": u2net["batch_stats"]}}
    return cfg, frozen, {"biggan": biggan_src, "u2net": u2net_src}


def initial_params(frozen) -> dict:
    """The three mechanisms' starting weights: copies of the pretrained BigGAN's (official init)."""
    return {name: jax.tree.map(lambda x: x.copy(), frozen["biggan"]["params"]) for name in MECHANISMS}


def initial_mechanisms(model_config, frozen, seed: int = 0):
    """(params, spectral) the three mechanisms start from, in `model_config.spectral_norm`'s mode.

    Folded: (`initial_params(frozen)`, None). Power iteration: each mechanism gets its own
    copy of the pretrained `weight_orig` (recovered by `load_biggan`) and u, v, as the
    official loads the checkpoint into each; for "random" the same random draw that
    `load_networks` folded into the x_gt BigGAN. A checkpoint's kernels are not read again:
    they are unfolded from `frozen`'s, with the converter's `spectral_norm/` data.
    """
    if spectral_norm_mode(model_config) == FOLDED:
        return initial_params(frozen), None
    if model_config.biggan == RANDOM:
        variables = random_biggan(biggan_config_from(model_config.arch), seed, POWER_ITERATION)
    else:
        from cgn_jax.port.biggan import power_iteration_variables

        variables = power_iteration_variables(model_config.biggan, frozen["biggan"])
    copy = lambda tree: jax.tree.map(lambda x: np.array(x, copy=True), tree)  # noqa: E731
    return ({name: copy(variables["params"]) for name in MECHANISMS},
            {name: copy(variables[SPECTRAL]) for name in MECHANISMS})


def from_config(model_config, biggan_config: BigGANConfig, dtype=jnp.float32) -> ImageNetCGN:
    return ImageNetCGN(biggan_config=biggan_config, u2net_variant=model_config.u2net_variant, dtype=dtype,
                       remat=bool(model_config.remat), spectral_norm=spectral_norm_mode(model_config))


def class_vectors(labels, num_classes: int) -> jax.Array:
    """(N,) labels -> (N, num_classes) float32 one-hots; (N, num_classes) passes through."""
    labels = jnp.asarray(labels)
    if labels.ndim == 1:
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    chex.assert_shape(labels, (None, num_classes))
    return labels.astype(jnp.float32)


def interpolate_classes(y_from: int, y_to: int, num_midpoints: int, num_classes: int) -> jax.Array:
    """(num_midpoints + 2, num_classes) class vectors from one-hot(y_from) to one-hot(y_to) (official `interp`)."""
    t = jnp.linspace(0.0, 1.0, num_midpoints + 2)[:, None]
    a, b = (jax.nn.one_hot(jnp.asarray([y]), num_classes) for y in (y_from, y_to))
    return a * (1.0 - t) + b * t


def _abs(path):
    from pathlib import Path

    return Path(path).expanduser().absolute()
