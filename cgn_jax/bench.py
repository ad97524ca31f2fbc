"""`cgn-jax bench`: time the real compiled train step (or counterfactual generation) of a config.

MNIST CGN configs time `mnist_step.pmap_train_step` (or `--what generate`); ImageNet CGN
configs (`configs/imagenet.py:...`) time the micro-step of `cgn_jax.train.imagenet` and
add the accumulation figures (seconds per update, hours for the configured updates);
`configs/imagenet_classifier.py` times the ResNet ensemble's step on a synthetic batch, and
`configs/classifier.py` a few short epochs of the MNIST classifier's own loop.

Step-time claims are only comparable if they time the program training runs, so this
builds the step with the same functions the training loop uses, on the same device layout, and times it with compilation split off (lower, compile) and
every step blocked. What does not change the step's cost is replaced to keep the
benchmark self-contained: the stored dataset is synthetic (right shapes and size,
random digits; the step renders on device, so its cost does not depend on pixel
values) and the frozen VGG16 weights are random unless `--config.loss.vgg_weights` is
set. FLOPs come from XLA's cost analysis of the lowered program, per device (the
compiled program's count misses the convolutions that become library calls on GPU); MFU
is reported against a documented table of vendor peak numbers (`PEAK_TFLOPS`).

`--json` prints one JSON object on stdout (human-readable lines go to stderr), so runs on
different machines can be diffed or tabulated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/mnist.py:colored"

# Training-split sizes of the MNIST variants (see cgn_jax.data.builders): the synthetic
# dataset has the real one's size, so the step indexes (and holds) as much data.
TRAIN_SIZES = {"colored": 60000, "double_colored": 50000, "wildlife": 50000}

# Dense peak TFLOP/s per JAX device, (bfloat16, float32), from the vendors' datasheets:
#  - NVIDIA H100 SXM5: BF16 tensor 1979 with 2:4 sparsity -> 989 dense; FP32 (CUDA cores,
#    non-tensor) 67. H100 PCIe: 756 / 51. (NVIDIA H100 Tensor Core GPU datasheet.)
#  - NVIDIA H200 SXM: the same compute as H100 SXM (989 / 67) with more, faster HBM
#    (NVIDIA H200 datasheet).
#  - NVIDIA A100 SXM/PCIe: BF16 tensor 312 dense, FP32 non-tensor 19.5 (A100 datasheet).
#  - Cloud TPU (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): bf16 peak per chip; one
#    JAX device per chip on these generations. v4 275, v5e 197, v5p 459, v6e 918.
# float32 caveats: on NVIDIA GPUs XLA runs float32 matmuls/convolutions on TF32 tensor
# cores by default (H100 TF32 dense 494.5), so float32 MFU against the 67 TFLOP/s
# non-tensor peak can look high; on TPUs float32 matmuls at default precision are single
# bf16 passes, so the bf16 peak is used for float32 too.
PEAK_TFLOPS = {
    "h100-pcie": (756.0, 51.0, "NVIDIA H100 PCIe datasheet (dense)"),
    "h100": (989.0, 67.0, "NVIDIA H100 SXM5 datasheet (bf16 dense tensor, fp32 non-tensor)"),
    "h200": (989.0, 67.0, "NVIDIA H200 SXM datasheet (same compute as H100 SXM)"),
    "a100": (312.0, 19.5, "NVIDIA A100 datasheet (bf16 dense tensor, fp32 non-tensor)"),
    "tpu-v4": (275.0, 275.0, "cloud.google.com/tpu/docs/v4 (bf16 per chip; fp32 dots run as bf16 passes)"),
    "tpu-v5e": (197.0, 197.0, "cloud.google.com/tpu/docs/v5e (bf16 per chip)"),
    "tpu-v5p": (459.0, 459.0, "cloud.google.com/tpu/docs/v5p (bf16 per chip)"),
    "tpu-v6e": (918.0, 918.0, "cloud.google.com/tpu/docs/v6e (bf16 per chip)"),
}


def peak_key(device_kind: str) -> str | None:
    """The `PEAK_TFLOPS` entry of a `device.device_kind` string, or None (CPU, unknown)."""
    k = device_kind.lower()
    if "h100" in k:
        return "h100-pcie" if "pcie" in k else "h100"
    if "h200" in k:
        return "h200"
    if "a100" in k:
        return "a100"
    if "tpu" in k:
        if "v4" in k:
            return "tpu-v4"
        if "v5" in k:
            return "tpu-v5e" if ("lite" in k or "v5e" in k) else "tpu-v5p"
        if "v6" in k:
            return "tpu-v6e"
    return None


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
    key = peak_key(device_kind)
    if key is None:
        return None, None
    bf16, f32, source = PEAK_TFLOPS[key]
    return (bf16 if dtype == "bfloat16" else f32), source


def cost_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled program per device (XLA cost analysis), or None.

    `Compiled.cost_analysis()` has returned a dict, a list with one dict per program, or
    None depending on the JAX version and backend.
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return None
    flops = ca.get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


def program_flops(lowered, compiled) -> tuple[float | None, str | None, float | None]:
    """(FLOPs per device, which analysis gave them, the compiled program's own count).

    The count of the lowered program (before XLA's backend passes) is the one used: it
    sees every convolution and dot as written, on any backend. The compiled program's
    count depends on the backend: on GPU, convolutions and matmuls become cuDNN/cuBLAS
    custom calls that the analysis may not count (the H100 build of this step reported
    about a tenth of the CPU build's FLOPs), which would understate MFU.
    """
    compiled_flops = cost_flops(compiled)
    lowered_flops = cost_flops(lowered)
    if lowered_flops:
        return lowered_flops, "lowered", compiled_flops
    return compiled_flops, ("compiled" if compiled_flops else None), compiled_flops


def compiled_memory(compiled) -> dict | None:
    """Sizes XLA planned for the program (arguments, outputs, temporaries), in bytes."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    return {f: int(getattr(m, f)) for f in fields if hasattr(m, f)}


def peak_memory(devices) -> int | None:
    """The largest `peak_bytes_in_use` over `devices`, None where the backend keeps no stats (CPU)."""
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def machine_info() -> dict:
    """What a reader needs to judge a timing: host, CPU, load, accelerator, software versions."""
    import jax

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "nproc": os.cpu_count(), "cpu_model": _cpu_model(), "jax": jax.__version__,
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "local_devices": jax.local_device_count(), "process_count": jax.process_count()}
    try:
        import flax
        info["flax"] = flax.__version__
    except Exception:
        pass
    try:
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _times(seconds: list[float]) -> dict:
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds),
            "mean": statistics.fmean(seconds), "n": len(seconds)}


