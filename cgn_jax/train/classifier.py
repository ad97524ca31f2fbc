"""Training the Table 1 classifiers: whole epochs as single on-device calls.

The classifier is tiny (67k parameters, 32x32 inputs), so on an accelerator a step takes
well under a millisecond and anything the host does per step (fetching a batch, rendering
colours, sampling the CGN, reading a metric) would dominate. So everything a step needs
lives on the device: the digits and cue labels of the real split (rendered with fresh
augmentation inside the step), the generator's weights (counterfactuals are sampled
inside the step and never leave the device) or a stored counterfactual dataset, and the
test split. On an accelerator an epoch is a `lax.scan` over its steps, pmapped over the
local devices (gradients `pmean`-ed, BatchNorm statistics synchronised) and vmapped over
independent runs (seeds), so a Table 1 row is one call per epoch for all of its seeds.
XLA:CPU runs convolutions inside loops, and batched-kernel (vmapped) convolutions, several
times slower, so on CPU the same step is dispatched once per step (asynchronously; still no
host syncs within an epoch) and seeds run one after another; results are the same.

This module is plain JAX/Flax/optax (no ml_collections, no tensorflow_datasets, tqdm
optional): the data arrive as numpy arrays, so a machine without the TFDS stack can run
it on data exported elsewhere (see `cgn_jax.table1`).

Conventions kept from the official `train_classifier.py`: Adadelta (lr 1.0, rho 0.9,
eps 1e-6, as torch), lr x 0.7 after every epoch (StepLR), batch 64, 10 epochs, NLL of
log-softmax outputs, train accuracy counted on the training batches in train mode, test
accuracy on the (seeded, randomised) test split after every epoch. One difference: an
epoch drops the last partial batch (fixed shapes keep it a single compiled call).

Epochs and mixed batches: an epoch is `len(real train split) // batch_size` steps in
every mode (so every Table 1 row gets the same number of updates); with a real fraction
f < 1 each epoch sees a fresh random f-sized share of the real split. `cgn_only` from a
stored dataset takes one pass over that dataset per epoch, as the official code does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import chex
import einops
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgn_jax import irm
from cgn_jax.data import palettes
from cgn_jax.data.render import from_uint8, render_batch
from cgn_jax.models import cpu_grads
from cgn_jax.models.classifier import CNN, init_variables
from cgn_jax.generate import sample_counterfactuals
from cgn_jax.models.mnist_cgn import MnistCGN
from cgn_jax.parallel import AXIS, replicate
from cgn_jax.train.checkpointing import TrainCheckpoints

MODES = ("original", "original+gan", "original+cgn", "cgn_only")
# Size of the counterfactual dataset the official MNIST recipe trains its invariant classifier
# on (`mnists/generate_data.py`: 10,000 shapes x 10 counterfactuals); one pass is an epoch there.
OFFICIAL_CF_DATASET_SIZE = 100_000
GENERATED_MODES = ("original+gan", "original+cgn", "cgn_only")
COUNTERFACTUAL_MODES = ("original+cgn", "cgn_only")  # GENERATED_MODES whose CGN images are counterfactuals
ON_THE_FLY = "on_the_fly"
DATASET = "dataset"
# FIXED: one set of `fixed_size` counterfactuals generated at the start of the run (the
# official recipe: generate_data.py stores such a set, then the classifier makes passes over it)
FIXED = "fixed"
CF_SOURCES = (ON_THE_FLY, DATASET, FIXED)
FIXED_SET_FILE = "fixed_counterfactuals.npz"  # the generated set, kept next to the checkpoints


class SetupError(ValueError):
    """A classifier setup that cannot run (bad mode, batch split, missing data)."""


FIXED_AUGMENTATION_SEED = 20210504  # fixed_augmentation: the "data file" draw, shared by all runs


@dataclasses.dataclass(frozen=True)
class ClassifierSetup:
    """Everything that shapes the compiled training step (hashable: a static argument)."""

    variant: str
    mode: str = "original+cgn"
    irm_correlations: tuple[float, ...] = ()  # empty: no IRM; else one environment per value
    irm_penalty_weight: float = irm.DEFAULT_PENALTY_WEIGHT
    irm_anneal_steps: int = irm.DEFAULT_ANNEAL_STEPS
    irm_rescale: bool = True        # divide the IRM loss by the penalty weight (see cgn_jax/irm.py)
    irm_joint_cues: bool = False    # IRM environments: the background cue repeats the foreground's label (irm.py)
    real_fraction: float = 0.5      # share of real images in a mixed (original+X) batch
    cf_source: str = ON_THE_FLY     # or DATASET (arrays 'cf_image', 'cf_label' in the data), or FIXED
    num_cfs: int = 1                # on the fly: counterfactuals per sampled shape in a batch; FIXED: per shape
    fixed_size: int = OFFICIAL_CF_DATASET_SIZE  # FIXED: images in the generated set
    # > 0: per-image colour offsets (this std, [0, 1] scale) on the texture and background of
    # generated counterfactuals (`cgn_jax.generate.sample_counterfactuals`); 0: the official procedure.
    cf_colour_jitter: float = 0.0
    # the shape noise of generated counterfactuals is scaled by this (< 1 a truncation, > 1 wider;
    # see `sample_counterfactuals`); 1: the official procedure.
    cf_shape_noise_scale: float = 1.0
    # True: one augmentation draw (colour jitter, texture crop) per real training image, the same in
    # every epoch and for every seed, as in a stored data file like the official colored MNIST's;
    # False: a fresh draw each time an image is used (an augmentation against the cue).
    fixed_augmentation: bool = False
    batch_size: int = 64            # global, split over the devices
    epochs: int = 10
    lr: float = 1.0
    lr_decay: float = 0.7           # StepLR gamma, applied after every epoch
    rho: float = 0.9
    eps: float = 1e-6
    pool: str = "official"          # classifier head, see cgn_jax.models.classifier
    steps_per_epoch: int = 0        # 0: derived from the data (see module docstring)
    steps_per_call: int = 0         # 0: one call per epoch; else smaller calls (finer progress)
    # "scan": an epoch is a lax.scan inside one call (accelerators); "steps": one call per step,
    # dispatched asynchronously (XLA:CPU runs convolutions inside loops several times slower);
    # "auto": "steps" on CPU, "scan" elsewhere.
    loop: str = "auto"
    eval_batch_size: int = 500

    def __post_init__(self):
        object.__setattr__(self, "variant", palettes.canonical_variant(self.variant))
        object.__setattr__(self, "irm_correlations", tuple(float(c) for c in self.irm_correlations))
        if self.mode not in MODES:
            raise SetupError(f"unknown data mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.cf_source not in CF_SOURCES:
            raise SetupError(f"unknown counterfactual source {self.cf_source!r}; valid: {', '.join(CF_SOURCES)}")
        if self.irm_correlations and self.mode != "original":
            raise SetupError(f"IRM trains on real environments only; use mode 'original', not {self.mode!r}")
        if any(not 0.0 <= c <= 1.0 for c in self.irm_correlations):
            raise SetupError(f"IRM correlations must lie in [0, 1], got {self.irm_correlations}")
        if self.irm_joint_cues and not self.irm_correlations:
            raise SetupError("irm_joint_cues couples the cues of IRM environments; set irm_correlations too")
        if self.irm_joint_cues and self.variant == palettes.COLORED:
            raise SetupError("colored MNIST has one cue (its background is black for every class), so there is "
                             "nothing to couple; irm_joint_cues (table1 --irm-cues joint, config irm.joint_cues) "
                             "is for double_colored and wildlife")
        if self.mode == "original+gan" and self.cf_source != ON_THE_FLY:
            raise SetupError("original+gan samples the CGN on the fly (stored and fixed sets hold counterfactuals)")
        if not 0.0 < self.real_fraction < 1.0 and self.mode in ("original+gan", "original+cgn"):
            raise SetupError(f"real_fraction must be in (0, 1) for {self.mode}, got {self.real_fraction}")
        if self.loop not in ("auto", "scan", "steps"):
            raise SetupError(f"unknown loop {self.loop!r}; valid: auto, scan, steps")
        if self.cf_colour_jitter < 0:
            raise SetupError(f"cf_colour_jitter is a standard deviation, got {self.cf_colour_jitter}")
        if not self.cf_shape_noise_scale > 0.0:
            raise SetupError(f"cf_shape_noise_scale must be positive (1: the official procedure), "
                             f"got {self.cf_shape_noise_scale}")
        generates_cfs = self.mode in COUNTERFACTUAL_MODES and self.cf_source != DATASET
        for name, official in (("cf_colour_jitter", 0.0), ("cf_shape_noise_scale", 1.0)):
            if getattr(self, name) != official and not generates_cfs:
                raise SetupError(f"{name} acts where this run generates counterfactuals (modes "
                                 f"{', '.join(COUNTERFACTUAL_MODES)} with cf_source {ON_THE_FLY} or {FIXED}); "
                                 f"mode {self.mode!r} with cf_source {self.cf_source!r} has none: set it to "
                                 f"{official:g} or generate the counterfactuals in the run")
        for name in ("batch_size", "epochs", "num_cfs", "eval_batch_size", "fixed_size"):
            if getattr(self, name) < 1:
                raise SetupError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def n_envs(self) -> int:
        return max(1, len(self.irm_correlations))

    @property
    def uses_generator(self) -> bool:
        return self.mode in GENERATED_MODES and self.cf_source == ON_THE_FLY

    @property
    def uses_cf_dataset(self) -> bool:
        return self.mode in GENERATED_MODES and self.cf_source in (DATASET, FIXED)

    @property
    def makes_fixed_set(self) -> bool:
        return self.mode in GENERATED_MODES and self.cf_source == FIXED

    @property
    def needs_generator(self) -> bool:
        """A CGN must be loaded: it runs in the step, or it makes the fixed set first."""
        return self.uses_generator or self.makes_fixed_set


class BatchPlan(NamedTuple):
    """Per-device composition of a step's batch."""

    n_real: int  # real images per environment
    n_gen: int   # generated images
    n_envs: int

    @property
    def size(self) -> int:
        return self.n_envs * self.n_real + self.n_gen


