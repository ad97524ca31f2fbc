"""Training the CGN's ImageNet classifier ensemble (`cgn-jax train-classifier --config=configs/imagenet_classifier.py`).

The point of the ensemble is that each head learns one cue: on counterfactual images the
shape, texture and background heads are each trained on their own class label, so no
head can lean on a cue its label does not follow; real images keep the shape head (or,
with `train.real_target=mean_logits`, the official code's averaged logits) anchored to
ImageNet. Both kinds of image share one backbone pass per step: a device's batch is
its real images followed by its counterfactuals, and a (B, 3) weight matrix says which
head learns from which image (`head_loss_weights`), so the routing is data, testable
on its own, rather than control flow.

Data parallel: the step is pmapped over the local devices with gradients averaged by
`pmean`; BatchNorm statistics, when trained, are computed over the global batch
(`axis_name`); every host reads its own shard. The loop keeps the host off the critical
path (batches are decoded by grain threads and put on the devices two steps ahead)
and is resumable from Orbax checkpoints; each checkpoint also exports the ensemble's
variables to `<workdir>/ensemble/` for `cgn-jax evaluate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import chex
import einops
import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgn_jax import imagenet_data as D
from cgn_jax import parallel
from cgn_jax.models import resnet as R
from cgn_jax.train.signals import BoundedQueue, StopOnSignal

HEAD_INDEX = {h: i for i, h in enumerate(R.HEADS)}  # column of each head in labels / loss weights
REAL_TARGETS = ("shape_head", "mean_logits")


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


# ------------------------------------------------------------------------------------ the step

def head_loss_weights(is_real: jnp.ndarray, real_target: str = "shape_head") -> jnp.ndarray:
    """(B, 3) weight of each (image, head) cross-entropy term, columns in `R.HEADS` order.

    Counterfactuals train all three heads on their own labels, averaged over the
    counterfactuals; real images train the shape head only (averaged over the real
    images), or no head directly under `mean_logits` (their loss is on the averaged
    logits instead, see `ensemble_loss`).
    """
    chex.assert_rank(is_real, 1)
    real = is_real.astype(jnp.float32)
    cf = 1.0 - real
    w_real = real / jnp.maximum(jnp.sum(real), 1.0)
    w_cf = cf / jnp.maximum(jnp.sum(cf), 1.0)
    shape_real = w_real if real_target == "shape_head" else jnp.zeros_like(w_real)
    return jnp.stack([shape_real + w_cf, w_cf, w_cf], axis=-1)


def ensemble_loss(logits: dict, labels: jnp.ndarray, is_real: jnp.ndarray, real_target: str = "shape_head"):
    """(loss, metrics) of a mixed batch; `labels` is (B, 3): shape, texture, background class."""
    chex.assert_rank(labels, 2)
    chex.assert_axis_dimension(labels, 1, len(R.HEADS))
    if real_target not in REAL_TARGETS:
        raise ValueError(f"train.real_target must be one of {REAL_TARGETS}, got {real_target!r}")
    ce = jnp.stack([optax.softmax_cross_entropy_with_integer_labels(logits[h], labels[:, i])
                    for h, i in HEAD_INDEX.items()], axis=-1)  # (B, 3)
    w = head_loss_weights(is_real, real_target)
    real = is_real.astype(jnp.float32)
    n_real, n_cf = jnp.maximum(jnp.sum(real), 1.0), jnp.maximum(jnp.sum(1.0 - real), 1.0)
    loss_real = jnp.sum(real * ce[:, 0]) / n_real
    if real_target == "mean_logits":
        mean_logits = jnp.mean(jnp.stack([logits[h] for h in R.HEADS]), axis=0)
        ce_mean = optax.softmax_cross_entropy_with_integer_labels(mean_logits, labels[:, 0])
        loss_real = jnp.sum(real * ce_mean) / n_real
    loss = jnp.sum(w * ce) + (loss_real if real_target == "mean_logits" else 0.0)
    hit = jnp.stack([jnp.argmax(logits[h], -1) == labels[:, i] for h, i in HEAD_INDEX.items()], -1)
    hit = hit.astype(jnp.float32)
    cf = 1.0 - real
    metrics = {"loss": loss, "loss_real": loss_real,
               "loss_cf": jnp.sum(cf[:, None] * ce) / n_cf,
               "acc_real_shape": jnp.sum(real * hit[:, 0]) / n_real}
    for h, i in HEAD_INDEX.items():
        metrics[f"acc_cf_{h}"] = jnp.sum(cf * hit[:, i]) / n_cf
    return loss, metrics


def make_optimizer(train_config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD (momentum) or Adam with torch-style L2 weight decay and the official step decay."""
    decay_epochs = int(train_config.lr_decay_epochs)
    if decay_epochs > 0:
        lr = optax.exponential_decay(float(train_config.lr), transition_steps=decay_epochs * max(steps_per_epoch, 1),
                                     decay_rate=float(train_config.lr_decay_factor), staircase=True)
    else:
        lr = float(train_config.lr)
    name = str(train_config.optimizer)
    if name == "sgd":
        opt = optax.sgd(lr, momentum=float(train_config.momentum) or None)
    elif name == "adam":
        opt = optax.adam(lr, b1=float(train_config.adam_b1), b2=float(train_config.adam_b2))
    else:
        raise ValueError(f"train.optimizer must be sgd or adam, got {name!r}")
    wd = float(train_config.weight_decay)
    # torch's weight_decay adds wd * param to the gradient before the optimizer (L2, not AdamW)
    return optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt


