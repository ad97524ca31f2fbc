"""One MNIST CGN training step as one compiled program: data, generator update, discriminator update.

Everything a step needs is on the device: the stored dataset (digits and labels of the
rows this host loaded, see `cgn_jax.data.sharding`), the render assets and the frozen
VGG16 weights. The step draws its batch indices, renders the images, samples the
generator's labels and noise, and runs the official update order (generator on D(fake),
then discriminator on real and the detached fake), so the host only dispatches.

Randomness: a step's key is `fold_in(state.key, step)`; each random draw that concerns
one example (data index, augmentation, generator label, noise, texture crop, dropout
mask) uses `fold_in(step key, global example id)`, where the global id is
`axis_index * per-device batch + local index`. So a run is reproducible and resumable
from (key, step) alone, and it is the same run whatever the number of devices: with
BatchNorm statistics and gradients averaged over the device axis, one device and eight
devices compute the same update up to float rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgn_jax import losses as L
from cgn_jax.compose import compose, texture_layer
from cgn_jax.data import render
from cgn_jax.data.sharding import DataShards
from cgn_jax.models import discriminators
from cgn_jax.models import mnist_cgn
from cgn_jax.parallel import AXIS

DATA_FIELDS = ("digit", "label", "fg_label", "bg_label")  # what the step reads from the stored dataset

# The scalar metrics every step returns (averaged over devices), in logging order.
METRICS = ("g_loss", "g_adv", "g_mask", "g_perc", "g_frame", "d_loss", "d_loss_real", "d_loss_fake",
           "d_real", "d_fake", "mask_mean", "mask_var")


@flax.struct.dataclass
class NetState:
    params: Any
    batch_stats: Any  # {} for a network without BatchNorm
    opt_state: Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates done
    key: jax.Array   # uint32[2] base key of the run; step keys are fold_in(key, step)
    generator: NetState
    discriminator: NetState
    # {"params", "batch_stats"}: exponential moving average of the generator (train.ema_decay > 0), else {}.
    # A passive copy: it never feeds back into the updates, so the raw run is the same with or without it.
    ema: Any = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class StepContext:
    """The constant device-resident inputs of every step (not donated, not checkpointed)."""

    data: dict       # DATA_FIELDS -> (N, ...) arrays: the rows this host loaded
    assets: dict     # `render.make_assets(variant)`
    perceptual: Any  # `cgn_jax.losses.PerceptualLoss` (frozen VGG16 weights)
    data_offset: Any = 0  # split row of data's first row (`DataShards.host_rows`)


def compute_dtype(config) -> Any:
    name = config.train.compute_dtype
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"train.compute_dtype must be 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def ema_decay(config) -> float:
    """`train.ema_decay` checked: 0 switches the generator average off."""
    decay = float(config.train.get("ema_decay", 0.0))
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1) (0 = no average; 0.999 is typical), got {decay}")
    return decay


def start_ema(generator: NetState) -> dict:
    """The average's first value: a copy of the generator's current variables."""
    return jax.tree.map(jnp.array, {"params": generator.params, "batch_stats": generator.batch_stats})


def build_models(config, axis_name: str | None = None):
    """(generator, discriminator) computing in `train.compute_dtype` (parameters stay float32)."""
    dtype = compute_dtype(config)
    return (mnist_cgn.from_config(config.model, dtype=dtype, axis_name=axis_name),
            discriminators.from_config(config, dtype=dtype, axis_name=axis_name))


def make_optimizers(config) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """One Adam per network (official: lr 2e-4, betas (0.5, 0.999), eps 1e-8)."""
    o = config.optim
    return optax.adam(o.lr, b1=o.b1, b2=o.b2), optax.adam(o.lr, b1=o.b1, b2=o.b2)


def init_state(config, key: jax.Array | None = None) -> TrainState:
    """The step-0 state (unreplicated); `key` defaults to PRNGKey(config.seed)."""
    key = jax.random.PRNGKey(config.seed) if key is None else key
    generator, discriminator = build_models(config)
    g_tx, d_tx = make_optimizers(config)
    img = config.model.img_size

    def init(key):
        k_g, k_d, k_run = jax.random.split(key, 3)
        y = jnp.zeros((2,), jnp.int32)
        g_vars = generator.init({"params": k_g}, jnp.zeros((2, generator.latent_dim)), y, y, y, train=False,
                                method=mnist_cgn.MnistCGN.mechanisms)
        d_vars = discriminator.init({"params": k_d}, jnp.zeros((2, img, img, 3)), y, train=False)

        def net(variables, tx):
            return NetState(params=variables["params"], batch_stats=variables.get("batch_stats", {}),
                            opt_state=tx.init(variables["params"]))

        g = net(g_vars, g_tx)
        return TrainState(step=jnp.zeros((), jnp.int32), key=k_run, generator=g, discriminator=net(d_vars, d_tx),
                          ema=start_ema(g) if ema_decay(config) else {})

    return jax.jit(init)(key)  # one compilation for all initialisers


def device_dataset(dataset: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fields the step renders from, in compact dtypes (labels int32)."""
    missing = [f for f in DATA_FIELDS if f not in dataset]
    if missing:
        raise KeyError(f"dataset lacks field(s) {missing}; expected {DATA_FIELDS}")
    n = dataset["label"].shape[0]
    chex.assert_shape(dataset["digit"], (n, None, None, 1))
    return {"digit": np.asarray(dataset["digit"], np.uint8),
            **{k: np.asarray(dataset[k], np.int32) for k in ("label", "fg_label", "bg_label")}}


