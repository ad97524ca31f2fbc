"""ImageNet CGN on the CPU with random tiny networks: losses, texture patches, training, generation.

Everything runs on a 64x64 BigGAN-deep with 4 base channels and 16 classes and a
U2-Net with two-layer RSU blocks (registered here as "u2net_tiny"; the real U2-Net
variants compile for minutes on a CPU). The compiled training step is shared between
tests through `cgn_jax.train.imagenet.train_step_fn`'s cache, so the default run
compiles it once. The multi-device and accumulation checks run in a subprocess with 8
simulated CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cgn_jax import losses as L  # noqa: E402
from cgn_jax import parallel  # noqa: E402
from cgn_jax import texture_patches as TP  # noqa: E402
from cgn_jax.models import imagenet_cgn as M  # noqa: E402
from cgn_jax.models import u2net as U  # noqa: E402
from cgn_jax.train import imagenet as T  # noqa: E402
from cgn_jax.train import imagenet_step as S  # noqa: E402
from configs.imagenet import get_config  # noqa: E402

TINY_U2NET = "u2net_tiny"
_r = U._rsu
TINY_U2NET_STAGES = (  # the U2-Net topology (6 encoder + 5 decoder stages) with RSU-2 blocks and 4-8 channels
    _r("stage1", 2, 3, 4, 8), _r("stage2", 2, 8, 4, 8), _r("stage3", 2, 8, 4, 8), _r("stage4", 2, 8, 4, 8),
    _r("stage5", 2, 8, 4, 8, dilated=True), _r("stage6", 2, 8, 4, 8, dilated=True),
    _r("stage5d", 2, 16, 4, 8, dilated=True), _r("stage4d", 2, 16, 4, 8), _r("stage3d", 2, 16, 4, 8),
    _r("stage2d", 2, 16, 4, 8), _r("stage1d", 2, 16, 4, 8))
TEST_LR = 1e-3  # larger than the official lrs so a few updates visibly lower the loss


def register_tiny_u2net():
    U.VARIANTS.setdefault(TINY_U2NET, TINY_U2NET_STAGES)


def tiny_config(per_device_batch=1, effective_batch=2, **train):
    register_tiny_u2net()
    c = get_config("tiny")
    c.model.u2net_variant = TINY_U2NET
    c.model.arch.layers = ((True, 16, 8), (True, 8, 4), (True, 4, 2), (True, 2, 1))
    c.model.arch.attention_layer_position = 2
    c.optim.lr_shape = c.optim.lr_texture = c.optim.lr_background = TEST_LR
    c.train.per_device_batch = per_device_batch
    c.train.effective_batch = effective_batch
    c.train.sample_every = 0
    for k, v in train.items():
        c.train[k] = v
    return c


def one_device():
    return jax.local_devices()[:1]


# ---------------------------------------------------------------------------- config and losses

def test_config_has_official_weights_and_lrs():
    c = get_config("")
    assert c.family == "imagenet" and c.model.biggan == "" and c.model.arch.output_dim == 256
    lc = S.LossConfig.from_config(c.loss)
    assert (lc.l1, lc.binary, lc.mask, lc.bg) == (100.0, 300.0, 500.0, 2000.0)
    assert lc.perc_style == (4.0,) * 4 and lc.perc_content == (0.0,) * 4  # LAMBDA.PERC are style weights
    assert lc.text_style == (0.0, 5.0, 5.0, 0.0) and lc.mask_interval == (0.1, 0.9)
    assert (lc.text_patch, lc.text_top, lc.text_grid, lc.text_work_size) == (15, 100, 6, 128)
    assert (c.optim.lr_shape, c.optim.lr_texture, c.optim.lr_background) == (8e-6, 3e-5, 1e-5)
    assert c.train.effective_batch == 4000 and c.model.truncation == 1.0
    r = get_config("random,bf16,remat")
    assert r.model.biggan == r.model.u2net == r.loss.vgg_weights == "random"
    assert r.train.compute_dtype == "bfloat16" and r.model.remat
    with pytest.raises(ValueError, match="unknown imagenet config option"):
        get_config("huge")
    assert c.model.spectral_norm == "folded" and get_config("tiny,sn_power").model.spectral_norm == "power_iteration"
    bad = get_config("tiny")
    bad.model.spectral_norm = "power"
    with pytest.raises(ValueError, match="power_iteration"):
        T.check_config(bad)


def test_accumulation_steps_and_errors():
    c = get_config("")
    c.train.per_device_batch = 16
    assert S.accum_steps(c, 1) == 250
    c.train.per_device_batch = 32
    with pytest.raises(ValueError, match="effective_batch=4000 is not a multiple"):
        S.accum_steps(c, 8)


def test_loss_terms_behave_as_specified():
    lc = S.LossConfig()
    # background loss: weight x mean saliency, so it falls as the background's saliency falls
    sal = [jnp.full((2, 8, 8, 1), s) for s in (0.9, 0.5, 0.1, 0.0)]
    bg = [float(L.background_loss(s, lc.bg)) for s in sal]
    assert bg == sorted(bg, reverse=True) and bg[-1] == 0.0 and np.isclose(bg[0], 0.9 * 2000)
    # mask loss: zero while the mean mask is inside [0.1, 0.9], linear outside
    for m in (0.11, 0.3, 0.5, 0.89):
        assert float(L.mask_interval_loss(jnp.full((2, 8, 8, 1), m), lc.mask, lc.mask_interval)) == 0.0
    assert np.isclose(float(L.mask_interval_loss(jnp.full((1, 8, 8, 1), 0.05), lc.mask, lc.mask_interval)), 500 * 0.05)
    assert np.isclose(float(L.mask_interval_loss(jnp.full((1, 8, 8, 1), 0.95), lc.mask, lc.mask_interval)), 500 * 0.05)
    # binary entropy: largest for a grey mask, ~0 for a clamped binary one
    grey = float(L.binary_entropy_loss(jnp.full((1, 8, 8, 1), 0.5), lc.binary))
    binary = float(L.binary_entropy_loss(jnp.full((1, 8, 8, 1), M.MASK_CLAMP[1]), lc.binary))
    assert np.isclose(grey, 300.0) and binary < 0.01 * grey


# ---------------------------------------------------------------------------- texture patches

def test_bicubic_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, 3, 90, 90)).astype(np.float32)
    for size in (128, 64, 256):
        ref = torch.nn.functional.interpolate(torch.from_numpy(x), (size, size), mode="bicubic", align_corners=False)
        got = TP.resize_bicubic(jnp.asarray(x.transpose(0, 2, 3, 1)), size)
        np.testing.assert_allclose(np.asarray(got), ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def _square_mask(size=128, box=(70, 110, 20, 60)):
    m = np.zeros((size, size, 1), np.float32)
    r0, r1, c0, c1 = box
    m[r0:r1, c0:c1] = 1.0
    return m, box


def test_texture_windows_come_from_high_mask_region():
    mask, (r0, r1, c0, c1) = _square_mask()
    for seed in range(3):
        rows, cols = TP.sample_windows(jax.random.PRNGKey(seed), jnp.asarray(mask), 15, 100, 36)
        rows, cols = np.asarray(rows), np.asarray(cols)
        assert rows.shape == cols.shape == (36,)
        assert (rows >= r0).all() and (rows + 15 <= r1).all() and (cols >= c0).all() and (cols + 15 <= c1).all()
    # the image behind the grid: +1 under the mask, -1 elsewhere -> the patch grid is all object
    image = np.where(mask > 0, 1.0, -1.0).repeat(3, axis=-1).astype(np.float32)
    grid = TP.sample_patch_grids(jax.random.PRNGKey(0)[None], jnp.asarray(mask)[None], jnp.asarray(image)[None])
    assert grid.shape == (1, 128, 128, 3)
    np.testing.assert_allclose(np.asarray(grid), 1.0, atol=1e-5)


def test_patch_sampling_vmapped_equals_per_image_loop():
    rng = np.random.default_rng(1)
    masks = jnp.asarray(rng.uniform(size=(3, 64, 64, 1)).astype(np.float32))
    images = jnp.asarray(rng.uniform(-1, 1, size=(3, 64, 64, 3)).astype(np.float32))
    keys = jax.random.split(jax.random.PRNGKey(2), 3)
    batched = np.asarray(TP.sample_patch_grids(keys, masks, images))
    one = jax.jit(lambda k, m, x: TP.patch_grid(k, m, x, out_size=64))
    looped = np.stack([np.asarray(one(keys[i], masks[i], images[i])) for i in range(3)])
    assert batched.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(batched, looped, atol=1e-6)
    assert not np.allclose(batched[0], batched[1])  # each image gets its own patches


# ---------------------------------------------------------------------------- model

@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    biggan_config, nets, sources = M.load_networks(config.model, 0)
    model = M.from_config(config.model, biggan_config)
    return model, nets, sources


def test_model_forward(tiny_model):
    model, nets, sources = tiny_model
    assert sources == {"biggan": "random:0", "u2net": "random:0"}
    params = M.initial_params(nets)
    u = model.sample_noise(jax.random.PRNGKey(0), 2, 1.0)
    y = jnp.array([1, 5])
    out = jax.jit(lambda p, n, u, y, t, b: model(p, n, u, y, t, b, model.stats(1.0)))(
        params, nets, u, y, jnp.array([2, 3]), jnp.array([4, 6]))
    for k in ("x_gt", "premask", "texture", "background", "composite"):
        assert out[k].shape == (2, 64, 64, 3) and np.isfinite(np.asarray(out[k])).all(), k
    assert out["mask"].shape == out["bg_saliency"].shape == (2, 64, 64, 1)
    mask = np.asarray(out["mask"])
    assert mask.min() >= np.float32(1e-4) and mask.max() <= np.float32(1 - 1e-4)
    np.testing.assert_allclose(out["composite"], mask * out["texture"] + (1 - mask) * out["background"], atol=1e-6)
    # all mechanisms start as the pretrained BigGAN: same labels -> premask == x_gt
    np.testing.assert_allclose(out["x_gt"], out["premask"], atol=1e-6)
    assert not np.allclose(out["texture"], out["background"])  # per-mechanism labels


def test_remat_biggan_matches_plain(tiny_model):
    model, nets, _ = tiny_model
    remat = M.ImageNetCGN(model.biggan_config, model.u2net_variant, remat=True)
    u = model.sample_noise(jax.random.PRNGKey(3), 2, 1.0)
    y = jnp.array([0, 7])
    ts = model.stats(0.5)
    f = lambda m: jax.jit(lambda p, n: m.generate(p, n, u, y, ts))(nets["biggan"]["params"], nets)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(f(model)), np.asarray(f(remat)))


def sn_config(**train):
    config = tiny_config(**train)
    config.model.spectral_norm = "power_iteration"
    return config


def test_power_iteration_mechanisms_start_as_x_gt_and_update_uv():
    """The frozen x_gt BigGAN is the fold of the mechanisms' start: equal in eval mode; train mode iterates."""
    config = sn_config()
    biggan_config, nets, _ = M.load_networks(config.model, 0)
    model = M.from_config(config.model, biggan_config)
    assert model.power_iteration and model.gt_biggan.spectral_norm == "folded"
    params, spectral = M.initial_mechanisms(config.model, nets, 0)
    assert set(params) == set(spectral) == set(M.MECHANISMS)
    assert params["shape"]["conv_to_rgb"]["kernel"].shape == (3, 3, 4, 4)  # all outputs: sigma of the full matrix
    assert nets["biggan"]["params"]["conv_to_rgb"]["kernel"].shape == (3, 3, 4, 3)
    u = model.sample_noise(jax.random.PRNGKey(0), 2, 1.0)
    y = jnp.array([1, 5])
    ts = model.stats(1.0)

    @jax.jit
    def run(p, s):
        gt = model.generate_gt(nets, u, y, ts)
        ev = model.generate(p, nets, u, y, ts, s)
        tr, new = model.generate(p, nets, u, y, ts, s, update_spectral=True)
        return gt, ev, tr, new

    gt, ev, tr, new = run(params["shape"], spectral["shape"])
    assert np.isfinite(np.asarray(tr)).all() and np.asarray(gt).std() > 0.05
    np.testing.assert_allclose(ev, gt, atol=1e-5)
    changed = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(new),
                                                                      jax.tree.leaves(spectral["shape"]))]
    assert max(changed) > 1e-3
    with pytest.raises(ValueError, match="spectral"):
        model.generate(params["shape"], nets, u, y, ts)