# ---------------------------------------------------------------------------- train step

def synthetic_dataset(num_examples: int, img_size: int = 32, n_classes: int = 10, seed: int = 0) -> dict:
    """Random digits and labels with the shapes and dtypes `mnist_step.device_dataset` expects."""
    import numpy as np

    rng = np.random.default_rng(seed)
    digit = rng.integers(0, 2, (num_examples, img_size, img_size, 1), dtype=np.uint8) * np.uint8(255)
    label = rng.integers(0, n_classes, num_examples).astype(np.int32)
    return {"digit": digit, "label": label, "fg_label": label, "bg_label": label}


def synthetic_assets(config) -> tuple[dict, str]:
    """Render assets: the real ones where they need no files, random textures for wildlife if absent."""
    import jax
    import numpy as np

    from cgn_jax.data import render

    palette = np.asarray(config.dataset.palette, np.float32) if config.variant == "colored" else None
    if config.variant != "wildlife":
        return render.make_assets(config.variant, palette=palette), "real"
    from cgn_jax.paths import resolve_dir

    try:
        textures = resolve_dir(config.dataset.textures_dir, "data", "textures", what="Wildlife MNIST textures")
        return render.make_assets(config.variant, textures_dir=textures), f"real ({textures})"
    except FileNotFoundError:
        k = jax.random.split(jax.random.PRNGKey(1))
        shape = (config.model.n_classes, 150, 150, 3)
        return ({"fg_textures": jax.random.uniform(k[0], shape), "bg_textures": jax.random.uniform(k[1], shape)},
                "random textures (none found)")


def perceptual_for_bench(config) -> tuple[object, str]:
    """The VGG16 perceptual loss of the config: converted weights if named, else random ones of the same shapes."""
    import numpy as np

    from cgn_jax.losses import PerceptualLoss
    from cgn_jax.models.vgg16 import param_shapes
    from cgn_jax.train.mnist_step import compute_dtype

    style, content = tuple(config.loss.perc_style), tuple(config.loss.perc_content)
    dtype = compute_dtype(config)
    if config.loss.vgg_weights:
        return (PerceptualLoss.load(style, content, dtype=dtype, path=config.loss.vgg_weights),
                f"converted ({config.loss.vgg_weights})")
    # numpy, not jax.random: one jax.random call per layer shape would compile a dozen programs
    rng = np.random.default_rng(2)
    params = {name: {"kernel": rng.standard_normal(sh["kernel"], np.float32) * np.float32((2.0 / (9 * sh["kernel"][2])) ** 0.5),
                     "bias": np.zeros(sh["bias"], np.float32)} for name, sh in param_shapes(len(style)).items()}
    return PerceptualLoss.create(params, style, content, dtype=dtype), "random (same shapes; cost does not depend on values)"


def initial_state(config):
    """`mnist_step.init_state`, jitted: one compilation instead of one per eager init op (much faster on CPU)."""
    import jax

    from cgn_jax.train import mnist_step as S

    return jax.jit(lambda key: S.init_state(config, key))(jax.random.PRNGKey(int(config.seed)))


def load_real_dataset(config) -> dict:
    from cgn_jax.train.mnist import load_train_data

    return load_train_data(config)


def _lower_compile(step_fn, *args, log=print):
    """(lowered, compiled, lower_s, compile_s) of a pmapped step for these arguments."""
    t0 = time.perf_counter()
    lowered = step_fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    log(f"lowered in {t1 - t0:.2f}s, compiled in {t2 - t1:.2f}s")
    return lowered, compiled, t1 - t0, t2 - t1


def _time_calls(call, state, metrics, const, *, steps: int, warmup: int, profile: str | None, log=print):
    """Warm up, then time `steps` blocked calls of `(state, metrics) = call(state, metrics, const)`; with
    `profile`, trace 3 more. Returns (seconds per call, process CPU seconds per call, state, metrics)."""
    import jax

    for _ in range(warmup):
        state, metrics = call(state, metrics, const)
    jax.block_until_ready((state, metrics))
    seconds = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = call(state, metrics, const)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - t)
    cpu_s = (time.process_time() - cpu0) / steps
    if profile:
        Path(profile).mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(profile):
            for i in range(3):
                with jax.profiler.StepTraceAnnotation("train", step_num=i):
                    state, metrics = call(state, metrics, const)
                    jax.block_until_ready((state, metrics))
        log(f"wrote a profile of 3 steps to {profile} (open with TensorBoard / Perfetto)")
    return seconds, cpu_s, state, metrics


