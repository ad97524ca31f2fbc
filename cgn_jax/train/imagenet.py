"""The ImageNet CGN training loop: config in, three fine-tuned BigGAN mechanisms out, resumable.

It reads top to bottom: load the frozen networks (converted weights or random, as
the config says) and put them on the devices once, start from the latest checkpoint
(or from copies of the pretrained BigGAN), then run the compiled micro-step, touching
the host only at update boundaries that are due for a log line (metrics JSONL,
TensorBoard, plots), a sample sheet or a checkpoint. SIGTERM or Ctrl-C stops after
the current micro-step with a checkpoint, so re-running the same command continues
the same run, mid-accumulation included.

Checkpoints are keyed by micro-step and hold only what training changes (the three
mechanisms' parameters, the optimizer state with its accumulated gradients, the step
and the run key); the pretrained weights are recorded by path in the checkpoint's
metadata, so a 3 x 55M-parameter model does not store a fourth copy of BigGAN and U2-Net
every time. The latest parameters are also exported to `workdir/cgn/` for
`cgn-jax generate`. With `model.spectral_norm=power_iteration` checkpoints and the
export also hold each mechanism's spectral norm u, v (the parameters are then the
unnormalised kernels), and sample sheets use the stored u, v (the official samples in
eval mode).

`cgn-jax bench --config=configs/imagenet.py:random,bf16` (or `python -m
cgn_jax.train.imagenet --bench N --config ...`, the same as JSON) times the compiled step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from cgn_jax import bench, parallel, sheets
from cgn_jax.checkpoint import CheckpointMismatchError, save_variables
from cgn_jax.models import imagenet_cgn as M
from cgn_jax.train import imagenet_step as S
from cgn_jax.train.checkpointing import TrainCheckpoints
from cgn_jax.train.logging import MetricsLogger, plot_metrics
from cgn_jax.train.mnist import _Every, _save_config, _say, transfer_guard
from cgn_jax.train.signals import BoundedQueue, StopOnSignal

PLOTS = (("losses.png", (("generator", ("g_loss",)), ("reconstruction", ("l1", "perc")),
                         ("mask", ("binary", "mask")), ("texture / background", ("text", "bg")))),
         ("mask.png", (("mask mean", ("mask_mean",)), ("background saliency", ("bg_saliency",)))))
SHEET_COLUMNS = ("mask", "premask", "texture", "background", "composite", "x_gt")  # official order


@dataclasses.dataclass
class TrainResult:
    step: int                 # optimizer updates done when the loop stopped
    num_steps: int            # updates the config asks for
    micro_step: int           # micro-steps done (step * accum, or more when stopped mid-update)
    accum: int                # micro-steps per update
    status: str               # "completed" or "interrupted"
    signal: int | None
    workdir: Path
    compile_s: float | None
    last_metrics: dict


def check_config(config) -> None:
    """ValueError for settings that cannot work, before anything is loaded or compiled."""
    S.compute_dtype(config)
    transfer_guard(config)
    lc = S.LossConfig.from_config(config.loss)
    for name in ("perc_content", "text_style"):
        if len(getattr(lc, name)) != len(lc.perc_style):
            raise ValueError(f"loss.{name} needs one weight per VGG16 block, like loss.perc_style")
    lo, hi = lc.mask_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"loss.mask_interval must satisfy 0 <= lo <= hi <= 1, got {lc.mask_interval}")
    M.spectral_norm_mode(config.model)
    if not 0.0 < float(config.model.truncation) <= 1.0:
        raise ValueError(f"model.truncation must be in (0, 1], got {config.model.truncation}")
    if int(config.train.num_steps) <= 0:
        raise ValueError("train.num_steps (optimizer updates) must be positive")
    if lc.text_patch > lc.text_work_size or lc.text_top > (lc.text_work_size - lc.text_patch + 1) ** 2:
        raise ValueError("loss.text_patch / text_top do not fit in loss.text_work_size")
    int(config.train.per_device_batch), int(config.train.effective_batch)


def build(config, devices):
    """(spec, frozen on host, sources) for `config` on `devices`: the model and everything frozen."""
    n_devices = len(devices) * jax.process_count()
    accum = S.accum_steps(config, n_devices)
    biggan_config, nets, sources = M.load_networks(config.model, int(config.seed))
    dtype = S.compute_dtype(config)
    model = M.from_config(config.model, biggan_config, dtype)
    lc = S.LossConfig.from_config(config.loss)
    vgg = perceptual(config, lc, dtype)
    sources["vgg16"] = config.loss.vgg_weights or "cache"
    pdb = int(config.train.per_device_batch)
    spec = S.StepSpec(model=model, loss=lc, truncation=float(config.model.truncation), per_device_batch=pdb,
                      global_batch=pdb * n_devices, accum=accum)
    frozen = S.Frozen(nets=nets, vgg=vgg, ts=model.stats(float(config.model.truncation)))
    return spec, frozen, sources


def initial_state(config, frozen: S.Frozen, accum: int) -> S.TrainState:
    """The state before the first step: mechanisms from the pretrained BigGAN in the config's spectral norm mode."""
    params, spectral = M.initial_mechanisms(config.model, frozen.nets, int(config.seed))
    return S.init_state(config, params, accum, spectral)