def zero_metrics() -> dict[str, jax.Array]:
    return {k: jnp.zeros((), jnp.float32) for k in METRICS}


def _example_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(key, ids)


def _with_stats(params, batch_stats) -> dict:
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def generate(generator: mnist_cgn.MnistCGN, variables, y, u, texture_keys, train: bool):
    """`MnistCGN.__call__` with one texture key per example: (outputs dict, new batch_stats).

    The model's own `__call__` splits one `texture` key over the batch, which would tie
    each crop to the example's position within its device's shard.
    """
    mutable = ["batch_stats"] if train else False
    res = generator.apply(variables, u, y, y, y, train, method=mnist_cgn.MnistCGN.mechanisms, mutable=mutable)
    (mask, fg, bg), updates = res if train else (res, {})
    mask = jnp.clip(mask.astype(jnp.float32), *mnist_cgn.MASK_CLAMP)
    fg, bg = fg.astype(jnp.float32), bg.astype(jnp.float32)
    if generator.texture_mode != "none":
        def one(key, f, b):
            kf, kb = jax.random.split(key)
            tex = functools.partial(texture_layer, mode=generator.texture_mode, patch_size=generator.patch_size)
            return tex(kf, f[None])[0], tex(kb, b[None])[0]
        fg, bg = jax.vmap(one)(texture_keys, fg, bg)
    out = {"mask": mask, "foreground": fg, "background": bg, "image": compose(mask, fg, bg)}
    return out, updates.get("batch_stats", variables.get("batch_stats", {}))


