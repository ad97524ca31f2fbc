"""The edge contrast where a double-colored digit's colour is its background's, for the real test
split and for a CGN's counterfactuals (cgn_jax.cue_contrast)."""

import jax
import numpy as np

from cgn_jax import cue_contrast
from cgn_jax.data import palettes
from cgn_jax.models.mnist_cgn import MnistCGN
from cgn_jax.port import mnist as port_mnist


def test_each_digit_colour_is_exactly_one_other_class_background():
    assert cue_contrast.ALIKE.shape == (palettes.NUM_CLASSES, palettes.NUM_CLASSES)
    assert (cue_contrast.ALIKE.sum(0) == 1).all() and (cue_contrast.ALIKE.sum(1) == 1).all()
    assert not np.diag(cue_contrast.ALIKE).any()


def test_the_real_test_split_shows_those_digits_through_the_jitter_alone():
    c = cue_contrast.real_test_contrast()
    assert 0.08 < c.size / 10_000 < 0.12  # one image in ten
    # two independent N(0, 0.01) per channel, partly clipped at the palette's 0 and 255 channels
    stats = cue_contrast.summary(c)
    assert 0.005 < stats["median"] < 0.03 and stats["p90"] < 0.06, stats
    assert cue_contrast.summary(np.array([]))["n"] == 0


def test_counterfactual_contrast_reads_the_edge_and_grows_with_colour_jitter(cgn_weights):
    variables = port_mnist.load_torch_mnist_cgn(cgn_weights / "double_colored_MNIST.pth")
    model, key = MnistCGN(), jax.random.PRNGKey(0)
    plain = cue_contrast.counterfactual_contrast(model, variables, key, n_shapes=400, num_cfs=5)
    assert 100 < plain.size < 300 and (plain >= 0).all()  # about a tenth of 2,000
    jittered = cue_contrast.counterfactual_contrast(model, variables, key, n_shapes=400, num_cfs=5,
                                                    colour_jitter=0.05)
    assert np.median(jittered) > np.median(plain) + 0.03, (np.median(plain), np.median(jittered))
    assert "median" in cue_contrast.describe("x", cue_contrast.summary(plain))
