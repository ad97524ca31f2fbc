"""Tests of the Table 1 classifier: model, optimiser schedule, IRM, data, on-the-fly batches, CLI.

They use the real MNIST files and the official colored-MNIST generator from ../shared (via
the conftest fixtures) with small `limit=` TFDS builds in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cgn_jax import irm  # noqa: E402
from cgn_jax.models.classifier import CNN, init_variables  # noqa: E402
from cgn_jax.train import classifier as C  # noqa: E402

N_SMALL = 3000  # examples in the small builds (train and test)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def colored_envs(mnist_dir, tfds_dir):
    return irm.build_environments("colored", irm.ENVIRONMENTS[5], mnist_dir=mnist_dir, data_dir=tfds_dir,
                                  limit=N_SMALL)


@pytest.fixture(scope="module")
def colored_generator(cgn_weights):
    from cgn_jax.port.mnist import load_torch_mnist_cgn
    from cgn_jax.models.mnist_cgn import MnistCGN

    return C.Generator(MnistCGN(), load_torch_mnist_cgn(cgn_weights / "colored_MNIST.pth"))


# ---------------------------------------------------------------- model
def test_cnn_is_the_official_architecture():
    model = CNN()
    variables = jax.jit(lambda k: init_variables(model, k))(jax.random.PRNGKey(0))
    shapes = jax.tree.map(jnp.shape, variables["params"])
    assert shapes["conv1"] == {"kernel": (5, 5, 3, 32), "bias": (32,)}
    assert shapes["conv3"] == {"kernel": (3, 3, 32, 64), "bias": (64,)}
    assert shapes["fc"] == {"kernel": (64, 10), "bias": (10,)}
    # parameter count of the official torch CNN (BatchNorm2d(3) + 4 convs + Linear(64, 10))
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 67760
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    out = jax.jit(model.apply)(variables, x)
    assert out.shape == (4, 10)
    np.testing.assert_allclose(jnp.exp(out).sum(-1), 1.0, rtol=1e-5)
    # torch default init: |w| <= 1/sqrt(fan_in)
    assert float(jnp.abs(variables["params"]["conv1"]["kernel"]).max()) <= 1 / np.sqrt(75) + 1e-6
    # the official head averages the top-left 7x7 of the 8x8 map, so the last row/column do not count
    g = jax.jit(CNN(pool="global").apply)(variables, x)
    assert not np.allclose(out, g)
    with pytest.raises(ValueError, match="unknown classifier pool"):
        jax.eval_shape(CNN(pool="max").apply, variables, x)


# ---------------------------------------------------------------- optimiser
def test_steplr_schedule_and_adadelta_match_torch():
    setup = C.ClassifierSetup("colored", mode="original")
    sched = C.make_schedule(setup, 100)
    for step, lr in [(0, 1.0), (99, 1.0), (100, 0.7), (250, 0.49), (999, 0.7 ** 9)]:
        assert float(sched(step)) == pytest.approx(lr, rel=1e-6)
    # torch.optim.Adadelta (rho 0.9, eps 1e-6) with StepLR(gamma 0.7), by hand, 2 steps per epoch
    tx = C.make_optimizer(setup, 2)
    p = jnp.array([1.5])
    state = tx.init(p)
    sq, acc, ref = 0.0, 0.0, 1.5
    for t in range(5):
        g = 2 * ref  # d/dp p^2
        sq = 0.9 * sq + 0.1 * g * g
        delta = np.sqrt(acc + 1e-6) / np.sqrt(sq + 1e-6) * g
        acc = 0.9 * acc + 0.1 * delta * delta
        ref = ref - 0.7 ** (t // 2) * delta
        upd, state = tx.update(2 * p, state, p)
        p = p + upd
        assert float(p[0]) == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------- IRM
def test_irm_penalty_zero_when_scale_is_optimal():
    # labels drawn exactly in proportion to the predicted probabilities: rescaling cannot help
    counts = np.array([5, 1, 2, 3, 1, 4, 1, 1, 1, 1])
    logits = jnp.log(jnp.asarray(counts, jnp.float32) / counts.sum())
    labels = jnp.asarray(np.repeat(np.arange(10), counts))
    scores = jnp.tile(logits, (labels.shape[0], 1))
    penalty = jax.jit(irm.irm_penalty)
    assert float(penalty(scores, labels)) < 1e-10
    # over- and under-confident versions of the same predictor are penalised
    for scale in (0.5, 2.0):
        assert float(penalty(scale * scores, labels)) > 1e-3
    # logits and log-probabilities give the same penalty
    z = jax.random.normal(jax.random.PRNGKey(0), (32, 10)) * 3
    y = jax.random.randint(jax.random.PRNGKey(1), (32,), 0, 10)
    assert float(irm.irm_penalty(z, y)) == pytest.approx(float(irm.irm_penalty(jax.nn.log_softmax(z), y)), rel=1e-5)
    # annealing: weight 1 before `anneal_steps`, the full weight after; the loss is rescaled then
    assert float(irm.penalty_weight(jnp.int32(9), 1e4, 10)) == 1.0
    assert float(irm.penalty_weight(jnp.int32(10), 1e4, 10)) == 1e4
    lp = jnp.stack([jax.nn.log_softmax(z), jax.nn.log_softmax(2 * z)])
    ys = jnp.stack([y, y])
    objective = jax.jit(irm.irm_objective)
    loss1, (risk, pen) = objective(lp, ys, jnp.float32(1.0))
    loss2, _ = objective(lp, ys, jnp.float32(1e4))
    assert float(loss1) == pytest.approx(float(risk + pen), rel=1e-5)
    assert float(loss2) == pytest.approx(float((risk + 1e4 * pen) / 1e4), rel=1e-5)
    # rescale=False keeps the weighted sum (for optimisers that are not scale-invariant)
    loss3, _ = jax.jit(irm.irm_objective, static_argnums=3)(lp, ys, jnp.float32(1e4), False)
    assert float(loss3) == pytest.approx(float(risk + 1e4 * pen), rel=1e-5)
    # weight 0 (the ERM control): the plain risk, and gradients stay finite and equal to the risk's
    loss0, (risk0, _) = objective(lp, ys, jnp.float32(0.0))
    assert float(loss0) == pytest.approx(float(risk0), rel=1e-6)
    grad0 = jax.grad(lambda x: irm.irm_objective(x, ys, jnp.float32(0.0))[0])(lp)
    grad_risk = jax.grad(lambda x: irm.irm_objective(x, ys, jnp.float32(1.0))[1][0])(lp)
    assert bool(jnp.all(jnp.isfinite(grad0)))
    np.testing.assert_allclose(grad0, grad_risk, rtol=1e-5, atol=1e-8)


def test_environments_hit_their_correlation(colored_envs):
    specs = irm.environment_specs(irm.ENVIRONMENTS[5])
    assert specs == [(0.9, 0), (0.925, 1), (0.95, 2), (0.975, 3), (1.0, 0)]
    env = colored_envs
    assert env["fg_label"].shape == (5, N_SMALL) and env["digit"].shape == (N_SMALL, 32, 32, 1)
    for e, target in enumerate(irm.ENVIRONMENTS[5]):
        got = irm.measured_correlation(env["label"], env["fg_label"][e])
        assert abs(got - target) <= 0.02, (target, got)
    # environments differ in the cue labels, not in the digits
    assert not np.array_equal(env["fg_label"][0], env["fg_label"][1])


def test_joint_cues_give_both_cues_one_label():
    """irm_joint_cues: every environment's background label becomes its foreground label (so each cue
    keeps its correlation and the pair is wrong together); off, the labels pass unchanged."""
    rng = np.random.default_rng(0)
    n = 4000
    labels = rng.integers(0, 10, n)
    cue = {c: np.where(rng.random((2, n)) < c, labels, (labels + rng.integers(1, 10, (2, n))) % 10) for c in (0.9, 1.0)}
    data = {"digit": np.zeros((n, 32, 32, 1), np.uint8), "label": labels,
            "fg_label": np.stack([cue[0.9][0], cue[1.0][0]]), "bg_label": np.stack([cue[0.9][1], cue[1.0][1]]),
            "test_image": np.zeros((8, 32, 32, 3), np.uint8), "test_label": np.zeros(8, np.int32)}
    assert 0.005 < np.mean((data["fg_label"][0] != labels) & (data["bg_label"][0] != labels)) < 0.02  # independent
    for joint in (False, True):
        setup = C.ClassifierSetup("double_colored", mode="original", irm_correlations=(0.9, 1.0), irm_joint_cues=joint)
        host, _ = C.prepare_data(data, setup, 1, {})
        np.testing.assert_array_equal(host["bg_label"], data["fg_label" if joint else "bg_label"])
        np.testing.assert_array_equal(host["fg_label"], data["fg_label"])
    both_wrong = (host["fg_label"][0] != labels) & (host["bg_label"][0] != labels)
    assert abs(np.mean(both_wrong) - 0.1) < 0.015 and abs(irm.measured_correlation(labels, host["bg_label"][0]) - 0.9) < 0.015
    with pytest.raises(C.SetupError, match="colored MNIST has one cue"):
        C.ClassifierSetup("colored", mode="original", irm_correlations=(0.9, 1.0), irm_joint_cues=True)
    with pytest.raises(C.SetupError, match="set irm_correlations too"):
        C.ClassifierSetup("wildlife", mode="original", irm_joint_cues=True)


# ---------------------------------------------------------------- batches
def _toy_data(n=256, m=64, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 10, n).astype(np.int32)
    return {"digit": rng.integers(0, 256, (n, 32, 32, 1)).astype(np.uint8), "label": label,
            "fg_label": label[None], "bg_label": label[None],
            "test_image": rng.integers(0, 256, (m, 32, 32, 3)).astype(np.uint8),
            "test_label": rng.integers(0, 10, m).astype(np.int32)}


def test_on_the_fly_counterfactual_batches(colored_generator):
    from cgn_jax.data import make_assets
    from cgn_jax.generate import sample_counterfactuals

    model, variables = colored_generator
    assets = make_assets("colored")
    for num_cfs in (2,):  # several counterfactuals per shape: checks their order too
        setup = C.ClassifierSetup("colored", mode="original+cgn", num_cfs=num_cfs, batch_size=16)
        plan = C.batch_plan(setup, 1)
        assert plan == C.BatchPlan(8, 8, 1)
        host, _ = C.prepare_data(_toy_data(), setup, 1, assets)
        data = jax.tree.map(jnp.asarray, host)
        perms = C._epoch_permutations(jax.random.PRNGKey(3), setup, host["digit"].shape[0], 0)
        make = jax.jit(lambda key, step: C.training_batch(key, step, perms, data, variables, setup=setup,
                                                          plan=plan, gen_model=model))
        key = jax.random.PRNGKey(7)
        b0, b1 = make(key, 0), make(jax.random.PRNGKey(8), 1)
        assert b0["image"].shape == (16, 32, 32, 3) and b0["label"].dtype == jnp.int32
        # real part: the labels of the digits this step's slice of the permutation picked
        np.testing.assert_array_equal(b0["label"][:8], host["label"][np.asarray(perms["real"][0][:8])])
        np.testing.assert_array_equal(b1["label"][:8], host["label"][np.asarray(perms["real"][0][8:16])])
        # generated part: exactly the generator's counterfactuals for the step's key, labelled by shape
        ref = sample_counterfactuals(model, variables, jax.random.split(key)[1], 8 // num_cfs, num_cfs, as_uint8=False)
        np.testing.assert_array_equal(b0["label"][8:], ref["shape_label"])
        np.testing.assert_allclose(b0["image"][8:], ref["image"], atol=1e-5)
        assert not np.array_equal(ref["texture_label"], ref["shape_label"])  # they are counterfactuals
        # fresh counterfactuals every step
        assert float(jnp.abs(b0["image"][8:] - b1["image"][8:]).mean()) > 0.05
        assert float(jnp.abs(b0["image"]).max()) <= 1.0 + 1e-5
    # GAN mode: one label for all mechanisms
    gan = jax.jit(lambda k: C.sample_generated(model, variables, k, 6, 1, counterfactual=False))(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(gan["texture_label"], gan["shape_label"])
    assert gan["image"].shape == (6, 32, 32, 3)


def test_colour_jitter_offsets_each_counterfactuals_texture_and_background(colored_generator):
    """colour_jitter: one colour offset per image on the texture, another on the background, of the
    asked std and independent; everything else (labels, masks, keys) as without it, and 0 is the
    official procedure bit for bit."""
    from cgn_jax.generate import sample_counterfactuals
    from cgn_jax.models.mnist_cgn import MASK_CLAMP, MnistCGN

    model, variables = colored_generator
    key, n_shapes, num_cfs, std = jax.random.PRNGKey(5), 100, 4, 0.05
    plain = sample_counterfactuals(model, variables, key, n_shapes, num_cfs, as_uint8=False)
    zero = sample_counterfactuals(model, variables, key, n_shapes, num_cfs, as_uint8=False, colour_jitter=0.0)
    np.testing.assert_array_equal(zero["image"], plain["image"])
    jittered = sample_counterfactuals(model, variables, key, n_shapes, num_cfs, as_uint8=False, colour_jitter=std)
    for name in ("shape_label", "texture_label", "background_label"):
        np.testing.assert_array_equal(jittered[name], plain[name])
    # the masks, as sample_counterfactuals draws them (one per shape, repeated per counterfactual)
    k_y, k_u, _ = jax.random.split(key, 3)
    y = jax.random.randint(k_y, (n_shapes,), 0, model.n_classes)
    mask = jnp.clip(model.apply(variables, model.sample_noise(k_u, n_shapes), y, method=MnistCGN.shape), *MASK_CLAMP)
    mask = np.tile(np.asarray(mask, np.float64).reshape(n_shapes, -1), (num_cfs, 1))  # (k b) order
    diff = np.asarray(jittered["image"] - plain["image"], np.float64).reshape(n_shapes * num_cfs, -1, 3)
    # per image and channel, diff = m * d_texture + (1 - m) * d_background: solve, check the fit
    offsets = np.empty((n_shapes * num_cfs, 2, 3))
    for i in range(diff.shape[0]):
        design = np.stack([mask[i], 1.0 - mask[i]], axis=1)
        offsets[i], res, *_ = np.linalg.lstsq(design, diff[i], rcond=None)
        assert np.abs(design @ offsets[i] - diff[i]).max() < 1e-4
    informative = (mask > 0.5).mean(1) > 0.05  # images with enough mask to see the texture offset
    d_tex, d_bg = offsets[informative, 0].ravel(), offsets[:, 1].ravel()
    for d in (d_tex, d_bg):  # [0, 1] std -> the images' [-1, 1] scale
        assert abs(d.mean()) < 0.02 and 0.8 * 2 * std < d.std() < 1.2 * 2 * std, (d.mean(), d.std())
    assert abs(np.corrcoef(offsets[informative, 0].ravel(), offsets[informative, 1].ravel())[0, 1]) < 0.15
    with pytest.raises(C.SetupError, match="cf_colour_jitter acts where"):
        C.ClassifierSetup("colored", mode="original", cf_colour_jitter=0.01)
    with pytest.raises(C.SetupError, match="standard deviation"):
        C.ClassifierSetup("colored", mode="cgn_only", cf_colour_jitter=-0.01)


def test_shape_noise_scale_truncates_only_the_shape_noise(colored_generator):
    """shape_noise_scale: the masks are the shape mechanism's on the scaled noise, with less variety
    the smaller the scale; labels, textures and backgrounds keep their keys; 1 is the official
    procedure bit for bit."""
    from cgn_jax.generate import sample_counterfactuals
    from cgn_jax.models.mnist_cgn import MASK_CLAMP, MnistCGN

    model, variables = colored_generator
    key, n_shapes, num_cfs = jax.random.PRNGKey(7), 200, 2
    sample = lambda s: sample_counterfactuals(model, variables, key, n_shapes, num_cfs, as_uint8=False,
                                              with_masks=True, shape_noise_scale=s)
    plain = sample_counterfactuals(model, variables, key, n_shapes, num_cfs, as_uint8=False, with_masks=True)
    np.testing.assert_array_equal(sample(1.0)["image"], plain["image"])
    k_y, k_u, _ = jax.random.split(key, 3)
    y = jax.random.randint(k_y, (n_shapes,), 0, model.n_classes)
    variety = []
    for s in (1.0, 0.7, 0.4):
        out = sample(s)
        for name in ("shape_label", "texture_label", "background_label"):
            np.testing.assert_array_equal(out[name], plain[name])
        want = jnp.clip(model.apply(variables, s * model.sample_noise(k_u, n_shapes), y, method=MnistCGN.shape),
                        *MASK_CLAMP)
        np.testing.assert_allclose(out["mask"][:n_shapes], want, atol=1e-5)
        m = np.asarray(out["mask"][:n_shapes], np.float64).reshape(n_shapes, -1)
        labels = np.asarray(y)
        variety.append(np.mean([np.linalg.norm(m[labels == c] - m[labels == c].mean(0), axis=1).mean()
                                for c in range(10)]))
        # where both masks sit at their floor the images are the same texture and background
        outside = (np.asarray(out["mask"]) <= MASK_CLAMP[0]) & (np.asarray(plain["mask"]) <= MASK_CLAMP[0])
        assert outside.mean() > 0.3
        np.testing.assert_allclose(np.where(outside, out["image"], 0), np.where(outside, plain["image"], 0),
                                   atol=1e-5)
    assert variety[0] > variety[1] > variety[2], variety
    for bad in (0.0, -0.5):
        with pytest.raises(C.SetupError, match="cf_shape_noise_scale must be positive"):
            C.ClassifierSetup("colored", mode="cgn_only", cf_shape_noise_scale=bad)
    with pytest.raises(C.SetupError, match="cf_shape_noise_scale acts where"):
        C.ClassifierSetup("colored", mode="original", cf_shape_noise_scale=0.5)


def test_fixed_augmentation_draws_once_per_image():
    """fixed_augmentation: an image looks the same whenever it is drawn (a stored data file);
    by default every use gets a fresh colour jitter."""
    from cgn_jax.data import make_assets

    host_data = _toy_data(n=16)
    images = {}
    for fixed in (False, True):
        setup = C.ClassifierSetup("colored", mode="original", batch_size=16, fixed_augmentation=fixed)
        plan = C.batch_plan(setup, 1)
        host, _ = C.prepare_data(host_data, setup, 1, make_assets("colored"))
        data = jax.tree.map(jnp.asarray, host)
        make = jax.jit(lambda key, perms: C.training_batch(key, 0, perms, data, None, setup=setup, plan=plan,
                                                           gen_model=None))
        # two epochs (other orders, other step keys) cover all 16 images each; compare per image
        out = []
        for epoch in (0, 1):
            perms = C._epoch_permutations(jax.random.PRNGKey(epoch), setup, 16, 0)
            batch = make(jax.random.PRNGKey(10 + epoch), perms)
            order = np.asarray(perms["real"][0][:16])
            by_image = np.empty((16, 32, 32, 3), np.float32)
            by_image[order] = np.asarray(batch["image"])
            np.testing.assert_array_equal(np.asarray(batch["label"]), host_data["label"][order])
            out.append(by_image)
        images[fixed] = out
    np.testing.assert_array_equal(images[True][0], images[True][1])
    assert float(np.abs(images[False][0] - images[False][1]).max()) > 0.05


def test_the_official_recipe_trains_on_one_fixed_set(colored_generator, tmp_path, monkeypatch):
    """cf_source 'fixed': one set, num_cfs per shape, made once, cached for resumes, one pass per epoch."""
    from cgn_jax import generate
    from cgn_jax.data import make_assets

    setup = C.ClassifierSetup("colored", mode="cgn_only", cf_source="fixed", num_cfs=10, fixed_size=200,
                              batch_size=32, epochs=1)
    assert setup.uses_cf_dataset and setup.makes_fixed_set and not setup.uses_generator
    cache = tmp_path / C.FIXED_SET_FILE
    made = C.fixed_counterfactual_set(colored_generator, setup, cache, progress=False)
    assert made["cf_image"].shape == (200, 32, 32, 3) and made["cf_image"].dtype == np.uint8
    # 10 counterfactuals of each of 20 shapes: the shape labels repeat for every counterfactual
    labels = made["cf_label"].reshape(10, 20)  # (counterfactual, shape)
    assert (labels == labels[:1]).all() and len(np.unique(labels[0])) > 3
    # the cache is reused as it is, and replaced when the generator changes
    monkeypatch.setattr(generate, "generate_dataset", lambda *a, **k: pytest.fail("regenerated"))
    again = C.fixed_counterfactual_set(colored_generator, setup, cache, progress=False)
    np.testing.assert_array_equal(again["cf_image"], made["cf_image"])
    other = C.Generator(colored_generator.model, jax.tree.map(lambda x: x * 1.01, colored_generator.variables))
    with pytest.raises(pytest.fail.Exception, match="regenerated"):
        C.fixed_counterfactual_set(other, setup, cache, progress=False)
    jittered = dataclasses.replace(setup, cf_colour_jitter=0.02)
    with pytest.raises(pytest.fail.Exception, match="regenerated"):
        C.fixed_counterfactual_set(colored_generator, jittered, cache, progress=False)
    truncated = dataclasses.replace(setup, cf_shape_noise_scale=0.7)
    with pytest.raises(pytest.fail.Exception, match="regenerated"):
        C.fixed_counterfactual_set(colored_generator, truncated, cache, progress=False)
    monkeypatch.undo()
    # training: one pass over the set per epoch; a generator is required
    res = C.train_classifier(setup, _toy_data(), make_assets("colored"), colored_generator, progress=False,
                             checkpoint_dir=tmp_path)
    assert res["steps_per_epoch"] == 200 // 32 and res["history"][0]["train_acc_gen"][0] is not None
    with pytest.raises(C.SetupError, match="needs a generator"):
        C.train_classifier(setup, _toy_data(), make_assets("colored"), None, progress=False)


# ---------------------------------------------------------------- training
def test_classifier_learns_a_small_split(colored_envs):
    """1024 colored examples, 2 epochs; tested on 500 held-out examples of the train distribution."""
    from cgn_jax.data import make_assets

    env = colored_envs
    e = list(irm.ENVIRONMENTS[5]).index(1.0)
    tr, te = slice(0, 1024), slice(2000, 2500)
    # the held-out examples rendered like training ones (mean colour of their class)
    from cgn_jax.data.builders import render_numpy

    test_image = render_numpy("colored", env["digit"][te], env["fg_label"][e, te], env["bg_label"][e, te])
    data = {"digit": env["digit"][tr], "label": env["label"][tr], "fg_label": env["fg_label"][e:e + 1, tr],
            "bg_label": env["bg_label"][e:e + 1, tr], "test_image": test_image, "test_label": env["label"][te]}
    setup = C.ClassifierSetup("colored", mode="original", epochs=2)
    records = []
    res = C.train_classifier(setup, data, make_assets("colored"), seeds=(0,), progress=False, on_epoch=records.append)
    assert res["steps_per_epoch"] == 1024 // 64
    assert [r["lr"] for r in records] == pytest.approx([1.0, 0.7])
    assert records[-1]["train_loss"][0] < records[0]["train_loss"][0] + 1e-6
    assert res["history"][-1]["test_acc"][0] > 0.3, res["history"]  # chance: 0.1
    assert res["history"][-1]["train_acc"][0] > 0.2
    # the log line a run without a progress bar prints per epoch
    line = C.epoch_summary(records[-1], setup.epochs)
    assert line.startswith("seeds [0]: epoch 2/2: test acc ") and f"{100 * records[-1]['test_acc'][0]:.1f} %" in line
    assert "IRM penalty" not in line
    assert "IRM penalty 0.5/2" in C.epoch_summary({**records[-1], "seeds": [0, 1], "test_acc": [0.5, 0.25],
                                                   "train_acc": [1.0, 1.0], "irm_penalty": [0.5, 2.0]}, 10)


class _StopAfter:
    """Stands in for `StopOnSignal`: SIGTERM arrives at the n-th look at `signum`."""

    def __init__(self, n):
        self.n = n

    @property
    def signum(self):
        self.n -= 1
        return 15 if self.n < 0 else None


def test_an_interrupted_classifier_run_resumes_exactly(tmp_path, checkpoint_managers):
    """Stopped mid-epoch, then at an epoch's end, then resumed: the same weights and records as one run;
    every call closes the checkpoint manager it opened, whether it finished, stopped or failed."""
    from cgn_jax.data import make_assets

    setup = C.ClassifierSetup("colored", mode="original", epochs=3, batch_size=32)  # 8 steps per epoch
    data, assets = _toy_data(), make_assets("colored")
    whole = C.train_classifier(setup, data, assets, seeds=(4,), progress=False)
    assert whole["status"] == "completed"

    ckpt, seen = tmp_path / "ckpt", []
    first = C.train_classifier(setup, data, assets, seeds=(4,), progress=False, checkpoint_dir=ckpt,
                               stop=_StopAfter(11), on_epoch=seen.append)
    assert first["status"] == "interrupted" and first["signal"] == 15
    assert [r["epoch"] for r in seen] == [1]  # stopped inside the second epoch
    second = C.train_classifier(setup, data, assets, seeds=(4,), progress=False, checkpoint_dir=ckpt,
                                stop=_StopAfter(5))
    assert second["status"] == "interrupted"  # at the end of the second epoch (its last call does not stop)
    seen = []
    last = C.train_classifier(setup, data, assets, seeds=(4,), progress=False, checkpoint_dir=ckpt,
                              on_epoch=seen.append)
    assert last["status"] == "completed"
    assert [r["epoch"] for r in seen] == [1, 2, 3] and [r.get("restored", False) for r in seen] == [True, True, False]
    for a, b in zip(jax.tree.leaves(whole["variables"]), jax.tree.leaves(last["variables"])):
        np.testing.assert_array_equal(a, b)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert [r[key] for r in last["history"]] == [r[key] for r in whole["history"]], key

    # the same directory under another setup is refused, with the way out
    with pytest.raises(C.SetupError, match="another run.*setup.*delete"):
        C.train_classifier(dataclasses.replace(setup, epochs=4), data, assets, seeds=(4,), progress=False,
                           checkpoint_dir=ckpt)
    opened, closed = checkpoint_managers.opened, checkpoint_managers.closed
    assert len(opened) == 4 and sorted(map(id, closed)) == sorted(map(id, opened))


# ---------------------------------------------------------------- config and CLI
def test_config_arg_and_errors(capsys):
    from cgn_jax import cli
    from cgn_jax.classifier_cli import setup_from_config
    from cgn_jax.config_loading import load_config

    cfg = load_config("configs/classifier.py:double_colored:irm5")
    assert (cfg.variant, cfg.data.mode, cfg.irm.correlations) == ("double_colored", "original", irm.ENVIRONMENTS[5])
    setup = setup_from_config(load_config("configs/classifier.py:wildlife_MNIST,original+cgn"))
    assert (setup.variant, setup.mode, setup.cf_source) == ("wildlife", "original+cgn", "on_the_fly")
    assert load_config("configs/classifier.py:colored").data.mode == "original+cgn"
    with pytest.raises(ValueError, match="unknown MNIST variant"):
        load_config("configs/classifier.py:purple")
    with pytest.raises(ValueError, match="unknown classifier method"):
        load_config("configs/classifier.py:colored,original+vae")
    assert cli.main(["train-classifier", "--config=configs/classifier.py:colored,nope"]) == 2
    assert "unknown classifier method 'nope'" in capsys.readouterr().err
    assert cli.main(["train-classifier", "--config=configs/classifier.py:colored",
                     "--config.data.mode=cgn_plus"]) == 2
    assert "unknown data mode 'cgn_plus'" in capsys.readouterr().err
    assert cli.main(["table1", "--methods", "original", "magic"]) == 2
    assert "unknown method(s) magic" in capsys.readouterr().err
    assert cli.main(["table1", "--methods", "cgn_official", "--cf-shape-noise-scale", "-1"]) == 2
    assert "--cf-shape-noise-scale must be positive" in capsys.readouterr().err
    with pytest.raises(C.SetupError, match="IRM trains on real environments only"):
        C.ClassifierSetup("colored", mode="original+cgn", irm_correlations=(0.9, 1.0))
    with pytest.raises(C.SetupError, match="not a multiple of num_cfs"):
        C.batch_plan(C.ClassifierSetup("colored", mode="original+cgn", num_cfs=10), 1)
    with pytest.raises(C.SetupError, match="does not split"):
        C.batch_plan(C.ClassifierSetup("colored", batch_size=63), 2)


def test_a_pool_of_cgns_shares_the_fixed_set(colored_generator, monkeypatch):
    """Each pooled CGN draws its share of whole shapes with its own key; a pool of one is the plain set."""
    from cgn_jax import generate

    setup = C.ClassifierSetup("colored", mode="cgn_only", cf_source="fixed", num_cfs=10, fixed_size=200,
                              batch_size=32, epochs=1)
    other = C.Generator(colored_generator.model, jax.tree.map(lambda x: x * 0.9, colored_generator.variables))
    pooled = C.fixed_counterfactual_set([colored_generator, other], setup, progress=False)
    assert pooled["cf_image"].shape == (200, 32, 32, 3)
    half = dataclasses.replace(setup, fixed_size=100)
    first = C.fixed_counterfactual_set(colored_generator, half, progress=False)  # member 0: key 0, 10 shapes
    second = generate.generate_dataset(other.model, other.variables, jax.random.PRNGKey(1), 100, 10, batch_size=100,
                                       progress=False)
    np.testing.assert_array_equal(pooled["cf_image"][:100], first["cf_image"])
    np.testing.assert_array_equal(pooled["cf_image"][100:], second["image"])
    np.testing.assert_array_equal(pooled["cf_label"][100:], second["label"])
    assert not np.array_equal(pooled["cf_image"][:100], pooled["cf_image"][100:])
    alone = C.fixed_counterfactual_set([colored_generator], setup, progress=False)
    np.testing.assert_array_equal(alone["cf_image"], C.fixed_counterfactual_set(colored_generator, setup,
                                                                                progress=False)["cf_image"])
    with pytest.raises(C.SetupError, match="fewer than the 3 generators pooled"):
        C.fixed_counterfactual_set([colored_generator] * 3, dataclasses.replace(setup, fixed_size=20), progress=False)
    # sampling inside the train step takes one generator; a pool of one is that generator
    on_the_fly = C.ClassifierSetup("colored", mode="cgn_only", batch_size=32, epochs=1, steps_per_epoch=1)
    data = {"digit": np.zeros((64, 28, 28), np.uint8), "label": np.zeros(64, np.int32),
            "fg_label": np.zeros((1, 64), np.int32), "bg_label": np.zeros((1, 64), np.int32),
            "test_image": np.zeros((32, 32, 32, 3), np.uint8), "test_label": np.zeros(32, np.int32)}
    with pytest.raises(C.SetupError, match="2 generators pooled, but mode cgn_only with cf_source on_the_fly"):
        C.train_classifier(on_the_fly, data, {}, [colored_generator, other], progress=False)


def test_train_classifier_config_pools_cgns_listed_in_the_checkpoint(tmp_path):
    from conftest import SHARED

    from cgn_jax.classifier_cli import load_generator_for
    from cgn_jax.config_loading import load_config

    official = SHARED / "weights" / "cgn_mnist" / "colored_MNIST.pth"
    twin = tmp_path / "colored_MNIST.pth"
    shutil.copyfile(official, twin)
    config = load_config("configs/classifier.py:colored,cgn_official", [f"--config.generator.checkpoint={official}"])
    one, _ = load_generator_for(config)
    assert isinstance(one, C.Generator)
    config = load_config("configs/classifier.py:colored,cgn_official",
                         [f"--config.generator.checkpoint={official}, {twin}"])
    pool, named = load_generator_for(config)
    assert len(pool) == 2 and named == f"{official}, {twin}"
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, pool[0].variables, pool[1].variables)))
    config = load_config("configs/classifier.py:colored,cgn_official",
                         [f"--config.generator.checkpoint={official},{official}"])
    with pytest.raises(ValueError, match="names a CGN twice"):
        load_generator_for(config)


def test_erm_control_rows_in_the_config_and_table1():
    """erm2/erm5: IRM's environments and warm-up, then no penalty, so the penalty's effect can be measured."""
    from cgn_jax import table1
    from cgn_jax.config_loading import load_config

    erm = load_config("configs/classifier.py:colored,erm5")
    assert (erm.irm.correlations, erm.irm.penalty_weight) == (irm.ENVIRONMENTS[5], 0.0)
    assert load_config("configs/classifier.py:colored,irm5").irm.penalty_weight == irm.DEFAULT_PENALTY_WEIGHT
    parser = argparse.ArgumentParser()
    table1.add_arguments(parser)
    setups = {m: table1.method_setup("colored", m, parser.parse_args(["--irm-penalty", "50"])) for m in ("irm2", "erm2")}
    assert setups["erm2"].irm_correlations == setups["irm2"].irm_correlations == irm.ENVIRONMENTS[2]
    assert (setups["erm2"].irm_penalty_weight, setups["irm2"].irm_penalty_weight) == (0.0, 50.0)
    assert table1.env_specs_for(["erm2"]) == table1.env_specs_for(["irm2"])  # the same data bundle rows
    assert setups["irm2"].irm_rescale and erm.irm.rescale
    plain = table1.method_setup("colored", "irm2", parser.parse_args(["--irm-rescale", "no"]))
    from cgn_jax.classifier_cli import setup_from_config
    assert not plain.irm_rescale and not setup_from_config(load_config("configs/classifier.py:colored,irm2",
                                                                       ["--config.irm.rescale=False"])).irm_rescale
    joint = {m: table1.method_setup("wildlife", m, parser.parse_args(["--irm-cues", "joint"])) for m in ("irm2", "original")}
    assert joint["irm2"].irm_joint_cues and not joint["original"].irm_joint_cues and not setups["irm2"].irm_joint_cues
    assert setup_from_config(load_config("configs/classifier.py:wildlife,irm2",
                                         ["--config.irm.joint_cues=True"])).irm_joint_cues
    # a setup field added later leaves the checkpoint name of its default unchanged, and changes it otherwise
    old = {"epochs": 10, "setup": {"lr": 1.0}}
    assert table1._digest(old) == table1._digest({**old, "setup": {"lr": 1.0, "irm_rescale": True}})
    assert table1._digest(old) == table1._digest({**old, "setup": {"lr": 1.0, "irm_correlations": ()}})
    assert table1._digest(old) != table1._digest({**old, "setup": {"lr": 1.0, "irm_rescale": False}})
    assert table1._digest(old) == table1._digest({**old, "setup": {"lr": 1.0, "irm_joint_cues": False}})
    runs = {f"colored/{m}": {"variant": "colored", "method": m, "seeds": [0], "epochs": 10, "train_acc": [0.9],
                             "test_acc": [0.5], "timing": {"total_seconds": 1}} for m in ("erm2", "irm2", "original")}
    lines = table1.render_markdown({"runs": runs}).splitlines()
    assert [ln.split(" |")[0] for ln in lines[2:5]] == ["| Original", "| IRM (2 envs)", "| ERM control on the 2 IRM envs"]
    assert lines[4].endswith("| 90.0 | 50.0 | – |")  # no paper number for the control
    # a row run with other options than its method's defaults says which under the table
    stored = {k: getattr(setups["irm2"], k) for k in setups["irm2"].__dataclass_fields__}
    stored["irm_penalty_weight"] = irm.DEFAULT_PENALTY_WEIGHT  # the table's default setup for irm2
    for setup, note in ((stored, None), ({**stored, "irm_rescale": False}, "irm_rescale=False"),
                        ({**stored, "irm_penalty_weight": 50.0}, "irm_penalty_weight=50.0"),
                        ({**stored, "irm_joint_cues": True}, "irm_joint_cues=True")):
        md = table1.render_markdown({"runs": {"colored/irm2": {**runs["colored/irm2"], "setup": setup}}})
        assert ("not the default" in md) == bool(note)
        assert not note or f"colored/irm2: run with {note} (not the default)." in md


def test_table1_palette_rows_and_errors(tmp_path, capsys):
    """--palette: colored real-data rows only, the bundle must hold that palette, rows tagged without paper numbers."""
    from cgn_jax import cli, table1

    base = ["table1", "--palette", "separated", "--out", str(tmp_path / "t.md")]
    assert cli.main([*base, "--variants", "wildlife", "--methods", "original"]) == 2
    assert "recolours colored MNIST only" in capsys.readouterr().err
    assert cli.main([*base, "--variants", "colored", "--methods", "original", "original+cgn"]) == 2
    assert "original+cgn would mix two palettes" in capsys.readouterr().err
    assert cli.main(["table1", "--tag", "palette-x", "--out", str(tmp_path / "t.md")]) == 2
    assert "name --palette rows" in capsys.readouterr().err
    assert cli.main(["table1", "--tag", "jittered", "--out", str(tmp_path / "t.md")]) == 2  # no --generator
    assert "tags name the rows of a CGN given with --generator" in capsys.readouterr().err
    with pytest.raises(ValueError, match="recolours colored MNIST only, not wildlife"):
        table1.collect_variant("wildlife", ["original"], palette="separated")
    np.savez(tmp_path / "colored.npz", version=np.int64(table1.BUNDLE_VERSION))  # a bundle from before --palette
    assert cli.main([*base, "--variants", "colored", "--methods", "original", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds the 'measured' palette, not 'separated'" in err and "--palette separated" in err
    runs = {"colored/original@palette-separated": {
        "variant": "colored", "method": "original", "row": "original@palette-separated", "seeds": [0],
        "epochs": 10, "train_acc": [0.99], "test_acc": [0.2], "timing": {"total_seconds": 1}}}
    md = table1.render_markdown({"runs": runs})
    assert "| Original (palette: separated) | 99.0 | 20.0 | – |" in md
    assert "the paper's numbers do not apply to them" in md


def test_official_recipe_row_in_the_config_and_table1():
    """cgn_official: counterfactuals only, from one fixed set of 100,000 (10 per shape), in the config and table1."""
    from cgn_jax import table1
    from cgn_jax.classifier_cli import setup_from_config
    from cgn_jax.config_loading import load_config

    setup = setup_from_config(load_config("configs/classifier.py:wildlife,cgn_official"))
    assert (setup.mode, setup.cf_source, setup.num_cfs, setup.fixed_size) == ("cgn_only", "fixed", 10, 100_000)
    assert C.steps_per_epoch(setup, n_real=50_000, n_cf=100_000) == 1562  # one pass over the set
    assert setup_from_config(load_config("configs/classifier.py:wildlife,cgn_only")).cf_source == "on_the_fly"

    parser = argparse.ArgumentParser()
    table1.add_arguments(parser)
    args = parser.parse_args([])
    assert "cgn_official" in args.methods  # a default row: it is how the paper's number was made
    assert table1.method_setup("wildlife", "cgn_official", args) == setup
    assert table1.method_setup("wildlife", "original+cgn", args).cf_source == "on_the_fly"
    quick = table1.method_setup("wildlife", "cgn_official", parser.parse_args(["--steps-per-epoch", "4",
                                                                                "--fixed-size", "500"]))
    assert (quick.steps_per_epoch, quick.fixed_size, quick.cf_source) == (4, 500, "fixed")
    jitter = parser.parse_args(["--cf-colour-jitter", "0.02"])  # rows with generated counterfactuals only
    assert table1.method_setup("wildlife", "cgn_official", jitter) == dataclasses.replace(setup, cf_colour_jitter=0.02)
    assert table1.method_setup("wildlife", "original+gan", jitter).cf_colour_jitter == 0.0
    assert table1.method_setup("wildlife", "original", jitter).cf_colour_jitter == 0.0
    assert setup_from_config(load_config("configs/classifier.py:wildlife,cgn_official",
                                         ["--config.data.cf_colour_jitter=0.02"])).cf_colour_jitter == 0.02
    assert table1._digest({"setup": {"lr": 1.0}}) == table1._digest({"setup": {"lr": 1.0, "cf_colour_jitter": 0.0}})
    truncated = parser.parse_args(["--cf-shape-noise-scale", "0.7"])
    assert (table1.method_setup("wildlife", "cgn_official", truncated)
            == dataclasses.replace(setup, cf_shape_noise_scale=0.7))
    assert table1.method_setup("wildlife", "original+gan", truncated).cf_shape_noise_scale == 1.0
    assert setup_from_config(load_config("configs/classifier.py:wildlife,cgn_official",
                                         ["--config.data.cf_shape_noise_scale=0.7"])).cf_shape_noise_scale == 0.7
    assert table1._digest({"setup": {"lr": 1.0}}) == table1._digest({"setup": {"lr": 1.0,
                                                                                 "cf_shape_noise_scale": 1.0}})
    assert table1.PAPER_TEST_ACC["cgn_official"] == table1.PAPER_TEST_ACC["original+cgn"]


def test_table1_bundle_roundtrip_and_markdown(tmp_path):
    from cgn_jax import table1

    tree = {"params": {"f_shape": {"conv1": {"kernel": np.ones((3, 3, 2, 2))}}, "label_emb": {"embedding": np.eye(2)}}}
    flat = table1._flatten("gen", tree)
    back = table1._unflatten("gen", flat)
    np.testing.assert_array_equal(back["params"]["f_shape"]["conv1"]["kernel"], tree["params"]["f_shape"]["conv1"]["kernel"])
    assert table1.env_specs_for(["original", "irm2", "irm5"]) == [(1.0, 0), (0.9, 0), (0.925, 1), (0.95, 2), (0.975, 3)]
    results = {"meta": {"device": "1 x cpu"}, "runs": {
        "colored/original": {"variant": "colored", "method": "original", "seeds": [0, 1], "epochs": 10,
                             "train_acc": [0.99, 0.98], "test_acc": [0.30, 0.40], "timing": {"total_seconds": 60}}}}
    results["runs"]["colored/original+cgn@ours"] = {
        "variant": "colored", "method": "original+cgn", "row": "original+cgn@ours", "seeds": [0], "epochs": 10,
        "train_acc": [0.9], "test_acc": [0.8], "timing": {"total_seconds": 60}, "inverted_classes": [1, 6]}
    results["runs"]["colored/original+cgn"] = {
        "variant": "colored", "method": "original+cgn", "seeds": [0], "epochs": 10,
        "train_acc": [0.95], "test_acc": [0.9], "timing": {"total_seconds": 60}}
    assert table1.render_markdown({"meta": results["meta"], "runs": {}}).startswith("No run has finished yet.")
    md = table1.render_markdown(results)
    assert "| Original | 98.5 ± 0.7 | 35.0 ± 7.1 | 35.9 |" in md
    rows = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| Original")]
    assert rows == ["| Original", "| Original + CGN", "| Original + CGN (CGN: ours)"]
    assert "| Original + CGN (CGN: ours) | 90.0 | 80.0 | 95.1 |" in md
    assert "colored/original+cgn@ours: the CGN's mask is inverted (covers the background) for classes 1, 6" in md
    assert "colored/original+cgn: seeds [0] only." in md and "colored/original: seeds" not in md
    results["runs"]["colored/original"]["history"] = [{"epoch": e, "test_acc": [0.1 * e, 0.2 * e]} for e in (1, 2)]
    png = table1.render_curves(results, tmp_path / "curves.png")
    assert png == tmp_path / "curves.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_table1_rows_gather_seeds_from_several_calls(tmp_path, capsys):
    """Seeds of one protocol trained in different calls (or machines) make one row; another protocol is refused."""
    from cgn_jax import cli, table1

    def row(seeds, test, epochs=10):
        return {"variant": "colored", "method": "original", "row": "original", "epochs": epochs, "limit": 0,
                "generator": "official", "setup": {"lr": 1.0, "pool": "official"},
                "parts": [{"seeds": seeds, "train_acc": [0.9] * len(seeds), "test_acc": test,
                           "timing": {"total_seconds": 100.0}, "device": "1 x cpu"}]}

    both = table1.combine_rows(table1.combine_rows(None, row([2], [0.5])), row([0], [0.3]))
    assert both["seeds"] == [0, 2] and both["test_acc"] == [0.3, 0.5] and both["timing"]["total_seconds"] == 200.0
    again = table1.combine_rows(both, row([2], [0.7]))  # a seed trained again replaces its old result
    assert again["seeds"] == [0, 2] and again["test_acc"] == [0.3, 0.7] and len(again["parts"]) == 2
    # a row stored before a setup field existed matches a new row holding that field's default
    newer = row([3], [0.4])
    newer["setup"] = {**newer["setup"], "fixed_size": C.ClassifierSetup("colored").fixed_size}
    assert table1.combine_rows(both, newer)["seeds"] == [0, 2, 3]
    newer["setup"]["fixed_size"] = 7
    with pytest.raises(table1.ProtocolMismatch, match=r"another protocol \(setup\.fixed_size: .* -> 7\)"):
        table1.combine_rows(both, newer)
    with pytest.raises(table1.ProtocolMismatch, match=r"colored/original: another protocol \(epochs: 10 -> 1\)"):
        table1.combine_rows(both, row([1], [0.9], epochs=1))
    # a row written before rows had parts counts as one part
    old = {k: v for k, v in row([0, 1], [0.2, 0.4]).items() if k != "parts"}
    old.update(seeds=[0, 1], train_acc=[0.9, 0.9], test_acc=[0.2, 0.4], timing={"total_seconds": 50.0},
               history=[{"epoch": 10}])
    assert table1.combine_rows(old, row([2], [0.6]))["test_acc"] == [0.2, 0.4, 0.6]

    files = []
    for seed, acc in ((0, 0.30), (1, 0.40)):
        files.append(tmp_path / f"s{seed}.json")
        files[-1].write_text(json.dumps({"meta": {"device": "1 x cpu"}, "runs": {"colored/original": row([seed], [acc])}}))
    out = tmp_path / "t1.md"
    assert cli.main(["table1", "--merge", *map(str, files), "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["runs"]["colored/original"]["seeds"] == [0, 1]
    assert "| Original | 90.0 ± 0.0 | 35.0 ± 7.1 | 35.9 |" in out.read_text()
    assert out.with_suffix(".png").is_file()  # the per-epoch curves beside the table

    # another protocol under the same key is refused, naming the difference, instead of replacing seeds
    stored = out.read_text()
    assert cli.main(["table1", "--variants", "colored", "--methods", "original", "--epochs", "1", "--out", str(out),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "colored/original: " in err and "another protocol (epochs: 10 -> 1;" in err and "--fresh" in err
    assert out.read_text() == stored
    files.append(tmp_path / "s2.json")
    files[-1].write_text(json.dumps({"runs": {"colored/original": row([2], [0.5], epochs=1)}}))
    assert cli.main(["table1", "--merge", *map(str, files), "--out", str(tmp_path / "t2.md")]) == 2
    err = capsys.readouterr().err
    assert "cannot merge " in err and "s2.json: colored/original: another protocol (epochs: 10 -> 1)" in err
    assert table1.protocol_differences(row([0], [0.1]), row([0], [0.1])) == []
    jittered = row([0], [0.1])
    jittered["setup"] = {**jittered["setup"], "cf_colour_jitter": 0.02}
    assert table1.protocol_differences(row([0], [0.1]), jittered) == ["setup.cf_colour_jitter: 0.0 -> 0.02"]


@pytest.mark.slow
def test_cli_trains_with_on_the_fly_counterfactuals(tmp_path, mnist_dir, tfds_dir, capsys):
    from cgn_jax import cli

    workdir = tmp_path / "run"
    command = ["train-classifier", "--config=configs/classifier.py:colored,original+cgn", f"--workdir={workdir}",
               "--no-progress", f"--config.dataset.mnist_dir={mnist_dir}", f"--config.dataset.data_dir={tfds_dir}",
               f"--config.dataset.limit={N_SMALL}", f"--config.dataset.test_limit={N_SMALL}",
               "--config.train.epochs=2", "--config.train.steps_per_epoch=5"]
    assert cli.main(command) == 0
    assert "seeds [0]: epoch 2/2: test acc " in capsys.readouterr().err  # --no-progress: a line per epoch
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert lines[0]["train_acc_gen"] is not None and lines[0]["test_acc"] >= 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["mode"] == "original+cgn" and (workdir / "classifier" / "meta.json").is_file()
    assert (workdir / "plots" / "classifier.png").stat().st_size > 1000 and list((workdir / "tb").glob("events.*"))
    # the same command again finds the finished run in checkpoints/ and only rewrites the outputs
    assert cli.main(command) == 0
    again = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in again] == [1, 2] and all(x["restored"] for x in again)
    assert len(list((workdir / "tb").glob("events.*"))) == 1  # rebuilt, not appended to

    # the official recipe from the CLI: the fixed set is generated once and kept with the checkpoints
    official = tmp_path / "official"
    assert cli.main(["train-classifier", "--config=configs/classifier.py:colored,cgn_official",
                     f"--workdir={official}", "--no-progress", *command[4:8], "--config.data.fixed_size=128",
                     "--config.train.epochs=1"]) == 0
    assert json.loads((official / "summary.json").read_text())["steps_per_epoch"] == 128 // 64
    assert (official / "checkpoints" / C.FIXED_SET_FILE).is_file()
    assert json.loads((workdir / "summary.json").read_text())["test_acc"] == summary["test_acc"]


@pytest.mark.slow
def test_table1_tiny_run(tmp_path, mnist_dir, tfds_dir, monkeypatch, capsys):
    from conftest import SHARED

    from cgn_jax.train import signals

    from cgn_jax import cli
    from cgn_jax.port import mnist as port_mnist

    out = tmp_path / "t1.md"
    bundles = tmp_path / "bundles"
    assert cli.main(["table1", "--export-data", str(bundles), "--variants", "colored", "--methods", "original", "irm2",
                     "--mnist-dir", str(mnist_dir), "--tfds-dir", str(tfds_dir), "--limit", str(N_SMALL),
                     "--test-limit", str(N_SMALL)]) == 0
    first_call = ["table1", "--data", str(bundles), "--variants", "colored", "--methods", "original", "irm2",
                  "--seeds", "0", "1", "--epochs", "1", "--steps-per-epoch", "4", "--out", str(out), "--no-progress"]
    # SIGTERM in the middle of the first seed: a checkpoint, no row, exit status 128 + 15
    with monkeypatch.context() as m:
        m.setattr(signals, "StopOnSignal", lambda: contextlib.nullcontext(_StopAfter(1)))
        assert cli.main(first_call) == 128 + 15
    capsys.readouterr()
    assert list((tmp_path / "t1.ckpt").glob("colored_original/*/seeds_0/*"))
    assert not json.loads(out.with_suffix(".json").read_text())["runs"]
    assert cli.main(first_call) == 0  # continues, and drops each call's checkpoints once its seeds are saved
    assert "table1: colored/irm2: seeds [1]: epoch 1/1: test acc " in capsys.readouterr().err  # --no-progress logs epochs
    assert not (tmp_path / "t1.ckpt").exists()
    md = out.read_text()
    assert "| Original |" in md and "| IRM (2 envs) |" in md
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["runs"]["colored/irm2"]["seeds"] == [0, 1]
    counts = np.bincount(np.load(bundles / "colored.npz")["test_label"], minlength=10)
    for part in raw["runs"]["colored/irm2"]["parts"]:  # per seed: accuracy by shape class, matching the total
        assert len(part["test_breakdown"]) == len(part["seeds"])
        for b, total in zip(part["test_breakdown"], part["test_acc"]):
            assert b["cues_alike"] is None and len(b["by_class"]) == 10
            assert sum(a * c for a, c in zip(b["by_class"], counts) if a is not None) / counts.sum() == \
                pytest.approx(total, abs=1e-6)
    # a later call with one more seed trains only that seed, in the same rows
    assert cli.main(["table1", "--data", str(bundles), "--variants", "colored", "--methods", "original", "irm2",
                     "--seeds", "0", "1", "2", "--epochs", "1", "--steps-per-epoch", "4", "--out", str(out),
                     "--no-progress"]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["runs"]["colored/irm2"]["seeds"] == [0, 1, 2]
    assert [p["seeds"] for p in raw["runs"]["colored/irm2"]["parts"]][-1] == [2]

    # a CGN of our own (here: the official weights through `cgn-jax port`) in place of the bundle's
    gen = port_mnist.convert(SHARED / "weights" / "cgn_mnist" / "colored_MNIST.pth", tmp_path / "gen")
    assert cli.main(["table1", "--data", str(bundles), "--variants", "colored", "--methods", "original", "original+cgn",
                     "--generator", f"colored={gen}", "--tag", "mine", "--seeds", "0", "--epochs", "1",
                     "--steps-per-epoch", "4", "--out", str(out), "--no-progress"]) == 0
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["runs"]["colored/original+cgn@mine"]["generator"] == str(gen)
    assert raw["runs"]["colored/original+cgn@mine"]["inverted_classes"] == []  # the official masks
    assert len(raw["runs"]["colored/original+cgn@mine"]["mask_frame_means"]) == 10
    assert "colored/original+cgn" not in raw["runs"]  # only the tagged row ran; original skipped with --generator
    assert "| Original + CGN (CGN: mine) |" in out.read_text()
    # the official recipe's row: a fixed set (small here), one pass per epoch, its cache dropped at the end
    assert cli.main(["table1", "--data", str(bundles), "--variants", "colored", "--methods", "cgn_official",
                     "--generator", f"colored={gen}", "--tag", "mine", "--seeds", "0", "--epochs", "1",
                     "--fixed-size", "256", "--out", str(out), "--no-progress"]) == 0
    row = json.loads(out.with_suffix(".json").read_text())["runs"]["colored/cgn_official@mine"]
    assert row["steps_per_epoch"] == 256 // 64 and row["setup"]["cf_source"] == "fixed"
    assert not (tmp_path / "t1.ckpt").exists()
    assert "| CGN counterfactuals only, official recipe (fixed set) (CGN: mine) |" in out.read_text()
    assert cli.main(["table1", "--data", str(bundles), "--generator", "colored"]) == 2  # no =DIR
    # two CGNs for one variant: a pool that shares the fixed set; on-the-fly rows refuse it, and a CGN given twice
    twin = tmp_path / "twin"
    shutil.copytree(gen, twin)
    pool = ["--generator", f"colored={gen}", f"colored={twin}", "--tag", "pool"]
    assert cli.main(["table1", "--data", str(bundles), "--variants", "colored", "--methods", "cgn_official", *pool,
                     "--seeds", "0", "--epochs", "1", "--fixed-size", "256", "--out", str(out), "--no-progress"]) == 0
    assert "shapes split 13 / 13 among 2 generators" in capsys.readouterr().err
    row = json.loads(out.with_suffix(".json").read_text())["runs"]["colored/cgn_official@pool"]
    assert row["generator"] == f"{gen} + {twin}" and row["steps_per_epoch"] == 256 // 64
    assert len(row["mask_frame_means"]) == 2 and row["mask_frame_means"][0] == row["mask_frame_means"][1]
    assert cli.main(["table1", "--data", str(bundles), "--variants", "colored", "--methods", "cgn_official",
                     "original+cgn", *pool, "--out", str(out)]) == 2
    assert "original+cgn sample inside the train step from one CGN" in capsys.readouterr().err
    assert cli.main(["table1", "--data", str(bundles), "--variants", "colored", "--methods", "cgn_official",
                     "--generator", f"colored={gen}", f"colored={gen}", "--out", str(out)]) == 2
    assert "is given twice" in capsys.readouterr().err