def perceptual(config, lc: S.LossConfig, dtype):
    """VGG16 feature weights: converted (`loss.vgg_weights` dir or the cache) or "random"."""
    from cgn_jax.losses import PerceptualLoss

    if config.loss.vgg_weights == M.RANDOM:
        from cgn_jax.models.vgg16 import param_shapes

        shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), param_shapes(len(lc.perc_style)),
                              is_leaf=lambda x: isinstance(x, tuple))
        params = M.random_variables(shapes, int(config.seed) + 2)
        return PerceptualLoss.create(params, lc.vgg_weights(), dtype=dtype)
    return PerceptualLoss.load(lc.vgg_weights(), dtype=dtype, path=config.loss.vgg_weights or None)


@functools.lru_cache(maxsize=8)
def _compiled_step(optim: tuple, spec: S.StepSpec, devices: tuple):
    import ml_collections

    config = ml_collections.ConfigDict({"optim": dict(optim)})
    return S.pmap_train_step(config, spec, devices)


def train_step_fn(config, spec: S.StepSpec, devices):
    """The pmapped step, cached per (optimizer settings, spec, devices): a resumed or repeated
    run in the same process does not compile again."""
    optim = tuple(sorted((k, float(v)) for k, v in config.optim.items()))
    return _compiled_step(optim, spec, tuple(devices))