def make_train_step(model: R.ClassifierEnsemble, tx: optax.GradientTransformation, *, real_target: str,
                    compute_dtype=jnp.float32, axis_name: str | None = parallel.AXIS):
    """`step(state, metrics_sum, batch) -> (state, metrics_sum)`, to be pmapped over `axis_name`.

    `batch` holds `image` (B, S, S, 3) uint8, `labels` (B, 3) int32 and `is_real` (B,) bool.
    """
    train_bn = not model.freeze_bn

    def loss_fn(params, batch_stats, batch):
        x = D.normalize(batch["image"], dtype=compute_dtype)
        variables = {"params": params, "batch_stats": batch_stats}
        if train_bn:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, x, train=True), batch_stats
        loss, metrics = ensemble_loss(logits, batch["labels"], batch["is_real"], real_target)
        return loss, (metrics, new_stats)

    def step(state: TrainState, metrics_sum: dict, batch: dict):
        grads, (metrics, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params, state.batch_stats, batch)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        return state, jax.tree.map(jnp.add, metrics_sum, metrics)

    return step


def zero_metrics() -> dict:
    names = ["loss", "loss_real", "loss_cf", "acc_real_shape"] + [f"acc_cf_{h}" for h in R.HEADS]
    return {k: jnp.zeros((), jnp.float32) for k in names}


# ------------------------------------------------------------------------------------ the state

def init_state(config, steps_per_epoch: int, *, model=None, log=print) -> TrainState:
    """Random init, with the backbone (or the whole ensemble) from `model.pretrained` when set."""
    model = model or R.ensemble_from_config(config.model)
    size = int(config.data.image_size)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), False))(jax.random.key(int(config.seed)))
    variables = jax.tree.map(np.asarray, variables)
    params, batch_stats = variables["params"], variables["batch_stats"]
    if config.model.pretrained:
        params, batch_stats = load_pretrained(config.model.pretrained, params, batch_stats, log=log)
    tx = make_optimizer(config.train, steps_per_epoch)
    return TrainState(step=np.zeros((), np.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params))


