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


def test_real_test_contrast_is_the_stored_test_images_edge(mnist_dir):
    """Measured on the images the split stores (digit mask from the stored digit), the edge is the same."""
    from cgn_jax.data.builders import make_split, mnist_split
    from cgn_jax.data.idx import load_mnist_idx

    n = 2_000
    images, labels = mnist_split(palettes.DOUBLE_COLORED, load_mnist_idx(mnist_dir), "test")
    split = make_split(palettes.DOUBLE_COLORED, images, labels, "test", limit=n)
    alike = cue_contrast.ALIKE[split["fg_label"], split["bg_label"]]
    inside = split["digit"][alike, ..., 0] > 127
    image = split["image"][alike].astype(np.float64) / 255.0
    mean_in = np.stack([im[m].mean(0) for im, m in zip(image, inside)])
    mean_out = np.stack([im[~m].mean(0) for im, m in zip(image, inside)])
    measured = np.linalg.norm(mean_in - mean_out, axis=-1)
    # test_draws for n_full = 10,000 and its first n: the same draws as the stored split's first n
    np.testing.assert_allclose(cue_contrast.real_test_contrast()[: alike.sum()], measured, atol=1e-6)


def test_counterfactual_contrast_reads_the_edge_and_grows_with_colour_jitter(cgn_weights):
    variables = port_mnist.load_torch_mnist_cgn(cgn_weights / "double_colored_MNIST.pth")
    model, key = MnistCGN(), jax.random.PRNGKey(0)
    plain = cue_contrast.counterfactual_contrast(model, variables, key, n_shapes=400, num_cfs=5)
    assert 100 < plain.size < 300 and (plain >= 0).all()  # about a tenth of 2,000
    jittered = cue_contrast.counterfactual_contrast(model, variables, key, n_shapes=400, num_cfs=5,
                                                    colour_jitter=0.05)
    assert np.median(jittered) > np.median(plain) + 0.03, (np.median(plain), np.median(jittered))
    assert "median" in cue_contrast.describe("x", cue_contrast.summary(plain))