def batch_plan(setup: ClassifierSetup, n_devices: int) -> BatchPlan:
    if setup.batch_size % n_devices:
        raise SetupError(f"batch_size {setup.batch_size} does not split over {n_devices} devices; "
                         f"use a multiple of {n_devices}")
    b = setup.batch_size // n_devices
    if setup.mode == "original":
        n_real = b
    elif setup.mode == "cgn_only":
        n_real = 0
    else:
        n_real = int(round(b * setup.real_fraction))
        if not 0 < n_real < b:
            raise SetupError(f"real_fraction {setup.real_fraction} leaves no real or no generated images "
                             f"in a per-device batch of {b}")
    n_gen = b - n_real
    if setup.uses_generator and n_gen % setup.num_cfs:
        raise SetupError(f"{n_gen} generated images per device batch are not a multiple of num_cfs="
                         f"{setup.num_cfs}; change data.num_cfs or data.real_fraction")
    return BatchPlan(n_real, n_gen, setup.n_envs)


def steps_per_epoch(setup: ClassifierSetup, n_real: int, n_cf: int = 0) -> int:
    if setup.steps_per_epoch:
        return setup.steps_per_epoch
    n = n_cf if (setup.mode == "cgn_only" and setup.uses_cf_dataset) else n_real
    steps = n // setup.batch_size
    if steps < 1:
        raise SetupError(f"{n} training examples make no batch of {setup.batch_size}")
    return steps