def test_resuming_across_spectral_norm_modes_is_refused(tmp_path):
    from cgn_jax.checkpoint import CheckpointMismatchError
    from cgn_jax.train.checkpointing import TrainCheckpoints

    config = tiny_config()
    spec, frozen, _ = T.build(config, one_device())
    with TrainCheckpoints(tmp_path / "run" / "checkpoints") as ckpt:  # a folded run's checkpoint
        ckpt.save(2, S.init_state(config, M.initial_params(frozen.nets), spec.accum), {"accum": spec.accum})
    with pytest.raises(CheckpointMismatchError, match="spectral_norm=power_iteration"):
        T.train(sn_config(), tmp_path / "run", devices=one_device(), progress=False)


# ---------------------------------------------------------------------------- training

def _run_updates(config, rstate, rfrozen, spec, devices, n, fixed_batch=False):
    step = T.train_step_fn(config, spec, devices)
    history = []
    for _ in range(n):
        msum = parallel.replicate(S.zero_metrics(), devices)
        for _ in range(spec.accum):
            rstate, msum = step(rstate, msum, rfrozen)
        history.append({k: float(v) / spec.accum for k, v in parallel.to_host(msum).items()})
        if fixed_batch:  # examples depend on (key, update): rewinding the counter repeats the batch
            rstate = rstate.replace(step=jnp.zeros_like(rstate.step))
    return rstate, history


