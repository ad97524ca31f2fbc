"""`cgn-jax bench`: runs the real train step on CPU and reports sane numbers; user errors are clear.

The CLI runs in a subprocess (as a user runs it) so that its device count can be set
with XLA_FLAGS independently of this test process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cgn_jax import bench

REPO = Path(__file__).resolve().parent.parent


def _bench(*args, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    # the installed `cgn-jax` script; else the same dispatcher through `python -m cgn_jax.distributed`
    exe = shutil.which("cgn-jax")
    cmd = [exe] if exe else [sys.executable, "-m", "cgn_jax.distributed"]
    return subprocess.run([*cmd, "bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_train_json():
    p = _bench("--config=configs/mnist.py:colored", "--batch", "8", "--steps", "3", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)  # stdout is the JSON object alone; progress lines go to stderr
    assert r["what"] == "train" and r["variant"] == "colored" and r["compute_dtype"] == "float32"
    assert r["global_batch"] == 8 and r["per_device_batch"] == 8 and r["devices"] == 1
    assert r["num_examples"] == 60000 and r["data"].startswith("synthetic")
    assert r["compile_s"] > 0 and r["lower_s"] > 0
    t = r["step_time_s"]
    assert t["n"] == 3 and 0 < t["min"] <= t["median"] <= t["max"]
    assert r["images_per_s"]["total"] == pytest.approx(8 / t["median"])
    assert r["images_per_s"]["per_device"] == pytest.approx(r["images_per_s"]["total"])
    f = r["flops_per_step"]
    assert f["per_device"] > 1e9 and f["source"] == "lowered"  # generator, 3 discriminator passes, VGG; fwd+bwd
    assert f["total"] == f["per_device"]
    assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # CPU: no known peak
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
    assert r["machine"]["backend"] == "cpu" and r["machine"]["nproc"] >= 1
    assert r["command"].startswith("cgn-jax bench --config=configs/mnist.py:colored")
    assert "--batch=8" in r["command"]


def test_bench_generate_table():
    p = _bench("--config=configs/mnist.py:double_colored", "--what", "generate", "--batch", "20", "--num-cfs", "2",
               "--steps", "2", "--warmup", "1", "--checkpoint", "random", "--dtype", "bfloat16")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "generation call (median)" in out and "10 shapes x 2 cfs" in out
    assert "random init" in out and "double_colored / bfloat16" in out
    assert "MFU" in out and "n/a" in out


def test_bench_batch_that_does_not_split():
    p = _bench("--config=configs/mnist.py:colored", "--batch", "3", "--steps", "1", devices=2, timeout=300)
    assert p.returncode == 2
    assert "does not split evenly over 2 devices" in p.stderr and "Traceback" not in p.stderr


def test_bench_unknown_variant():
    p = _bench("--config=configs/mnist.py:blue", "--steps", "1", timeout=300)
    assert p.returncode == 2
    assert "unknown MNIST variant 'blue'" in p.stderr and "Traceback" not in p.stderr


def test_peak_table():
    assert bench.peak_key("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.peak_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert bench.peak_key("NVIDIA H200") == "h200"
    assert bench.peak_key("TPU v4") == "tpu-v4"
    assert bench.peak_key("TPU v5 lite") == "tpu-v5e"
    assert bench.peak_key("TPU v5p") == "tpu-v5p"
    assert bench.peak_key("cpu") is None
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989.0
    assert bench.peak_tflops("NVIDIA H200", "float32")[0] == 67.0
    assert bench.peak_tflops("TPU v5 lite", "bfloat16")[0] == 197.0
    assert bench.peak_tflops("cpu", "float32") == (None, None)


def test_cost_flops_return_variants():
    class Fake:
        def __init__(self, value):
            self.value = value

        def cost_analysis(self):
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

    assert bench.cost_flops(Fake({"flops": 12.0})) == 12.0
    assert bench.cost_flops(Fake([{"flops": 7.0, "bytes accessed": 1.0}])) == 7.0
    assert bench.cost_flops(Fake([])) is None
    assert bench.cost_flops(Fake(None)) is None
    assert bench.cost_flops(Fake({"flops": -1.0})) is None
    assert bench.cost_flops(Fake(NotImplementedError())) is None


@pytest.mark.slow  # compiles a whole training step; the step itself is tested elsewhere
def test_bench_imagenet_micro_step():
    """The ImageNet CGN's real micro-step, tiny random networks: bench schema, accumulation figures, table."""
    from test_imagenet_cgn import tiny_config

    config = tiny_config(per_device_batch=2, effective_batch=8)
    r = bench.bench_imagenet_train(config, steps=2, warmup=1, n_devices=1, log=lambda msg: None)
    assert r["family"] == "imagenet" and r["what"] == "train" and r["spectral_norm"] == "folded"
    assert (r["global_batch"], r["per_device_batch"], r["accum"], r["examples_per_update"]) == (2, 2, 4, 8)
    t = r["step_time_s"]
    assert t["n"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
    assert r["images_per_s"]["total"] == pytest.approx(2 / t["median"])
    assert r["sec_per_update_estimate"] == pytest.approx(4 * t["median"])
    assert r["hours_for_updates_estimate"] == pytest.approx(r["sec_per_update_estimate"] * r["updates"] / 3600)
    assert r["flops_per_step"]["per_device"] > 1e8 and r["flops_per_step"]["source"] == "lowered"
    r["command"], r["machine"] = "cgn-jax bench --config=configs/imagenet.py:tiny", bench.machine_info()
    table = bench.format_table(r)
    assert "global micro-batch" in table and "4 micro-steps per update" in table and "folded / False" in table


def test_bench_refuses_what_it_cannot_time():
    p = _bench("--config=configs/classifier.py:colored,original", "--steps", "1", "--profile", "/tmp/x", timeout=300)
    assert p.returncode == 2 and "no --profile" in p.stderr and "Traceback" not in p.stderr
    p = _bench("--config=configs/imagenet.py:tiny", "--what", "generate", "--steps", "1", timeout=300)
    assert p.returncode == 2 and "cgn-jax generate" in p.stderr and "Traceback" not in p.stderr
    p = _bench("--config=configs/imagenet.py:tiny", "--batch", "3", "--steps", "1", devices=2, timeout=300)
    assert p.returncode == 2 and "does not split evenly over 2 devices" in p.stderr


@pytest.mark.slow  # the step is tested by test_imagenet_classifier; keeps the default run under 15 min on 2 cores
def test_bench_imagenet_classifier_json():
    p = _bench("--config=configs/imagenet_classifier.py:tiny", "--batch", "4", "--steps", "2", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["family"] == "imagenet_classifier" and r["variant"] == "tiny"
    assert (r["real_per_device"], r["cf_per_device"], r["global_batch"]) == (4, 4, 8)  # cf_ratio 1
    t = r["step_time_s"]
    assert t["n"] == 2 and r["images_per_s"]["total"] == pytest.approx(8 / t["median"])
    assert r["flops_per_step"]["per_device"] > 1e6 and r["mfu"] is None


@pytest.mark.slow  # compiles a whole training step; the step itself is tested elsewhere
def test_bench_mnist_classifier_with_the_cgn_on_the_fly():
    p = _bench("--config=configs/classifier.py:colored,original+cgn", "--batch", "8", "--steps", "3", "--warmup", "1",
               "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    assert r["family"] == "mnist_classifier" and r["mode"] == "original+cgn" and r["cgn_on_the_fly"]
    assert r["global_batch"] == 8 and r["loop"] == "steps"
    t = r["step_time_s"]
    assert t["n"] == 1 and r["images_per_s"]["total"] == pytest.approx(8 / t["median"])
    assert r["first_epoch_train_s"] > t["median"]  # the first epoch compiles
