"""`cgn-jax train-classifier`: one Table 1 classifier from a config, with metrics in a workdir.

The config (configs/classifier.py) names the variant and the method; this module turns it
into the plain `ClassifierSetup` of `cgn_jax.train.classifier`, gathers the data on the
host (TFDS builds, a stored counterfactual dataset, the generator weights) and records
what happened: `config.json`, `metrics.jsonl` (one line per epoch) with the same scalars in
`tb/` (TensorBoard) and drawn in `plots/classifier.png` (accuracy, loss, IRM penalty per epoch:
where the shortcut shows is a train accuracy near 100 % next to a falling test accuracy), `summary.json` and
the final classifier weights (`classifier/`, Orbax, loadable with
`cgn_jax.checkpoint.restore_variables`). `checkpoints/` holds the training state after
every epoch and at a SIGTERM/Ctrl-C, so re-running the same command continues the run
exactly (and a finished run's command only rewrites its outputs).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
from pathlib import Path

from cgn_jax.train.classifier import (DATASET, FIXED, ON_THE_FLY, ClassifierSetup, Generator, SetupError,
                                     epoch_summary)
from cgn_jax.train.logging import plot_metrics

# panels of plots/classifier.png (and the TensorBoard scalars); absent or None metrics are skipped
EPOCH_PANELS = (("accuracy", ("train_acc", "train_acc_real", "train_acc_gen", "test_acc")),
                ("loss", ("train_loss", "test_loss")),
                ("IRM penalty", ("irm_penalty",)))


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="configs/classifier.py:colored,original+cgn",
                        help="configs/classifier.py:VARIANT[,METHOD]; METHOD in original, irm2, irm5, erm2, erm5, "
                             "original+gan, original+cgn (default), cgn_only, cgn_official; or configs/imagenet_classifier.py[:ARG] "
                             "for the ImageNet ensemble")
    parser.add_argument("--workdir", default="",
                        help="where metrics and weights go (default runs/classifier_<variant>_<method>_s<seed>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def setup_from_config(config) -> ClassifierSetup:
    """The config's `ClassifierSetup`; SetupError / ValueError for values that cannot run."""
    source = config.data.cf_source
    return ClassifierSetup(
        variant=config.variant, mode=config.data.mode, irm_correlations=tuple(config.irm.correlations),
        irm_penalty_weight=float(config.irm.penalty_weight), irm_anneal_steps=int(config.irm.anneal_steps),
        irm_rescale=bool(config.irm.get("rescale", True)), irm_joint_cues=bool(config.irm.get("joint_cues", False)),
        real_fraction=float(config.data.real_fraction),
        fixed_augmentation=bool(config.data.get("fixed_augmentation", False)),
        cf_source=source if source in (ON_THE_FLY, FIXED) else DATASET, num_cfs=int(config.data.num_cfs),
        fixed_size=int(config.data.get("fixed_size", 100_000)),
        cf_colour_jitter=float(config.data.get("cf_colour_jitter", 0.0)),
        cf_shape_noise_scale=float(config.data.get("cf_shape_noise_scale", 1.0)),
        batch_size=int(config.train.batch_size), epochs=int(config.train.epochs), lr=float(config.train.lr),
        lr_decay=float(config.train.lr_decay), rho=float(config.train.rho), eps=float(config.train.eps),
        pool=config.model.pool, steps_per_epoch=int(config.train.steps_per_epoch),
        steps_per_call=int(config.train.steps_per_call), eval_batch_size=int(config.train.eval_batch_size))


def default_generator_path(variant: str) -> Path:
    """The official pretrained generator of `variant` in shared/weights/cgn_mnist."""
    from cgn_jax.paths import shared_dir

    shared = shared_dir()
    path = shared / "weights" / "cgn_mnist" / f"{variant}_MNIST.pth" if shared else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no generator given and no official {variant} weights in shared/weights/cgn_mnist; "
                                "set --config.generator.checkpoint=PATH")
    return path


def load_generator_for(config) -> tuple[Generator | list[Generator], str]:
    """The config's CGN, or a pool of CGNs for a fixed set when generator.checkpoint lists several ("A,B")."""
    from types import SimpleNamespace

    from cgn_jax import mask_stats
    from cgn_jax.generate import load_generator

    checkpoint = config.generator.checkpoint or str(default_generator_path(config.variant))
    paths = [p.strip() for p in checkpoint.split(",") if p.strip()]
    if len(set(paths)) < len(paths):
        raise ValueError(f"generator.checkpoint={checkpoint} names a CGN twice; a pool takes each CGN once")
    texture = SimpleNamespace(texture_mode=config.generator.texture_mode, patch_size=config.generator.patch_size)
    shim = SimpleNamespace(variant=config.variant, model=texture)
    pool = []
    for path in paths:
        model, variables = load_generator(path, shim)
        mask_stats.check_generator(model, variables, path)
        pool.append(Generator(model, variables))
    return (pool[0] if len(pool) == 1 else pool), checkpoint