def test_losses_finite_and_decreasing_on_fixed_batch():
    config = tiny_config()
    devices = one_device()
    spec, frozen, _ = T.build(config, devices)
    assert spec.accum == 2
    state = S.init_state(config, M.initial_params(frozen.nets), spec.accum)
    rstate = parallel.replicate(state, devices)
    _, history = _run_updates(config, rstate, parallel.replicate(frozen, devices), spec, devices, 3, fixed_batch=True)
    for h in history:
        assert all(np.isfinite(v) for v in h.values()), h
        assert np.isclose(h["g_loss"], sum(h[k] for k in ("l1", "perc", "binary", "mask", "text", "bg")), rtol=1e-5)
    g = [h["g_loss"] for h in history]
    assert all(b < a for a, b in zip(g, g[1:])), g
    # every mechanism starts as the pretrained BigGAN, so the first composite is x_gt itself
    assert history[0]["l1"] < 1e-3 and history[0]["perc"] < 1e-3


def _latest_params(workdir):
    from cgn_jax.checkpoint import restore_variables

    return jax.tree.map(np.asarray, restore_variables(Path(workdir) / "cgn")["params"])


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """Two updates straight, and one update then a resumed second: (straight, resumed) workdirs."""
    root = tmp_path_factory.mktemp("imagenet_train")
    config = tiny_config(num_steps=2, checkpoint_every=0, log_every=1)
    T.train(config, root / "straight", devices=one_device(), progress=False)
    first = tiny_config(num_steps=1, checkpoint_every=0, log_every=1)
    T.train(first, root / "resumed", devices=one_device(), progress=False)
    result = T.train(config, root / "resumed", devices=one_device(), progress=False)
    assert result.status == "completed" and result.step == 2 and result.micro_step == 4
    return root / "straight", root / "resumed"


