"""Multi-host data parallelism, checked on one machine: two JAX processes talking over localhost.

Each process gets one CPU device (XLA_FLAGS), joins the job through
`cgn_jax.distributed.initialize`, and runs a few steps of the real MNIST CGN train
step pmapped over the devices of *both* processes (gloo collectives on CPU). The
result must equal a single process with two devices running the same global batch
from the same seed: the step keys every random draw by global example id and averages
gradients and BatchNorm statistics over the global device axis, so the split over
processes must not show in the numbers.

The worker is this file run as a script (`python test_multihost.py worker ...`), so
the two processes run exactly the code under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

GLOBAL_BATCH = 4
NUM_EXAMPLES = 64
STEPS = 3
TIMEOUT_S = 420


# ---------------------------------------------------------------------------- worker (subprocess)

def _worker(out: Path, num_processes: int, process_id: int, coordinator: str | None) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from cgn_jax import distributed

    multi = distributed.initialize(coordinator, num_processes, process_id) if num_processes > 1 else \
        distributed.initialize()
    assert multi == (num_processes > 1), (multi, num_processes)
    assert distributed.initialize(coordinator, num_processes, process_id) == multi  # idempotent

    from cgn_jax import parallel
    from cgn_jax.bench import initial_state, perceptual_for_bench, synthetic_dataset
    from cgn_jax.config_loading import load_config
    from cgn_jax.data import render
    from cgn_jax.train import mnist_step as S

    config = load_config("configs/mnist.py:colored")
    config.train.batch_size = GLOBAL_BATCH
    local_batch = distributed.global_to_local_batch(GLOBAL_BATCH)
    # Every process holds the whole (small) dataset: the step samples from all of it on each device.
    dataset = synthetic_dataset(NUM_EXAMPLES, seed=0)
    ctx = S.StepContext(data=S.device_dataset(dataset), assets=render.make_assets("colored"),
                        perceptual=perceptual_for_bench(config)[0])
    local = jax.local_devices()
    ctx = parallel.replicate(ctx, local)
    init = initial_state(config)  # jitted S.init_state(config, PRNGKey(config.seed))
    state = parallel.replicate(init, local)

    # pmap over every device of every process; each process feeds its local devices' shards.
    step = jax.pmap(S.make_train_step(config, local_batch, NUM_EXAMPLES), axis_name=parallel.AXIS,
                    devices=jax.devices(), donate_argnums=(0, 1))
    losses = []
    start = time.perf_counter()
    for _ in range(STEPS):
        state, metrics = step(state, parallel.replicate(S.zero_metrics(), local), ctx)
        losses.append({k: float(v) for k, v in parallel.to_host(metrics).items()})

    host = parallel.to_host(state)
    leaves = jax.tree_util.tree_flatten_with_path((host.generator.params, host.generator.batch_stats,
                                                   host.discriminator.params, host.discriminator.batch_stats))[0]
    arrays = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    np.savez(out / f"state_{num_processes}p_{process_id}.npz", **arrays)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(host.generator.params),
                                                            jax.tree.leaves(jax.device_get(init.generator.params))))
    info = {"losses": losses, "max_param_change": moved, "steps_s": time.perf_counter() - start, "process_count": jax.process_count(), "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "local_batch": local_batch,
            "is_main": distributed.is_main_process(), "host_shard": [distributed.host_shard(10).start,
                                                                    distributed.host_shard(10).stop]}
    (out / f"info_{num_processes}p_{process_id}.json").write_text(json.dumps(info))


# ---------------------------------------------------------------------------- test (parent)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out: Path, num_processes: int, process_id: int, devices_per_process: int, port: int | None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    for var in ("CGN_JAX_COORDINATOR", "CGN_JAX_NUM_PROCESSES", "CGN_JAX_PROCESS_ID"):
        env.pop(var, None)
    args = [sys.executable, __file__, "worker", str(out), str(num_processes), str(process_id),
            f"127.0.0.1:{port}" if port else "-"]
    log = open(out / f"log_{num_processes}p_{process_id}.txt", "w")
    return subprocess.Popen(args, cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _wait(procs, out: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    for name, p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            pytest.fail(f"{name} did not finish in {TIMEOUT_S}s; logs in {out}")
    for name, p in procs:
        if p.returncode != 0:
            logs = "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(out.glob("log_*.txt")))
            pytest.fail(f"{name} exited with {p.returncode}\n{logs}")


@pytest.mark.slow  # the training-loop test below runs the same step through `cgn-jax train`
def test_two_processes_match_one_process(tmp_path):
    # All three at once: the compilations (most of the time) are single-threaded, so on a
    # machine with two or more idle cores the test takes about one compilation's time.
    port = _free_port()
    _wait([("process 0 of 2", _spawn(tmp_path, 2, 0, 1, port)),
           ("process 1 of 2", _spawn(tmp_path, 2, 1, 1, port)),
           ("single process", _spawn(tmp_path, 1, 0, 2, None))], tmp_path)

    info = {name: json.loads((tmp_path / f"info_{name}.json").read_text()) for name in ("2p_0", "2p_1", "1p_0")}
    assert info["2p_0"]["process_count"] == 2 and info["2p_0"]["device_count"] == 2
    assert info["2p_0"]["local_device_count"] == 1 and info["2p_0"]["local_batch"] == GLOBAL_BATCH // 2
    assert info["2p_0"]["is_main"] and not info["2p_1"]["is_main"]
    assert info["2p_0"]["host_shard"] == [0, 5] and info["2p_1"]["host_shard"] == [5, 10]
    assert info["1p_0"]["process_count"] == 1 and info["1p_0"]["device_count"] == 2

    # metrics are global means: identical on both processes, and equal to the single-process run
    for step, (a, b, ref) in enumerate(zip(info["2p_0"]["losses"], info["2p_1"]["losses"], info["1p_0"]["losses"])):
        assert a == b, f"step {step}: processes disagree on the metrics"
        for k in ref:
            np.testing.assert_allclose(a[k], ref[k], rtol=1e-4, atol=1e-6, err_msg=f"step {step} {k}")

    p0, p1, ref = (np.load(tmp_path / f"state_{n}.npz") for n in ("2p_0", "2p_1", "1p_0"))
    assert set(p0.files) == set(ref.files) and len(ref.files) > 10
    for name in ref.files:
        np.testing.assert_array_equal(p0[name], p1[name], err_msg=f"replicas diverged across processes: {name}")
        np.testing.assert_allclose(p0[name], ref[name], rtol=1e-4, atol=2e-6, err_msg=name)
    # and training moved the parameters (the comparison is not between two initial states)
    assert info["1p_0"]["max_param_change"] > 1e-4


def _train(out: Path, name: str, workdir: Path, steps: int, devices: int, process: tuple[int, int, int] | None,
           data_dir: Path):
    """`cgn-jax train` as a subprocess: through `cgn_jax.distributed` when `process` = (id, count, port)."""
    from conftest import SHARED

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               CGN_JAX_SHARED=str(SHARED))
    for var in ("CGN_JAX_COORDINATOR", "CGN_JAX_NUM_PROCESSES", "CGN_JAX_PROCESS_ID"):
        env.pop(var, None)
    entry = "cgn_jax.cli"
    if process:
        pid, count, port = process
        env.update(CGN_JAX_COORDINATOR=f"127.0.0.1:{port}", CGN_JAX_NUM_PROCESSES=str(count),
                   CGN_JAX_PROCESS_ID=str(pid))
        entry = "cgn_jax.distributed"
    args = [sys.executable, "-m", entry, "train", "--config=configs/mnist.py:colored", f"--workdir={workdir}",
            "--no-progress", f"--config.dataset.limit={NUM_EXAMPLES}", f"--config.train.batch_size={GLOBAL_BATCH}",
            f"--config.train.num_steps={steps}", "--config.train.log_every=2", "--config.train.sample_every=2",
            "--config.train.checkpoint_every=2", f"--config.dataset.data_dir={data_dir}",
            "--config.dataset.shards=2"]
    log = open(out / f"log_{name}.txt", "w")
    return name, subprocess.Popen(args, cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)


def _numbers(metrics_jsonl: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("sec_per_step", "time", "wall_time")} for r in rows]


# the cores this process may use (taskset), where the OS can say; macOS has no sched_getaffinity
_USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.mark.skipif(_USABLE_CORES < 2,
                    reason="needs two CPU cores: pinned to one (taskset), XLA orders the float sums of the "
                           "three processes differently and the GAN amplifies the last-bit differences")
def test_two_process_training_matches_one_process_and_resumes(tmp_path):
    """`cgn-jax train` over two processes (one CPU device each, a shared run directory) is the
    single-process two-device run: same metrics, same generator, also across a stop and resume.

    The two processes write one Orbax checkpoint together; process 0 alone writes logs and samples.
    With two data shards each process loads only its half of the split; the one-process run
    holds both halves and reads them the same way.
    """
    from conftest import SHARED

    from cgn_jax.checkpoint import flatten_with_names, restore_variables
    from cgn_jax.data import load_variant

    # build the TFDS dataset once here, so the three processes do not race to build it
    data = tmp_path / "tfds"
    load_variant("colored", "train", mnist_dir=SHARED / "data" / "mnist", data_dir=data, limit=NUM_EXAMPLES)
    two, one = tmp_path / "two", tmp_path / "one"
    port = _free_port()
    _wait([_train(tmp_path, "2p_0", two, 4, 1, (0, 2, port), data),
           _train(tmp_path, "2p_1", two, 4, 1, (1, 2, port), data),
           _train(tmp_path, "1p", one, 6, 2, None, data)], tmp_path)
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    # a second launch of the same job resumes from step 4 (checkpoint read by both processes)
    port = _free_port()
    _wait([_train(tmp_path, "2p_0b", two, 6, 1, (0, 2, port), data),
           _train(tmp_path, "2p_1b", two, 6, 1, (1, 2, port), data)], tmp_path)
    assert "resuming" in (tmp_path / "log_2p_0b.txt").read_text()
    half = NUM_EXAMPLES // 2
    assert f"process 0: loading rows [0, {half}) of {NUM_EXAMPLES}" in (tmp_path / "log_2p_0.txt").read_text()
    assert f"process 1: loading rows [{half}, {NUM_EXAMPLES}) of {NUM_EXAMPLES}" in (
        tmp_path / "log_2p_1.txt").read_text()

    rows_two, rows_one = _numbers(two / "metrics.jsonl"), _numbers(one / "metrics.jsonl")
    # one writer, no duplicates: at each step a row of losses and one of per-class mask statistics
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [2, 2, 4, 4, 6, 6]
    for r2, r1 in zip(rows_two, rows_one):
        assert r2 == pytest.approx(r1, rel=1e-5, abs=1e-7), r1["step"]
    assert sorted(p.name for p in (two / "samples").iterdir()) == sorted(p.name for p in (one / "samples").iterdir())
    a, b = restore_variables(two / "generator"), restore_variables(one / "generator")
    a, b = flatten_with_names(a), flatten_with_names(b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert json.loads((two / "generator" / "meta.json").read_text())["step"] == 6


def test_distributed_single_process_helpers(monkeypatch):
    """No cluster, no settings: a no-op; incomplete settings: a clear error, before touching JAX."""
    from cgn_jax import distributed

    for var in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize(num_processes=1) is False
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(distributed.DistributedError, match="incomplete"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    with pytest.raises(distributed.DistributedError, match="process_id"):
        distributed.initialize()
    assert distributed.is_main_process()
    assert distributed.host_shard(10) == slice(0, 10)
    assert distributed.host_shard(10, process_index=2, process_count=3) == slice(6, 9)
    from cgn_jax.parallel import BatchSplitError

    import jax

    n = jax.device_count()
    assert distributed.global_to_local_batch(4 * n) == 4
    if n > 1:
        with pytest.raises(BatchSplitError, match="does not split"):
            distributed.global_to_local_batch(n + 1)
    with pytest.raises(BatchSplitError, match="positive"):
        distributed.global_to_local_batch(0)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    _out, _n, _pid, _coord = sys.argv[2:6]
    _worker(Path(_out), int(_n), int(_pid), None if _coord == "-" else _coord)