def load_data(config, setup: ClassifierSetup):
    """(data arrays, render assets) for `setup`, read on the host."""
    from cgn_jax.data import make_assets
    from cgn_jax.paths import resolve_dir
    from cgn_jax.train.classifier import load_real_data

    ds = config.dataset
    mnist_dir = resolve_dir(ds.mnist_dir, "data", "mnist", what="MNIST")
    textures_dir = (resolve_dir(ds.textures_dir, "data", "textures", what="textures")
                    if config.variant == "wildlife" else None)
    correlations = setup.irm_correlations or (float(ds.correlation),)
    data = load_real_data(config.variant, correlations, mnist_dir=mnist_dir, textures_dir=textures_dir,
                          data_dir=ds.data_dir or None, limit=ds.limit or None, test_limit=ds.test_limit or None,
                          dataset_seed=int(ds.seed))
    if setup.cf_source == DATASET:  # (a FIXED set is generated by train_classifier)
        from cgn_jax.data.counterfactual import load_dataset

        cf = load_dataset(config.data.cf_source, limit=config.data.cf_limit or None)
        data["cf_image"], data["cf_label"] = cf["image"], cf["label"]
    return data, make_assets(config.variant, textures_dir)


def run(args) -> int:
    from cgn_jax.cli import CLIError
    from cgn_jax.config_loading import ConfigError, load_config

    try:
        config = load_config(args.config, args.config_overrides)
    except (ConfigError, ValueError) as e:
        raise CLIError(str(e)) from e
    if config.get("task") == "imagenet_classifier":  # configs/imagenet_classifier.py
        from cgn_jax.imagenet_classifier import run_with_config

        return run_with_config(config, args.workdir or "runs/imagenet_classifier", progress=not args.no_progress)
    try:
        setup = setup_from_config(config)
    except (SetupError, ValueError) as e:
        raise CLIError(str(e)) from e
    workdir = Path(args.workdir or f"runs/classifier_{config.variant}_{config.method}_s{config.seed}")
    workdir.mkdir(parents=True, exist_ok=True)

    try:
        data, assets = load_data(config, setup)
        generator, checkpoint = load_generator_for(config) if setup.needs_generator else (None, "")
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e

    from tensorboardX import SummaryWriter

    from cgn_jax.train.classifier import train_classifier
    from cgn_jax.train.signals import StopOnSignal

    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
    metrics_path = workdir / "metrics.jsonl"
    metrics_path.write_text("")
    print(f"train-classifier: {config.variant} {config.method} ({setup.mode}"
          + (f", {len(setup.irm_correlations)} IRM environments" if setup.irm_correlations else "")
          + (f", generator {checkpoint}" if checkpoint else "")
          + f"); {data['digit'].shape[0]} real train / {data['test_label'].shape[0]} test images; workdir {workdir}",
          file=sys.stderr)

    # a resumed run replays its restored epochs through on_epoch, so every output is rebuilt from epoch 1
    shutil.rmtree(workdir / "tb", ignore_errors=True)
    tb = SummaryWriter(str(workdir / "tb"))
    rows = []

    def on_epoch(record):
        row = {k: (v[0] if isinstance(v, list) and k != "seeds" else v) for k, v in record.items()}
        row["seed"] = row.pop("seeds")[0]
        rows.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name in ("lr", *(n for _, names in EPOCH_PANELS for n in names)):
            if isinstance(row.get(name), (int, float)):
                tb.add_scalar(f"classifier/{name}", row[name], row["epoch"])
        tb.flush()
        plot_metrics(rows, [p for p in EPOCH_PANELS if any(row.get(n) is not None for n in p[1])],
                     workdir / "plots" / "classifier.png", x="epoch")
        if args.no_progress:
            print(epoch_summary(record, setup.epochs), file=sys.stderr, flush=True)

    try:
        with StopOnSignal() as stop:
            result = train_classifier(setup, data, assets, generator, seeds=(config.seed,),
                                      progress=not args.no_progress, on_epoch=on_epoch,
                                      checkpoint_dir=workdir / "checkpoints", stop=stop,
                                      grad_kernels=config.model.get("grad_kernels", "auto"))
    except SetupError as e:
        raise CLIError(str(e)) from e
    finally:
        tb.close()
    if result["status"] == "interrupted":
        print(f"stopped by {signal.Signals(result['signal']).name}; checkpoint in {result['checkpoint_dir']}; "
              "re-run the same command to continue", file=sys.stderr)
        return 128 + result["signal"]

    from cgn_jax.checkpoint import save_variables

    last = result["history"][-1]
    summary = {"variant": config.variant, "method": config.method, "mode": setup.mode, "seed": config.seed,
               "epochs": setup.epochs, "steps_per_epoch": result["steps_per_epoch"],
               "train_acc": last["train_acc"][0], "test_acc": last["test_acc"][0],
               "generator": checkpoint or None, "timing": result["timing"]}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    save_variables(workdir / "classifier", result["variables"][0],
                   {"model": "mnist_classifier", "pool": setup.pool, "variant": config.variant,
                    "method": config.method})
    print(f"final: train acc {summary['train_acc']:.4f}, test acc {summary['test_acc']:.4f} "
          f"({result['timing']['images_per_s']:.0f} train images/s); wrote {workdir}")
    return 0