def test_resume_is_exact(trained_workdir):
    straight, resumed = trained_workdir
    a, b = _latest_params(straight), _latest_params(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    rec = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [1, 2]
    np.testing.assert_allclose([r["g_loss"] for r in rec], [r["g_loss"] for r in ref], rtol=1e-6)
    ckpt = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpt == [2, 4]  # keyed by micro-step
    meta = json.loads((straight / "cgn" / "meta.json").read_text())
    assert meta["sources"]["biggan"] == "random:0" and meta["update"] == 2
    assert (straight / "plots" / "losses.png").is_file()


def test_generate_dataset_sheets_and_interpolation(trained_workdir, tmp_path):
    from argparse import Namespace

    from cgn_jax import generate_imagenet as G

    config = tiny_config()
    args = Namespace(checkpoint=str(trained_workdir[0]), out=str(tmp_path), sheet=True, dataset=True, num_images=5,
                     batch_size=4, seed=0, mode="random", classes=None, run_name="t", truncation=None,
                     interp="texture", interp_cls=3, midpoints=2, gif=True, gif_frames=4)
    assert G.run(args, config) == 0
    with open(tmp_path / "labels.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == list(G.CSV_HEADER) and len(rows) == 6
    assert rows[1][0] == "t_0000000" and all(0 <= int(c) < 16 for r in rows[1:] for c in r[1:])
    ims = sorted(p.name for p in (tmp_path / "ims").iterdir())
    assert "t_0000004_x_gen.jpg" in ims and "t_0000000_x_gen_interp.jpg" in ims
    assert "t_0000000_texture_interp.jpg" in ims and "t_0000000_interp.gif" in ims
    assert (tmp_path / "class_sheet.png").is_file()
    from PIL import Image

    with Image.open(tmp_path / "ims" / "t_0000000_x_gen.jpg") as im:
        assert im.size == (64, 64)
    with Image.open(tmp_path / "ims" / "t_0000000_x_gen_interp.jpg") as im:
        assert im.size == (4 * 64 + 3 * 2, 64)
    with Image.open(tmp_path / "ims" / "t_0000000_interp.gif") as gif:
        assert gif.n_frames > 2
    # fixed classes go to the CSV unchanged
    fixed = G.sample_classes(np.random.default_rng(0), "fixed_classes", 3, 16, (1, 2, 3))
    assert fixed.tolist() == [[1, 2, 3]] * 3


def _restored_state(workdir, config):
    """The latest checkpoint of `workdir` as a host SpectralTrainState."""
    from cgn_jax.train.checkpointing import TrainCheckpoints

    spec, frozen, _ = T.build(config, one_device())
    params, spectral = M.initial_mechanisms(config.model, frozen.nets, 0)
    template = S.init_state(config, params, spec.accum, spectral)
    with TrainCheckpoints(Path(workdir) / "checkpoints") as ckpt:
        state, meta = ckpt.restore(template)
    return template, state, meta


@pytest.mark.slow
def test_power_iteration_training_resumes_exactly_and_generates(tmp_path):
    """model.spectral_norm=power_iteration: two updates (accumulation 2) straight vs one, resume, one."""
    from argparse import Namespace

    from cgn_jax import generate_imagenet as G
    from cgn_jax.checkpoint import restore_variables

    config = sn_config(num_steps=2, checkpoint_every=0, log_every=1)
    T.train(config, tmp_path / "straight", devices=one_device(), progress=False)
    T.train(sn_config(num_steps=1, checkpoint_every=0, log_every=1), tmp_path / "resumed", devices=one_device(),
            progress=False)
    result = T.train(config, tmp_path / "resumed", devices=one_device(), progress=False)
    assert result.status == "completed" and result.micro_step == 4
    init, straight, meta = _restored_state(tmp_path / "straight", config)
    _, resumed, _ = _restored_state(tmp_path / "resumed", config)
    assert isinstance(straight, S.SpectralTrainState) and meta["spectral_norm"] == "power_iteration"
    for x, y in zip(jax.tree.leaves((straight.params, straight.spectral, straight.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.spectral, resumed.opt_state))):
        np.testing.assert_array_equal(x, y)
    # u, v moved (4 micro-steps = 4 power iterations) and stay unit vectors; params moved too
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(straight.spectral),
                                                        jax.tree.leaves(init.spectral))]
    assert min(moved) > 0 and max(moved) > 1e-3
    assert all(abs(np.linalg.norm(x) - 1) < 1e-5 for x in jax.tree.leaves(straight.spectral))
    assert not np.array_equal(straight.params["shape"]["gen_z"]["kernel"], init.params["shape"]["gen_z"]["kernel"])
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["g_loss"]) for r in records)
    rec = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["g_loss"] for r in rec], [r["g_loss"] for r in records], rtol=1e-6)
    # the export holds u, v; generation folds them (eval mode)
    export = restore_variables(tmp_path / "straight" / "cgn")
    jax.tree.map(np.testing.assert_array_equal, export["spectral"], straight.spectral)
    args = Namespace(checkpoint=str(tmp_path / "straight"), out=str(tmp_path / "gen"), sheet=True, dataset=False,
                     num_images=None, batch_size=4, seed=0, mode="random", classes=None, run_name="t",
                     truncation=None, interp="", interp_cls=-1, midpoints=None, gif=False, gif_frames=4)
    assert G.run(args, tiny_config()) == 0
    assert (tmp_path / "gen" / "class_sheet.png").is_file()
    model, params, nets, _ = G.load_cgn(tmp_path / "straight", tiny_config())
    assert params["shape"]["conv_to_rgb"]["kernel"].shape == (3, 3, 4, 3)  # folded