def make_schedule(setup: ClassifierSetup, n_steps_per_epoch: int) -> optax.Schedule:
    """StepLR(step_size=1 epoch, gamma=lr_decay): lr * gamma ** (step // steps_per_epoch)."""
    return optax.exponential_decay(setup.lr, transition_steps=n_steps_per_epoch,
                                   decay_rate=setup.lr_decay, staircase=True)


def make_optimizer(setup: ClassifierSetup, n_steps_per_epoch: int) -> optax.GradientTransformation:
    return optax.adadelta(make_schedule(setup, n_steps_per_epoch), rho=setup.rho, eps=setup.eps)


# ---------------------------------------------------------------- generated images
class Generator(NamedTuple):
    model: MnistCGN
    variables: Any


def sample_generated(model: MnistCGN, variables, key: jax.Array, n_shapes: int, num_cfs: int,
                     counterfactual: bool = True, colour_jitter: float = 0.0,
                     shape_noise_scale: float = 1.0) -> dict[str, jax.Array]:
    """Images from the CGN in [-1, 1] (float32) with their labels; jit-friendly.

    counterfactual=True: the procedure (and key use) of `cgn_jax.generate.sample_counterfactuals`,
    i.e. the official `generate_data.py`: one mask per (noise, shape label), then per
    counterfactual fresh noise and random labels for texture and background; labelled with
    the shape label. counterfactual=False: the CGN as a plain conditional GAN (one noise
    vector and one label for all mechanisms), the paper's 'Original + GAN' data.
    `colour_jitter`, `shape_noise_scale`: counterfactuals only, see `sample_counterfactuals`.
    """
    if not counterfactual:
        k_y, k_u, k_t = jax.random.split(key, 3)
        n = n_shapes * num_cfs
        y = jax.random.randint(k_y, (n,), 0, model.n_classes)
        out = model.apply(variables, y, u=model.sample_noise(k_u, n), rngs={"texture": k_t})
        return {"image": out["image"], "label": y, "shape_label": y, "texture_label": y, "background_label": y}
    return sample_counterfactuals(model, variables, key, n_shapes, num_cfs, as_uint8=False,
                                  colour_jitter=colour_jitter, shape_noise_scale=shape_noise_scale)


