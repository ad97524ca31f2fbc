"""`cgn-jax train`: turn a config spec and a working directory into a training run.

Errors the user can fix (unknown variant, bad override, a batch that does not split
over the devices, a checkpoint from another config) become `CLIError`s, printed
without a traceback. The persistent XLA compilation cache is switched on by default,
because a resumed run otherwise pays the full compilation again.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_CONFIG = "configs/mnist.py:colored"
FAMILIES = {"mnist": "cgn_jax.train.mnist", "imagenet": "cgn_jax.train.imagenet"}  # config.family -> module with train(config, workdir, ...)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"config file and argument, PATH:ARG (default {DEFAULT_CONFIG}); "
                             "override fields with --config.FIELD=VALUE, e.g. --config.train.batch_size=64")
    parser.add_argument("--workdir", default=None,
                        help="where checkpoints, logs, samples and the generator go (default ./runs/<variant>); "
                             "re-running with the same workdir resumes")
    parser.add_argument("--devices", type=int, default=None,
                        help="use only the first N local devices (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use the persistent XLA compilation cache (default: $JAX_COMPILATION_CACHE_DIR "
                             "or ~/.cache/cgn_jax/xla)")


def run(args) -> int:
    from cgn_jax.cli import CLIError
    from cgn_jax.config_loading import ConfigError, load_config

    try:
        config = load_config(args.config, getattr(args, "config_overrides", []))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    family = config.get("family", "mnist")
    if family.endswith("classifier"):
        raise CLIError(f"{args.config} is a classifier config; train it with `cgn-jax train-classifier "
                       f"--config={args.config}`")
    if family not in FAMILIES:
        raise CLIError(f"`cgn-jax train` does not support config family {family!r} yet; "
                       f"supported: {', '.join(FAMILIES)}")
    if args.workdir and "://" in args.workdir:
        raise CLIError(f"--workdir {args.workdir}: URLs are not supported; the loop writes logs and pictures "
                       "through the local filesystem. Use a local directory, or a shared filesystem path "
                       "(NFS, or the bucket mounted with gcsfuse) that every process sees")
    workdir = Path(args.workdir) if args.workdir else Path("runs") / config.get("variant", family)
    if not args.no_compile_cache:
        _enable_compile_cache()

    import importlib

    import jax

    from cgn_jax.checkpoint import CheckpointMismatchError
    from cgn_jax.data.sharding import ShardingError
    from cgn_jax.parallel import BatchSplitError
    from cgn_jax.train.mnist import ScheduleError

    from cgn_jax import distributed

    # Multi-host jobs (Cloud TPU pods, SLURM, or CGN_JAX_COORDINATOR etc.) join before any device use.
    distributed.initialize()
    devices = None
    if args.devices is not None:
        if jax.process_count() > 1:
            raise CLIError("--devices cannot be used in a multi-process job; every process uses all its devices")
        if not 1 <= args.devices <= jax.local_device_count():
            raise CLIError(f"--devices={args.devices}, but this machine has {jax.local_device_count()} device(s)")
        devices = jax.local_devices()[: args.devices]
    module = importlib.import_module(FAMILIES[family])
    try:
        module.check_config(config)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        result = module.train(config, workdir, devices=devices, progress=not args.no_progress)
    except (BatchSplitError, CheckpointMismatchError, FileNotFoundError, ShardingError, ScheduleError) as e:
        raise CLIError(str(e)) from None
    if result.status == "interrupted" and result.signal is not None:
        return 128 + int(result.signal)  # the shell's convention for "ended by signal N"
    return 0


def _enable_compile_cache() -> None:
    import jax

    from cgn_jax.paths import cache_dir

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir("xla"))
    try:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception:  # an older JAX without these options: compile as usual
        pass