# ---------------------------------------------------------------------------- devices and accumulation

def _adam_first_moments(opt_state):
    """Adam's first moment per mechanism: (1 - b1) x the update's averaged gradient after one update."""
    inner = opt_state.inner_opt_state.inner_states
    return {name: inner[name].inner_state[0].mu[name] for name in M.MECHANISMS}


def _worker(out: str) -> None:
    """Subprocess body: one update of the same examples as (1 device, batch 4, accum 2),
    (1 device, batch 8) and (8 devices, batch 1 each); gradients, params and metrics to `out`."""
    devices = jax.local_devices()
    assert len(devices) == 8, devices
    results = {}
    for name, n_dev, pdb in (("accum", 1, 4), ("big", 1, 8), ("devices", 8, 1)):
        config = tiny_config(per_device_batch=pdb, effective_batch=8)
        devs = devices[:n_dev]
        spec, frozen, _ = T.build(config, devs)
        # mechanisms away from x_gt: at the pretrained init the composite equals x_gt up to rounding,
        # and the L1 gradient there is the sign of rounding noise, which differs between batch shapes
        params = {name: M.random_biggan(spec.model.biggan_config, 10 + i)["params"]
                  for i, name in enumerate(M.MECHANISMS)}
        state = S.init_state(config, params, spec.accum)
        rstate, history = _run_updates(config, parallel.replicate(state, devs), parallel.replicate(frozen, devs),
                                       spec, devs, 1)
        host = parallel.to_host(rstate)
        results.update({f"{name}/param/{i}": x for i, x in enumerate(jax.tree.leaves(host.params))})
        moments = jax.tree.leaves(_adam_first_moments(host.opt_state))
        results.update({f"{name}/grad/{i}": x for i, x in enumerate(moments)})
        results.update({f"{name}/metric/{k}": np.float64(v) for k, v in history[0].items()})
    np.savez(out, **results)