def load_pretrained(path, params: dict, batch_stats: dict, log=print) -> tuple[dict, dict]:
    """Put a `cgn-jax port resnet50` checkpoint into the ensemble: its backbone, or all of an ensemble.

    A plain ResNet's `fc` is dropped (the heads start from scratch, as in the official code).
    """
    from cgn_jax.checkpoint import check_tree_matches, read_meta, restore_variables

    meta = read_meta(path)
    if meta.get("model") != "resnet":
        raise FileNotFoundError(f"model.pretrained={path} is not a `cgn-jax port resnet50` directory (meta.json "
                                "with model 'resnet' missing)")
    stored = restore_variables(path)
    if meta.get("kind") == "ensemble":
        new_params, new_stats = stored["params"], stored["batch_stats"]
        what = "the whole ensemble"
    else:
        new_params = {**params, "backbone": {k: v for k, v in stored["params"].items() if k != "fc"}}
        new_stats = {"backbone": stored["batch_stats"]}
        what = "the backbone (fc dropped)"
    check_tree_matches({"params": params, "batch_stats": batch_stats},
                       {"params": new_params, "batch_stats": new_stats},
                       what=f"pretrained checkpoint {path} ({meta.get('arch')}, width {meta.get('width')})")
    log(f"initialised {what} from {path}")
    return (jax.tree.map(lambda x: np.asarray(x, np.float32), new_params),
            jax.tree.map(lambda x: np.asarray(x, np.float32), new_stats))


# ------------------------------------------------------------------------------------ the data

def merge_batches(real: dict, cf: dict | None, n_devices: int) -> dict:
    """Per-device mixed batches: (n_devices, b_real + b_cf, ...) with real images first on every device."""
    def per_device(x):
        return einops.rearrange(x, "(d b) ... -> d b ...", d=n_devices)

    y = real["label"].astype(np.int32)
    images = [per_device(real["image"])]
    labels = [per_device(np.stack([y, y, y], axis=-1))]  # texture/bg columns carry zero loss weight
    is_real = [per_device(np.ones_like(y, dtype=bool))]
    if cf is not None:
        images.append(per_device(cf["image"]))
        labels.append(per_device(np.stack([cf["shape"], cf["texture"], cf["background"]], -1).astype(np.int32)))
        is_real.append(per_device(np.zeros_like(cf["shape"], dtype=bool)))
    return {"image": np.concatenate(images, 1), "labels": np.concatenate(labels, 1),
            "is_real": np.concatenate(is_real, 1)}


def train_iterator(config, real_source, cf_source, n_devices: int, start_step: int, shard=(0, 1)):
    """Endless per-device mixed batches on the host (numpy), starting at `start_step`."""
    dc = config.data
    b_real = int(config.train.per_device_batch_size) * n_devices
    b_cf = cf_batch_per_device(config) * n_devices if cf_source is not None else 0
    kw = dict(image_size=int(dc.image_size), start_step=start_step, shard=shard, num_threads=int(dc.num_threads),
              num_workers=int(dc.num_workers), prefetch=int(dc.prefetch) or None, draft=bool(dc.draft_decode),
              scale=(float(dc.min_crop_scale), 1.0))
    real = D.train_batches(real_source, b_real, seed=int(config.seed), **kw)
    cf = D.train_batches(cf_source, b_cf, seed=int(config.seed) + 7919, **kw) if b_cf else None
    try:
        while True:
            yield merge_batches(next(real), next(cf) if cf is not None else None, n_devices)
    finally:  # stop decode threads / worker processes now, not at interpreter exit
        D.close_iterator(real)
        D.close_iterator(cf)


def cf_batch_per_device(config) -> int:
    if not config.data.counterfactual:
        return 0
    return int(round(float(config.data.cf_ratio) * int(config.train.per_device_batch_size)))


def _put(batches, devices, depth: int = 2):
    import collections

    queue = collections.deque()
    try:
        for b in batches:
            queue.append(D.device_put_stacked(b, devices))
            if len(queue) > depth:
                yield queue.popleft()
    finally:
        D.close_iterator(batches)


# ------------------------------------------------------------------------------------- the loop