def _step_figures(seconds, cpu_s, lowered, compiled, devices, dtype: str, global_batch: int, per_device: int,
                  profile: str | None) -> dict:
    """The timing, throughput, FLOPs, MFU and memory fields every train-step result has."""
    t = _times(seconds)
    flops, flops_source, compiled_flops = program_flops(lowered, compiled)
    peak, peak_source = peak_tflops(devices[0].device_kind, dtype)
    return {
        "step_time_s": t, "process_cpu_s_per_step": cpu_s,
        "images_per_s": {"total": global_batch / t["median"], "per_device": per_device / t["median"]},
        "flops_per_step": {"per_device": flops, "total": flops * len(devices) if flops else None,
                           "source": flops_source, "compiled_per_device": compiled_flops},
        "tflops_per_s_per_device": flops / t["median"] / 1e12 if flops else None,
        "peak_tflops_per_device": peak, "peak_source": peak_source,
        "mfu": flops / t["median"] / (peak * 1e12) if (flops and peak) else None,
        "peak_memory_bytes": peak_memory(devices), "compiled_memory": compiled_memory(compiled),
        "profile_dir": profile,
    }


def bench_train(config, *, steps: int, warmup: int, n_devices: int | None = None, data: str = "synthetic",
                profile: str | None = None, log=print) -> dict:
    """Compile and time `steps` calls of the config's pmapped train step; the result dict of `--json`."""
    import jax

    from cgn_jax import parallel
    from cgn_jax.train import mnist_step as S

    start = time.perf_counter()
    devices = parallel.local_devices(n_devices)
    global_batch = int(config.train.batch_size)
    local_batch = parallel.per_device_batch(global_batch, len(devices))  # BatchSplitError before any work
    S.compute_dtype(config)  # validates train.compute_dtype

    if data == "real":
        dataset, data_note = load_real_dataset(config), "real (TFDS train split)"
    else:
        n = int(config.dataset.limit) or TRAIN_SIZES.get(config.variant, 50000)
        dataset = synthetic_dataset(n, config.model.img_size, config.model.n_classes, seed=int(config.seed))
        data_note = "synthetic (random digits; the step renders on device, cost independent of pixel values)"
    num_examples = int(dataset["label"].shape[0])
    assets, assets_note = synthetic_assets(config)
    perceptual, vgg_note = perceptual_for_bench(config)
    log(f"building the {config.variant} train step: global batch {global_batch} on {len(devices)} "
        f"{devices[0].device_kind} device(s), {config.train.compute_dtype}")

    ctx = parallel.replicate(S.StepContext(data=S.device_dataset(dataset), assets=assets, perceptual=perceptual),
                             devices)
    del dataset
    state = parallel.replicate(initial_state(config), devices)
    metrics = parallel.replicate(S.zero_metrics(), devices)
    step_fn = S.pmap_train_step(config, global_batch, num_examples, devices)
    jax.block_until_ready((state, ctx))

    setup_s = time.perf_counter() - start
    log(f"set up data, state and VGG16 on the device(s) in {setup_s:.2f}s")
    lowered, compiled, lower_s, compile_s = _lower_compile(step_fn, state, metrics, ctx, log=log)

    call = compiled
    try:
        state, metrics = call(state, metrics, ctx)
        jax.block_until_ready(metrics)
        first_call_s = None
    except (TypeError, ValueError):  # an AOT executable this JAX cannot call directly: use the pmap (compiles again)
        call = step_fn
        t = time.perf_counter()
        state, metrics = call(state, metrics, ctx)
        jax.block_until_ready(metrics)
        first_call_s = time.perf_counter() - t
    seconds, cpu_s, state, metrics = _time_calls(call, state, metrics, ctx, steps=steps, warmup=max(warmup - 1, 0),
                                                 profile=profile, log=log)
    if not all(map(_finite, parallel.to_host(metrics).values())):
        log("warning: non-finite metrics after the timed steps (the timing is still valid)")

    dtype = str(config.train.compute_dtype)
    return {
        "what": "train", "variant": config.variant, "compute_dtype": dtype, "global_batch": global_batch,
        "per_device_batch": local_batch, "devices": len(devices), "device_kind": devices[0].device_kind,
        "num_examples": num_examples, "data": data_note, "render_assets": assets_note, "vgg16_weights": vgg_note,
        "steps": steps, "warmup": warmup, "setup_s": setup_s, "lower_s": lower_s, "compile_s": compile_s,
        "first_call_s": first_call_s,
        **_step_figures(seconds, cpu_s, lowered, compiled, devices, dtype, global_batch, local_batch, profile),
    }


def _finite(x) -> bool:
    import math

    return math.isfinite(float(x))