@pytest.mark.slow
def test_accumulation_and_eight_devices_match_one(tmp_path):
    out = tmp_path / "res.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, __file__, "worker", str(out)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = np.load(out)
    leaves = sorted({k.split("/")[2] for k in res.files if k.startswith("big/grad/")}, key=int)
    metrics = [k.split("/")[2] for k in res.files if k.startswith("big/metric/")]
    for other in ("accum", "devices"):
        for k in metrics:
            np.testing.assert_allclose(res[f"{other}/metric/{k}"], res[f"big/metric/{k}"], rtol=1e-4, atol=1e-5,
                                       err_msg=k)
        for i in leaves:
            g, g_big = res[f"{other}/grad/{i}"], res[f"big/grad/{i}"]
            scale = np.abs(g_big).max() + 1e-30
            # the update's averaged gradient: equal up to float32 summation order (measured: at most
            # 2.5e-4 of the leaf's largest entry, where many terms cancel)
            np.testing.assert_allclose(g, g_big, rtol=1e-3, atol=1e-3 * scale, err_msg=f"{other} grad {i}")
            # Adam's first step is ~lr * sign(grad): only where the gradient is zero up to rounding
            # may the parameters differ (by up to 2 lr)
            diff = np.abs(res[f"{other}/param/{i}"] - res[f"big/param/{i}"])
            assert diff.max() <= 2.001 * TEST_LR, (other, i)
            flipped = diff > 1e-2 * TEST_LR
            assert (np.abs(g_big[flipped]) <= 1e-4 * scale).all(), (other, i, np.abs(g_big[flipped]).max() / scale)


