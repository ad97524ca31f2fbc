"""The MNIST CGN training loop: config in, trained generator out, resumable at any point.

It reads top to bottom: set up the working directory, put the data and frozen VGG16
on the devices, start from the latest checkpoint (or from scratch), then run the
compiled step, touching the host only every `log_every` steps (metrics), every
`sample_every` steps (a sample sheet) and every `checkpoint_every` steps (an Orbax
checkpoint plus an export of the generator that `cgn-jax generate` and
`load_mnist_cgn` read). SIGTERM or Ctrl-C stops after the current step with a final
checkpoint, so re-running the same command continues the same run.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cgn_jax import mask_stats, parallel, sheets
from cgn_jax.data import sharding
from cgn_jax.data.sharding import DataShards
from cgn_jax.checkpoint import read_meta, save_variables
from cgn_jax.train import mnist_step as S
from cgn_jax.train.checkpointing import TrainCheckpoints
from cgn_jax.train.logging import MetricsLogger
from cgn_jax.train.signals import BoundedQueue, StopOnSignal

SAMPLES_PER_CLASS = 6
# config fields that may change between a run and its resumption without a warning
_RESUME_SAFE = ("train.num_steps", "train.epochs", "train.log_every", "train.sample_every",
                "train.checkpoint_every", "train.keep_checkpoints")


@dataclasses.dataclass
class TrainResult:
    step: int                 # steps done when the loop stopped
    num_steps: int            # steps the config asks for
    status: str               # "completed" or "interrupted"
    signal: int | None        # the signal that stopped it, if any
    workdir: Path
    compile_s: float | None   # first step (compilation included), None if no step ran
    last_metrics: dict


def train(config, workdir: str | Path, *, devices=None, progress: bool = True) -> TrainResult:
    check_config(config)
    workdir = Path(workdir).absolute()
    is_main = jax.process_index() == 0
    chosen = list(devices) if devices is not None else None  # None: all devices, pmap's default
    devices = chosen or jax.local_devices()
    global_batch = int(config.train.batch_size)
    parallel.per_device_batch(global_batch, len(devices) * jax.process_count())  # fail before loading data
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        _save_config(config, workdir / "config.json")

    # data (this host's rows), render assets and the frozen VGG16, on the devices for the whole run
    ctx, layout = step_context(config, devices)
    steps_per_epoch = layout.steps_per_epoch
    num_steps = int(config.train.num_steps) or int(config.train.epochs) * steps_per_epoch
    late = sorted(n for n in snapshot_steps(config.train) if not 0 < n <= num_steps)
    if late:
        raise ScheduleError(f"train.snapshot_steps {late} fall outside this run's steps 1-{num_steps}; "
                            "give steps within the run (or raise train.num_steps)")

    # state: the latest checkpoint if there is one, else step 0
    checkpoints = TrainCheckpoints(workdir / "checkpoints", config.train.keep_checkpoints)
    state = S.init_state(config)
    start = checkpoints.latest_step()
    if start is not None:
        with checkpoints.closed_on_error():
            state = restore_state(checkpoints, state, start, config, is_main)
        _say(is_main, f"resuming {workdir} from step {start}")
    start = int(state.step)
    train_step = S.pmap_train_step(config, global_batch, layout, chosen)
    sampler = make_sampler(config)
    logger = MetricsLogger(workdir, enabled=is_main, resume_step=start if start else None)
    _say(is_main, f"training {config.variant} MNIST CGN: {num_steps} steps of global batch {global_batch} "
                  f"on {len(devices) * jax.process_count()} device(s), {layout.num_examples} examples "
                  f"({steps_per_epoch} steps/epoch)")

    rstate = parallel.replicate(state, devices)
    metrics_sum = parallel.replicate(S.zero_metrics(), devices)
    del state
    every = _Every(config.train)
    summed = 0  # steps in metrics_sum
    timer_start, timed, last_metrics, compile_s = time.perf_counter(), 0, {}, None
    pbar = tqdm(total=num_steps, initial=start, disable=not (progress and is_main), dynamic_ncols=True,
                desc=config.variant, unit="step")
    step = start
    guard = transfer_guard(config)
    inverted = None  # classes whose mask covered the background at the last sample sheet
    queue = BoundedQueue()  # a stop signal waits for at most a few seconds of queued steps
    with StopOnSignal() as stop, checkpoints.closed_on_error():  # an error in a step closes it too
        while step < num_steps and not stop.signum:
            with jax.transfer_guard(guard):  # the step may not move data between host and device
                rstate, metrics_sum = train_step(rstate, metrics_sum, ctx)
            queue.after_step(metrics_sum)
            step, summed, timed = step + 1, summed + 1, timed + 1
            pbar.update(1)
            if compile_s is None:  # one sync, to report the compilation time (and time steps without it)
                jax.block_until_ready(metrics_sum)
                compile_s = time.perf_counter() - timer_start
                timer_start, timed = time.perf_counter(), 0
                _say(is_main, f"first step (compilation included) took {compile_s:.1f}s", pbar)
            if every.log(step) or step == num_steps:
                last_metrics = _mean_metrics(metrics_sum, summed)
                now = time.perf_counter()
                last_metrics["sec_per_step"] = (now - timer_start) / timed if timed else compile_s
                logger.write(step, last_metrics)
                pbar.set_postfix({k: f"{last_metrics[k]:.3f}" for k in ("g_loss", "d_loss", "mask_mean")})
                metrics_sum, summed = parallel.replicate(S.zero_metrics(), devices), 0
                timer_start, timed = now, 0
            if every.sample(step) and is_main:
                inverted = log_samples(sampler, rstate, workdir, config, step, logger, inverted, pbar)
            if every.checkpoint(step):
                _checkpoint(checkpoints, rstate, step, config, workdir)
    pbar.close()

    # the end (or an interruption): final checkpoint, generator export, last sample sheet;
    # the manager is closed however this ends (a full disk at the export, say)
    with checkpoints:
        if checkpoints.latest_step() != step:
            _checkpoint(checkpoints, rstate, step, config, workdir)
        elif step == start and not _exported(workdir, step, average=bool(rstate.ema)):
            # no step ran (a step past `start` was saved and exported in the loop): an export that
            # failed in an earlier run, judged from its files, which every process reads alike
            _export(parallel.to_host(rstate), config, workdir, step)
        if is_main and step > start and not every.sample(step) and not stop.signum:  # a preempted run saves time
            log_samples(sampler, rstate, workdir, config, step, logger, inverted)
    logger.close()
    status = "interrupted" if stop.signum and step < num_steps else "completed"
    if status == "interrupted":
        _say(is_main, f"stopped by {signal.Signals(stop.signum).name} at step {step}/{num_steps}; checkpoint "
                      f"saved in {workdir / 'checkpoints'}; run the same command again to resume")
    else:
        _say(is_main, f"done: step {step}; generator in {workdir / 'generator'}")
    return TrainResult(step=step, num_steps=num_steps, status=status, signal=stop.signum, workdir=workdir,
                       compile_s=compile_s, last_metrics=last_metrics)


# ---------------------------------------------------------------------------- pieces of the loop

def check_config(config) -> None:
    """ValueError for settings that cannot work, before anything is loaded or compiled."""
    from cgn_jax.data import canonical_variant
    from cgn_jax.models import mnist_cgn
    from cgn_jax.models.discriminators import KINDS

    canonical_variant(config.variant)
    S.compute_dtype(config)
    S.ema_decay(config)
    transfer_guard(config)
    try:
        snapshot_steps(config.train)
    except (TypeError, ValueError):
        raise ValueError(f"train.snapshot_steps={config.train.snapshot_steps!r}: give whole steps, "
                         "e.g. --config.train.snapshot_steps=30000,35000") from None
    mnist_cgn.from_config(config.model)  # refuses impossible model settings (e.g. tanh_grad_floor)
    if config.disc.kind not in KINDS:
        raise ValueError(f"disc.kind must be one of {', '.join(KINDS)}, got {config.disc.kind!r}")
    if int(config.train.batch_size) <= 0:
        raise ValueError(f"train.batch_size must be positive, got {config.train.batch_size}")
    if len(tuple(config.loss.perc_style)) != len(tuple(config.loss.perc_content)):
        raise ValueError("loss.perc_style and loss.perc_content need one weight per VGG16 block each")
    if int(config.train.num_steps) <= 0 and int(config.train.epochs) <= 0:
        raise ValueError("set train.num_steps or train.epochs to a positive number")
    shards, batch = int(config.dataset.get("shards", 0)), int(config.train.batch_size)
    if shards < 0 or (shards and batch % shards):
        raise ValueError(f"dataset.shards={shards} cannot work with train.batch_size={batch}: every global batch "
                         "takes the same number of examples from each shard; use a divisor of the batch size, or 0 "
                         "(one shard per process)")


def restore_state(checkpoints: TrainCheckpoints, template: S.TrainState, step: int, config,
                  is_main: bool = True) -> S.TrainState:
    """Checkpoint `step` onto `template`; the generator average may be switched on at a resumption.

    A run resumed with `train.ema_decay` > 0 from a checkpoint that has no average starts the
    average at the restored weights. Resuming a run that has one with the average off would
    drop it, so that is refused with the setting that keeps it.
    """
    stored = checkpoints.stored_entries(step)
    has_ema = bool(template.ema)
    if stored is None or (stored.get("ema", 0) > 0) == has_ema:
        return checkpoints.restore(template, step)[0]
    if not has_ema:
        decay = checkpoints.read_meta(step).get("ema_decay", "D")
        raise ValueError(f"checkpoint {step} in {checkpoints.directory} holds an average of the generator, but "
                         f"train.ema_decay is 0 now; resume with --config.train.ema_decay={decay} to keep it, "
                         "or use a new --workdir")
    state, _ = checkpoints.restore(template.replace(ema={}), step)
    _say(is_main, f"note: checkpoint {step} has no generator average; it starts here from the restored weights "
                  f"(train.ema_decay={S.ema_decay(config)})")
    return state.replace(ema=S.start_ema(state.generator))


def step_context(config, devices) -> tuple[S.StepContext, DataShards]:
    """(the step's constant inputs replicated on `devices`, the data layout).

    This host loads only the rows its devices read (`DataShards.host_rows`).
    """
    from cgn_jax.data import open_split

    split = open_split(config.variant, "train", **_data_args(config))
    layout = sharding.resolve(split.size, int(config.train.batch_size), int(config.dataset.get("shards", 0)))
    start, stop = layout.host_rows(jax.process_index(), jax.process_count())
    if jax.process_count() > 1:
        print(f"process {jax.process_index()}: loading rows [{start}, {stop}) of {layout.num_examples} "
              f"({layout.num_shards} shard(s))", flush=True)
    dataset = split.read(rows=(start, stop))
    ctx = S.StepContext(data=S.device_dataset(dataset), assets=_render_assets(config), perceptual=_perceptual(config),
                        data_offset=np.int32(start))
    return parallel.replicate(ctx, devices), layout


def load_train_data(config) -> dict[str, np.ndarray]:
    """The training split of `config.variant` as numpy arrays (see `cgn_jax.data.load_variant`).

    The dataset's own seed (`dataset.seed`, default 0) is not the run's seed: a new run seed
    changes the training randomness, not the benchmark data (and needs no rebuild of them).
    """
    from cgn_jax.data import load_variant

    return load_variant(config.variant, "train", **_data_args(config))


def _data_args(config) -> dict:
    d = config.dataset
    return dict(mnist_dir=_mnist_dir(d.mnist_dir), textures_dir=_textures_dir(config), data_dir=d.data_dir or None,
                correlation=float(d.correlation), seed=int(d.get("seed", 0)), limit=int(d.limit) or None)


def _mnist_dir(value: str):
    from cgn_jax.paths import resolve_dir

    try:
        return resolve_dir(value, "data", "mnist", what="MNIST")
    except FileNotFoundError:
        if value:
            raise
        return None  # no ../shared: the data module falls back to TFDS's `mnist`


def _textures_dir(config):
    if config.variant != "wildlife":
        return None
    from cgn_jax.paths import resolve_dir

    return resolve_dir(config.dataset.textures_dir, "data", "textures", what="Wildlife MNIST textures")


def _render_assets(config) -> dict:
    from cgn_jax.data import render

    palette = np.asarray(config.dataset.palette, np.float32) if config.variant == "colored" else None
    return render.make_assets(config.variant, textures_dir=_textures_dir(config), palette=palette)


def _perceptual(config):
    from cgn_jax.losses import PerceptualLoss

    return PerceptualLoss.load(tuple(config.loss.perc_style), tuple(config.loss.perc_content),
                               dtype=S.compute_dtype(config), path=config.loss.vgg_weights or None)


def make_sampler(config):
    """`sampler(generator variables) -> outputs` for fixed noise: SAMPLES_PER_CLASS per class, classes in order."""
    from cgn_jax.models import mnist_cgn

    model = mnist_cgn.from_config(config.model)  # float32, BatchNorm running averages
    n = config.model.n_classes
    y = jnp.repeat(jnp.arange(n), SAMPLES_PER_CLASS)
    k_noise, k_tex = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5A3))
    u = jax.random.normal(k_noise, (y.shape[0], config.model.latent_dim))

    @jax.jit
    def sampler(variables):
        return model.apply(variables, y, u=u, train=False, rngs={"texture": k_tex})

    return sampler


def save_samples(sampler, variables, path: Path, title: str) -> dict:
    """Sheet with rows = classes and panels mask | foreground | background | composite; returns the outputs."""
    out = jax.device_get(sampler(variables))
    panels = [("mask", sheets.to_uint8(out["mask"], (0.0, 1.0))), ("foreground", sheets.to_uint8(out["foreground"])),
              ("background", sheets.to_uint8(out["background"])), ("composite", sheets.to_uint8(out["image"]))]
    sheets.save_sheet(path, panels, n_cols=SAMPLES_PER_CLASS, title=title)
    return out


def log_samples(sampler, rstate, workdir: Path, config, step: int, logger, inverted, pbar=None) -> list[int]:
    """Sample sheet, plus each class's mask mean on the canvas frame (`mask_frame_c{k}`) and share of
    saturated foreground/background outputs (`fg_saturated_c{k}`, `bg_saturated_c{k}`; see
    `cgn_jax.mask_stats`) in the metrics; says so when the set of inverted classes changes.
    With a generator average, its sheet (same noise) goes beside the raw one as `*_ema.png`."""
    g = parallel.unreplicate(rstate.generator)
    title = f"{config.variant} MNIST CGN, step {step}"
    out = save_samples(sampler, {"params": g.params, "batch_stats": g.batch_stats},
                       workdir / "samples" / f"step_{step:07d}.png", title)
    if rstate.ema:
        save_samples(sampler, parallel.unreplicate(rstate.ema), workdir / "samples" / f"step_{step:07d}_ema.png",
                     f"{title}, average (decay {S.ema_decay(config)})")
    labels = np.repeat(np.arange(config.model.n_classes), SAMPLES_PER_CLASS)
    means = mask_stats.per_class_frame_mean(out["mask"], labels, config.model.n_classes)
    now = mask_stats.inverted_classes(means)
    saturated = {f"{panel}_saturated_c{k}": float(v) for panel, key in (("fg", "foreground"), ("bg", "background"))
                 for k, v in enumerate(mask_stats.per_class_saturated(out[key], labels, config.model.n_classes))}
    logger.write(step, {**{f"mask_frame_c{k}": float(m) for k, m in enumerate(means)},
                        "mask_inverted_classes": float(len(now)), **saturated})
    if now != inverted and (now or inverted is not None):
        _say(True, f"step {step}: {mask_stats.describe(means)}", pbar)
    return now


def export_generator(dst: Path, generator: S.NetState, config, step: int, ema_decay: float = 0.0) -> Path:
    """The generator's variables in the layout `cgn_jax.port.mnist.load_mnist_cgn` reads."""
    m = config.model
    meta = {"model": "mnist_cgn", "variant": config.variant, "n_classes": int(m.n_classes),
            "latent_dim": int(m.latent_dim), "ngf": int(m.ngf), "img_size": int(m.img_size),
            "texture_mode": m.texture_mode, "patch_size": int(m.patch_size), "step": int(step),
            "source": "cgn-jax train", **({"ema_decay": ema_decay} if ema_decay else {})}
    return save_variables(dst, {"params": generator.params, "batch_stats": generator.batch_stats}, meta)


def _checkpoint(checkpoints: TrainCheckpoints, rstate, step: int, config, workdir: Path) -> None:
    state = parallel.to_host(rstate)
    meta = {"variant": config.variant, **({"ema_decay": S.ema_decay(config)} if state.ema else {})}
    checkpoints.save(step, state, meta)
    _export(state, config, workdir, step)


class ScheduleError(ValueError):
    """Config steps that the run's schedule (known once the data is) never reaches."""


def snapshot_steps(train_config) -> frozenset[int]:
    return frozenset(int(n) for n in train_config.get("snapshot_steps", ()))


def _export(state: S.TrainState, config, workdir: Path, step: int) -> None:
    """`generator/`, and `generator_ema/` (the average, which `cgn-jax generate` reads the same way) if kept;
    at a snapshot step the same again in snapshots/step_N/, which later exports leave alone."""
    places = [workdir] + ([workdir / "snapshots" / f"step_{step}"] if step in snapshot_steps(config.train) else [])
    average = (S.NetState(params=state.ema["params"], batch_stats=state.ema["batch_stats"], opt_state=None)
               if state.ema else None)
    for place in places:
        export_generator(place / "generator", state.generator, config, step)
        if average is not None:
            export_generator(place / "generator_ema", average, config, step, ema_decay=S.ema_decay(config))


def _exported(workdir: Path, step: int, average: bool) -> bool:
    """Whether `generator/` (and `generator_ema/`) hold this step; meta.json is written last."""
    names = ["generator", "generator_ema"] if average else ["generator"]
    return all(read_meta(workdir / name).get("step") == step for name in names)


def _mean_metrics(metrics_sum, n: int) -> dict[str, float]:
    return {k: float(v) / n for k, v in parallel.to_host(metrics_sum).items()}


def transfer_guard(config) -> str:
    """The `jax.transfer_guard` level around each train step call (config `train.transfer_guard`).

    "disallow" (the default) makes any implicit host<->device transfer inside the hot
    loop an error, so a stray numpy argument or a Python read of a device value cannot
    slip in and serialise the loop; "log" reports them, "allow" switches the check off.
    """
    level = str(config.train.get("transfer_guard", "disallow"))
    if level not in ("allow", "log", "disallow"):
        raise ValueError(f"train.transfer_guard={level!r}; valid: allow, log, disallow")
    return level


class _Every:
    """Which periodic actions fall on a step (a period of 0 switches one off)."""

    def __init__(self, train_config):
        self._log, self._sample = int(train_config.log_every), int(train_config.sample_every)
        self._ckpt = int(train_config.checkpoint_every)
        self._snapshots = snapshot_steps(train_config)

    @staticmethod
    def _due(period: int, step: int) -> bool:
        return period > 0 and step % period == 0

    def log(self, step):
        return self._due(self._log, step)

    def sample(self, step):
        return self._due(self._sample, step)

    def checkpoint(self, step):
        return self._due(self._ckpt, step) or step in self._snapshots


def _save_config(config, path: Path) -> None:
    new = json.loads(config.to_json_best_effort())
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None:
            before, now = _flat(old), _flat(new)
            # settings the code gained since the run started are not changes the user made: say so apart
            added = [k for k in sorted(now) if k not in before]
            changed = [k for k in sorted(before) if before[k] != now.get(k) and k not in _RESUME_SAFE]
            if changed:
                print(f"warning: config differs from the one in {path} in {', '.join(changed)}; "
                      "a resumed run continues with the new values", flush=True)
            if added:
                print(f"note: {path} predates the setting(s) {', '.join(f'{k}={now[k]!r}' for k in added)}; "
                      "the resumed run uses these values", flush=True)
    path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _say(enabled: bool, message: str, pbar=None) -> None:
    if enabled:
        (pbar.write if pbar is not None else print)(message)
