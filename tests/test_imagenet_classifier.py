"""ImageNet classifier ensemble: ResNet port, head routing, metrics, data layouts, and the pipeline end to end.

Everything runs on tiny data the tests write themselves (no ImageNet here): a reduced
ResNet (ResNet-50 layout, widths /16) on 32x32 crops. Full-size checks are `slow`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cgn_jax import eval_metrics as M
from cgn_jax import imagenet_data as D
from cgn_jax.models import resnet as R

torch = pytest.importorskip("torch")
nn = torch.nn


# ------------------------------------------------------------------ a torchvision-layout torch ResNet

class _TorchBottleneck(nn.Module):
    def __init__(self, cin, planes, stride, downsample):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = (nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                         nn.BatchNorm2d(planes * 4)) if downsample else None)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (self.downsample(x) if self.downsample is not None else x))


class _TorchResNet(nn.Module):
    """torchvision.models.resnet50's module tree (names and shapes), any width and depth."""

    def __init__(self, width=64, stages=(3, 4, 6, 3), num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for s, n in enumerate(stages):
            planes = width * 2 ** s
            blocks = []
            for k in range(n):
                stride = 2 if k == 0 and s > 0 else 1
                blocks.append(_TorchBottleneck(cin, planes, stride, k == 0))
                cin = planes * 4
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def _torch_resnet(width, stages=(3, 4, 6, 3), num_classes=1000, seed=0):
    torch.manual_seed(seed)
    m = _TorchResNet(width, stages, num_classes)
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
    return m.eval()


def _port_and_compare(tmp_path, width, size, stages=(3, 4, 6, 3), atol=1e-4):
    from cgn_jax.checkpoint import restore_variables
    from cgn_jax.port.resnet50 import convert

    tm = _torch_resnet(width, stages)
    src = tmp_path / "resnet.pth"
    torch.save(tm.state_dict(), src)
    dst = convert(str(src), tmp_path / "port", variant="resnet50" if tuple(stages) == (3, 4, 6, 3) else "custom")
    meta = json.loads((dst / "meta.json").read_text())
    assert (meta["kind"], meta["width"], meta["stage_sizes"]) == ("classifier", width, list(stages))
    model = R.ResNet("bottleneck", tuple(stages), width, 1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), False))
    variables = restore_variables(dst, expected=shapes)  # names and shapes are exactly the model's
    x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        want_feats, want_logits = tm.features(torch.from_numpy(x)).numpy(), tm(torch.from_numpy(x)).numpy()
    feats_model = R.ResNet("bottleneck", tuple(stages), width, None)  # the backbone as the ensemble uses it
    backbone = {"params": {k: v for k, v in variables["params"].items() if k != "fc"},
                "batch_stats": variables["batch_stats"]}
    got_feats = np.asarray(jax.jit(lambda v, x: feats_model.apply(v, x, False))(backbone, x.transpose(0, 2, 3, 1)))
    fc = variables["params"]["fc"]
    got_logits = got_feats.astype(np.float64) @ fc["kernel"] + fc["bias"]
    assert np.abs(want_feats).max() > 1e-2  # the comparison is not between two near-zero arrays
    np.testing.assert_allclose(got_feats, want_feats, atol=atol, rtol=1e-4)
    np.testing.assert_allclose(got_logits, want_logits, atol=atol, rtol=1e-4)
    return tm, x, want_feats


def test_resnet50_port_matches_torch_reduced_width(tmp_path):
    """ResNet-50 layout (3, 4, 6, 3 bottlenecks) at width 4: every tensor taken, forward within 1e-4."""
    _port_and_compare(tmp_path, width=4, size=64)


@pytest.mark.slow
def test_resnet50_port_matches_torch_full_size(tmp_path):
    _port_and_compare(tmp_path, width=64, size=224, atol=2e-4)


def test_port_rejects_extra_missing_and_wrong_variant(tmp_path):
    from cgn_jax.port.common import PortError
    from cgn_jax.port.resnet50 import variables_from_torch

    tm = _torch_resnet(4, (1, 1, 1, 1), num_classes=10)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    with pytest.raises(PortError, match="not resnet50"):
        variables_from_torch(sd, "resnet50")
    variables_from_torch(sd, "custom")
    with pytest.raises(PortError, match="not consumed.*'extra.weight'"):
        variables_from_torch({**sd, "extra.weight": np.zeros(3)}, "custom")
    with pytest.raises(PortError, match="layer2.0.bn2.running_var"):
        variables_from_torch({k: v for k, v in sd.items() if k != "layer2.0.bn2.running_var"}, "custom")
    # DataParallel's "module." prefix is accepted
    v, _ = variables_from_torch({f"module.{k}": v for k, v in sd.items()}, "custom")
    assert v["params"]["fc"]["kernel"].shape == (128, 10)


