"""`cgn-jax generate`: counterfactual batches, sample sheets and TFDS datasets."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from cgn_jax.cli import main
from cgn_jax.data.counterfactual import load_dataset
from cgn_jax.generate import load_generator, sample_counterfactuals
from cgn_jax.models.mnist_cgn import MASK_CLAMP, MnistCGN


@pytest.fixture(scope="module")
def colored(cgn_weights):
    return load_generator(str(cgn_weights / "colored_MNIST.pth"))


def test_counterfactuals_share_the_mask_of_their_shape(colored):
    model, variables = colored
    out = sample_counterfactuals(model, variables, jax.random.PRNGKey(0), 8, 3, as_uint8=False)
    assert out["image"].shape == (24, 32, 32, 3)
    labels = np.asarray(out["shape_label"]).reshape(3, 8)
    assert (labels == labels[0]).all() and (np.asarray(out["label"]) == np.asarray(out["shape_label"])).all()
    # colored MNIST has a black background, so every counterfactual of one shape shows the same digit mask
    images = np.asarray(out["image"]).reshape(3, 8, 32, 32, 3)
    for b in range(8):
        fg = [(images[k, b] > -0.8).any(-1) for k in range(3)]
        agree = np.mean(fg[0] == fg[1])
        assert agree > 0.95, agree
    # texture labels vary across counterfactuals
    assert len(np.unique(np.asarray(out["texture_label"]))) > 3


def test_mapping_and_vmapping_over_counterfactuals_give_the_same_images(colored):
    model, variables = colored
    key = jax.random.PRNGKey(5)
    seq = sample_counterfactuals(model, variables, key, 6, 4, as_uint8=False, loop="map")
    vec = sample_counterfactuals(model, variables, key, 6, 4, as_uint8=False, loop="vmap")
    for k in ("shape_label", "texture_label", "background_label"):
        np.testing.assert_array_equal(seq[k], vec[k], err_msg=k)
    np.testing.assert_allclose(seq["image"], vec["image"], atol=2e-5)
    assert float(np.std(np.asarray(seq["image"]))) > 0.1  # real images, not two arrays of zeros
    with pytest.raises(ValueError, match="counterfactual loop"):
        sample_counterfactuals(model, variables, key, 6, 4, loop="scan")


def test_counterfactual_mask_matches_the_shape_mechanism(colored):
    model, variables = colored
    key = jax.random.PRNGKey(3)
    k_y, k_u, _ = jax.random.split(key, 3)
    y = jax.random.randint(k_y, (4,), 0, 10)
    u = model.sample_noise(k_u, 4)
    mask = np.clip(np.asarray(model.apply(variables, u, y, method=MnistCGN.shape)), *MASK_CLAMP)
    out = sample_counterfactuals(model, variables, key, 4, 2, as_uint8=False)
    np.testing.assert_array_equal(np.asarray(out["shape_label"])[:4], np.asarray(y))
    # where the mask is ~1 the image equals the (shuffled) foreground, i.e. not the black background
    on = mask[..., 0] > 0.999
    assert on.any()
    assert (np.abs(np.asarray(out["image"])[:4][on]).max(-1) > 0).all()


def test_generate_cli_writes_sheet_and_dataset(cgn_weights, tmp_path):
    out = tmp_path / "gen"
    rc = main(["generate", "--checkpoint", str(cgn_weights / "double_colored_MNIST.pth"),
               "--config", "configs/mnist.py:double_colored", "--out", str(out), "--sheet", "--dataset",
               "--num-images", "120", "--num-cfs", "4", "--batch-size", "40"])
    assert rc == 0
    with Image.open(out / "counterfactuals_double_colored.png") as sheet:
        assert sheet.size[0] > 300 and sheet.size[1] > 300
    data = load_dataset(out)
    assert data["image"].shape == (120, 32, 32, 3) and data["image"].dtype == np.uint8
    assert set(data) == {"image", "label", "shape_label", "texture_label", "background_label"}
    assert (data["label"] == data["shape_label"]).all()
    # 4 counterfactuals per shape: each block of 10 shapes repeats its shape labels 4 times
    shapes = data["shape_label"][:40].reshape(4, 10)
    assert (shapes == shapes[0]).all()


def test_generate_cli_errors(tmp_path):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert main(["generate", "--config", "configs/mnist.py:rainbow", "--out", str(tmp_path)]) == 2


def test_generate_cli_rejects_a_non_positive_shape_noise_scale(cgn_weights, tmp_path, capsys):
    rc = main(["generate", "--checkpoint", str(cgn_weights / "colored_MNIST.pth"), "--out", str(tmp_path),
               "--dataset", "--num-images", "10", "--shape-noise-scale", "0"])
    assert rc == 2 and "--shape-noise-scale must be positive" in capsys.readouterr().err
    assert not (tmp_path / "tfds").exists()
