"""One ImageNet CGN micro-step as one compiled program: sample, generate, six losses, accumulate.

The official loop (`imagenet/train_cgn.py`) has no data: each iteration draws noise
and a class, runs the frozen BigGAN for the target and the three mechanisms for the
composite, back-propagates the summed losses and steps Adam every `BATCH_ACC`
iterations. Here one pmapped call is one such iteration for `per_device_batch`
examples on every device; gradients are averaged over devices (`pmean`) and over
`accum` calls by `optax.MultiSteps`, so one optimizer update sees
`per_device_batch * devices * accum` examples (the official 1 x 4000 by default) at
whatever per-device batch fits in memory.

Randomness is a function of (run key, update, example index within the update): an
example's noise, class and texture-patch draws come from
`fold_in(fold_in(key, update), example)` with `example = micro * global_batch +
device * per_device_batch + i`. So a run is the same whatever the number of devices
and whatever the split between per-device batch and accumulation (up to float
rounding), and resuming from (key, step) continues it exactly.

The frozen networks (BigGAN for x_gt, U2-Net, VGG16) are a separate argument
(`Frozen`), never donated, never in the optimizer state, never checkpointed.

With `model.spectral_norm="power_iteration"` the state is a `SpectralTrainState`: the
mechanisms' params are the unnormalised kernels (what Adam updates, as the official's
`weight_orig`) and `spectral` holds each mechanism's u, v. Every micro-step does one
power iteration per layer inside the differentiated forward, as every official
train-mode forward does, whether or not the optimizer steps. It depends only on the
parameters and the stored u, v, which are replicated, so every device computes the
same new u, v and no collective is needed. (Folded runs keep the plain `TrainState`,
so their checkpoints are unchanged.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from cgn_jax import losses as L
from cgn_jax.models.biggan import TruncationStats
from cgn_jax.models.imagenet_cgn import MECHANISMS, ImageNetCGN
from cgn_jax.parallel import AXIS, BatchSplitError
from cgn_jax.texture_patches import sample_patch_grids

# The scalar metrics of every step (device means), in logging order.
METRICS = ("g_loss", "l1", "perc", "binary", "mask", "text", "bg", "mask_mean", "bg_saliency")


@flax.struct.dataclass
class TrainState:
    step: jax.Array    # int32: micro-steps done (optimizer updates = step // accum)
    key: jax.Array     # uint32[2]: the run's base key
    params: Any        # {"shape", "texture", "background"}: trainable BigGAN params
    opt_state: Any     # optax.MultiSteps state (accumulated gradients + per-mechanism Adam)


@flax.struct.dataclass
class SpectralTrainState(TrainState):
    """`TrainState` plus the mechanisms' spectral norm state (power-iteration mode)."""

    spectral: Any      # {"shape", "texture", "background"}: each mechanism's u, v per layer


@flax.struct.dataclass
class Frozen:
    """Constant inputs of every step: pretrained networks and the truncation statistics."""

    nets: Any                 # {"biggan": {"params", "batch_stats"}, "u2net": {"params", "batch_stats"}}
    vgg: Any                  # cgn_jax.losses.PerceptualLoss (VGG16 weights)
    ts: TruncationStats


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss weights and texture-patch settings (hashable: static under jit)."""

    l1: float = 100.0
    perc_style: tuple = (4.0, 4.0, 4.0, 4.0)
    perc_content: tuple = (0.0, 0.0, 0.0, 0.0)
    binary: float = 300.0
    mask: float = 500.0
    mask_interval: tuple = (0.1, 0.9)
    text_style: tuple = (0.0, 5.0, 5.0, 0.0)
    bg: float = 2000.0
    text_patch: int = 15
    text_top: int = 100
    text_grid: int = 6
    text_work_size: int = 128

    @classmethod
    def from_config(cls, loss) -> "LossConfig":
        f = lambda v: tuple(float(x) for x in v)  # noqa: E731
        return cls(l1=float(loss.l1), perc_style=f(loss.perc_style), perc_content=f(loss.perc_content),
                   binary=float(loss.binary), mask=float(loss.mask), mask_interval=f(loss.mask_interval),
                   text_style=f(loss.text_style), bg=float(loss.bg), text_patch=int(loss.text_patch),
                   text_top=int(loss.text_top), text_grid=int(loss.text_grid),
                   text_work_size=int(loss.text_work_size))

    def vgg_weights(self) -> tuple:
        """Per-block weights that keep every VGG layer either perceptual term needs."""
        blocks = zip(self.perc_style, self.perc_content, self.text_style)
        return tuple(float(max(abs(a), abs(b), abs(c))) for a, b, c in blocks)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about the compiled step."""

    model: ImageNetCGN
    loss: LossConfig
    truncation: float
    per_device_batch: int
    global_batch: int
    accum: int


