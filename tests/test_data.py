"""Tests of the MNIST variants: raw readers, TFDS builds, and the on-device renderer.

They run on the real MNIST/texture files in ../shared/data, on small `limit=` builds in
temporary directories, so they stay fast on a CPU-only machine.
"""

from __future__ import annotations

import gzip
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cgn_jax.data import builders, idx, palettes, render  # noqa: E402

from conftest import SHARED as _SHARED_ROOT  # noqa: E402  (../shared or $CGN_JAX_SHARED)

SHARED = _SHARED_ROOT / "data"
MNIST_DIR = SHARED / "mnist"
TEXTURES_DIR = SHARED / "textures"
VARIANTS = ("colored", "double_colored", "wildlife")


TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist():
    return idx.load_mnist_idx(MNIST_DIR)


@pytest.fixture(scope="module")
def textures():
    return idx.load_textures(TEXTURES_DIR)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def _load(variant, split, data_dir, **kw):
    return builders.load_variant(variant, split, mnist_dir=MNIST_DIR, textures_dir=TEXTURES_DIR,
                                 data_dir=data_dir, **kw)


# ---------------------------------------------------------------- raw sources
def test_idx_reader_counts_and_labels(mnist):
    assert mnist["train_images"].shape == (60000, 28, 28)
    assert mnist["test_images"].shape == (10000, 28, 28)
    assert mnist["train_images"].dtype == np.uint8 and mnist["train_labels"].dtype == np.int64
    assert np.bincount(mnist["train_labels"]).tolist() == TRAIN_COUNTS
    assert np.bincount(mnist["test_labels"]).tolist() == TEST_COUNTS
    assert mnist["train_labels"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist["test_labels"][:5].tolist() == [7, 2, 1, 0, 4]
    assert mnist["train_images"].max() == 255 and mnist["train_images"][0, 0, 0] == 0


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], ">u4").tobytes() + arr.tobytes())
    np.testing.assert_array_equal(idx.read_idx(good), arr)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        idx.read_idx(bad)


def test_textures_sorted_and_resized(textures):
    for kind in ("object", "background"):
        assert textures[kind].shape == (10, 150, 150, 3) and textures[kind].dtype == np.uint8
    # index = class: file names start with the class digit; classes differ
    assert not np.array_equal(textures["object"][0], textures["object"][1])


def test_palettes_match_official_css_names():
    from PIL import ImageColor

    colors = palettes.DOUBLE_COLORED_CSS
    for i in range(10):
        bg = np.array(ImageColor.getcolor(colors[i], "RGB")) / 255.0
        obj = np.array(ImageColor.getcolor(colors[i - 6], "RGB")) / 255.0
        np.testing.assert_allclose(palettes.DOUBLE_COLORED_BACKGROUND[i], bg, atol=1e-6)
        np.testing.assert_allclose(palettes.DOUBLE_COLORED_OBJECT[i], obj, atol=1e-6)
    assert palettes.LNTL_PALETTE.shape == (10, 3)
    assert abs(palettes.COLORED_JITTER_STD ** 2 - 0.02) < 1e-12


def test_prepare_digits_follow_official_resizes(mnist):
    from PIL import Image

    ims = mnist["train_images"][:20]
    # colored: PIL nearest resize (the LNTL loader's transforms.Resize(..., NEAREST))
    col = builders.prepare_digits(ims, "colored")
    ref = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.NEAREST)) for im in ims])
    np.testing.assert_array_equal(col[..., 0], ref)
    # double/wildlife: F.interpolate(nearest) = floor(i * 28/32), then (x / 255) > 0.1
    r = (np.arange(32) * 28) // 32
    ref = ((ims[:, r][:, :, r].astype(np.float32) / 255.0) > 0.1).astype(np.uint8) * 255
    for v in ("double_colored", "wildlife"):
        got = builders.prepare_digits(ims, v)
        assert got.shape == (20, 32, 32, 1) and got.dtype == np.uint8
        np.testing.assert_array_equal(got[..., 0], ref)


