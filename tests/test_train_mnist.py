"""MNIST CGN training: the step learns, splits over devices, resumes bit-exactly, stops cleanly on SIGTERM.

Every test trains on the first 64 examples with a global batch of 8, so they share
compiled programs; the persistent XLA compilation cache (the one `cgn-jax train`
uses) carries them between tests and into the subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from cgn_jax.configs.mnist import get_config

REPO = Path(__file__).resolve().parent.parent
BATCH, LIMIT = 8, 64


def tiny_config(variant: str = "colored", **train):
    c = get_config(variant)
    c.dataset.limit = LIMIT
    c.train.batch_size = BATCH
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.sample_every = 3
    c.train.checkpoint_every = 3
    c.train.keep_checkpoints = 2
    for k, v in train.items():
        c.train[k] = v
    return c


def _compile_cache_dir() -> str:
    from cgn_jax.paths import cache_dir

    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir("xla"))


@pytest.fixture(scope="module", autouse=True)
def compile_cache():
    """Use the persistent compilation cache in this module (and its subprocesses), as the CLI does."""
    try:
        from jax._src import compilation_cache as cc
    except ImportError:  # pragma: no cover - layout of another JAX version
        cc = None
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", _compile_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if cc is not None:
        cc.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    if cc is not None:
        cc.reset_cache()


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=_compile_cache_dir(),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- cheap checks

def test_batch_that_does_not_split_names_both_numbers_and_the_fix():
    from cgn_jax.parallel import BatchSplitError, per_device_batch

    assert per_device_batch(64, 8) == 8
    with pytest.raises(BatchSplitError) as e:
        per_device_batch(12, 8)
    msg = str(e.value)
    assert "train.batch_size=12" in msg and "8 devices" in msg
    assert "--config.train.batch_size=8" in msg and "--config.train.batch_size=16" in msg


def test_unknown_variant_is_a_cli_error(tmp_path, capsys):
    from cgn_jax.cli import main

    assert main(["train", "--config=configs/mnist.py:fashion", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert "unknown MNIST variant 'fashion'" in err and "double_colored" in err
    assert "Traceback" not in err and not (tmp_path / "w").exists()


def test_after_a_cli_error_only_reports_of_abandoned_reads_are_dropped(tmp_path, monkeypatch):
    """Orbax's abandoned reads on a corrupt checkpoint report a closed event loop after the error
    message; the CLI drops those reports and passes every other one on."""
    import types

    from cgn_jax.cli import main

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    assert main(["train", "--config=configs/mnist.py:fashion", f"--workdir={tmp_path / 'w'}"]) == 2
    report = lambda exc: types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                               err_msg=None, object=None)
    abandoned, other = report(RuntimeError("Event loop is closed")), report(RuntimeError("something else"))
    sys.unraisablehook(abandoned)
    sys.unraisablehook(other)
    assert seen == [other]


def test_cli_errors_for_bad_settings(tmp_path, capsys):
    from cgn_jax.cli import main

    assert main(["train", f"--workdir={tmp_path}", "--config.train.compute_dtype=float16"]) == 2
    assert "compute_dtype" in capsys.readouterr().err
    assert main(["train", f"--workdir={tmp_path}", "--devices=99"]) == 2
    assert "--devices=99" in capsys.readouterr().err
    assert main(["train", "--workdir=gs://bucket/run"]) == 2
    assert "gcsfuse" in capsys.readouterr().err
    assert main(["train", f"--workdir={tmp_path}", "--config.dataset.shards=3"]) == 2
    assert "dataset.shards=3 cannot work with train.batch_size=16" in capsys.readouterr().err
    assert main(["train", f"--workdir={tmp_path}", "--config.model.tanh_grad_floor=1.5"]) == 2
    assert "model.tanh_grad_floor=1.5 is not in [0, 1)" in capsys.readouterr().err
    for classifier in ("configs/classifier.py:colored,original", "configs/imagenet_classifier.py"):
        assert main(["train", f"--config={classifier}", f"--workdir={tmp_path}"]) == 2
        assert f"train-classifier --config={classifier}" in capsys.readouterr().err


def test_cli_defaults_to_colored_and_runs_dir(tmp_path, monkeypatch):
    import cgn_jax.train.mnist as mnist
    from cgn_jax.cli import main

    seen = {}

    def fake_train(config, workdir, devices=None, progress=True):
        seen.update(variant=config.variant, workdir=workdir, batch=config.train.batch_size, progress=progress)
        return mnist.TrainResult(step=0, num_steps=0, status="completed", signal=None, workdir=Path(workdir),
                                 compile_s=None, last_metrics={})

    monkeypatch.setattr(mnist, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-compile-cache", "--no-progress", "--config.train.batch_size=32"]) == 0
    assert seen == {"variant": "colored", "workdir": Path("runs") / "colored", "batch": 32, "progress": False}


def test_metrics_logger_drops_records_after_the_resumed_step(tmp_path):
    from cgn_jax.train.logging import MetricsLogger

    log = MetricsLogger(tmp_path)
    for step in (2, 4, 6):
        log.write(step, {"g_loss": 1.0 / step, "mask_mean": 0.5, "mask_var": 0.1})
    log.close()
    assert (tmp_path / "plots" / "losses.png").is_file() and (tmp_path / "plots" / "mask.png").is_file()
    assert any((tmp_path / "tb").iterdir())
    log = MetricsLogger(tmp_path, resume_step=4)
    log.write(5, {"g_loss": 0.3})
    log.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 5]
    assert MetricsLogger(tmp_path / "off", enabled=False).plot() == [] and not (tmp_path / "off").exists()


# ---------------------------------------------------------------------------- the step learns

@pytest.mark.parametrize("variant", ["colored", pytest.param("double_colored", marks=pytest.mark.slow),
                                     pytest.param("wildlife", marks=pytest.mark.slow)])
def test_training_steps_reduce_the_generator_loss_on_a_fixed_batch(variant):
    from cgn_jax import parallel as P
    from cgn_jax.train import mnist as M
    from cgn_jax.train import mnist_step as S

    config = tiny_config(variant)
    devices = jax.local_devices()[:1]
    ctx, n = M.step_context(config, devices)
    train_step = S.pmap_train_step(config, BATCH, n, devices)
    evaluate = S.pmap_eval_step(config, BATCH, n, devices)
    state = P.replicate(S.init_state(config), devices)
    metrics = P.replicate(S.zero_metrics(), devices)
    at_step0 = P.replicate(np.int32(0), devices)  # the batch, noise and dropout of step 0
    before = P.to_host(evaluate(state, ctx, at_step0))
    for _ in range(8):
        state, metrics = train_step(state, metrics, ctx)
    after = P.to_host(evaluate(state, ctx, at_step0))
    steps_metrics = {k: float(v) / 8 for k, v in P.to_host(metrics).items()}
    assert set(steps_metrics) == set(S.METRICS) and all(np.isfinite(list(steps_metrics.values())))
    assert int(P.to_host(state).step) == 8
    assert after["g_loss"] < before["g_loss"], (before, after)
    assert after["g_perc"] < before["g_perc"], (before, after)
    assert 0.0 < after["mask_mean"] < 1.0 and 0.0 <= after["mask_var"] <= 0.25
    assert after["g_frame"] == 0.0  # the frame prior is off in the official configs


def test_frame_prior_enters_the_generator_loss():
    from cgn_jax import parallel as P
    from cgn_jax.train import mnist as M
    from cgn_jax.train import mnist_step as S

    config = tiny_config("colored")
    config.loss.mask_frame = 2.0
    devices = jax.local_devices()[:1]
    ctx, n = M.step_context(config, devices)
    state = P.replicate(S.init_state(config), devices)
    m = P.to_host(S.pmap_eval_step(config, BATCH, n, devices)(state, ctx, P.replicate(np.int32(0), devices)))
    assert 0.0 < m["g_frame"] < 2.0
    assert m["g_loss"] == pytest.approx(m["g_adv"] + m["g_mask"] + m["g_perc"] + m["g_frame"], rel=1e-5)


def test_tanh_grad_floor_changes_the_update_not_the_losses():
    from cgn_jax import parallel as P
    from cgn_jax.train import mnist as M
    from cgn_jax.train import mnist_step as S

    devices = jax.local_devices()[:1]
    results = []
    for floor in (0.0, 0.9):
        config = tiny_config("colored")
        config.model.tanh_grad_floor = floor
        ctx, n = M.step_context(config, devices)
        state = P.replicate(S.init_state(config), devices)
        state, metrics = S.pmap_train_step(config, BATCH, n, devices)(state, P.replicate(S.zero_metrics(), devices), ctx)
        results.append((P.to_host(metrics), P.to_host(state).generator.params))
    (m0, g0), (m1, g1) = results
    m0, m1 = ({k: float(v) for k, v in m.items()} for m in (m0, m1))  # pytest 9.2's approx: no 0-d arrays in dicts
    assert m0 == pytest.approx(m1, rel=1e-6)  # same forward pass: the first step's losses agree
    assert not np.allclose(g0["f_text2"]["conv3"]["kernel"], g1["f_text2"]["conv3"]["kernel"])
    np.testing.assert_array_equal(g0["f_shape"]["linear"]["kernel"], g1["f_shape"]["linear"]["kernel"])


def test_generator_average_follows_the_updates_and_leaves_them_unchanged():
    from cgn_jax import parallel as P
    from cgn_jax.train import mnist as M
    from cgn_jax.train import mnist_step as S

    devices = jax.local_devices()[:1]
    runs = {}
    for decay in (0.0, 0.75):
        config = tiny_config("colored", ema_decay=decay)
        ctx, n = M.step_context(config, devices)
        step = S.pmap_train_step(config, BATCH, n, devices)
        state, metrics = P.replicate(S.init_state(config), devices), P.replicate(S.zero_metrics(), devices)
        states = [P.to_host(state)]
        for _ in range(2):
            state, metrics = step(state, metrics, ctx)
            states.append(P.to_host(state))
        runs[decay] = states
    for plain, averaged in zip(runs[0.0], runs[0.75]):
        assert plain.ema == {}
        jax.tree.map(np.testing.assert_array_equal, plain.generator, averaged.generator)  # passive
        jax.tree.map(np.testing.assert_array_equal, plain.discriminator, averaged.discriminator)
    states = runs[0.75]
    jax.tree.map(np.testing.assert_array_equal, states[0].ema["params"], states[0].generator.params)
    for before, after in zip(states, states[1:]):
        current = {"params": after.generator.params, "batch_stats": after.generator.batch_stats}
        expected = jax.tree.map(lambda e, x: 0.75 * e + 0.25 * x, before.ema, current)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after.ema, expected)
    moved = np.abs(states[2].ema["params"]["f_shape"]["linear"]["kernel"]
                   - states[2].generator.params["f_shape"]["linear"]["kernel"]).max()
    assert moved > 0  # the average lags the weights


def test_ema_decay_outside_zero_one_is_a_config_error():
    from cgn_jax.train import mnist as M

    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0, 1\)"):
            M.check_config(tiny_config(ema_decay=bad))


def test_a_step_refuses_a_data_layout_made_for_another_global_batch():
    from cgn_jax import parallel as P
    from cgn_jax.data.sharding import DataShards
    from cgn_jax.train import mnist as M
    from cgn_jax.train import mnist_step as S

    config = tiny_config("colored")
    devices = jax.local_devices()[:1]
    ctx, n = M.step_context(config, devices)
    state = P.replicate(S.init_state(config), devices)
    evaluate = S.pmap_eval_step(config, BATCH, DataShards(n.num_examples, 1, 2 * BATCH), devices)
    with pytest.raises(ValueError, match=f"{BATCH} examples on each of 1 devices is not the data layout's "
                                         f"global batch {2 * BATCH}"):
        evaluate(state, ctx, P.replicate(np.int32(0), devices))


# ---------------------------------------------------------------------------- one device vs eight

_SPLIT_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np, flax
    sys.path.insert(0, sys.argv[3])
    from test_train_mnist import tiny_config
    from cgn_jax import parallel as P
    from cgn_jax.checkpoint import flatten_with_names
    from cgn_jax.train import mnist as M, mnist_step as S

    variant, out = sys.argv[1], sys.argv[2]
    config = tiny_config(variant)
    devices = jax.local_devices()
    assert len(devices) == 8, devices
    runs = {}
    for n in (1, 2, 4, 8):
        ctx, num = M.step_context(config, devices[:n])
        runs[n] = (S.pmap_train_step(config, 8, num, devices[:n]), ctx, devices[:n])
    res, state = {}, S.init_state(config)
    for i in (1, 2):  # step 1 from the initial state, step 2 from the state after step 1 (on one device)
        for n, (step, ctx, d) in runs.items():
            new, metrics = step(P.replicate(state, d), P.replicate(S.zero_metrics(), d), ctx)
            res[f"{n}/replica_spread"] = max(float(np.max(np.abs(np.asarray(x) - np.asarray(x)[:1])))
                                             for x in jax.tree.leaves(new) if np.asarray(x).size)
            for k, v in P.to_host(metrics).items():
                res[f"{n}/step{i}/metrics/{k}"] = v
            host = P.to_host(new)
            for name, v in flatten_with_names(flax.serialization.to_state_dict(host)).items():
                res[f"{n}/step{i}/{name}"] = np.asarray(v)
            if n == 1:
                after_one = host
        state = after_one
    bad = config.copy_and_resolve_references()
    bad.train.batch_size = 12
    try:
        M.train(bad, out + ".workdir", devices=devices, progress=False)
        res["split_error"] = ""
    except Exception as e:
        res["split_error"] = f"{type(e).__name__}: {e}"
    np.savez(out, **res)
""")


