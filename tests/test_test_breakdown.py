"""The Table 1 test breakdown: per-class accuracy and double-colored's same-colour test images."""

import numpy as np
import pytest

from cgn_jax import test_breakdown as T
from cgn_jax.data import builders, idx, palettes


def test_cues_alike_marks_the_double_colored_test_images_whose_digit_matches_its_background(mnist_dir):
    alike = T.cues_alike("double_colored", T.TEST_SPLIT_SIZE)
    assert 0.09 < alike.mean() < 0.11  # one colour pair in ten
    assert T.cues_alike("wildlife", 100) is None and T.cues_alike("colored", 100) is None
    np.testing.assert_array_equal(T.cues_alike("double_colored", 300), alike[:300])  # a prefix of the same split

    mnist = idx.load_mnist(mnist_dir)
    n = 300
    split = builders.make_split("double_colored", mnist["train_images"][50000:], mnist["train_labels"][50000:],
                                "test", limit=n)
    digit = split["digit"][..., 0] > 127
    image = split["image"].astype(np.float32) / 255
    for i in range(n):
        gap = np.abs(image[i][digit[i]].mean(0) - image[i][~digit[i]].mean(0)).max()
        assert (gap < 0.1) == alike[i], (i, gap)  # alike: only the jitter tells digit from background


def test_breakdown_counts_per_class_and_on_the_alike_rows():
    labels = np.tile(np.arange(10), 100)
    alike = T.cues_alike("double_colored", labels.size)
    perfect = T.breakdown("double_colored", labels, labels)
    assert perfect["by_class"] == [1.0] * 10 and perfect["cues_alike"] == 1.0
    assert perfect["cues_alike_share"] == pytest.approx(alike.mean())

    wrong_where_alike = np.where(alike, (labels + 1) % 10, labels)
    result = T.breakdown("double_colored", wrong_where_alike, labels)
    assert result["cues_alike"] == 0.0
    assert np.mean(result["by_class"]) == pytest.approx(1 - alike.mean())

    sevens = T.breakdown("wildlife", np.full_like(labels, 7), labels)
    assert sevens["by_class"] == [0.0] * 7 + [1.0] + [0.0] * 2 and sevens["cues_alike"] is None
    assert "per class 0 0 0 0 0 0 0 100 0 0" == T.describe(sevens)
    assert "digit colour = background colour" in T.describe(result)
    with pytest.raises(ValueError, match="3 predictions for 1000 test labels"):
        T.breakdown("colored", labels[:3], labels)