def _sn_worker(out: str) -> None:
    """Subprocess body: one power-iteration micro-step on 2 devices; every replica's state to `out`."""
    devices = jax.local_devices()[:2]
    assert len(devices) == 2, devices
    config = sn_config(per_device_batch=1, effective_batch=4)  # accumulation 2: a micro-step, no update yet
    spec, frozen, _ = T.build(config, devices)
    params, spectral = M.initial_mechanisms(config.model, frozen.nets, 0)
    state = S.init_state(config, params, spec.accum, spectral)
    rstate = parallel.replicate(state, devices)
    step = T.train_step_fn(config, spec, devices)
    for _ in range(2):  # the second micro-step applies the first update
        rstate, _ = step(rstate, parallel.replicate(S.zero_metrics(), devices), parallel.replicate(frozen, devices))
    res = {}
    for what, tree in (("spectral", rstate.spectral), ("params", rstate.params), ("init", state.spectral)):
        res.update({f"{what}/{i}": np.asarray(jax.device_get(x)) for i, x in enumerate(jax.tree.leaves(tree))})
    np.savez(out, **res)


@pytest.mark.slow
def test_power_iteration_state_stays_identical_across_devices(tmp_path):
    out = tmp_path / "sn.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, __file__, "sn_worker", str(out)], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = np.load(out)
    spectral = [k for k in res.files if k.startswith("spectral/")]
    params = [k for k in res.files if k.startswith("params/")]
    assert spectral and params
    for k in spectral + params:
        assert res[k].shape[0] == 2
        np.testing.assert_array_equal(res[k][0], res[k][1], err_msg=k)  # replicas agree bit for bit
    assert max(np.abs(res[k][0] - res[k.replace("spectral", "init")]).max() for k in spectral) > 1e-3


@pytest.mark.slow
def test_training_sample_sheet_and_remat_gradients(tmp_path, tiny_model):
    model, nets, _ = tiny_model
    config = tiny_config(num_steps=1, sample_every=1, checkpoint_every=1)
    config.model.remat = True
    T.train(config, tmp_path / "run", devices=one_device(), progress=False)
    assert (tmp_path / "run" / "samples" / "update_000001.png").is_file()
    remat = M.ImageNetCGN(model.biggan_config, model.u2net_variant, remat=True)
    u = model.sample_noise(jax.random.PRNGKey(3), 2, 1.0)
    y = jnp.array([0, 7])
    grad = lambda m: jax.jit(jax.grad(lambda p: m.generate(p, nets, u, y, m.stats(1.0)).sum()))(  # noqa: E731
        nets["biggan"]["params"])
    for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(remat))):
        # recomputation may fuse differently: equal up to float32 rounding of the leaf's scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * (np.abs(a).max() + 1e-30))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "sn_worker":
    _sn_worker(sys.argv[2])