def compute_dtype(config) -> Any:
    name = config.train.compute_dtype
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"train.compute_dtype must be 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def accum_steps(config, n_devices: int) -> int:
    """Micro-steps per update: effective_batch / (per_device_batch * devices), or a fixable error."""
    pdb, eff = int(config.train.per_device_batch), int(config.train.effective_batch)
    if pdb <= 0 or eff <= 0:
        raise ValueError(f"train.per_device_batch ({pdb}) and train.effective_batch ({eff}) must be positive")
    global_batch = pdb * n_devices
    if eff % global_batch:
        divisors = [d for d in range(1, eff + 1) if eff % (d * n_devices) == 0]
        near = sorted(divisors, key=lambda d: abs(d - pdb))[:3]
        raise BatchSplitError(
            f"train.effective_batch={eff} is not a multiple of per_device_batch x devices = {pdb} x {n_devices}; "
            f"use --config.train.per_device_batch in {sorted(near)} or an effective_batch that is a multiple of "
            f"{global_batch} (e.g. {eff - eff % global_batch or global_batch} or "
            f"{eff + global_batch - eff % global_batch})")
    return eff // global_batch


def make_optimizer(config, accum: int) -> optax.GradientTransformation:
    """Per-mechanism Adam (official lrs) under `optax.multi_transform`, averaged over `accum` micro-steps."""
    o = config.optim
    lrs = {"shape": o.lr_shape, "texture": o.lr_texture, "background": o.lr_background}
    inner = optax.multi_transform(
        {name: optax.adam(float(lrs[name]), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps)) for name in MECHANISMS},
        {name: name for name in MECHANISMS})
    return optax.MultiSteps(inner, every_k_schedule=int(accum))


def init_state(config, params, accum: int, spectral=None) -> TrainState:
    """The state before the first step; with `spectral` (power-iteration mode) a `SpectralTrainState`."""
    chex.assert_trees_all_equal_structs(*(params[name] for name in MECHANISMS))
    tx = make_optimizer(config, accum)
    fields = dict(step=jnp.zeros((), jnp.int32), key=jax.random.PRNGKey(int(config.seed)), params=params,
                  opt_state=tx.init(params))
    if spectral is None:
        return TrainState(**fields)
    chex.assert_trees_all_equal_structs(*(spectral[name] for name in MECHANISMS))
    return SpectralTrainState(**fields, spectral=spectral)


def zero_metrics() -> dict:
    return {k: jnp.zeros((), jnp.float32) for k in METRICS}


# ---------------------------------------------------------------------------- the step

def example_keys(key: jax.Array, step: jax.Array, spec: StepSpec, device_index) -> jax.Array:
    """(per_device_batch, 2) keys: fold_in(fold_in(key, update), example index within the update)."""
    update, micro = step // spec.accum, step % spec.accum
    first = micro * spec.global_batch + device_index * spec.per_device_batch
    ids = first + jnp.arange(spec.per_device_batch)
    update_key = jax.random.fold_in(key, update)
    return jax.vmap(lambda i: jax.random.fold_in(update_key, i))(ids)