@dataclasses.dataclass
class TrainResult:
    step: int
    num_steps: int
    status: str
    workdir: Path
    compile_s: float | None
    last_metrics: dict
    eval_metrics: dict


def check_config(config) -> None:
    if config.get("task", "imagenet_classifier") != "imagenet_classifier":
        raise ValueError(f"config task {config.task!r} is not the ImageNet classifier")
    if not config.data.train:
        raise ValueError("data.train is empty; set --config.data.train=/path/to/imagenet/train (ImageFolder) "
                         "or --config.data.train=tfds")
    if str(config.train.real_target) not in REAL_TARGETS:
        raise ValueError(f"train.real_target must be one of {REAL_TARGETS}")
    if str(config.model.ensemble) not in ("mean_probs", "mean_logits"):
        raise ValueError("model.ensemble must be mean_probs or mean_logits")
    if config.model.freeze_bn_stats and not config.model.pretrained:
        raise ValueError("model.freeze_bn_stats=True keeps BatchNorm in inference mode, which only makes sense for a "
                         "pretrained backbone: set model.pretrained=DIR (from `cgn-jax port resnet50`), or train from "
                         "scratch with configs/imagenet_classifier.py:scratch (--config.model.freeze_bn_stats=False)")
    R._arch(config.model)
    R._dtype(config.model.dtype)