# ---------------------------------------------------------------- splits (numpy, no TFDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_label_correlation(variant, mnist, textures):
    n = 5000
    tr = builders.make_split(variant, *builders.mnist_split(variant, mnist, "train"), "train",
                             limit=n, textures=textures)
    np.testing.assert_array_equal(tr["fg_label"], tr["label"])
    np.testing.assert_array_equal(tr["bg_label"], tr["label"])
    te = builders.make_split(variant, *builders.mnist_split(variant, mnist, "test"), "test",
                             limit=n, textures=textures)
    for k in ("fg_label", "bg_label"):
        assert 0.08 < np.mean(te[k] == te["label"]) < 0.12
        assert set(np.unique(te[k])) == set(range(10))
    c9 = builders.make_split(variant, *builders.mnist_split(variant, mnist, "train"), "train",
                             correlation=0.9, limit=n, textures=textures)
    for k in ("fg_label", "bg_label"):
        assert 0.88 < np.mean(c9[k] == c9["label"]) < 0.92
    if variant == "colored":
        np.testing.assert_array_equal(te["bg_label"], te["fg_label"])
        np.testing.assert_array_equal(c9["bg_label"], c9["fg_label"])
    else:  # object and background classes are drawn independently
        assert np.mean(te["fg_label"] == te["bg_label"]) < 0.2


def test_splits_follow_official_partitions(mnist):
    im, lab = builders.mnist_split("colored", mnist, "test")
    assert len(lab) == 10000 and im is mnist["test_images"]
    assert len(builders.mnist_split("colored", mnist, "train")[1]) == 60000
    for v in ("double_colored", "wildlife"):
        assert len(builders.mnist_split(v, mnist, "train")[1]) == 50000
        im, lab = builders.mnist_split(v, mnist, "test")
        np.testing.assert_array_equal(lab, mnist["train_labels"][50000:])


def test_limit_is_a_prefix_of_the_full_draw(mnist, textures):
    for split in ("train", "test"):
        small = builders.make_split("wildlife", *builders.mnist_split("wildlife", mnist, split),
                                    split, correlation=0.5, limit=50, textures=textures)
        big = builders.make_split("wildlife", *builders.mnist_split("wildlife", mnist, split),
                                  split, correlation=0.5, limit=300, textures=textures)
        for k in small:
            np.testing.assert_array_equal(small[k], big[k][:50])


def test_colored_test_split_with_another_palette(mnist):
    """`palette=` recolours the same draw: same digits, colour labels and jitter, other colours."""
    args = (*builders.mnist_split("colored", mnist, "test"), "test")
    stored = builders.make_split("colored", *args, limit=300)
    same = builders.make_split("colored", *args, limit=300, palette=palettes.LNTL_PALETTE)
    other = builders.make_split("colored", *args, limit=300, palette=palettes.SEPARATED_PALETTE)
    for k in stored:
        np.testing.assert_array_equal(same[k], stored[k])
        if k != "image":
            np.testing.assert_array_equal(other[k], stored[k])
    fg, _, jitter, _ = builders.test_draws("colored", 10000, 300)
    np.testing.assert_array_equal(fg, stored["fg_label"])
    full = stored["digit"][..., 0] == 255  # fully inked pixels show the (jittered) colour itself
    for i in range(0, 300, 37):
        want = np.clip(palettes.SEPARATED_PALETTE[fg[i]] + jitter[i], 0, 1) * 255
        np.testing.assert_allclose(other["image"][i][full[i]], np.broadcast_to(want, (full[i].sum(), 3)), atol=0.51)
    assert not np.array_equal(other["image"], stored["image"])
    dist = np.linalg.norm(palettes.SEPARATED_PALETTE[:, None] - palettes.SEPARATED_PALETTE[None], axis=-1)
    assert dist[~np.eye(10, dtype=bool)].min() >= 0.5