@pytest.mark.parametrize("variant", ["colored", pytest.param("wildlife", marks=pytest.mark.slow)])
def test_one_two_four_eight_devices_make_the_same_update(variant, tmp_path):
    """From the same state, one step over 1, 2, 4 and 8 devices (global batch 8) agree to float rounding:
    the losses for all splits, and for 8 devices the whole new state (parameters, Adam moments, BN stats)."""
    out = tmp_path / "split.npz"
    proc = subprocess.run([sys.executable, "-c", _SPLIT_SCRIPT, variant, str(out), str(Path(__file__).parent)],
                          env=_subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = dict(np.load(out))
    assert r["8/replica_spread"] == 0.0  # every device holds the same state
    err = str(r["split_error"])
    assert err.startswith("BatchSplitError") and "batch_size=12" in err and "8 devices" in err, err
    lr = tiny_config(variant).optim.lr
    for n in (2, 4):
        for i in (1, 2):
            for name in [k for k in r if k.startswith(f"1/step{i}/metrics/")]:
                np.testing.assert_allclose(r[f"{n}/" + name[2:]], r[name], rtol=1e-4, atol=1e-6,
                                           err_msg=f"{n} devices, step {i} {name}")
        assert r[f"{n}/replica_spread"] == 0.0
    for i in (1, 2):
        one = {k[len(f"1/step{i}/"):]: v for k, v in r.items() if k.startswith(f"1/step{i}/")}
        eight = {k[len(f"8/step{i}/"):]: v for k, v in r.items() if k.startswith(f"8/step{i}/")}
        assert one.keys() == eight.keys()
        for name in [k for k in one if k.startswith("metrics/") or k in ("key", "step")]:
            np.testing.assert_allclose(eight[name], one[name], rtol=1e-4, atol=1e-6, err_msg=f"step {i} {name}")
        for net in ("generator", "discriminator"):
            # Adam moments are linear in the gradients: compare at the scale of the network's gradients
            # (some gradients are exactly zero in exact arithmetic, e.g. of a bias just before BatchNorm,
            # and only rounding noise in float)
            for moment in ("mu", "nu"):
                names = [k for k in one if k.startswith(f"{net}/opt_state/") and f"/{moment}/" in k]
                scale = max(float(np.max(np.abs(one[k]))) for k in names)
                for k in names:
                    assert np.max(np.abs(eight[k] - one[k])) <= 3e-3 * scale, f"step {i} {k}"
            for k in [k for k in one if k.startswith(f"{net}/batch_stats/")]:
                np.testing.assert_allclose(eight[k], one[k], rtol=1e-3, atol=1e-4, err_msg=f"step {i} {k}")
            # parameters: an Adam step moves each weight by about lr * sign(gradient), so a weight whose
            # gradient is zero up to rounding may move the other way; all others agree closely
            params = [k for k in one if k.startswith(f"{net}/params/")]
            diffs = np.concatenate([np.abs(eight[k] - one[k]).ravel() for k in params])
            assert diffs.max() <= 2 * lr + 1e-6, f"step {i} {net}"
            assert np.mean(diffs > 1e-5) < 1e-3, f"step {i} {net}: {np.mean(diffs > 1e-5)}"


# ---------------------------------------------------------------------------- the loop

@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at 3 and 6."""
    from cgn_jax.train.mnist import train

    workdir = tmp_path_factory.mktemp("full")
    result = train(tiny_config(), workdir, progress=False)
    return workdir, result


def _final_state(workdir):
    from cgn_jax.train import mnist_step as S
    from cgn_jax.train.checkpointing import TrainCheckpoints

    with TrainCheckpoints(workdir / "checkpoints") as ckpt:
        step = ckpt.latest_step()
        state, meta = ckpt.restore(S.init_state(tiny_config()), step)
    return step, state, meta


def test_training_run_writes_logs_samples_checkpoints_and_a_generator(full_run):
    from cgn_jax.port.mnist import load_mnist_cgn
    from cgn_jax.train import mnist_step as S

    workdir, result = full_run
    assert result.status == "completed" and result.step == 6 and result.compile_s > 0
    config = json.loads((workdir / "config.json").read_text())
    assert config["variant"] == "colored" and config["train"]["batch_size"] == BATCH
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "g_loss" in r]
    assert [r["step"] for r in losses] == [2, 4, 6]
    assert set(losses[0]) == {"step", "sec_per_step", *S.METRICS}
    for r in losses:  # window means: a mask in [0, 1] has variance <= mean * (1 - mean)
        assert 0 < r["mask_mean"] < 1 and r["mask_var"] <= r["mask_mean"] * (1 - r["mask_mean"]) + 1e-6, r
        assert r["sec_per_step"] > 0
    # at every sample sheet: each class's mask mean on the canvas frame, and how many exceed 0.5
    by_class = [r for r in records if "mask_frame_c0" in r]
    assert [r["step"] for r in by_class] == [3, 6] and len(by_class) + len(losses) == len(records)
    for r in by_class:
        frame = [r[f"mask_frame_c{k}"] for k in range(10)]
        assert all(0 <= m <= 1 for m in frame) and r["mask_inverted_classes"] == sum(m > 0.5 for m in frame)
        assert all(0 <= r[f"{p}_saturated_c{k}"] <= 1 for p in ("fg", "bg") for k in range(10))
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert {p.name for p in (workdir / "plots").iterdir()} == {"losses.png", "mask.png", "mask_by_class.png",
                                                               "saturation_by_class.png"}
    assert {p.name for p in (workdir / "samples").iterdir()} == {"step_0000003.png", "step_0000006.png"}
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]

    model, variables = load_mnist_cgn(workdir / "generator")
    meta = json.loads((workdir / "generator" / "meta.json").read_text())
    assert meta["variant"] == "colored" and meta["step"] == 6 and meta["latent_dim"] == 32
    step, state, _ = _final_state(workdir)
    jax.tree.map(np.testing.assert_array_equal, variables,
                 {"params": state.generator.params, "batch_stats": state.generator.batch_stats})
    y = jax.numpy.arange(4)
    out = model.apply(variables, y, rngs={"noise": jax.random.PRNGKey(0), "texture": jax.random.PRNGKey(1)})
    assert out["image"].shape == (4, 32, 32, 3)


def test_resume_continues_the_run_bit_exactly(full_run, tmp_path, capsys):
    from cgn_jax.train.mnist import train

    workdir = tmp_path / "split"
    first = train(tiny_config(num_steps=3), workdir, progress=False)
    assert first.step == 3 and first.status == "completed"
    resumed = train(tiny_config(log_every=1), workdir, progress=False)  # a log-only change: no warning
    out = capsys.readouterr().out
    assert "resuming" in out and "warning" not in out
    assert resumed.step == 6
    step, state, _ = _final_state(workdir)
    ref_step, ref, _ = _final_state(full_run[0])
    assert step == ref_step == 6
    jax.tree.map(np.testing.assert_array_equal, state, ref)  # parameters, statistics, optimizer states, key

    # already finished: nothing to do, nothing changes
    again = train(tiny_config(), workdir, progress=False)
    assert again.step == 6 and again.compile_s is None


def test_the_average_can_start_at_a_resumption_but_not_be_dropped(full_run, tmp_path, capsys):
    from cgn_jax.checkpoint import read_meta
    from cgn_jax.port.mnist import load_mnist_cgn
    from cgn_jax.train import mnist_step as S
    from cgn_jax.train.checkpointing import TrainCheckpoints
    from cgn_jax.train.mnist import train

    workdir = tmp_path / "ema"
    train(tiny_config(num_steps=3), workdir, progress=False)  # a run from before the average existed
    assert not (workdir / "generator_ema").exists()
    resumed = train(tiny_config(ema_decay=0.9), workdir, progress=False)
    assert resumed.step == 6
    assert "checkpoint 3 has no generator average; it starts here" in capsys.readouterr().out
    with TrainCheckpoints(workdir / "checkpoints") as ckpt:
        state, meta = ckpt.restore(S.init_state(tiny_config(ema_decay=0.9)), 6)
    assert meta["ema_decay"] == 0.9
    jax.tree.map(np.testing.assert_array_equal, state.generator, _final_state(full_run[0])[1].generator)
    assert read_meta(workdir / "generator_ema") == {**read_meta(workdir / "generator"), "ema_decay": 0.9}
    _, variables = load_mnist_cgn(workdir / "generator_ema")
    jax.tree.map(np.testing.assert_array_equal, variables, state.ema)
    assert (workdir / "samples" / "step_0000006_ema.png").is_file()
    assert not (workdir / "samples" / "step_0000003_ema.png").exists()

    with pytest.raises(ValueError, match=r"holds an average of the generator.*--config.train.ema_decay=0.9"):
        train(tiny_config(num_steps=9), workdir, progress=False)


def test_resuming_reads_the_checkpoint_metadata_once(full_run, monkeypatch):
    """The average check and the shape check share one metadata read (a slow call on remote storage)."""
    import orbax.checkpoint as ocp

    from cgn_jax.train import mnist_step as S
    from cgn_jax.train.checkpointing import TrainCheckpoints
    from cgn_jax.train.mnist import restore_state

    reads = []
    original = ocp.CheckpointManager.item_metadata
    monkeypatch.setattr(ocp.CheckpointManager, "item_metadata",
                        lambda self, step, *a, **k: reads.append(step) or original(self, step, *a, **k))
    config = tiny_config()
    with TrainCheckpoints(full_run[0] / "checkpoints") as ckpt:
        step = ckpt.latest_step()
        state = restore_state(ckpt, S.init_state(config), step, config, is_main=False)
    assert reads == [step]
    jax.tree.map(np.testing.assert_array_equal, state, _final_state(full_run[0])[1])


# Orbax reads a checkpoint's metadata as several TensorStore reads on a short-lived event loop;
# when one fails on the corrupt manifest it closes the loop, and the reads still in flight later
# complain that it is closed ("Exception ignored ... Event loop is closed"). The CLI exits first
# and shows nothing; here the test waits for them, so the complaint is not blamed on a later test.
@pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_training_checkpoint_is_a_clear_error(full_run, tmp_path, checkpoint_managers):
    """A corrupt manifest names the checkpoint and the way back to the one before it, and the
    checkpoint manager is closed before the error leaves `train` (no saver thread left behind)."""
    import gc
    import shutil

    from cgn_jax.checkpoint import CheckpointMismatchError
    from cgn_jax.train.mnist import train

    workdir = tmp_path / "damaged"
    shutil.copytree(full_run[0], workdir)
    steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    latest = workdir / "checkpoints" / str(steps[-1])
    for manifest in latest.rglob("manifest.ocdbt"):
        manifest.write_bytes(b"garbage")
    with pytest.raises(CheckpointMismatchError,
                       match=rf"checkpoint .*{steps[-1]} is unreadable, corrupt or incomplete .*; "
                             rf"delete .*{steps[-1]} to resume from checkpoint {steps[-2]}, or use a new --workdir"):
        train(tiny_config(num_steps=9), workdir, progress=False)
    assert checkpoint_managers.closed == checkpoint_managers.opened and len(checkpoint_managers.opened) == 1
    time.sleep(1.0)  # the orphaned reads (see above) finish well within this
    gc.collect()


def test_a_failed_final_export_closes_the_manager_and_the_next_run_finishes_it(tmp_path, monkeypatch,
                                                                               checkpoint_managers):
    """A full disk at the export after the loop (the raw generator written, the average not): the
    error reaches the caller, the manager is closed (no saver thread left behind) and the
    checkpoint is on disk, so the same command writes the missing export without training again."""
    from cgn_jax.checkpoint import read_meta
    from cgn_jax.train import mnist

    real_export = mnist.export_generator

    def full_disk_at_the_average(dst, *args, **kwargs):
        if dst.name == "generator_ema":
            raise OSError(28, "No space left on device")
        return real_export(dst, *args, **kwargs)

    config = tiny_config(num_steps=2, sample_every=0, checkpoint_every=0, ema_decay=0.9)
    with monkeypatch.context() as patch:
        patch.setattr(mnist, "export_generator", full_disk_at_the_average)
        with pytest.raises(OSError, match="No space left"):
            mnist.train(config, tmp_path, progress=False)
    assert checkpoint_managers.closed == checkpoint_managers.opened and len(checkpoint_managers.opened) == 1
    assert read_meta(tmp_path / "generator")["step"] == 2 and read_meta(tmp_path / "generator_ema") == {}
    assert mnist.train(config, tmp_path, progress=False).step == 2
    assert read_meta(tmp_path / "generator_ema")["step"] == 2
    assert len(checkpoint_managers.opened) == 2 and checkpoint_managers.closed == checkpoint_managers.opened


def test_resuming_with_a_changed_hyperparameter_warns(tmp_path, capsys):
    from cgn_jax.train.mnist import _save_config

    _save_config(tiny_config(), tmp_path / "config.json")
    _save_config(tiny_config(num_steps=100, log_every=7), tmp_path / "config.json")
    assert capsys.readouterr().out == ""
    changed = tiny_config()
    changed.loss.mask = 0.5
    _save_config(changed, tmp_path / "config.json")
    assert "loss.mask" in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["mask"] == 0.5
    # a run started before the code gained a setting: named apart, not reported as a change
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["model"]["tanh_grad_floor"]
    (tmp_path / "config.json").write_text(json.dumps(stored))
    _save_config(changed, tmp_path / "config.json")
    out = capsys.readouterr().out
    assert "differs" not in out and "predates the setting(s) model.tanh_grad_floor=0.0" in out


def test_sigterm_writes_a_final_checkpoint_and_exits_cleanly(tmp_path):
    from cgn_jax.checkpoint import read_meta
    from cgn_jax.train.checkpointing import TrainCheckpoints

    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cgn_jax.cli", "train", f"--workdir={workdir}", "--no-progress",
           f"--config.dataset.limit={LIMIT}", f"--config.train.batch_size={BATCH}", "--config.train.num_steps=10000",
           "--config.train.log_every=1", "--config.train.sample_every=0", "--config.train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, env=_subprocess_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 600
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    with TrainCheckpoints(workdir / "checkpoints") as ckpt:
        step = ckpt.latest_step()
    assert step is not None and 2 <= step < 10000
    assert read_meta(workdir / "generator")["step"] == step


def test_the_loop_makes_no_implicit_host_transfers(tmp_path, monkeypatch, checkpoint_managers):
    """The step runs under jax.transfer_guard("disallow"): a host round-trip in it is an error, not a slowdown.
    The error leaves `train` with the checkpoint manager closed, as at a failed resume."""
    from cgn_jax.train import mnist, mnist_step

    real = mnist_step.pmap_train_step

    def leaky_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def run(rstate, metrics_sum, ctx):
            # a careless loop: the metrics round-trip through host numpy arrays every step
            return step(rstate, jax.tree.map(np.asarray, metrics_sum), ctx)
        return run

    monkeypatch.setattr(mnist_step, "pmap_train_step", leaky_step)
    config = tiny_config(num_steps=2, sample_every=0, checkpoint_every=0)
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device"):
        mnist.train(config, tmp_path / "guarded", progress=False)
    assert checkpoint_managers.closed == checkpoint_managers.opened and len(checkpoint_managers.opened) == 1
    config.train.transfer_guard = "allow"
    assert mnist.train(config, tmp_path / "unguarded", progress=False).step == 2
    config.train.transfer_guard = "sometimes"
    with pytest.raises(ValueError, match="transfer_guard"):
        mnist.check_config(config)


@pytest.mark.slow
def test_bfloat16_compute_trains(tmp_path):
    from cgn_jax.train.mnist import train

    config = tiny_config(num_steps=4, compute_dtype="bfloat16", sample_every=0, checkpoint_every=0)
    result = train(config, tmp_path, progress=False)
    assert result.step == 4 and all(np.isfinite(list(result.last_metrics.values())))
    _, state, _ = _final_state(tmp_path)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.generator.params))


def test_snapshot_steps_keep_earlier_generators_beside_the_final_one(tmp_path):
    """train.snapshot_steps: the generator and its average at those steps stay in snapshots/step_N/
    (for pooling with the final one) while generator/ moves on; steps outside the run are refused."""
    from cgn_jax.checkpoint import read_meta, restore_variables
    from cgn_jax.train import mnist

    config = tiny_config(num_steps=3, sample_every=0, checkpoint_every=0, ema_decay=0.9)
    config.train.snapshot_steps = (1, 2)
    assert mnist.train(config, tmp_path, progress=False).step == 3
    for name in ("generator", "generator_ema"):
        assert read_meta(tmp_path / name)["step"] == 3
        assert [read_meta(tmp_path / "snapshots" / f"step_{n}" / name)["step"] for n in (1, 2)] == [1, 2]
    early = restore_variables(tmp_path / "snapshots" / "step_1" / "generator_ema")
    final = restore_variables(tmp_path / "generator_ema")
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(early), jax.tree.leaves(final)))
    config.train.snapshot_steps = (2, 9)
    with pytest.raises(mnist.ScheduleError, match=r"snapshot_steps \[9\] fall outside this run's steps 1-3"):
        mnist.train(config, tmp_path / "late", progress=False)
    from cgn_jax.config_loading import load_config

    for text, steps in (("30000,35000", (30000, 35000)), ("30000", (30000,)), ("soon", ("soon",))):
        assert load_config("configs/mnist.py:wildlife", [f"--config.train.snapshot_steps={text}"]).train.snapshot_steps \
            == steps
    with pytest.raises(ValueError, match="give whole steps"):
        mnist.check_config(load_config("configs/mnist.py:wildlife", ["--config.train.snapshot_steps=soon"]))