def train(config, workdir: str | Path, *, devices=None, progress: bool = True) -> TrainResult:
    from tqdm import tqdm

    from cgn_jax.train.checkpointing import TrainCheckpoints
    from cgn_jax.train.logging import MetricsLogger

    check_config(config)
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    say = (lambda m: print(m, flush=True)) if is_main else (lambda m: None)
    devices = list(devices) if devices is not None else jax.local_devices()
    n_dev, n_proc = len(devices), jax.process_count()
    shard = (jax.process_index(), n_proc)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2,
                                                        sort_keys=True) + "\n")

    dc = config.data
    real_source = D.open_source(dc.train, "train", tfds_data_dir=dc.tfds_data_dir, tfds_manual_dir_=dc.tfds_manual_dir)
    cf_source = None
    if dc.counterfactual and cf_batch_per_device(config) > 0:
        cf_source = D.CounterfactualSource(dc.counterfactual, "train", dc.cf_image_suffix)
    b_real = int(config.train.per_device_batch_size)
    global_real = b_real * n_dev * n_proc
    steps_per_epoch = len(real_source) // global_real
    if steps_per_epoch < 1:
        raise ValueError(f"{len(real_source)} training images are fewer than one global batch of {global_real}")
    num_steps = int(config.train.num_steps) or int(config.train.epochs) * steps_per_epoch

    model = R.ensemble_from_config(config.model, axis_name=parallel.AXIS)
    tx = make_optimizer(config.train, steps_per_epoch)
    checkpoints = TrainCheckpoints(workdir / "checkpoints", int(config.train.keep_checkpoints))
    start = checkpoints.latest_step()
    if start is not None:
        template = init_state(_no_pretrained(config), steps_per_epoch, model=model, log=lambda m: None)
        with checkpoints.closed_on_error():
            state, _ = checkpoints.restore(template, start)
        say(f"resuming {workdir} from step {start}")
    else:
        state = init_state(config, steps_per_epoch, model=model, log=say)
    start = int(state.step)
    say(f"training the {config.model.arch} ensemble ({config.variant}): {num_steps} steps, {steps_per_epoch}/epoch; "
        f"{b_real} real + {cf_batch_per_device(config) if cf_source else 0} counterfactual images per device on "
        f"{n_dev} device(s) x {n_proc} host(s); {len(real_source)} real"
        + (f", {len(cf_source)} counterfactual images" if cf_source else " images, no counterfactuals"))

    step_fn = make_train_step(model, tx, real_target=str(config.train.real_target),
                              compute_dtype=R._dtype(config.model.dtype))
    p_step = jax.pmap(step_fn, axis_name=parallel.AXIS, devices=devices, donate_argnums=(0, 1))
    rstate = parallel.replicate(state, devices)
    metrics_sum = parallel.replicate(jax.tree.map(np.asarray, zero_metrics()), devices)
    del state
    batches = _put(train_iterator(config, real_source, cf_source, n_dev, start, shard), devices)
    logger = MetricsLogger(workdir, enabled=is_main, resume_step=start if start else None,
                           tensorboard=bool(config.train.tensorboard), plots=False)

    log_every, ckpt_every = int(config.train.log_every), int(config.train.checkpoint_every)
    eval_every = int(config.train.eval_every_epochs) * steps_per_epoch
    window_start, window_steps, last, compile_s, eval_results = time.perf_counter(), 0, {}, None, {}
    pbar = tqdm(total=num_steps, initial=start, disable=not (progress and is_main), dynamic_ncols=True,
                desc="classifier", unit="step")
    step = start
    queue = BoundedQueue()  # a stop signal waits for at most a few seconds of queued steps
    with StopOnSignal() as stop, checkpoints.closed_on_error():  # an error in a step closes it too
        while step < num_steps and not stop.signum:
            rstate, metrics_sum = p_step(rstate, metrics_sum, next(batches))
            queue.after_step(metrics_sum)
            step += 1
            window_steps += 1
            pbar.update(1)
            if compile_s is None:
                jax.block_until_ready(metrics_sum)
                compile_s = time.perf_counter() - window_start
                window_start, window_steps = time.perf_counter(), 0
                pbar.write(f"first step (compilation included) took {compile_s:.1f}s") if is_main else None
            if (log_every and step % log_every == 0) or step == num_steps:
                sums = parallel.to_host(metrics_sum)
                now = time.perf_counter()
                last = {k: float(v) / max(window_steps, 1) for k, v in sums.items()}
                if window_steps:
                    last["sec_per_step"] = (now - window_start) / window_steps
                    last["images_per_s"] = global_real * (1 + (cf_batch_per_device(config) / b_real if cf_source
                                                               else 0)) / last["sec_per_step"]
                last["epoch"] = step / steps_per_epoch
                logger.write(step, last)
                pbar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "acc_real_shape")})
                metrics_sum = parallel.replicate(jax.tree.map(np.asarray, zero_metrics()), devices)
                window_start, window_steps = now, 0
            epoch_end = step % steps_per_epoch == 0
            if (ckpt_every and step % ckpt_every == 0) or epoch_end:
                _checkpoint(checkpoints, rstate, step, config, workdir)
            if eval_every and step % eval_every == 0:
                eval_results = evaluate_during_training(config, model, rstate, devices, say)
                if eval_results:
                    logger.write(step, eval_results)
                window_start = time.perf_counter()
    pbar.close()
    batches.close()
    with checkpoints:  # closed however the final save ends
        if checkpoints.latest_step() != step:
            _checkpoint(checkpoints, rstate, step, config, workdir)
    logger.close()
    status = "interrupted" if stop.signum and step < num_steps else "completed"
    if status == "interrupted":
        say(f"stopped by {signal.Signals(stop.signum).name} at step {step}/{num_steps}; run the same command to resume")
    else:
        say(f"done: step {step}; ensemble variables in {workdir / 'ensemble'}")
    return TrainResult(step, num_steps, status, workdir, compile_s, last, eval_results)


def _no_pretrained(config):
    c = config.copy_and_resolve_references()
    c.model.pretrained = ""
    return c


def _checkpoint(checkpoints, rstate, step: int, config, workdir: Path) -> None:
    from cgn_jax.checkpoint import save_variables

    state = parallel.to_host(rstate)
    checkpoints.save(step, state, {"variant": config.variant})
    # every process takes part (Orbax synchronises hosts); the primary one writes
    save_variables(workdir / "ensemble", {"params": state.params, "batch_stats": state.batch_stats},
                   export_meta(config, step))