def train(config, workdir: str | Path, *, devices=None, progress: bool = True) -> TrainResult:
    check_config(config)
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    devices = list(devices) if devices is not None else jax.local_devices()
    spec, frozen, sources = build(config, devices)
    accum, num_steps = spec.accum, int(config.train.num_steps)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _save_config(config, workdir / "config.json")

    checkpoints = TrainCheckpoints(workdir / "checkpoints", config.train.keep_checkpoints)
    state = initial_state(config, frozen, accum)
    latest = checkpoints.latest_step()
    if latest is not None:
        with checkpoints.closed_on_error():
            state, meta = _restore(checkpoints, state, latest, spec)
            _check_resume(meta, sources, accum, is_main)
        _say(is_main, f"resuming {workdir} from micro-step {latest} (update {latest // accum})")
    micro = int(state.step)
    start_update = micro // accum
    rfrozen = parallel.replicate(frozen, devices)
    rstate = parallel.replicate(state, devices)
    metrics_sum = parallel.replicate(S.zero_metrics(), devices)
    del state
    step_fn = train_step_fn(config, spec, devices)
    sampler = make_sampler(spec.model, config)
    logger = MetricsLogger(workdir, enabled=is_main, resume_step=start_update if micro else None, plots=False)
    _say(is_main, f"training ImageNet CGN ({config.variant}): {num_steps} updates of {spec.global_batch * accum} "
                  f"examples = {accum} micro-steps x {spec.per_device_batch} per device x {len(devices)} device(s); "
                  f"{spec.model.image_size}px, {config.train.compute_dtype}, remat={spec.model.remat}, "
                  f"spectral_norm={spec.model.spectral_norm}")

    every = _Every(config.train)
    # metrics are summed on the device over `n_summed` micro-steps; timing leaves out the compilation
    n_summed, timed, last_metrics, compile_s = 0, 0, {}, None
    window_start = time.perf_counter()
    pbar = tqdm(total=num_steps * accum, initial=micro, disable=not (progress and is_main), dynamic_ncols=True,
                desc=config.variant, unit="micro")
    guard = transfer_guard(config)
    queue = BoundedQueue()  # a stop signal waits for at most a few seconds of queued steps
    with StopOnSignal() as stop, checkpoints.closed_on_error():  # an error in a step closes it too
        while micro < num_steps * accum and not stop.signum:
            with jax.transfer_guard(guard):  # the step may not move data between host and device
                rstate, metrics_sum = step_fn(rstate, metrics_sum, rfrozen)
            queue.after_step(metrics_sum)
            micro += 1
            n_summed += 1
            timed += 1
            pbar.update(1)
            if compile_s is None:
                jax.block_until_ready(metrics_sum)
                compile_s = time.perf_counter() - window_start
                window_start, timed = time.perf_counter(), 0
                _say(is_main, f"first micro-step (compilation included) took {compile_s:.1f}s", pbar)
            if micro % accum:
                continue
            update = micro // accum
            if every.log(update) or update == num_steps:
                last_metrics = _mean_metrics(metrics_sum, n_summed)
                now = time.perf_counter()
                if timed:
                    last_metrics["sec_per_update"] = (now - window_start) / timed * accum
                    last_metrics["examples_per_sec"] = timed * spec.global_batch / max(now - window_start, 1e-9)
                logger.write(update, last_metrics)
                if is_main:
                    for name, panels in PLOTS:
                        plot_metrics(logger.records, panels, workdir / "plots" / name)
                pbar.set_postfix({k: f"{last_metrics[k]:.3f}" for k in ("g_loss", "mask_mean")})
                metrics_sum = parallel.replicate(S.zero_metrics(), devices)
                window_start, timed, n_summed = now, 0, 0
            if every.sample(update) and is_main:
                save_samples(sampler, rstate, frozen, workdir / "samples" / f"update_{update:06d}.png", update)
            if every.checkpoint(update):
                _checkpoint(checkpoints, rstate, micro, spec, sources, config, workdir)
    pbar.close()

    with checkpoints:  # closed however the final save ends
        if checkpoints.latest_step() != micro and micro > 0:
            _checkpoint(checkpoints, rstate, micro, spec, sources, config, workdir)
    logger.close()
    update = micro // accum
    status = "interrupted" if stop.signum and micro < num_steps * accum else "completed"
    if status == "interrupted":
        _say(is_main, f"stopped by {signal.Signals(stop.signum).name} at micro-step {micro} (update {update}/"
                      f"{num_steps}); checkpoint saved in {workdir / 'checkpoints'}; run the same command to resume")
    else:
        _say(is_main, f"done: {update} updates; mechanisms in {workdir / 'cgn'}")
    return TrainResult(step=update, num_steps=num_steps, micro_step=micro, accum=accum, status=status,
                       signal=stop.signum, workdir=workdir, compile_s=compile_s, last_metrics=last_metrics)


# ---------------------------------------------------------------------------- pieces of the loop

def make_sampler(model: M.ImageNetCGN, config):
    """`sampler(params, nets, ts, spectral=None) -> outputs` on the official fixed-noise sheet: one noise
    vector (drawn once from the run's seed), one row per class of `train.sample_classes` (mod num_classes).
    Power-iteration mechanisms use their stored u, v (the official samples in eval mode)."""
    classes = jnp.asarray([int(c) % model.num_classes for c in config.train.sample_classes])
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0xF1ED)
    u = jnp.repeat(model.sample_noise(key, 1, float(config.model.truncation)), classes.shape[0], axis=0)

    @jax.jit
    def sampler(params, nets, ts, spectral=None):
        return model(params, nets, u, classes, ts=ts, with_bg_saliency=False, spectral=spectral)

    return sampler