# ---------------------------------------------------------------- data on the device
def prepare_data(data: dict[str, np.ndarray], setup: ClassifierSetup, n_devices: int,
                 assets: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Check the host arrays and lay them out for the device: (arrays, eval batch size).

    data: 'digit' (N,32,32,1) uint8, 'label' (N,), 'fg_label'/'bg_label' (E,N) or (N,),
    'test_image' (M,32,32,3) uint8, 'test_label' (M,); for a stored counterfactual dataset
    also 'cf_image' (K,32,32,3) uint8, 'cf_label' (K,). The test split is padded to a
    whole number of eval batches per device, with a mask.
    """
    s = palettes.IMAGE_SIZE
    digit = np.asarray(data["digit"], np.uint8)
    n = digit.shape[0]
    chex.assert_shape(digit, (n, s, s, 1))
    label = np.asarray(data["label"]).astype(np.int32)
    fg, bg = (np.asarray(data[k]).astype(np.int32) for k in ("fg_label", "bg_label"))
    fg, bg = (x[None] if x.ndim == 1 else x for x in (fg, bg))
    chex.assert_shape(label, (n,))
    chex.assert_shape([fg, bg], (setup.n_envs, n))
    if setup.irm_joint_cues:
        bg = fg.copy()
    test_image = np.asarray(data["test_image"], np.uint8)
    m = test_image.shape[0]
    chex.assert_shape(test_image, (m, s, s, 3))
    test_label = np.asarray(data["test_label"]).astype(np.int32)
    chex.assert_shape(test_label, (m,))
    eval_bs = max(1, min(setup.eval_batch_size, -(-m // n_devices)))
    padded = -(-m // (eval_bs * n_devices)) * eval_bs * n_devices
    pad = padded - m
    out = {
        "digit": digit, "label": label, "fg_label": fg, "bg_label": bg,
        "test_image": np.concatenate([test_image, np.zeros((pad, s, s, 3), np.uint8)]),
        "test_label": np.concatenate([test_label, np.zeros((pad,), np.int32)]),
        "test_mask": np.concatenate([np.ones((m,), np.float32), np.zeros((pad,), np.float32)]),
        "assets": {k: np.asarray(v, np.float32) for k, v in assets.items()},
    }
    if setup.uses_cf_dataset:
        if "cf_image" not in data:
            raise SetupError("cf_source 'dataset' needs a counterfactual dataset (cgn-jax generate --dataset)")
        cf_image = np.asarray(data["cf_image"], np.uint8)
        k = cf_image.shape[0]
        chex.assert_shape(cf_image, (k, s, s, 3))
        out["cf_image"] = cf_image
        out["cf_label"] = np.asarray(data["cf_label"]).astype(np.int32)
        chex.assert_shape(out["cf_label"], (k,))
    return out, eval_bs


# ---------------------------------------------------------------- the step
class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array


_METRIC_KEYS = ("nll_sum", "count", "correct", "correct_real", "count_real", "correct_gen", "count_gen",
                "penalty_sum", "steps")


def _epoch_permutations(epoch_key, setup: ClassifierSetup, n_real: int, n_cf: int):
    """Index orders of this epoch, identical on every device (each takes its own slice)."""
    k_real, k_cf = jax.random.split(jax.random.fold_in(epoch_key, 0))
    perms = {"real": jnp.stack([jax.random.permutation(jax.random.fold_in(k_real, e), n_real)
                                for e in range(setup.n_envs)])}
    if setup.uses_cf_dataset:
        perms["cf"] = jax.random.permutation(k_cf, n_cf)
    return perms


def training_batch(key: jax.Array, step: jax.Array, perms: dict, data: dict, gen_variables, *,
                   setup: ClassifierSetup, plan: BatchPlan, gen_model: MnistCGN | None,
                   device: jax.Array | int = 0, n_devices: int = 1) -> dict[str, jax.Array]:
    """One device's batch for `step` of the epoch whose index orders are `perms`.

    Returns 'image' (plan.size, 32, 32, 3) float32 in [-1, 1] and 'label': first the real
    images environment by environment (n_real each), then the generated ones.
    """
    k_real, k_gen = jax.random.split(key)
    images, labels = [], []
    if plan.n_real:
        n = data["digit"].shape[0]
        offset = step * plan.n_real * n_devices + device * plan.n_real
        for e in range(plan.n_envs):
            idx = perms["real"][e][(offset + jnp.arange(plan.n_real)) % n]
            batch = {"digit": data["digit"][idx], "fg_label": data["fg_label"][e][idx],
                     "bg_label": data["bg_label"][e][idx]}
            example_keys = None  # fresh draws from the step's key
            if setup.fixed_augmentation:  # keyed by environment and example, not by step or seed
                env_key = jax.random.fold_in(jax.random.PRNGKey(FIXED_AUGMENTATION_SEED), e)
                example_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(env_key, idx)
            images.append(render_batch(jax.random.fold_in(k_real, e), batch, data["assets"],
                                       setup.variant, train=True, example_keys=example_keys))
            labels.append(data["label"][idx])
    if plan.n_gen:
        if setup.uses_generator:
            out = sample_generated(gen_model, gen_variables, k_gen, plan.n_gen // setup.num_cfs, setup.num_cfs,
                                   counterfactual=setup.mode != "original+gan",
                                   colour_jitter=setup.cf_colour_jitter,
                                   shape_noise_scale=setup.cf_shape_noise_scale)
            images.append(out["image"].astype(jnp.float32))
            labels.append(out["label"].astype(jnp.int32))
        else:
            k = data["cf_image"].shape[0]
            offset = step * plan.n_gen * n_devices + device * plan.n_gen
            idx = perms["cf"][(offset + jnp.arange(plan.n_gen)) % k]
            images.append(from_uint8(data["cf_image"][idx]))
            labels.append(data["cf_label"][idx])
    return {"image": jnp.concatenate(images), "label": jnp.concatenate(labels).astype(jnp.int32)}


def _train_step(state: TrainState, batch: dict, *, model: CNN, tx, setup: ClassifierSetup, plan: BatchPlan):
    images, labels = batch["image"], batch["label"]
    n_real = plan.n_envs * plan.n_real

    def loss_fn(params):
        log_probs, mutated = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                         train=True, mutable=["batch_stats"])
        if setup.irm_correlations:
            # environments occupy consecutive blocks of the batch
            lp = einops.rearrange(log_probs, "(e b) c -> e b c", e=plan.n_envs)
            lab = einops.rearrange(labels, "(e b) -> e b", e=plan.n_envs)
            weight = irm.penalty_weight(state.step, setup.irm_penalty_weight, setup.irm_anneal_steps)
            loss, (risk, penalty) = irm.irm_objective(lp, lab, weight, setup.irm_rescale)
        else:
            loss = risk = irm.nll(log_probs, labels)
            penalty = jnp.float32(0.0)
        return loss, (log_probs, mutated["batch_stats"], risk, penalty)

    (_, (log_probs, batch_stats, risk, penalty)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct = (jnp.argmax(log_probs, -1) == labels).astype(jnp.float32)
    size = jnp.float32(plan.size)
    metrics = {"nll_sum": risk * size, "count": size, "correct": correct.sum(),
               "correct_real": correct[:n_real].sum(), "count_real": jnp.float32(n_real),
               "correct_gen": correct[n_real:].sum(), "count_gen": jnp.float32(plan.n_gen),
               "penalty_sum": penalty, "steps": jnp.float32(1.0)}
    return TrainState(params, batch_stats, opt_state, state.step + 1), metrics


def _member_perms(member_key, data, epoch, *, setup: ClassifierSetup):
    n_cf = data["cf_image"].shape[0] if "cf_image" in data else 0
    return _epoch_permutations(jax.random.fold_in(member_key, epoch), setup, data["digit"].shape[0], n_cf)


def _member_chunk(state, member_key, perms, data, gen_variables, epoch, start, *, n_steps: int, model, tx,
                  setup: ClassifierSetup, plan: BatchPlan, gen_model, n_devices: int):
    """`n_steps` steps of one run (seed) on one device, from step `start` of epoch `epoch`."""
    device = jax.lax.axis_index(AXIS)
    step_key = jax.random.fold_in(jax.random.fold_in(member_key, epoch), 1)

    def body(carry, i):
        state, sums = carry
        step = start + i
        key = jax.random.fold_in(jax.random.fold_in(step_key, step), device)
        batch = training_batch(key, step, perms, data, gen_variables, setup=setup, plan=plan,
                               gen_model=gen_model, device=device, n_devices=n_devices)
        state, metrics = _train_step(state, batch, model=model, tx=tx, setup=setup, plan=plan)
        return (state, jax.tree.map(jnp.add, sums, metrics)), None

    zeros = {k: jnp.float32(0.0) for k in _METRIC_KEYS}
    if n_steps == 1:  # no loop at all (see `ClassifierSetup.loop`)
        (state, sums), _ = body((state, zeros), jnp.int32(0))
    else:
        (state, sums), _ = jax.lax.scan(body, (state, zeros), jnp.arange(n_steps))
    sums = jax.lax.psum(sums, AXIS)
    sums["steps"] = sums["steps"] / n_devices
    sums["penalty_sum"] = sums["penalty_sum"] / n_devices
    return state, sums


def _member_eval(state, data, first, *, model, eval_bs: int, n_batches: int, n_devices: int):
    """Correct count and summed NLL on `n_batches` test batches from batch `first` of each device's share."""
    rows = data["test_image"].shape[0] // n_devices
    device = jax.lax.axis_index(AXIS)

    def body(sums, i):
        start = device * rows + (first + i) * eval_bs
        image = jax.lax.dynamic_slice_in_dim(data["test_image"], start, eval_bs)
        label = jax.lax.dynamic_slice_in_dim(data["test_label"], start, eval_bs)
        mask = jax.lax.dynamic_slice_in_dim(data["test_mask"], start, eval_bs)
        log_probs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                                from_uint8(image), train=False)
        nll = -jnp.take_along_axis(log_probs, label[:, None], axis=1)[:, 0]
        correct = (jnp.argmax(log_probs, -1) == label).astype(jnp.float32)
        return {"correct": sums["correct"] + (correct * mask).sum(), "nll_sum": sums["nll_sum"] + (nll * mask).sum(),
                "count": sums["count"] + mask.sum()}, None

    zeros = {k: jnp.float32(0.0) for k in ("correct", "nll_sum", "count")}
    if n_batches == 1:
        sums, _ = body(zeros, jnp.int32(0))
    else:
        sums, _ = jax.lax.scan(body, zeros, jnp.arange(n_batches))
    return jax.lax.psum(sums, AXIS)