def sample_inputs(model: ImageNetCGN, keys: jax.Array, truncation: float):
    """Per-example noise (official truncated noise x truncation), class and texture-patch key."""
    def one(k):
        k_u, k_y, k_p = jax.random.split(k, 3)
        return model.sample_noise(k_u, 1, truncation)[0], jax.random.randint(k_y, (), 0, model.num_classes), k_p

    return jax.vmap(one)(keys)


def loss_fn(params, frozen: Frozen, u, y, patch_keys, spec: StepSpec, spectral=None):
    """Sum of the six official losses (each a batch mean) and (metrics, new spectral state).

    In power-iteration mode `spectral` is the mechanisms' u, v before this forward; the
    forward power-iterates them (train mode) and returns the new ones (None when folded).
    """
    model, lc = spec.model, spec.loss
    new_spectral = None
    if model.power_iteration:
        out, new_spectral = model(params, frozen.nets, u, y, y, y, frozen.ts, spectral=spectral,
                                  update_spectral=True)
    else:
        out = model(params, frozen.nets, u, y, y, y, frozen.ts)
    x_gen, x_gt, mask = out["composite"], out["x_gt"], out["mask"]
    features = frozen.vgg.features
    terms = {
        "l1": L.l1_loss(x_gen, x_gt, lc.l1),
        "perc": L.perceptual_loss(features, x_gen, x_gt, lc.perc_style, lc.perc_content)[0],
        "binary": L.binary_entropy_loss(mask, lc.binary),
        "mask": L.mask_interval_loss(mask, lc.mask, lc.mask_interval),
    }
    grids = sample_patch_grids(patch_keys, mask, x_gt, patch=lc.text_patch, top=lc.text_top, grid=lc.text_grid,
                               work_size=lc.text_work_size)
    terms["text"] = L.perceptual_loss(features, out["texture"], grids, lc.text_style)[0]
    terms["bg"] = L.background_loss(out["bg_saliency"], lc.bg)
    total = sum(terms.values())
    metrics = dict(terms, g_loss=total, mask_mean=jnp.mean(mask.astype(jnp.float32)),
                   bg_saliency=jnp.mean(out["bg_saliency"].astype(jnp.float32)))
    return total, (metrics, new_spectral)


def train_step(state: TrainState, metrics_sum: dict, frozen: Frozen, spec: StepSpec, tx, axis_name=AXIS):
    """One micro-step on one device (call under pmap with `axis_name`, or with axis_name=None)."""
    device = jax.lax.axis_index(axis_name) if axis_name else 0
    keys = example_keys(state.key, state.step, spec, device)
    u, y, patch_keys = sample_inputs(spec.model, keys, spec.truncation)
    spectral = getattr(state, "spectral", None)
    if spec.model.power_iteration != (spectral is not None):
        raise ValueError(f"model.spectral_norm={spec.model.spectral_norm!r} needs "
                         f"{'a SpectralTrainState' if spectral is None else 'a plain TrainState'}")
    grads, (metrics, new_spectral) = jax.grad(loss_fn, has_aux=True)(state.params, frozen, u, y, patch_keys, spec,
                                                                      spectral)
    if axis_name:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_sum = {k: metrics_sum[k] + metrics[k].astype(jnp.float32) for k in METRICS}
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if new_spectral is not None:  # the same on every device: computed from replicated params and u, v
        state = state.replace(spectral=new_spectral)
    return state, new_sum


def pmap_train_step(config, spec: StepSpec, devices):
    """`step(rstate, rmetrics_sum, rfrozen) -> (rstate, rmetrics_sum)` on replicated trees; state donated."""
    tx = make_optimizer(config, spec.accum)

    def body(state, metrics_sum, frozen):
        return train_step(state, metrics_sum, frozen, spec, tx, AXIS)

    return jax.pmap(body, axis_name=AXIS, devices=list(devices), donate_argnums=(0, 1))
