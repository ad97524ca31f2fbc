"""Mask orientation per class: the check training and `table1` run on a generator."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cgn_jax import mask_stats
from cgn_jax.generate import load_generator


def test_frame_mean_tells_a_digit_mask_from_an_inverted_one():
    size = 32
    digit = np.zeros((size, size, 1))
    digit[9:23, 13:19] = 1.0  # a stroke inside the central 20x20
    masks = np.stack([digit, 1.0 - digit, digit, 0.5 * np.ones_like(digit)])
    means = mask_stats.per_class_frame_mean(masks, np.array([0, 1, 0, 3]), n_classes=5)
    assert means[0] == 0.0 and means[1] == 1.0 and means[3] == 0.5
    assert np.isnan(means[2]) and np.isnan(means[4])  # classes without samples
    assert mask_stats.inverted_classes(means) == [1]
    assert mask_stats.describe(means).endswith("for classes 1 (of 5)")
    assert mask_stats.describe(np.zeros(10)) == "masks the right way round for all 10 classes"
    assert mask_stats.frame(32).sum() == 32 * 32 - 20 * 20
    with pytest.raises(ValueError, match="square"):
        mask_stats.per_class_frame_mean(np.zeros((1, 32, 30, 1)), np.array([0]), 10)


def test_saturation_share_per_class():
    black = np.full((4, 4, 3), -np.tanh(2.7))  # a trained colored background: -0.991, not saturated
    white = np.full((4, 4, 3), np.tanh(6.0))   # class 0's stuck background in the full colored run
    half = black.copy()
    half[:2] = -1.0
    x = np.stack([white, black, half, white])
    share = mask_stats.per_class_saturated(x, np.array([0, 1, 2, 0]), n_classes=4)
    np.testing.assert_array_equal(share[:3], [1.0, 0.0, 0.5])
    assert np.isnan(share[3])


@pytest.mark.parametrize("name", ["colored_MNIST.pth", "double_colored_MNIST.pth", "wildlife_MNIST.pth"])
def test_official_generators_have_every_mask_the_right_way_round(cgn_weights, name):
    model, variables = load_generator(str(cgn_weights / name))
    means = mask_stats.generator_frame_means(model, variables, jax.random.PRNGKey(0), per_class=16)
    assert means.shape == (10,)
    assert mask_stats.inverted_classes(means) == [] and means.max() < 0.15, means


def test_generate_warns_about_a_generator_with_inverted_classes(cgn_weights, tmp_path, monkeypatch, capsys):
    from cgn_jax.cli import main

    means = np.full(10, 0.02)
    means[[3, 7]] = 0.7
    monkeypatch.setattr(mask_stats, "generator_frame_means", lambda *a, **k: means)
    assert main(["generate", "--checkpoint", str(cgn_weights / "colored_MNIST.pth"), "--out", str(tmp_path),
                 "--sheet"]) == 0
    err = capsys.readouterr().err
    assert "colored_MNIST.pth: mask inverted" in err and "for classes 3, 7 (of 10)" in err