class _StepFns:
    """The pieces of a step, built once per config: batch sampling and the two losses."""

    def __init__(self, config, local_batch: int, data: int | DataShards, axis_name: str):
        self.variant = config.variant
        self.img_size = config.model.img_size
        self.n_classes, self.latent = config.model.n_classes, config.model.latent_dim
        self.mask_weight = float(config.loss.mask)
        self.frame_weight = float(config.loss.get("mask_frame", 0.0))
        self.local_batch, self.data, self.axis_name = local_batch, data, axis_name
        self.ema_decay = ema_decay(config)
        self.generator, self.discriminator = build_models(config, axis_name=axis_name)
        self.g_tx, self.d_tx = make_optimizers(config)

    def inputs(self, run_key, step, ctx: StepContext) -> dict:
        """This device's share of step `step`: the rendered real batch, generator labels, noise and keys.

        The data are read epoch by epoch in a fresh random order (as the official shuffled
        loader), dropping the last incomplete batch; `cgn_jax.data.sharding` says which row
        each position reads, computing only this batch's entries of the permutation.
        """
        b = self.local_batch
        global_batch = b * jax.lax.psum(1, self.axis_name)
        layout = self.data if isinstance(self.data, DataShards) else DataShards(self.data, 1, global_batch)
        if layout.global_batch != global_batch:
            raise ValueError(f"{b} examples on each of {global_batch // b} devices is not the data layout's "
                             f"global batch {layout.global_batch}")
        ids = jax.lax.axis_index(self.axis_name) * b + jnp.arange(b)
        k_perm, k_steps = jax.random.split(run_key)
        k_aug, k_label, k_noise, k_tex, k_drop_g, k_drop_real, k_drop_fake = jax.random.split(
            jax.random.fold_in(k_steps, step), 7)

        rows = layout.example_index(k_perm, step, ids) - ctx.data_offset
        examples = jax.tree.map(lambda a: a[rows], ctx.data)
        x_gt = jax.vmap(lambda k, d, f, bg: render.render_batch(
            k, {"digit": d[None], "fg_label": f[None], "bg_label": bg[None]}, ctx.assets, self.variant)[0])(
            _example_keys(k_aug, ids), examples["digit"], examples["fg_label"], examples["bg_label"])
        chex.assert_shape(x_gt, (b, self.img_size, self.img_size, 3))
        return {
            "ids": ids, "x_gt": x_gt, "y_gt": examples["label"],
            # generator inputs: random classes (as the official loop) and fresh noise
            "y_gen": jax.vmap(lambda k: jax.random.randint(k, (), 0, self.n_classes))(_example_keys(k_label, ids)),
            "u": jax.vmap(lambda k: jax.random.normal(k, (self.latent,)))(_example_keys(k_noise, ids)),
            "tex_keys": _example_keys(k_tex, ids),
            "k_drop_g": k_drop_g, "k_drop_real": k_drop_real, "k_drop_fake": k_drop_fake,
        }

    def discriminate(self, d_params, d_stats, x, y, ids, key):
        out, updates = self.discriminator.apply(_with_stats(d_params, d_stats), x, y, train=True, example_ids=ids,
                                                rngs={"dropout": key}, mutable=["batch_stats"])
        return out, updates.get("batch_stats", d_stats)

    def generator_loss(self, g_params, g_stats, d: NetState, inp: dict, perceptual):
        """Fool D, keep the mask binary, match the real batch's style; aux: (outputs, stats, D stats, terms)."""
        out, g_stats = generate(self.generator, _with_stats(g_params, g_stats), inp["y_gen"], inp["u"],
                                inp["tex_keys"], train=True)
        d_out, d_stats = self.discriminate(d.params, d.batch_stats, out["image"], inp["y_gen"], inp["ids"],
                                           inp["k_drop_g"])
        adv = L.lsgan_generator_loss(d_out)
        mask = L.binary_entropy_loss(out["mask"], self.mask_weight)
        perc, _ = perceptual(out["image"], inp["x_gt"])
        frame = L.mask_frame_loss(out["mask"], self.frame_weight) if self.frame_weight else jnp.float32(0.0)
        terms = {"g_adv": adv, "g_mask": mask, "g_perc": perc, "g_frame": frame}
        return adv + mask + perc + frame, (out, g_stats, d_stats, terms)

    def discriminator_loss(self, d_params, d_stats, x_fake, inp: dict):
        """LSGAN on the real batch (vs 1) and the detached fake (vs 0), halved; aux: (stats, terms)."""
        real, stats = self.discriminate(d_params, d_stats, inp["x_gt"], inp["y_gt"], inp["ids"], inp["k_drop_real"])
        fake, stats = self.discriminate(d_params, stats, x_fake, inp["y_gen"], inp["ids"], inp["k_drop_fake"])
        terms = {"d_loss_real": jnp.mean(jnp.square(real - 1.0)), "d_loss_fake": jnp.mean(jnp.square(fake)),
                 "d_real": real.mean(), "d_fake": fake.mean()}
        return L.lsgan_discriminator_loss(real, fake), (stats, terms)