def bench_imagenet_train(config, *, steps: int, warmup: int, n_devices: int | None = None,
                         profile: str | None = None, log=print) -> dict:
    """Time the ImageNet CGN's compiled training micro-step (`cgn_jax.train.imagenet`), same result schema
    as `bench_train` plus the accumulation figures: seconds per update and hours for the configured schedule."""
    import jax

    from cgn_jax import parallel
    from cgn_jax.train import imagenet as I
    from cgn_jax.train import imagenet_step as S

    start = time.perf_counter()
    devices = parallel.local_devices(n_devices)
    I.check_config(config)
    global_batch = int(config.train.per_device_batch) * len(devices)
    examples_per_update = int(config.train.effective_batch)
    try:
        S.accum_steps(config, len(devices))
    except ValueError:  # accumulation does not change a micro-step's cost: time the micro-step without it
        config = config.copy_and_resolve_references()
        config.train.effective_batch = global_batch
    spec, frozen, sources = I.build(config, devices)
    log(f"building the ImageNet CGN micro-step: {spec.model.image_size} px, batch {spec.per_device_batch} on each "
        f"of {len(devices)} {devices[0].device_kind} device(s), {config.train.compute_dtype}, "
        f"spectral norm {spec.model.spectral_norm}")
    state = parallel.replicate(I.initial_state(config, frozen, spec.accum), devices)
    rfrozen = parallel.replicate(frozen, devices)
    metrics = parallel.replicate(S.zero_metrics(), devices)
    del frozen
    step_fn = I.train_step_fn(config, spec, devices)
    jax.block_until_ready((state, rfrozen))
    setup_s = time.perf_counter() - start
    lowered, compiled, lower_s, compile_s = _lower_compile(step_fn, state, metrics, rfrozen, log=log)
    seconds, cpu_s, state, metrics = _time_calls(compiled, state, metrics, rfrozen, steps=steps,
                                                 warmup=max(warmup, 1), profile=profile, log=log)
    if not all(map(_finite, parallel.to_host(metrics).values())):
        log("warning: non-finite metrics after the timed steps (the timing is still valid)")

    figures = _step_figures(seconds, cpu_s, lowered, compiled, devices, str(config.train.compute_dtype),
                            global_batch, spec.per_device_batch, profile)
    per_update = figures["step_time_s"]["median"] * examples_per_update / global_batch
    updates = int(config.train.num_steps)
    return {
        "what": "train", "family": "imagenet", "variant": config.variant,
        "compute_dtype": str(config.train.compute_dtype),
        "global_batch": global_batch, "per_device_batch": spec.per_device_batch, "devices": len(devices),
        "device_kind": devices[0].device_kind, "image_size": spec.model.image_size,
        "spectral_norm": spec.model.spectral_norm, "remat": bool(spec.model.remat),
        "weights": {k: str(v) for k, v in sources.items()},
        "data": "none (the CGN samples its own noise and labels)", "vgg16_weights": str(sources.get("vgg16")),
        "accum": spec.accum, "examples_per_update": examples_per_update, "sec_per_update_estimate": per_update,
        "updates": updates, "hours_for_updates_estimate": per_update * updates / 3600,
        "steps": steps, "warmup": max(warmup, 1), "setup_s": setup_s, "lower_s": lower_s, "compile_s": compile_s,
        "first_call_s": None, **figures,
    }


def bench_imagenet_classifier(config, *, steps: int, warmup: int, n_devices: int | None = None,
                              profile: str | None = None, log=print) -> dict:
    """Time the ImageNet classifier ensemble's pmapped train step (`cgn_jax.imagenet_classifier`) on random
    weights and a synthetic batch: per device `per_device_batch_size` real images plus `cf_ratio` times as
    many counterfactuals, as training with a counterfactual dataset feeds it."""
    import jax
    import numpy as np

    from cgn_jax import parallel
    from cgn_jax import imagenet_classifier as C
    from cgn_jax.models import resnet as R

    start = time.perf_counter()
    devices = parallel.local_devices(n_devices)
    config = config.copy_and_resolve_references()
    config.model.pretrained = ""  # random weights: the cost does not depend on them
    R._arch(config.model)
    dtype = str(config.model.dtype)
    b_real = int(config.train.per_device_batch_size)
    b_cf = int(round(float(config.data.cf_ratio) * b_real))
    size = int(config.data.image_size)
    model = R.ensemble_from_config(config.model, axis_name=parallel.AXIS)
    log(f"building the {config.model.arch} ensemble step: {b_real} real + {b_cf} counterfactual {size}px images on "
        f"each of {len(devices)} {devices[0].device_kind} device(s), {dtype}")
    steps_per_epoch = 1000  # only shapes the lr schedule
    state = parallel.replicate(C.init_state(config, steps_per_epoch, model=model, log=lambda m: None), devices)
    metrics = parallel.replicate(jax.tree.map(np.asarray, C.zero_metrics()), devices)
    rng = np.random.default_rng(0)
    n = b_real + b_cf
    batch = parallel.replicate({"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                                "labels": rng.integers(0, 1000, (n, 3)).astype(np.int32),
                                "is_real": np.arange(n) < b_real}, devices)
    tx = C.make_optimizer(config.train, steps_per_epoch)
    step_fn = jax.pmap(C.make_train_step(model, tx, real_target=str(config.train.real_target),
                                         compute_dtype=R._dtype(dtype)),
                       axis_name=parallel.AXIS, devices=devices, donate_argnums=(0, 1))
    jax.block_until_ready((state, batch))
    setup_s = time.perf_counter() - start
    lowered, compiled, lower_s, compile_s = _lower_compile(step_fn, state, metrics, batch, log=log)
    seconds, cpu_s, state, metrics = _time_calls(compiled, state, metrics, batch, steps=steps, warmup=max(warmup, 1),
                                                 profile=profile, log=log)
    return {
        "what": "train", "family": "imagenet_classifier", "variant": config.variant, "compute_dtype": dtype,
        "global_batch": n * len(devices), "per_device_batch": n, "real_per_device": b_real, "cf_per_device": b_cf,
        "devices": len(devices), "device_kind": devices[0].device_kind, "image_size": size,
        "arch": str(config.model.arch), "frozen_bn": bool(config.model.freeze_bn_stats),
        "data": "synthetic uint8 images (the step's cost does not depend on pixel values)",
        "steps": steps, "warmup": max(warmup, 1), "setup_s": setup_s, "lower_s": lower_s, "compile_s": compile_s,
        "first_call_s": None,
        **_step_figures(seconds, cpu_s, lowered, compiled, devices, dtype, n * len(devices), n, profile),
    }