def test_port_official_ensemble_layout(tmp_path):
    """The official InvariantEnsemble state dict (backbone.N.*, m_shape.1.*) becomes a ClassifierEnsemble."""
    from cgn_jax.port.resnet50 import variables_from_torch

    tm = _torch_resnet(4, (1, 1, 1, 1), num_classes=12)
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    sd = {}
    for k, v in tm.state_dict().items():
        head, _, rest = k.partition(".")
        if head != "fc":
            sd[f"module.backbone.{names[head]}.{rest}"] = v.numpy()
    rng = np.random.default_rng(1)
    heads = {h: (rng.normal(size=(12, 128)).astype(np.float32), rng.normal(size=12).astype(np.float32))
             for h in ("m_shape", "m_texture", "m_bg")}
    for h, (w, b) in heads.items():
        sd[f"module.{h}.1.weight"], sd[f"module.{h}.1.bias"] = w, b
    variables, meta = variables_from_torch(sd, "custom")
    assert meta["kind"] == "ensemble" and meta["num_classes"] == 12
    model = R.ClassifierEnsemble("bottleneck", (1, 1, 1, 1), 4, 12)
    x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
    out = jax.jit(lambda v, x: model.apply(v, x, False))(variables, x.transpose(0, 2, 3, 1))
    with torch.no_grad():
        feats = tm.features(torch.from_numpy(x)).numpy()
    for h, key in (("shape", "m_shape"), ("texture", "m_texture"), ("background", "m_bg")):
        w, b = heads[key]
        np.testing.assert_allclose(np.asarray(out[h]), feats @ w.T + b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------- heads and loss

def test_heads_see_the_right_labels():
    from cgn_jax.imagenet_classifier import ensemble_loss, head_loss_weights

    is_real = jnp.array([True, True, False, False, False, False])
    w = np.asarray(head_loss_weights(is_real))
    np.testing.assert_allclose(w[:2], [[0.5, 0, 0]] * 2)  # real: shape head only
    np.testing.assert_allclose(w[2:], np.full((4, 3), 0.25))  # counterfactuals: every head, own label
    assert np.all(np.asarray(head_loss_weights(is_real, "mean_logits"))[:2] == 0)

    # three linear heads on fixed features: the loss alone decides which head learns from what
    feats = jax.random.normal(jax.random.key(0), (6, 16))
    params = {h: jax.random.normal(jax.random.key(i + 1), (16, 7)) for i, h in enumerate(R.HEADS)}
    labels = jnp.array([[1, 1, 1], [2, 2, 2], [3, 4, 5], [0, 6, 2], [1, 1, 3], [4, 2, 0]])

    def loss(params, real_mask, target="shape_head", labels=labels):
        return ensemble_loss({h: feats @ w for h, w in params.items()}, labels, real_mask, target)[0]

    norm = lambda t: float(jnp.sum(jnp.abs(t)))
    g = jax.grad(loss)(params, jnp.ones(6, bool))  # only real images: texture and background heads must not learn
    assert norm(g["shape"]) > 0 and norm(g["texture"]) == 0 and norm(g["background"]) == 0
    g = jax.grad(loss)(params, jnp.zeros(6, bool))
    assert min(norm(g[h]) for h in R.HEADS) > 0
    g = jax.grad(loss)(params, jnp.ones(6, bool), "mean_logits")  # the official rule trains the averaged logits
    assert min(norm(g[h]) for h in R.HEADS) > 0

    # each head's term uses its own label column; real rows' texture/background labels are never read
    cf, mixed = jnp.zeros(6, bool), is_real
    assert float(loss(params, cf)) != float(loss(params, cf, labels=labels.at[:, 1].set(0)))
    assert float(loss(params, cf)) != float(loss(params, cf, labels=labels.at[:, 2].set(0)))
    assert float(loss(params, mixed)) == float(loss(params, mixed, labels=labels.at[:2, 1:].set(0)))


def test_combine_heads():
    logits = {h: jnp.asarray(np.random.default_rng(i).normal(size=(3, 5)), jnp.float32)
              for i, h in enumerate(R.HEADS)}
    p = R.combine(logits, R.HEADS, "mean_probs")
    want = np.mean([jax.nn.softmax(logits[h]) for h in R.HEADS], axis=0)
    np.testing.assert_allclose(p, want, rtol=1e-6)
    q = R.combine(logits, R.HEADS, "mean_logits")
    np.testing.assert_allclose(q, jax.nn.softmax(sum(logits.values()) / 3), rtol=1e-6)
    assert set(R.prediction_probs(logits)) == {*R.HEADS, "ensemble", "shape_texture"}


def test_loss_decreases_on_a_fixed_batch():
    import ml_collections

    from cgn_jax.imagenet_classifier import TrainState, make_optimizer, make_train_step, zero_metrics

    tc = ml_collections.ConfigDict(dict(lr=1e-2, lr_decay_epochs=0, lr_decay_factor=0.1, optimizer="adam",
                                        momentum=0.9, weight_decay=0.0, adam_b1=0.9, adam_b2=0.999))
    model = R.ClassifierEnsemble("bottleneck", (1,), 4, 10, freeze_bn=False)  # one stage: quick to compile
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 255, (8, 32, 32, 3)), jnp.uint8),
             "labels": jnp.asarray(rng.integers(0, 10, (8, 3)), jnp.int32),
             "is_real": jnp.asarray([True] * 4 + [False] * 4)}
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), False))(jax.random.key(0))
    tx = make_optimizer(tc, 100)
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                       tx.init(variables["params"]))
    step = jax.jit(make_train_step(model, tx, real_target="shape_head", axis_name=None))
    losses = []
    for _ in range(8):
        state, m = step(state, zero_metrics(), batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.75 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert int(state.step) == 8


# --------------------------------------------------------------------------------------- metrics

def test_shape_bias_known_answer():
    names, members = M.geirhos_categories()
    assert len(names) == 16 and names == tuple(sorted(names))
    c = {n: i for i, n in enumerate(names)}

    def probs_for(category, p=0.9):
        v = np.full(1000, (1 - p) / 999)
        v[members[c[category]][0]] = p
        return v

    # shape, texture, decision: 3 shape decisions, 1 texture decision, 1 neither, 1 excluded (same cue)
    rows = [("cat", "dog", "cat"), ("car", "bird", "car"), ("bear", "boat", "bear"),
            ("knife", "oven", "oven"), ("chair", "clock", "truck"), ("dog", "dog", "dog")]
    probs = np.stack([probs_for(d) for _, _, d in rows])
    dec = M.decisions_16(probs)
    assert [names[i] for i in dec] == [d for _, _, d in rows]
    r = M.shape_bias(dec, [c[s] for s, _, _ in rows], [c[t] for _, t, _ in rows])
    assert r["shape_bias"] == pytest.approx(0.75)
    assert (r["shape_decisions"], r["texture_decisions"], r["stimuli"], r["excluded_same_cue"]) == (3, 1, 5, 1)
    assert r["shape_match"] == pytest.approx(0.6) and r["texture_match"] == pytest.approx(0.2)

    # categories are scored by the MEAN of their members: 109 dog classes at 0.005 each (0.545 in total)
    # lose to the single knife class at 0.1
    v = np.zeros(1000)
    v[list(members[c["dog"]])] = 0.005
    v[members[c["knife"]][0]] = 0.1
    assert names[M.decisions_16(v[None])[0]] == "knife"
    assert M.shape_bias([0], [1], [2])["shape_bias"] is None


def test_bg_gap_known_answer():
    table = M.in9_table()
    assert table.shape == (1000,) and table[151] == 0 and table[0] == 8 and table[999] == -1
    assert M.in9_class_names()[:3] == ("Dog", "Bird", "Vehicle")
    dog, fish, outside = 151, 0, 999  # -> dog (0), fish (8), no IN-9 class
    top1_same = np.array([dog, dog, fish, fish])       # labels dog, dog, fish, fish: 100 %
    top1_rand = np.array([dog, outside, outside, fish])  # 50 %
    labels = np.array([0, 0, 8, 8])
    a_same, a_rand = M.in9_accuracy(top1_same, labels), M.in9_accuracy(top1_rand, labels)
    assert (a_same, a_rand) == (100.0, 50.0)
    assert M.bg_gap(a_same, a_rand) == 50.0
    assert M.to_in9([outside])[0] == -1


def test_topk_accuracy():
    top = np.array([[3, 1, 2, 0, 4], [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    r = M.topk_accuracy(top, np.array([3, 2, 9]))
    assert r["top1"] == pytest.approx(100 / 3) and r["top5"] == pytest.approx(200 / 3)


# ------------------------------------------------------------------------------------ data layouts

def _jpeg(path: Path, size=(48, 40), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


def _write_cf_dataset(root: Path, n: int, classes: int = 1000, seed: int = 0) -> list[tuple]:
    """The official generate_data.py layout, including its one-header-per-row CSV quirk."""
    rng = np.random.default_rng(seed)
    (root / "ims").mkdir(parents=True, exist_ok=True)
    rows = []
    with open(root / "labels.csv", "w", newline="") as f:
        f.write(",im_name,shape_cls,texture_cls,bg_cls\n")
        for i in range(n):
            name = f"run_{i:07d}"
            s, t, b = (int(x) for x in rng.integers(0, classes, 3))
            f.write(f",{name},{s},{t},{b}\n")
            _jpeg(root / "ims" / f"{name}_x_gen.jpg", (40, 40), seed + i)
            rows.append((name, s, t, b))
    return rows


def _write_cue_conflict(root: Path):
    stimuli = [("cat", "dog"), ("dog", "elephant"), ("car", "clock"), ("knife", "knife"), ("boat", "bear")]
    for i, (s, t) in enumerate(stimuli):
        p = root / s / f"{s}{i + 1}-{t}{i + 2}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((224, 224, 3), 40 * i, np.uint8)).save(p)
    return stimuli


def _write_in9(root: Path, per_class: int = 1):
    names = ["00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore", "05_insect",
             "06_musical instrument", "07_primate", "08_fish"]
    for v in M.IN9_VARIANTS:
        for c, name in enumerate(names):
            for k in range(per_class):
                _jpeg(root / v / "val" / name / f"img_{k}.JPEG", (224, 224), c * 10 + k)


def test_imagefolder_counterfactual_cueconflict_in9_sources(tmp_path):
    for c in ("n02", "n01", "n03"):
        for k in range(2):
            _jpeg(tmp_path / "folder" / c / f"{c}_{k}.JPEG")
    (tmp_path / "folder" / "n01" / "notes.txt").write_text("not an image")
    src = D.ImageFolderSource(tmp_path / "folder")
    assert src.classes == ["n01", "n02", "n03"] and len(src) == 6 and src[2]["label"] == 1

    rows = _write_cf_dataset(tmp_path / "cf", 5)
    cf = D.CounterfactualSource(tmp_path / "cf")
    assert len(cf) == 5
    assert cf[3] == {"image": str(tmp_path / "cf" / "ims" / f"{rows[3][0]}_x_gen.jpg"), "shape": rows[3][1],
                     "texture": rows[3][2], "background": rows[3][3]}
    # split layout: root/train_*/labels.csv and root/val_*/labels.csv
    _write_cf_dataset(tmp_path / "cf2" / "train_a", 3)
    _write_cf_dataset(tmp_path / "cf2" / "val_a", 2, seed=5)
    assert len(D.CounterfactualSource(tmp_path / "cf2", "train")) == 3
    assert len(D.CounterfactualSource(tmp_path / "cf2", "val")) == 2
    with pytest.raises(D.DataError, match="labels.csv"):
        D.CounterfactualSource(tmp_path / "folder")

    stimuli = _write_cue_conflict(tmp_path / "cue")
    cc = D.CueConflictSource(tmp_path / "cue")
    names = M.geirhos_categories()[0]
    got = sorted((names[cc[i]["shape"]], names[cc[i]["texture"]]) for i in range(len(cc)))
    assert got == sorted(st for st in stimuli if st[0] != st[1]) and cc.excluded == 1

    _write_in9(tmp_path / "in9")
    in9 = D.in9_source(tmp_path / "in9", "mixed_rand")
    assert len(in9) == 9 and [in9[i]["label"] for i in range(9)] == list(range(9))


def test_missing_tfds_archives_error_names_the_files(tmp_path):
    with pytest.raises(D.DataError) as e:
        D.TFDSImageNetSource("train", data_dir=tmp_path / "tfds")
    msg = str(e.value)
    manual = str(tmp_path / "tfds" / "downloads" / "manual")
    assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg and manual in msg
    (tmp_path / "man").mkdir()
    (tmp_path / "man" / "ILSVRC2012_img_train.tar").write_bytes(b"")
    with pytest.raises(D.DataError) as e:  # evaluation needs only the validation archive
        D.open_source("tfds", "validation", tfds_data_dir=str(tmp_path / "tfds"), tfds_manual_dir_=str(tmp_path / "man"))
    assert "ILSVRC2012_img_val.tar is missing" in str(e.value) and str(tmp_path / "man") in str(e.value)


def test_transforms_and_resumable_order(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = (int(x) for x in rng.integers(20, 500, 2))
        left, top, cw, ch = D.random_resized_crop_box(w, h, rng)
        assert 0 <= left and 0 <= top and left + cw <= w and top + ch <= h and cw > 0 and ch > 0
    _jpeg(tmp_path / "a.JPEG", (400, 350))
    for draft in (False, True):
        out = D.train_image(str(tmp_path / "a.JPEG"), np.random.default_rng(1), 224, draft=draft)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    ev = D.eval_image(str(tmp_path / "a.JPEG"), 256, 224)
    img = Image.open(tmp_path / "a.JPEG").convert("RGB").resize((292, 256), Image.BILINEAR)
    np.testing.assert_array_equal(ev, np.asarray(img)[16:240, 34:258])  # torchvision Resize(256)+CenterCrop(224)

    D.write_synthetic_jpegs(tmp_path / "synth", 24, (60, 50), classes=3)
    src = D.ImageFolderSource(tmp_path / "synth")
    it = D.train_batches(src, 4, image_size=32, seed=3, num_threads=2)
    first = [next(it) for _ in range(7)]
    resumed = next(D.train_batches(src, 4, image_size=32, seed=3, start_step=6, num_threads=2))
    np.testing.assert_array_equal(resumed["image"], first[6]["image"])
    np.testing.assert_array_equal(resumed["label"], first[6]["label"])
    # every image once per epoch
    epoch = np.concatenate([b["label"] for b in first[:6]])
    assert np.bincount(epoch).tolist() == [8, 8, 8]
    batches = list(D.eval_batches(src, 5, resize=36, image_size=32, num_threads=2))
    assert len(batches) == 5 and sum(int(b["valid"].sum()) for b in batches) == 24


# ------------------------------------------------------------------------------------- end to end

def test_train_resume_and_evaluate_end_to_end(tmp_path, capsys):
    from cgn_jax import evaluate as E
    from cgn_jax.config_loading import load_config
    from cgn_jax.imagenet_classifier import train

    for c in range(4):
        for k in range(4):
            _jpeg(tmp_path / "train" / f"n{c:08d}" / f"{k}.JPEG", (48, 40), 10 * c + k)
    _write_cf_dataset(tmp_path / "cf", 8, classes=4)
    _write_cue_conflict(tmp_path / "cue")
    _write_in9(tmp_path / "in9")
    overrides = [f"--config.data.train={tmp_path / 'train'}", f"--config.data.counterfactual={tmp_path / 'cf'}",
                 "--config.train.per_device_batch_size=4", "--config.data.cf_ratio=0.5",
                 "--config.model.num_classes=1000", "--config.model.stage_sizes=(1,)", "--config.train.num_steps=3", "--config.train.eval_every_epochs=0"]
    config = load_config("configs/imagenet_classifier.py:tiny", overrides)
    workdir = tmp_path / "run"
    result = train(config, workdir, progress=False)
    assert result.status == "completed" and result.step == 3
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert (workdir / "ensemble" / "meta.json").is_file()

    config.train.num_steps = 4  # resume: continues at step 3
    result = train(config, workdir, progress=False)
    assert result.step == 4 and "resuming" in capsys.readouterr().out
    assert [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    parser = argparse.ArgumentParser()
    E.add_arguments(parser)
    for what, data in (("shape-bias", tmp_path / "cue"), ("bg-gap", tmp_path / "in9"),
                       ("imagenet", tmp_path / "train"), ("counterfactual", tmp_path / "cf")):
        args = parser.parse_args(["--what", what, "--data", str(data), "--checkpoint", str(workdir),
                                  "--batch-size", "4", "--image-size", "32", "--resize", "36", "--threads", "2"])
        assert E.run(args) == 0
        out = json.loads((workdir / f"eval_{what.replace('-', '_')}.json").read_text())
        assert set(out["results"]) == {*R.HEADS, "ensemble", "shape_texture"}
    printed = capsys.readouterr().out
    assert "Shape bias" in printed and "BG-Gap" in printed
    sb = json.loads((workdir / "eval_shape_bias.json").read_text())["results"]["ensemble"]
    assert sb["stimuli"] == 4 and sb["excluded_same_cue"] == 0
    gap = json.loads((workdir / "eval_bg_gap.json").read_text())["results"]["shape_texture"]
    assert gap["bg_gap"] == pytest.approx(gap["mixed_same"] - gap["mixed_rand"])
    assert json.loads((workdir / "eval_imagenet.json").read_text())["results"]["shape"]["images"] == 16