def make_train_step(config, local_batch: int, data: int | DataShards, axis_name: str = AXIS) -> Callable:
    """The per-device step `(state, metrics_sum, ctx) -> (state, metrics_sum + metrics)`, to pmap.

    `data` is the layout of the split (`cgn_jax.data.sharding`); an int N means one shard of
    N examples, which every host then holds whole.
    """
    fns = _StepFns(config, local_batch, data, axis_name)

    def step(state: TrainState, metrics_sum: dict, ctx: StepContext):
        inp = fns.inputs(state.key, state.step, ctx)
        gs, ds = state.generator, state.discriminator

        # generator update (D in train mode: its BatchNorm statistics move, as in the official loop)
        (g_loss, (gen, g_stats, d_stats, g_terms)), g_grads = jax.value_and_grad(fns.generator_loss, has_aux=True)(
            gs.params, gs.batch_stats, ds, inp, ctx.perceptual)
        g_grads = jax.lax.pmean(g_grads, axis_name)
        g_updates, g_opt = fns.g_tx.update(g_grads, gs.opt_state, gs.params)
        new_g = NetState(optax.apply_updates(gs.params, g_updates), g_stats, g_opt)

        # discriminator update on the real batch and the detached fake of this step
        x_fake = jax.lax.stop_gradient(gen["image"])
        (d_loss, (d_stats, d_terms)), d_grads = jax.value_and_grad(fns.discriminator_loss, has_aux=True)(
            ds.params, d_stats, x_fake, inp)
        d_grads = jax.lax.pmean(d_grads, axis_name)
        d_updates, d_opt = fns.d_tx.update(d_grads, ds.opt_state, ds.params)
        new_d = NetState(optax.apply_updates(ds.params, d_updates), d_stats, d_opt)

        ema = state.ema
        if fns.ema_decay:  # BatchNorm statistics are averaged with the weights they belong to
            ema = optax.incremental_update({"params": new_g.params, "batch_stats": new_g.batch_stats}, ema,
                                           1.0 - fns.ema_decay)

        metrics = _metrics({"g_loss": g_loss, **g_terms, "d_loss": d_loss, **d_terms}, gen["mask"], axis_name)
        new_state = TrainState(step=state.step + 1, key=state.key, generator=new_g, discriminator=new_d, ema=ema)
        return new_state, jax.tree.map(jnp.add, metrics_sum, metrics)

    return step


def make_eval_step(config, local_batch: int, data: int | DataShards, axis_name: str = AXIS) -> Callable:
    """Per-device `(state, ctx, at_step) -> metrics` of the generator and discriminator losses, no update.

    Evaluates the batch, noise and dropout masks of step `at_step` with the current
    parameters, so `at_step` fixed gives the losses on one fixed batch.
    """
    fns = _StepFns(config, local_batch, data, axis_name)

    def evaluate(state: TrainState, ctx: StepContext, at_step):
        inp = fns.inputs(state.key, at_step, ctx)
        g_loss, (gen, _, d_stats, g_terms) = fns.generator_loss(
            state.generator.params, state.generator.batch_stats, state.discriminator, inp, ctx.perceptual)
        d_loss, (_, d_terms) = fns.discriminator_loss(state.discriminator.params, d_stats, gen["image"], inp)
        return _metrics({"g_loss": g_loss, **g_terms, "d_loss": d_loss, **d_terms}, gen["mask"], axis_name)

    return evaluate


def _metrics(terms: dict, mask, axis_name: str) -> dict:
    """Device-averaged scalars, plus the mask's pixel mean and variance over the global batch."""
    metrics = jax.lax.pmean({**terms, "mask_mean": mask.mean(), "mask_sq": jnp.square(mask).mean()}, axis_name)
    metrics["mask_var"] = metrics.pop("mask_sq") - jnp.square(metrics["mask_mean"])
    return {k: metrics[k].astype(jnp.float32) for k in METRICS}


def _per_device_batch(global_batch: int, devices) -> int:
    """A `data` layout made for another global batch is refused when the step is traced (`inputs`)."""
    from cgn_jax.parallel import per_device_batch

    return per_device_batch(global_batch, len(devices) * jax.process_count())


def pmap_train_step(config, global_batch: int, data: int | DataShards, devices: Sequence | None = None):
    """The compiled step over `devices` (default: all local ones); state and metrics are donated.

    Raises `parallel.BatchSplitError` if the global batch does not split over the devices.
    """
    local = _per_device_batch(global_batch, devices if devices is not None else jax.local_devices())
    step = make_train_step(config, local, data)
    return jax.pmap(step, axis_name=AXIS, devices=list(devices) if devices is not None else None,
                    donate_argnums=(0, 1))


def pmap_eval_step(config, global_batch: int, data: int | DataShards, devices: Sequence | None = None):
    """`make_eval_step` compiled over `devices`; `at_step` is a replicated int32."""
    local = _per_device_batch(global_batch, devices if devices is not None else jax.local_devices())
    evaluate = make_eval_step(config, local, data)
    return jax.pmap(evaluate, axis_name=AXIS, devices=list(devices) if devices is not None else None)