def bench_mnist_classifier(config, *, steps: int, warmup: int, n_devices: int | None = None, log=print) -> dict:
    """Time the MNIST classifier's training as `train-classifier` runs it (`train_classifier`, same loop,
    on-the-fly CGN inside the step where the mode asks for it), on synthetic data and a random CGN.

    Its loop is not one callable step (one call per step on the CPU, a scan per epoch elsewhere),
    so it runs 1 + max(warmup, 1) epochs of `steps` steps: the first compiles, the others are timed
    (their training time over `steps`, evaluation left out). FLOPs are not counted.
    """
    import dataclasses

    import jax
    import numpy as np

    from cgn_jax import parallel
    from cgn_jax.classifier_cli import setup_from_config
    from cgn_jax.config_loading import load_config
    from cgn_jax.models import mnist_cgn
    from cgn_jax.train.classifier import Generator, train_classifier

    devices = parallel.local_devices(n_devices)
    timed = max(warmup, 1)
    setup = dataclasses.replace(setup_from_config(config), epochs=1 + timed, steps_per_epoch=steps,
                                steps_per_call=0, eval_batch_size=100)
    if setup.makes_fixed_set:  # training from a generated fixed set costs what a stored one does
        setup = dataclasses.replace(setup, cf_source="dataset")
    cgn_config = load_config(f"configs/mnist.py:{setup.variant}")
    assets, assets_note = synthetic_assets(cgn_config)
    n = max(setup.batch_size * 4, 1024)
    data = synthetic_dataset(n, seed=int(config.seed))
    rng = np.random.default_rng(1)
    data = {**data, "fg_label": np.stack([data["fg_label"]] * setup.n_envs),
            "bg_label": np.stack([data["bg_label"]] * setup.n_envs),
            "test_image": rng.integers(0, 256, (100 * len(devices), 32, 32, 3), dtype=np.uint8),
            "test_label": rng.integers(0, 10, 100 * len(devices)).astype(np.int32)}
    if setup.uses_cf_dataset:
        data["cf_image"] = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        data["cf_label"] = rng.integers(0, 10, n).astype(np.int32)
    generator = None
    if setup.uses_generator:
        model = mnist_cgn.from_config(cgn_config.model)
        generator = Generator(model, mnist_cgn.init_variables(model, jax.random.PRNGKey(0)))
    log(f"timing the {setup.variant} classifier ({setup.mode}"
        + (", CGN on the fly" if setup.uses_generator else "") + f"): global batch {setup.batch_size} on "
        f"{len(devices)} {devices[0].device_kind} device(s), {1 + timed} epochs of {steps} steps")
    result = train_classifier(setup, data, assets, generator, seeds=(int(config.seed),), devices=devices,
                              progress=False, grad_kernels=config.model.get("grad_kernels", "auto"))
    history, timing = result["history"], result["timing"]
    seconds = [r["train_seconds"] / steps for r in history[1:]]
    t = _times(seconds)
    images = timing["images_per_step"]
    return {
        "what": "train", "family": "mnist_classifier", "variant": setup.variant, "mode": setup.mode,
        "compute_dtype": "float32", "global_batch": images, "per_device_batch": images // len(devices),
        "devices": len(devices), "device_kind": devices[0].device_kind, "loop": timing["loop"],
        "grad_kernels": timing["grad_kernels"],
        "cgn_on_the_fly": setup.uses_generator, "data": "synthetic digits and labels", "render_assets": assets_note,
        "steps": steps, "warmup": 1, "setup_s": None, "lower_s": None, "compile_s": None,
        "first_epoch_train_s": history[0]["train_seconds"], "step_time_s": t, "process_cpu_s_per_step": None,
        "images_per_s": {"total": images / t["median"], "per_device": images / len(devices) / t["median"]},
        "flops_per_step": {"per_device": None, "total": None, "source": None, "compiled_per_device": None},
        "tflops_per_s_per_device": None, "peak_tflops_per_device": None, "peak_source": None, "mfu": None,
        "peak_memory_bytes": peak_memory(devices), "compiled_memory": None, "profile_dir": None,
    }


# ---------------------------------------------------------------------------- generation