def _chunks(total: int, per_call: int) -> list[tuple[int, int]]:
    """(start, length) of near-equal calls covering `total` steps (at most two distinct lengths)."""
    if per_call <= 0 or per_call >= total:
        return [(0, total)]
    n = math.ceil(total / per_call)
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        length = base + (1 if i < extra else 0)
        out.append((start, length))
        start += length
    return out


class _NoBar:
    def __init__(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # the accelerator image may not ship tqdm
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


def epoch_summary(record: dict, epochs: int) -> str:
    """One log line per epoch, for runs without a progress bar (background jobs, batch logs)."""
    pct = lambda xs: "/".join(f"{100 * x:.1f}" for x in xs)  # noqa: E731  one value per seed
    line = (f"seeds {record['seeds']}: epoch {record['epoch']}/{epochs}: test acc {pct(record['test_acc'])} %, "
            f"train acc {pct(record['train_acc'])} %")
    if record.get("irm_penalty") is not None:
        line += f", IRM penalty {'/'.join(f'{x:.2g}' for x in record['irm_penalty'])}"
    return line + f" ({record['seconds']:.0f} s, {record['images_per_s']:.0f} images/s)"


def member_keys(seeds: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """(init keys, data keys), one per seed."""
    keys = jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    return split[:, 0], split[:, 1]


def train_classifier(setup: ClassifierSetup, data: dict[str, np.ndarray], assets: dict[str, Any],
                     generator: Generator | Sequence[Generator] | None = None, seeds: Sequence[int] = (0,), *,
                     devices: Sequence | None = None, vmap_seeds: bool | None = None, progress: bool = True,
                     on_epoch: Callable[[dict], None] | None = None, checkpoint_dir: str | Path | None = None,
                     stop: Any = None, grad_kernels: str = "auto") -> dict:
    """Train one classifier per seed and evaluate each after every epoch.

    vmap_seeds: train all seeds in one vmapped computation (None: on accelerators only; on
    CPU, XLA runs the resulting batched-kernel convolutions far slower than one seed after
    another, which reuses the same compiled functions).
    Returns {'history': [per-epoch record], 'variables': [per seed {'params', 'batch_stats'}
    as numpy], 'steps_per_epoch', 'seeds', 'timing'}; each record holds per-seed lists of
    train_loss, train_acc (all training images), train_acc_real, train_acc_gen, irm_penalty,
    test_loss, test_acc, plus lr, seconds and images_per_s. `on_epoch` gets each record (of
    a group of seeds trained together) as soon as it is fetched, in order, including the
    records restored from a checkpoint.

    generator: the CGN, or a pool of CGNs (a sequence) that share a fixed set (`fixed_counterfactual_set`).
    grad_kernels: how the CNN computes its slowest gradients (`CNN.grad_kernels`; same values
    up to float rounding, so not part of the setup).
    checkpoint_dir: resumable training. Each group of seeds is checkpointed there after
    every epoch and, when `stop.signum` gets set (see `cgn_jax.train.signals`), after the
    current call; a later call with the same arguments continues from the checkpoint and
    gives the same result as an uninterrupted run. An interrupted call returns
    {'status': 'interrupted', 'signal', 'checkpoint_dir', 'seeds'}; a finished one has
    'status': 'completed'.
    """
    devices = list(devices) if devices is not None else jax.local_devices()
    n_dev = len(devices)
    platform = devices[0].platform
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise SetupError("need at least one seed")
    plan = batch_plan(setup, n_dev)
    if setup.needs_generator and generator is None:
        raise SetupError(f"mode {setup.mode} with cf_source {setup.cf_source} needs a generator (a CGN checkpoint)")
    if generator is not None and not isinstance(generator, Generator):  # a pool
        members = pool_members(generator)
        if setup.uses_generator and len(members) > 1:
            raise SetupError(f"{len(members)} generators pooled, but mode {setup.mode} with cf_source "
                             f"{setup.cf_source} samples inside the train step, from one generator; pool them "
                             f"into a fixed set (cf_source {FIXED!r}) or give one generator")
        generator = members[0] if len(members) == 1 else members
    if setup.makes_fixed_set:
        cache = Path(checkpoint_dir) / FIXED_SET_FILE if checkpoint_dir is not None else None
        data = {**data, **fixed_counterfactual_set(generator, setup, cache, progress=progress)}
    host, eval_bs = prepare_data(data, setup, n_dev, assets)
    n_real = host["digit"].shape[0]
    n_cf = host["cf_image"].shape[0] if "cf_image" in host else 0
    spe = steps_per_epoch(setup, n_real, n_cf)
    model = CNN(pool=setup.pool, axis_name=AXIS, grad_kernels=grad_kernels)
    tx = make_optimizer(setup, spe)
    schedule = make_schedule(setup, spe)
    gen_model = generator.model if setup.uses_generator else None
    loop = setup.loop if setup.loop != "auto" else ("steps" if platform == "cpu" else "scan")
    if vmap_seeds is None:
        vmap_seeds = platform != "cpu"
    groups = [seeds] if vmap_seeds else [[s] for s in seeds]

    data_dev = replicate(host, devices)
    gen_dev = replicate(generator.variables if setup.uses_generator else {}, devices)

    # ---- compiled once, reused by every group of seeds
    chunk_fns: dict[int, Callable] = {}

    def chunk_fn(n_steps):
        if n_steps not in chunk_fns:
            fn = functools.partial(_member_chunk, n_steps=n_steps, model=model, tx=tx, setup=setup, plan=plan,
                                   gen_model=gen_model, n_devices=n_dev)
            chunk_fns[n_steps] = jax.pmap(jax.vmap(fn, in_axes=(0, 0, 0, None, None, None, None)), axis_name=AXIS,
                                          in_axes=(0, 0, 0, 0, 0, None, None), devices=devices, donate_argnums=(0,))
        return chunk_fns[n_steps]

    perm_fn = jax.pmap(jax.vmap(functools.partial(_member_perms, setup=setup), in_axes=(0, None, None)),
                       axis_name=AXIS, in_axes=(0, 0, None), devices=devices)
    chunks = _chunks(spe, 1 if loop == "steps" else setup.steps_per_call)
    eval_batches = host["test_image"].shape[0] // n_dev // eval_bs
    eval_calls = [(i, 1) for i in range(eval_batches)] if loop == "steps" else [(0, eval_batches)]
    eval_fns = {n: jax.pmap(jax.vmap(functools.partial(_member_eval, model=model, eval_bs=eval_bs, n_batches=n,
                                                       n_devices=n_dev), in_axes=(0, None, None)),
                            axis_name=AXIS, in_axes=(0, 0, None), devices=devices)
                for n in {n for _, n in eval_calls}}

    def evaluate(states):
        out = None
        for first, n in eval_calls:
            ev = eval_fns[n](states, data_dev, first)
            out = ev if out is None else jax.tree.map(jnp.add, out, ev)
        return out

    def init_member(key):
        variables = init_variables(CNN(pool=setup.pool), key)
        return TrainState(variables["params"], variables["batch_stats"], tx.init(variables["params"]),
                          jnp.int32(0))

    # calls between progress updates (each one a wait for the device, never a transfer)
    sync_every = (setup.steps_per_call or spe) if loop == "steps" else 1
    bar = _progress_bar(setup.epochs * spe * len(groups), f"{setup.variant} {setup.mode}"
                        + (f" irm{setup.n_envs}" if setup.irm_correlations else ""), progress)
    per_group, variables = [], []
    fingerprint = _run_fingerprint(setup, data, spe, n_dev) if checkpoint_dir is not None else None

    def save(store, group, states, totals, history, epoch, chunk):
        """Checkpoint a group at call `chunk` of `epoch` (chunk 0: the epoch has not started)."""
        host = jax.device_get({"state": jax.tree.map(lambda x: x[0], states),
                               "totals": jax.tree.map(lambda x: x[0], totals) if chunk else
                               {k: np.zeros(len(group), np.float32) for k in _METRIC_KEYS}})
        store.save(epoch * spe + chunks[chunk][0], host, {"run": fingerprint, "seeds": list(group), "epoch": epoch,
                                                          "chunk": chunk, "history": history})

    t_start = time.perf_counter()
    stores = []  # each group's checkpoint manager, closed however the run ends
    try:
        for group in groups:
            init_keys, data_keys = member_keys(group)
            states = replicate(jax.vmap(init_member)(init_keys), devices)  # eager: compiling it costs more
            keys = replicate(data_keys, devices)
            images_per_step = plan.size * n_dev * len(group)
            history, first_epoch, first_chunk, totals, store = [], 0, 0, None, None
            if checkpoint_dir is not None:
                store = TrainCheckpoints(group_checkpoint_dir(checkpoint_dir, group), max_to_keep=2, async_save=False)
                stores.append(store)
                if store.latest_step() is not None:
                    states, totals, history, first_epoch, first_chunk = _resume(store, states, group, fingerprint)
                    totals = replicate(totals, devices) if first_chunk else None
                    states = replicate(states, devices)
                    for record in history:
                        if on_epoch is not None:
                            on_epoch(record)
                    bar.update(first_epoch * spe + (chunks[first_chunk][0] if first_chunk else 0))

            for epoch in range(first_epoch, setup.epochs):
                t0 = time.perf_counter()
                first = first_chunk if epoch == first_epoch else 0
                if not first:
                    totals = None
                perms = perm_fn(keys, data_dev, epoch)
                done = chunks[first][0]
                for i in range(first, len(chunks)):
                    start, length = chunks[i]
                    states, sums = chunk_fn(length)(states, keys, perms, data_dev, gen_dev, epoch, start)
                    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
                    if stop is not None and stop.signum and i + 1 < len(chunks):
                        if store is None:
                            return _interrupted(stop, None, seeds)
                        save(store, group, states, totals, history, epoch, i + 1)
                        return _interrupted(stop, store.directory, seeds)
                    if (i + 1) % sync_every == 0 and i + 1 < len(chunks):
                        jax.block_until_ready(sums)
                        bar.update(start + length - done)
                        done = start + length
                bar.update(spe - done)
                jax.block_until_ready(totals)
                t_train = time.perf_counter() - t0
                ev = evaluate(states)
                tr, ev = jax.device_get((jax.tree.map(lambda x: x[0], totals), jax.tree.map(lambda x: x[0], ev)))
                record = {
                    "epoch": epoch + 1,
                    "lr": float(schedule(epoch * spe)),
                    "seeds": list(group),
                    "train_loss": (tr["nll_sum"] / tr["count"]).tolist(),
                    "train_acc": (tr["correct"] / tr["count"]).tolist(),
                    "train_acc_real": (tr["correct_real"] / np.maximum(tr["count_real"], 1)).tolist()
                    if plan.n_real else None,
                    "train_acc_gen": (tr["correct_gen"] / np.maximum(tr["count_gen"], 1)).tolist()
                    if plan.n_gen else None,
                    "irm_penalty": (tr["penalty_sum"] / tr["steps"]).tolist() if setup.irm_correlations else None,
                    "test_loss": (ev["nll_sum"] / ev["count"]).tolist(),
                    "test_acc": (ev["correct"] / ev["count"]).tolist(),
                    "train_seconds": t_train,
                    "seconds": time.perf_counter() - t0,
                    "images_per_s": spe * images_per_step / t_train,
                }
                history.append(record)
                bar.set_postfix(test_acc=f"{np.mean(record['test_acc']):.3f}",
                                train_acc=f"{np.mean(record['train_acc']):.3f}")
                if on_epoch is not None:
                    on_epoch(record)
                if store is not None:
                    save(store, group, states, None, history, epoch + 1, 0)
                if stop is not None and stop.signum and epoch + 1 < setup.epochs:
                    return _interrupted(stop, store.directory if store is not None else None, seeds)
            final = jax.device_get(jax.tree.map(lambda x: x[0], states))
            variables += [jax.tree.map(lambda x, i=i: np.asarray(x[i]), {"params": final.params,
                                                                          "batch_stats": final.batch_stats})
                          for i in range(len(group))]
            per_group.append(history)
    finally:
        bar.close()
        for store in stores:
            store.close()
    total = time.perf_counter() - t_start
    history = [_merge_records([h[e] for h in per_group]) for e in range(setup.epochs)]
    # steady-state throughput: leave out each group's first epoch (the very first one compiles)
    # (and the epochs restored from a checkpoint: their times belong to an earlier call)
    fresh = [[r for r in h if not r.get("restored")] for h in per_group]
    steady = ([r["images_per_s"] for h in fresh for r in h[1:]] or [r["images_per_s"] for h in fresh for r in h]
              or [per_group[0][-1]["images_per_s"]])
    return {"status": "completed", "history": history, "variables": variables, "steps_per_epoch": spe, "seeds": seeds,
            "timing": {"total_seconds": total, "first_epoch_seconds": per_group[0][0]["seconds"],
                       "images_per_s": float(np.median(steady)),
                       "images_per_step": plan.size * n_dev * len(groups[0]), "devices": n_dev,
                       "platform": platform, "loop": loop, "vmap_seeds": bool(vmap_seeds),
                       "grad_kernels": cpu_grads.resolve(grad_kernels)}}


# ---------------------------------------------------------------- the official recipe's fixed set
def _generator_digest(variables) -> str:
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
    crc = 0
    for path, leaf in leaves:
        crc = zlib.crc32(jax.tree_util.keystr(path).encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(leaf).data, crc)
    return f"{crc:08x}"


def pool_members(generator) -> list[Generator]:
    """The generators behind `generator`: itself, or the members of a pool (a sequence of them)."""
    members = [generator] if isinstance(generator, Generator) else list(generator)
    if not members or not all(isinstance(g, Generator) for g in members):
        raise SetupError("a pool of generators needs at least one Generator (model, variables)")
    return members


def fixed_counterfactual_set(generator: Generator | Sequence[Generator], setup: ClassifierSetup,
                             cache: Path | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """{'cf_image', 'cf_label'}: `setup.fixed_size` counterfactuals, `setup.num_cfs` per shape.

    As the official `generate_data.py`: one set for the whole run (every seed trains on the
    same images). Kept in `cache` (written whole, then renamed), so a resumed run trains on the
    very same images even where generation is not bit-reproducible (GPU convolutions); a cache
    made by another generator or size is replaced.

    A pool of generators (CGNs trained with different seeds, say) shares the set: member i
    draws an equal share of the shapes, whole shapes only, with key i, so one CGN's failures
    (a class it draws badly) make up only its share. A pool of one is the single-generator set.
    """
    from cgn_jax.generate import generate_dataset

    members = pool_members(generator)
    n_shapes = -(-setup.fixed_size // setup.num_cfs)
    shares = [len(part) for part in np.array_split(np.arange(n_shapes), len(members))]
    if min(shares) == 0:
        raise SetupError(f"a fixed set of {setup.fixed_size} counterfactuals ({setup.num_cfs} per shape) has "
                         f"{n_shapes} shapes, fewer than the {len(members)} generators pooled; raise fixed_size "
                         "or pool fewer generators")
    tag = "+".join(_generator_digest(g.variables) for g in members) + f":{setup.fixed_size}:{setup.num_cfs}"
    if setup.cf_colour_jitter:  # (caches of unjittered sets keep their tag)
        tag += f":jitter{setup.cf_colour_jitter:g}"
    if setup.cf_shape_noise_scale != 1.0:
        tag += f":shape_noise{setup.cf_shape_noise_scale:g}"
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as f:
                if str(f["tag"]) == tag:
                    return {"cf_image": f["cf_image"], "cf_label": f["cf_label"]}
        except (OSError, ValueError, KeyError) as e:
            print(f"regenerating the fixed counterfactual set: {cache} is unreadable ({e})", file=sys.stderr)
    t0 = time.perf_counter()
    parts = []
    for i, (member, share) in enumerate(zip(members, shares)):
        shapes_per_call = min(100, share)  # small sets: whole shapes, one call
        parts.append(generate_dataset(member.model, member.variables, jax.random.PRNGKey(i), share * setup.num_cfs,
                                      setup.num_cfs, batch_size=shapes_per_call * setup.num_cfs, progress=progress,
                                      colour_jitter=setup.cf_colour_jitter,
                                      shape_noise_scale=setup.cf_shape_noise_scale))
    print(f"generated the fixed set of {setup.fixed_size} counterfactuals ({setup.num_cfs} per shape"
          + (f", shapes split {' / '.join(map(str, shares))} among {len(members)} generators" if len(members) > 1
             else "") + f") in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    result = {"cf_image": np.concatenate([p["image"] for p in parts])[:setup.fixed_size],
              "cf_label": np.concatenate([p["label"] for p in parts])[:setup.fixed_size].astype(np.int32)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez(tmp, tag=np.str_(tag), **result)
        tmp.replace(cache)
    return result


# ---------------------------------------------------------------- resuming
def group_checkpoint_dir(checkpoint_dir: str | Path, seeds: Sequence[int]) -> Path:
    """Where `train_classifier` checkpoints the seeds trained together in one group."""
    return Path(checkpoint_dir) / ("seeds_" + "_".join(str(int(s)) for s in seeds))


def _run_fingerprint(setup: ClassifierSetup, data: dict[str, np.ndarray], spe: int, n_dev: int) -> dict:
    """What a checkpoint must agree on to continue a run exactly (JSON-normalised)."""
    arrays = {k: f"{np.asarray(v).dtype}{list(np.shape(v))}:{zlib.crc32(np.ascontiguousarray(v).data):08x}"
              for k, v in sorted(data.items())}
    return json.loads(json.dumps({"setup": dataclasses.asdict(setup), "steps_per_epoch": spe, "devices": n_dev,
                                  "data": arrays}))


def _resume(store, states, group, fingerprint):
    """(host state, host totals, history, epoch, chunk) of the latest checkpoint in `store`."""
    template = {"state": jax.device_get(jax.tree.map(lambda x: x[0], states)),
                "totals": {k: np.zeros(len(group), np.float32) for k in _METRIC_KEYS}}
    restored, meta = store.restore(template)
    if meta.get("run") != fingerprint or meta.get("seeds") != list(group):
        old = meta.get("run") or {}
        what = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)) or ["seeds"]
        raise SetupError(f"the checkpoint in {store.directory} belongs to another run (it differs in: "
                         f"{', '.join(what)}); delete that directory to start this run afresh, or use another "
                         "output/work directory")
    history = [dict(r, restored=True) for r in meta["history"]]
    if meta["epoch"] >= fingerprint["setup"]["epochs"]:
        print(f"seeds {list(group)}: finished run found in {store.directory}", file=sys.stderr)
    else:
        print(f"resuming seeds {list(group)} at epoch {meta['epoch'] + 1}"
              + (f", call {meta['chunk']}" if meta["chunk"] else "") + f" from {store.directory}", file=sys.stderr)
    return restored["state"], restored["totals"], history, int(meta["epoch"]), int(meta["chunk"])


def _interrupted(stop, directory, seeds) -> dict:
    return {"status": "interrupted", "signal": int(stop.signum), "seeds": list(seeds),
            "checkpoint_dir": str(directory) if directory is not None else None}


def _merge_records(records: list[dict]) -> dict:
    """One epoch's records of several seed groups -> one record (per-seed lists joined, times summed)."""
    out = dict(records[0])
    for key, value in records[0].items():
        if isinstance(value, list):
            out[key] = [x for r in records for x in r[key]]
    for key in ("train_seconds", "seconds"):
        out[key] = sum(r[key] for r in records)
    images = sum(r["images_per_s"] * r["train_seconds"] for r in records)
    out["images_per_s"] = images / out["train_seconds"]
    return out


# ---------------------------------------------------------------- host-side data assembly
def load_real_data(variant: str, correlations: Sequence[float] = (1.0,), *, mnist_dir=None, textures_dir=None,
                   data_dir=None, limit: int | None = None, test_limit: int | None = None,
                   dataset_seed: int = 0) -> dict[str, np.ndarray]:
    """The real train split(s) and the test split via `cgn_jax.data.load_variant` (needs TFDS).

    One correlation: the plain train split (built with `dataset_seed`); several: the IRM
    environments (`cgn_jax.irm.build_environments`, seed = environment index).
    """
    from cgn_jax.data import load_variant

    common = dict(mnist_dir=mnist_dir, textures_dir=textures_dir, data_dir=data_dir)
    if len(correlations) == 1:
        train = load_variant(variant, "train", correlation=float(correlations[0]), seed=dataset_seed,
                             limit=limit, **common)
        out = {"digit": train["digit"], "label": train["label"].astype(np.int32),
               "fg_label": train["fg_label"][None].astype(np.int32),
               "bg_label": train["bg_label"][None].astype(np.int32)}
    else:
        out = irm.build_environments(variant, correlations, limit=limit, **common)
    test = load_variant(variant, "test", limit=test_limit, **common)
    out["test_image"], out["test_label"] = test["image"], test["label"].astype(np.int32)
    return out