def save_samples(sampler, rstate, frozen: S.Frozen, path: Path, update: int) -> Path:
    """Rows = classes; columns as the official sheet: mask, premask, texture, background, composite, x_gt."""
    spectral = getattr(rstate, "spectral", None)
    spectral = None if spectral is None else parallel.unreplicate(spectral)
    out = jax.device_get(sampler(parallel.unreplicate(rstate.params), frozen.nets, frozen.ts, spectral))
    panels = [(name, sheets.to_uint8(out[name], (0.0, 1.0) if name == "mask" else (-1.0, 1.0)), 1)
              for name in SHEET_COLUMNS]
    scale = 1 if out["composite"].shape[1] >= 128 else 2
    return sheets.save_sheet(path, panels, n_cols=1, title=f"ImageNet CGN, update {update}", scale=scale)


def export_mechanisms(dst: Path, params, spec: S.StepSpec, sources: dict, config, update: int,
                      spectral=None) -> Path:
    """The three mechanisms' parameters (and, power-iteration mode, their u, v under "spectral")
    plus what `generate_imagenet` needs to rebuild the rest."""
    meta = {"model": "imagenet_cgn", "biggan_config": spec.model.biggan_config.to_dict(),
            "u2net_variant": spec.model.u2net_variant, "sources": sources, "seed": int(config.seed),
            "truncation": float(config.model.truncation), "update": int(update), "source": "cgn-jax train",
            "spectral_norm": spec.model.spectral_norm}
    variables = {"params": params} if spectral is None else {"params": params, "spectral": spectral}
    return save_variables(dst, variables, meta)


def _checkpoint(checkpoints, rstate, micro: int, spec: S.StepSpec, sources: dict, config, workdir: Path) -> None:
    state = parallel.to_host(rstate)
    checkpoints.save(micro, state, {"sources": sources, "accum": spec.accum, "update": micro // spec.accum,
                                    "spectral_norm": spec.model.spectral_norm})
    if jax.process_index() == 0:
        export_mechanisms(workdir / "cgn", state.params, spec, sources, config, micro // spec.accum,
                          getattr(state, "spectral", None))


def _restore(checkpoints, template, step: int, spec: S.StepSpec):
    """`checkpoints.restore`, naming the spectral norm mode when the checkpoint is of the other one."""
    try:
        return checkpoints.restore(template, step)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f"{e}. Note: this config has model.spectral_norm={spec.model.spectral_norm}, and a run started with the "
            "other mode cannot resume in this one (the checkpoint's meta says which it used)") from None


def _check_resume(meta: dict, sources: dict, accum: int, is_main: bool) -> None:
    old = meta.get("sources", {})
    changed = [k for k in ("biggan", "u2net") if k in old and old[k] != sources.get(k)]
    if changed:
        _say(is_main, "warning: the run was started with " + ", ".join(f"{k}={old[k]}" for k in changed) +
             "; now " + ", ".join(f"{k}={sources[k]}" for k in changed) + ": the frozen networks differ")
    if "accum" in meta and int(meta["accum"]) != accum:
        raise CheckpointMismatchError(
            f"the checkpoint accumulates over {meta['accum']} micro-steps per update, this config and device count "
            f"over {accum}; keep per_device_batch x devices the same to resume, or use a new --workdir")


def _mean_metrics(metrics_sum, n: int) -> dict[str, float]:
    return {k: float(v) / n for k, v in parallel.to_host(metrics_sum).items()}


# ---------------------------------------------------------------------------- benchmark

def benchmark(config, steps: int = 10, devices=None) -> dict:
    """`cgn-jax bench` of `config`'s micro-step on the first len(devices) local devices (default all)."""
    n = len(list(devices)) if devices is not None else None
    return bench.bench_imagenet_train(config, steps=steps, warmup=1, n_devices=n, log=lambda msg: None)


def main(argv=None) -> int:
    import argparse

    from cgn_jax.config_loading import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/imagenet.py:random")
    parser.add_argument("--bench", type=int, default=10, help="timed micro-steps")
    parser.add_argument("--devices", type=int, default=None)
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    devices = jax.local_devices()[: args.devices] if args.devices else None
    print(json.dumps(benchmark(config, args.bench, devices), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