def load_generation_model(config, checkpoint: str | None, log=print):
    """(model, variables, note): a named checkpoint, the config's, the official weights in shared/, or random."""
    import jax

    from cgn_jax.generate import load_generator
    from cgn_jax.models import mnist_cgn
    from cgn_jax.paths import shared_dir

    if checkpoint == "random":
        checkpoint = None
    elif not checkpoint:
        checkpoint = config.model.pretrained or None
        if checkpoint is None and shared_dir() is not None:
            official = shared_dir() / "weights" / "cgn_mnist" / f"{config.variant}_MNIST.pth"
            checkpoint = str(official) if official.is_file() else None
    if checkpoint:
        model, variables = load_generator(checkpoint, config)
        return model, variables, f"loaded ({checkpoint})"
    model = mnist_cgn.from_config(config.model)
    return model, mnist_cgn.init_variables(model, jax.random.PRNGKey(int(config.seed))), "random init"


def bench_generate(config, *, batch: int, num_cfs: int, steps: int, warmup: int, checkpoint: str | None = None,
                   profile: str | None = None, log=print) -> dict:
    """Time `cgn_jax.generate.sample_counterfactuals` on one device: batch // num_cfs shapes x num_cfs each."""
    import jax
    import jax.numpy as jnp

    from cgn_jax.generate import sample_counterfactuals
    from cgn_jax.train.mnist_step import compute_dtype

    if num_cfs < 1 or batch < num_cfs:
        raise ValueError(f"batch ({batch}) must be at least num_cfs ({num_cfs}), both positive")
    n_shapes = batch // num_cfs
    images = n_shapes * num_cfs
    dtype = str(config.train.compute_dtype)
    model, variables, weights_note = load_generation_model(config, checkpoint, log)
    model = model.clone(dtype=compute_dtype(config))
    device = jax.local_devices()[0]
    variables = jax.device_put(variables, device)
    log(f"timing counterfactual generation: {n_shapes} shapes x {num_cfs} counterfactuals = {images} images "
        f"per call on {device.device_kind}, {dtype}, weights {weights_note}")

    key = jax.random.PRNGKey(int(config.seed))
    t0 = time.perf_counter()
    lowered = sample_counterfactuals.lower(model, variables, key, n_shapes, num_cfs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    def call(i):
        return compiled(variables, jax.random.fold_in(key, i))

    for i in range(max(warmup, 1)):
        jax.block_until_ready(call(i))
    seconds = []
    cpu_s = 0.0
    for i in range(steps):
        k = jax.random.fold_in(key, 1000 + i)
        jax.block_until_ready(k)
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(variables, k))
        seconds.append(time.perf_counter() - t)
        cpu_s += (time.process_time() - c) / steps
    if profile:
        Path(profile).mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(profile):
            for i in range(3):
                jax.block_until_ready(call(10_000 + i))
    out = call(0)
    assert out["image"].shape == (images, config.model.img_size, config.model.img_size, 3)
    assert out["image"].dtype == jnp.uint8

    t = _times(seconds)
    flops, flops_source, compiled_flops = program_flops(lowered, compiled)
    if jax.default_backend() == "cpu":  # the CPU loops over the counterfactuals (`sample_counterfactuals`), and
        # XLA's cost analysis counts a loop body once: count the same work in its vmapped form instead
        flops = cost_flops(sample_counterfactuals.lower(model, variables, key, n_shapes, num_cfs, loop="vmap"))
        flops_source, compiled_flops = "lowered, vmapped form", None
    peak, peak_source = peak_tflops(device.device_kind, dtype)
    return {
        "what": "generate", "variant": config.variant, "compute_dtype": dtype, "n_shapes": n_shapes,
        "num_cfs": num_cfs, "images_per_call": images, "devices": 1, "device_kind": device.device_kind,
        "weights": weights_note, "steps": steps, "warmup": warmup, "lower_s": t1 - t0, "compile_s": t2 - t1,
        "call_time_s": t, "process_cpu_s_per_call": cpu_s, "images_per_s": {"total": images / t["median"], "per_device": images / t["median"]},
        "flops_per_call": flops, "flops_source": flops_source, "compiled_flops_per_call": compiled_flops,
        "tflops_per_s_per_device": flops / t["median"] / 1e12 if flops else None,
        "peak_tflops_per_device": peak, "peak_source": peak_source,
        "mfu": flops / t["median"] / (peak * 1e12) if (flops and peak) else None,
        "peak_memory_bytes": peak_memory([device]), "compiled_memory": compiled_memory(compiled),
        "profile_dir": profile,
    }


# ---------------------------------------------------------------------------- output

def _ms(s):
    return "n/a" if s is None else f"{s * 1e3:.1f} ms"


def _num(x, fmt="{:,.0f}"):
    return "n/a" if x is None else fmt.format(x)