def test_stored_wildlife_image_is_the_official_composite(mnist, textures):
    te = builders.make_split("wildlife", *builders.mnist_split("wildlife", mnist, "test"),
                             "test", limit=20, textures=textures)
    pad = {k: np.pad(v, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect")
           for k, v in textures.items()}
    win = {k: np.lib.stride_tricks.sliding_window_view(v, (32, 32), axis=(1, 2))
           for k, v in pad.items()}
    for i in range(2):
        mask = te["digit"][i, ..., 0] == 255
        for kind, lab, sel in (("object", te["fg_label"][i], mask),
                               ("background", te["bg_label"][i], ~mask)):
            w = win[kind][lab].transpose(0, 1, 3, 4, 2)  # (125, 125, 32, 32, 3)
            hits = np.all(w[:, :, sel] == te["image"][i][sel], axis=(-1, -2))
            assert hits.any(), (i, kind)


# ---------------------------------------------------------------- TFDS builds
@pytest.mark.parametrize("variant", VARIANTS)
def test_load_variant_shapes_and_dtypes(variant, data_dir):
    for split in ("train", "test"):
        d = _load(variant, split, data_dir, limit=32)
        assert set(d) == {"digit", "image", "label", "fg_label", "bg_label"}
        assert d["digit"].shape == (32, 32, 32, 1) and d["digit"].dtype == np.uint8
        assert d["image"].shape == (32, 32, 32, 3) and d["image"].dtype == np.uint8
        for k in ("label", "fg_label", "bg_label"):
            assert d[k].shape == (32,) and d[k].dtype == np.int64
        if variant != "colored":
            assert set(np.unique(d["digit"])) <= {0, 255}
        if variant == "colored":  # digit on black
            assert np.all(d["image"][d["digit"][..., 0] == 0] == 0)
    # the TFDS name is accepted too, and reads back the same build
    d2 = _load(palettes.TFDS_NAMES[variant], "test", data_dir, limit=32)
    np.testing.assert_array_equal(d2["image"], d["image"])


def test_test_split_identical_across_builds(tmp_path, data_dir):
    a = _load("double_colored", "test", tmp_path / "a", limit=40)
    b = _load("double_colored", "test", tmp_path / "b", limit=40)
    c = _load("double_colored", "test", tmp_path / "c", limit=40, correlation=0.9, seed=3)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes() == c[k].tobytes(), k
    files_a = sorted((tmp_path / "a").rglob("*test.array_record*"))
    files_b = sorted((tmp_path / "b").rglob("*test.array_record*"))
    assert files_a and [f.read_bytes() for f in files_a] == [f.read_bytes() for f in files_b]
    # train depends on the config: correlation 0.9 changes some labels
    tr1 = _load("double_colored", "train", tmp_path / "a", limit=40)
    tr9 = _load("double_colored", "train", tmp_path / "c", limit=40, correlation=0.9, seed=3)
    np.testing.assert_array_equal(tr1["digit"], tr9["digit"])
    assert (tr9["fg_label"] != tr9["label"]).any() or (tr9["bg_label"] != tr9["label"]).any()


def test_builder_config_names():
    assert builders.config_name(0.925, 1) == "corr0.925_seed1"
    assert builders.config_name(1.0, 0, 64) == "corr1_seed0_first64"
    cfg = builders.DoubleColoredMnist.get_builder_config("corr0.925_seed1_first10")
    assert (cfg.correlation, cfg.seed, cfg.limit) == (0.925, 1, 10)


# ---------------------------------------------------------------- on-device rendering
@pytest.fixture(scope="module")
def batches(data_dir):
    return {v: {k: jnp.asarray(x) for k, x in _load(v, "train", data_dir, limit=32).items()}
            for v in VARIANTS}


@pytest.fixture(scope="module")
def assets():
    return {v: render.make_assets(v, TEXTURES_DIR) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_render_batch_train(variant, batches, assets):
    batch = batches[variant]
    a = render.render_batch(jax.random.PRNGKey(0), batch, assets[variant], variant)
    b = render.render_batch(jax.random.PRNGKey(1), batch, assets[variant], variant)
    a2 = render.render_batch(jax.random.PRNGKey(0), batch, assets[variant], variant)
    assert a.shape == (32, 32, 32, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))  # deterministic per key
    assert not np.allclose(np.asarray(a), np.asarray(b))  # fresh jitter / crops per key
    lo, hi = float(a.min()), float(a.max())
    if variant == "double_colored":  # official: jitter is not clipped (see render docstring)
        assert -1.1 < lo and hi < 1.1
    else:
        assert -1.0 <= lo and hi <= 1.0
    # close to the stored mean-colour rendering (jitter is small) for double-colored
    if variant == "double_colored":
        ref = np.asarray(batch["image"], np.float32) / 127.5 - 1.0
        assert np.abs(np.asarray(a) - ref).max() < 0.15


def _many_renders(variant, batches, assets, n_calls=16):
    """Example 0 repeated over the batch, rendered with n_calls keys (no recompilation)."""
    one = {k: jnp.repeat(v[:1], v.shape[0], axis=0) for k, v in batches[variant].items()}
    outs = [render.render_batch(jax.random.PRNGKey(100 + i), one, assets[variant], variant)
            for i in range(n_calls)]
    return one, np.concatenate([np.asarray(o) for o in outs])


def test_render_jitter_statistics(batches, assets):
    # the per-image colour jitter has the official std (512 draws for one example)
    one, out = _many_renders("double_colored", batches, assets)
    digit = np.asarray(one["digit"][0, ..., 0]) == 255
    bg = out[:, ~digit][:, 0]  # one background pixel per image, (512, 3), in [-1, 1]
    np.testing.assert_allclose(bg.std(0) / 2.0, 0.01, rtol=0.2)
    np.testing.assert_allclose(
        bg.mean(0), palettes.DOUBLE_COLORED_BACKGROUND[int(one["bg_label"][0])] * 2 - 1, atol=0.01)
    one, out = _many_renders("colored", batches, assets)
    full = np.asarray(one["digit"][0, ..., 0]) == 255
    assert full.any()
    px = (out[:, full][:, 0] + 1) / 2  # (512, 3) in [0, 1]
    mean = palettes.LNTL_PALETTE[int(one["fg_label"][0])]
    unclipped = (mean > 0.4) & (mean < 0.75)  # channels that clipping hardly touches
    assert unclipped.any()
    np.testing.assert_allclose(px.std(0)[unclipped], palettes.COLORED_JITTER_STD, rtol=0.2)
    np.testing.assert_allclose(px.mean(0)[unclipped], mean[unclipped], atol=0.03)


def test_render_wildlife_crops_come_from_the_right_texture(batches, assets, textures):
    batch = batches["wildlife"]
    out = np.asarray(render.render_batch(jax.random.PRNGKey(5), batch, assets["wildlife"],
                                         "wildlife"))
    u8 = np.round((out + 1) * 127.5).astype(np.uint8)
    pad = {k: np.pad(v, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="reflect")
           for k, v in textures.items()}
    i = 0
    mask = np.asarray(batch["digit"][i, ..., 0]) == 255
    for kind, lab, sel in (("object", int(batch["fg_label"][i]), mask),
                           ("background", int(batch["bg_label"][i]), ~mask)):
        w = np.lib.stride_tricks.sliding_window_view(pad[kind][lab], (32, 32), axis=(0, 1))
        w = w.transpose(0, 1, 3, 4, 2)
        assert np.all(w[:, :, sel] == u8[i][sel], axis=(-1, -2)).any(), kind


def test_render_test_split_and_inside_jit(batches, assets):
    batch = batches["wildlife"]
    out = render.render_batch(jax.random.PRNGKey(0), batch, assets["wildlife"], "wildlife",
                              train=False)
    np.testing.assert_allclose(np.asarray(out), np.asarray(batch["image"]) / 127.5 - 1.0, atol=1e-6)

    @jax.jit
    def step(key, batch):  # a stand-in for a jitted train step
        x = render.render_batch(key, batch, assets["colored"], "colored")
        return x.mean(), x

    m, x = step(jax.random.PRNGKey(7), batches["colored"])
    direct = render.render_batch(jax.random.PRNGKey(7), batches["colored"], assets["colored"],
                                 "colored")
    np.testing.assert_allclose(np.asarray(x), np.asarray(direct), atol=1e-6)
    assert np.isfinite(float(m))


# ---------------------------------------------------------------- bad input
def test_unknown_variant_lists_valid_names(data_dir):
    with pytest.raises(ValueError, match="unknown MNIST variant") as e:
        builders.load_variant("rainbow", "train", data_dir=data_dir)
    for name in ("colored", "double_colored", "wildlife", "wildlife_mnist"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="unknown MNIST variant"):
        render.make_assets("rainbow")
    with pytest.raises(ValueError, match="split"):
        builders.load_variant("colored", "validation", data_dir=data_dir)
    with pytest.raises(ValueError, match="correlation"):
        builders.load_variant("colored", "train", data_dir=data_dir, correlation=1.5)


def test_missing_mnist_dir(tmp_path):
    missing = tmp_path / "no_mnist_here"
    with pytest.raises(FileNotFoundError) as e:
        builders.load_variant("double_colored", "train", mnist_dir=missing,
                              data_dir=tmp_path / "tfds", limit=4)
    assert str(missing) in str(e.value) and "mnist_dir" in str(e.value)
    (tmp_path / "partial").mkdir()
    with pytest.raises(FileNotFoundError, match="t10k|train-") as e:
        idx.load_mnist_idx(tmp_path / "partial")
    assert "mnist_dir" in str(e.value)
    # no mnist_dir and no prepared TFDS 'mnist' either
    with pytest.raises(FileNotFoundError, match="mnist_dir"):
        idx.load_mnist(None, tfds_data_dir=tmp_path / "empty_tfds")


def test_missing_or_bad_textures_dir(tmp_path):
    missing = tmp_path / "no_textures"
    with pytest.raises(FileNotFoundError) as e:
        builders.load_variant("wildlife", "train", mnist_dir=MNIST_DIR, textures_dir=missing,
                              data_dir=tmp_path / "tfds", limit=4)
    assert str(missing) in str(e.value) and "textures_dir" in str(e.value)
    with pytest.raises(FileNotFoundError, match="textures_dir"):
        render.make_assets("wildlife", None)
    # wrong count: 9 object textures
    bad = tmp_path / "bad_textures"
    for kind in ("object", "background"):
        (bad / kind).mkdir(parents=True)
        for p in sorted((TEXTURES_DIR / kind).iterdir())[: 9 if kind == "object" else 10]:
            (bad / kind / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match="holds 9 images; expected exactly 10"):
        idx.load_textures(bad)


def test_builders_leave_no_temporary_directories(tmp_path, monkeypatch):
    """TFDS's bucket lookup for an unbuilt dataset made an empty /tmp/tmp*tfds every time."""
    import tempfile

    from cgn_jax.data import counterfactual

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    builder = builders.get_builder("wildlife", data_dir=tmp_path / "tfds", limit=4,
                                   mnist_dir=MNIST_DIR, textures_dir=TEXTURES_DIR)
    assert not builder.is_prepared()
    assert builder.info.features["label"].num_classes == 10
    arrays = {"image": np.zeros((2, 32, 32, 3), np.uint8),
              **{k: np.array([3, 7]) for k in counterfactual.LABEL_KEYS}}
    written = counterfactual.write_dataset(tmp_path / "cf", arrays, {"generator": "test"})
    assert counterfactual.load_dataset(written)["label"].tolist() == [3, 7]
    leftovers = [p.name for p in scratch.iterdir() if p.name.endswith("tfds")]
    assert leftovers == [], f"TFDS left temporary directories: {leftovers}"