def export_meta(config, step: int) -> dict:
    block, stages = R._arch(config.model)
    return {"model": "resnet", "kind": "ensemble", "arch": str(config.model.arch), "block": block,
            "stage_sizes": list(stages), "width": int(config.model.width),
            "num_classes": int(config.model.num_classes), "ensemble": str(config.model.ensemble),
            "step": int(step), "variant": str(config.variant),
            "note": "cgn-jax ImageNet classifier ensemble (heads: shape, texture, background)"}


def evaluate_during_training(config, model, rstate, devices, say) -> dict:
    """The official per-epoch validation: ImageNet top-1/5, shape bias, ImageNet-9 (whichever is configured)."""
    from cgn_jax import evaluate as E

    ec, dc = config.eval, config.data
    if not (dc.val or ec.shape_bias_dir or ec.in9_dir):
        return {}
    predictor = E.Predictor(model, {"params": rstate.params, "batch_stats": rstate.batch_stats},
                            ensemble=str(config.model.ensemble), devices=devices, replicated=True,
                            dtype=R._dtype(config.model.dtype))
    kw = dict(num_threads=int(dc.num_threads), max_batches=int(ec.max_batches))
    bs, size, resize = int(ec.batch_size), int(dc.image_size), int(dc.resize_size)
    out = {}
    if dc.val:
        src = D.open_source(dc.val, "validation", tfds_data_dir=dc.tfds_data_dir, tfds_manual_dir_=dc.tfds_manual_dir)
        for head, r in E.evaluate_imagenet(predictor, src, bs, resize=resize, image_size=size, **kw).items():
            out[f"val/top1_{head}"], out[f"val/top5_{head}"] = r["top1"], r["top5"]
    if ec.shape_bias_dir and int(config.model.num_classes) == 1000:
        res = E.evaluate_shape_bias(predictor, D.CueConflictSource(ec.shape_bias_dir), bs, resize=resize,
                                    image_size=size, **kw)
        out.update({f"shape_bias/{h}": float("nan") if r["shape_bias"] is None else r["shape_bias"]
                    for h, r in res.items()})
    if ec.in9_dir and int(config.model.num_classes) == 1000:
        for head, r in E.evaluate_bg_gap(predictor, ec.in9_dir, bs, image_size=size, **kw).items():
            out.update({f"in9/{k}_{head}": v for k, v in r.items()})
    say("eval: " + ", ".join(f"{k}={v:.2f}" if not math.isnan(v) else f"{k}=nan" for k, v in sorted(out.items())))
    return out


# ------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/imagenet_classifier.py",
                        help="config file[:variant] (official, scratch, baseline, tiny); fields are overridden "
                             "with --config.a.b=value")
    parser.add_argument("--workdir", default="runs/imagenet_classifier",
                        help="checkpoints, metrics.jsonl and the ensemble export go here; re-running resumes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from cgn_jax.cli import CLIError
    from cgn_jax.config_loading import ConfigError, load_config

    try:
        config = load_config(args.config, getattr(args, "config_overrides", []) or [])
    except (ConfigError, ValueError) as e:
        raise CLIError(str(e)) from e
    return run_with_config(config, args.workdir, progress=not getattr(args, "no_progress", False))


def run_with_config(config, workdir, progress: bool = True) -> int:
    """Entry point for a dispatcher that already loaded the config (`train-classifier` when `config.task` is
    `imagenet_classifier`)."""
    from cgn_jax.checkpoint import CheckpointMismatchError
    from cgn_jax.cli import CLIError

    try:
        result = train(config, workdir or "runs/imagenet_classifier", progress=progress)
    except (D.DataError, FileNotFoundError, CheckpointMismatchError, parallel.BatchSplitError) as e:
        raise CLIError(str(e)) from e
    except ValueError as e:
        if "config" in str(e) or "data." in str(e) or "train." in str(e) or "model." in str(e):
            raise CLIError(str(e)) from e
        raise
    return 0 if result.status == "completed" else 130