def _bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def format_table(r: dict) -> str:
    """The result as aligned `name  value` lines."""
    m = r["machine"]
    t = r.get("step_time_s") or r.get("call_time_s")
    what = "train step" if r["what"] == "train" else "generation call"
    rows = [("command", r["command"]), ("date", m["date"]),
            ("machine", f"{m['host']}: {m['nproc']} CPU(s) {m.get('cpu_model') or ''}; load {m.get('load_avg', 'n/a')}"),
            ("jax / backend", f"{m['jax']} / {m['backend']}"),
            ("device", f"{r['devices']} x {r['device_kind']}"),
            ("variant / dtype", f"{r['variant']} / {r['compute_dtype']}")]
    if r.get("family") == "imagenet":
        rows += [("global micro-batch", f"{r['global_batch']} ({r['per_device_batch']} per device), "
                                        f"{r['image_size']} px"),
                 ("spectral norm / remat", f"{r['spectral_norm']} / {r['remat']}"),
                 ("weights", ", ".join(f"{k} {v}" for k, v in r["weights"].items()))]
    elif r.get("family") == "imagenet_classifier":
        rows += [("global batch", f"{r['global_batch']} ({r['real_per_device']} real + {r['cf_per_device']} "
                                  f"counterfactual per device), {r['image_size']} px"),
                 ("model", f"{r['arch']} ensemble, BatchNorm {'frozen' if r['frozen_bn'] else 'trained'}; "
                           "random weights"), ("data", r["data"])]
    elif r.get("family") == "mnist_classifier":
        rows += [("mode", f"{r['mode']}" + (", CGN sampled inside the step" if r["cgn_on_the_fly"] else "")),
                 ("global batch", f"{r['global_batch']} ({r['per_device_batch']} per device)"),
                 ("data", r["data"]), ("timing", f"per-step time of epochs 2+ ({r['loop']} loop); the first epoch "
                                                  f"(compilation included) took {r['first_epoch_train_s']:.1f} s")]
    elif r["what"] == "train":
        rows += [("global batch", f"{r['global_batch']} ({r['per_device_batch']} per device)"),
                 ("data", r["data"]), ("VGG16 weights", r["vgg16_weights"])]
    else:
        rows += [("images per call", f"{r['images_per_call']} ({r['n_shapes']} shapes x {r['num_cfs']} cfs)"),
                 ("generator weights", r["weights"])]
    if r.get("compile_s") is not None:
        rows.append(("lower / compile", f"{r['lower_s']:.2f} s / {r['compile_s']:.2f} s"))
    rows += [
             (f"{what} (median)", f"{_ms(t['median'])} over {t['n']} (min {_ms(t['min'])}, max {_ms(t['max'])})"),
             ("images/s", f"{_num(r['images_per_s']['total'])} total, {_num(r['images_per_s']['per_device'])} per device")]
    cpu = r.get("process_cpu_s_per_step", r.get("process_cpu_s_per_call"))
    if m["backend"] == "cpu" and cpu is not None:
        # on a shared machine wall time includes waiting for cores; CPU time does not
        rows.append(("process CPU time", f"{_ms(cpu)} per call (all threads; >= {_ms(cpu / (m['nproc'] or 1))} "
                                         f"wall on {m['nproc']} idle cores)"))
    if r["what"] == "train":
        f = r.get("flops_per_step", {})
        flops, source, compiled_flops = f.get("per_device"), f.get("source"), f.get("compiled_per_device")
    else:
        flops, source, compiled_flops = r.get("flops_per_call"), r.get("flops_source"), r.get("compiled_flops_per_call")
    note = "XLA cost analysis" + {"lowered": " of the lowered program",
                                  "lowered, vmapped form": " of the lowered program, in its vmapped form"}.get(source, "")
    if source == "lowered" and compiled_flops and abs(compiled_flops - flops) > 0.01 * flops:
        note += f"; the compiled program reports {compiled_flops / 1e9:,.2f}"
    rows += [("FLOPs per device", "n/a" if not flops else f"{flops / 1e9:,.2f} GFLOP ({note})"),
             ("achieved", _num(r["tflops_per_s_per_device"], "{:.3f} TFLOP/s per device")),
             ("MFU", "n/a (peak unknown for this device)" if r["mfu"] is None
              else f"{100 * r['mfu']:.2f}% of {r['peak_tflops_per_device']:g} TFLOP/s ({r['peak_source']})"),
             ("peak device memory", _bytes(r["peak_memory_bytes"]))]
    cm = r.get("compiled_memory")
    if cm:
        rows.append(("compiled buffers", f"args {_bytes(cm.get('argument_size_in_bytes'))}, "
                                         f"temp {_bytes(cm.get('temp_size_in_bytes'))}, "
                                         f"out {_bytes(cm.get('output_size_in_bytes'))}"))
    if r.get("family") == "imagenet":
        rows += [("per update (estimate)", f"{r['sec_per_update_estimate']:,.1f} s for {r['examples_per_update']} "
                                           f"examples ({r['accum']} micro-steps per update on these devices)"),
                 (f"{r['updates']} updates (estimate)", f"{r['hours_for_updates_estimate']:,.2f} h")]
    if r.get("profile_dir"):
        rows.append(("profile", r["profile_dir"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"config PATH:ARG (default {DEFAULT_CONFIG}); --config.FIELD=VALUE overrides apply")
    parser.add_argument("--what", choices=("train", "generate"), default="train",
                        help="train: the pmapped train step (default); generate: counterfactual sampling")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (train; default config.train.batch_size; ImageNet CGN: the micro-batch, "
                             "ImageNet classifier: real images, both per-device value x devices) or images per "
                             "generation call (generate; default config.generate.batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed calls (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default config.train.compute_dtype); parameters stay float32")
    parser.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    parser.add_argument("--data", choices=("synthetic", "real"), default="synthetic",
                        help="train: a synthetic dataset of the right shapes (default) or the real TFDS split")
    parser.add_argument("--num-cfs", type=int, default=None,
                        help="generate: counterfactuals per shape (default config.generate.num_cfs)")
    parser.add_argument("--checkpoint", default=None,
                        help="generate: generator weights (Orbax dir, workdir or official .pth); 'random' for a "
                             "random init; default: config.model.pretrained, else shared/weights/cgn_mnist")
    parser.add_argument("--shared", default=None,
                        help="the shared data/weights directory (sets $CGN_JAX_SHARED; default ../shared)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="also trace 3 calls into DIR (jax.profiler)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    parser.add_argument("--output", default=None, metavar="FILE", help="also write the JSON result to FILE")


def _command(args) -> str:
    """The command line that reproduces this result (defaults spelled out)."""
    parts = ["cgn-jax bench", f"--config={args.config}", f"--what={args.what}"]
    for flag, value in (("--batch", args.batch), ("--steps", args.steps), ("--warmup", args.warmup),
                        ("--dtype", args.dtype), ("--devices", args.devices), ("--num-cfs", args.num_cfs),
                        ("--checkpoint", args.checkpoint), ("--profile", args.profile)):
        if value is not None:
            parts.append(f"{flag}={value}")
    if args.what == "train" and args.data != "synthetic":
        parts.append(f"--data={args.data}")
    return " ".join(parts + list(getattr(args, "config_overrides", [])))


def run(args) -> int:
    from cgn_jax.cli import CLIError
    from cgn_jax.config_loading import ConfigError, load_config

    if args.shared:
        if not Path(args.shared).is_dir():
            raise CLIError(f"--shared {args.shared} is not a directory")
        os.environ["CGN_JAX_SHARED"] = str(Path(args.shared).resolve())
    if args.steps < 1 or args.warmup < 0:
        raise CLIError("--steps must be >= 1 and --warmup >= 0")
    try:
        config = load_config(args.config, getattr(args, "config_overrides", []))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    family = config.get("family", "mnist")
    if family not in ("mnist", "imagenet", "imagenet_classifier", "mnist_classifier"):
        raise CLIError(f"`cgn-jax bench` times the steps of configs/mnist.py, configs/imagenet.py, "
                       f"configs/classifier.py and configs/imagenet_classifier.py, not config family {family!r}")
    if family == "mnist_classifier" and (args.profile or args.dtype == "bfloat16"):
        raise CLIError("the MNIST classifier bench has no --profile and runs in float32")
    if family != "mnist" and args.what != "train":
        raise CLIError("--what generate times MNIST counterfactual generation; for ImageNet use "
                       "`cgn-jax generate --config=configs/imagenet.py ...`, which reports images/s")
    if args.dtype and family == "imagenet_classifier":
        config.model.dtype = args.dtype
    elif args.dtype and family != "mnist_classifier":
        config.train.compute_dtype = args.dtype
    if args.batch is not None:
        if args.batch < 1:
            raise CLIError(f"--batch must be positive, got {args.batch}")
        if family in ("imagenet", "imagenet_classifier"):  # global (micro-)batch = per-device batch x devices
            import jax

            from cgn_jax.parallel import BatchSplitError, per_device_batch

            try:
                per_device = per_device_batch(args.batch, args.devices or jax.local_device_count(), what="--batch")
            except BatchSplitError as e:
                raise CLIError(str(e)) from None
            if family == "imagenet":
                config.train.per_device_batch = per_device
            else:  # real images; counterfactuals add data.cf_ratio times as many
                config.train.per_device_batch_size = per_device
        elif args.what == "train":  # the MNIST CGN's and classifier's global batch
            config.train.batch_size = args.batch
        else:
            config.generate.batch_size = args.batch

    if args.what == "generate":
        cfs = args.num_cfs or int(config.generate.num_cfs)
        if cfs < 1 or int(config.generate.batch_size) < cfs:
            raise CLIError(f"the generation batch ({config.generate.batch_size} images) must be at least "
                           f"--num-cfs ({cfs}), both positive")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))

    import jax

    from cgn_jax.parallel import BatchSplitError

    if args.devices is not None and not 1 <= args.devices <= jax.local_device_count():
        raise CLIError(f"--devices={args.devices}, but this machine has {jax.local_device_count()} device(s)")
    try:
        if family == "imagenet":
            result = bench_imagenet_train(config, steps=args.steps, warmup=args.warmup, n_devices=args.devices,
                                          profile=args.profile, log=log)
        elif family == "imagenet_classifier":
            result = bench_imagenet_classifier(config, steps=args.steps, warmup=args.warmup, n_devices=args.devices,
                                               profile=args.profile, log=log)
        elif family == "mnist_classifier":
            result = bench_mnist_classifier(config, steps=args.steps, warmup=args.warmup, n_devices=args.devices,
                                            log=log)
        elif args.what == "train":
            result = bench_train(config, steps=args.steps, warmup=args.warmup, n_devices=args.devices,
                                 data=args.data, profile=args.profile, log=log)
        else:
            result = bench_generate(config, batch=int(config.generate.batch_size),
                                    num_cfs=args.num_cfs or int(config.generate.num_cfs), steps=args.steps,
                                    warmup=args.warmup, checkpoint=args.checkpoint, profile=args.profile, log=log)
    except (BatchSplitError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except ModuleNotFoundError as e:  # e.g. generation's tqdm / pillow on a minimal accelerator image
        package = {"PIL": "pillow", "ml_collections": "ml-collections"}.get(e.name or "", e.name)
        raise CLIError(f"{e}; `cgn-jax bench --what {args.what}` needs it: pip install {package}") from None
    result["command"] = _command(args)
    result["config"] = args.config
    result["config_overrides"] = list(getattr(args, "config_overrides", []))
    result["machine"] = machine_info()
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0
