"""Where a Table 1 classifier's test accuracy goes.

One number per run hides two things worth seeing. Per shape class: the classes a CGN draws
poorly (`cgn_jax.shape_probe`) should be the ones a classifier trained on its counterfactuals
gets wrong. And on double-colored MNIST, one test image in ten has a digit colour equal to
its background colour (each colour is one class's digit colour and another's background),
so its shape shows only through the small colour jitter: those images bound what any
classifier can reach on the split, whatever the CGN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax.data import palettes

TEST_SPLIT_SIZE = 10_000  # every variant's test split (colored: MNIST test; the others: train[50000:])


def cues_alike(variant: str, n: int) -> np.ndarray | None:
    """(n,) bool: test rows whose digit and background share one colour; None where that cannot happen."""
    from cgn_jax.data.builders import test_draws

    if palettes.canonical_variant(variant) != palettes.DOUBLE_COLORED:
        return None
    fg, bg, _, _ = test_draws(variant, TEST_SPLIT_SIZE, n)
    return palettes.DOUBLE_COLORED_ALIKE[fg, bg]


@functools.partial(jax.jit, static_argnames=("pool",))
def _predict(variables, images, pool: str):
    from cgn_jax.data.render import from_uint8
    from cgn_jax.models.classifier import CNN

    return jnp.argmax(CNN(pool=pool).apply(variables, from_uint8(images), train=False), -1)


def predictions(variables: dict, images: np.ndarray, pool: str = "official", batch: int = 1000) -> np.ndarray:
    """Class per uint8 test image, as the classifier's own evaluation computes it."""
    return np.concatenate([np.asarray(_predict(variables, images[i:i + batch], pool))
                           for i in range(0, len(images), batch)])


def breakdown(variant: str, predicted: np.ndarray, labels: np.ndarray) -> dict:
    """{'by_class': accuracy per shape class, 'cues_alike': accuracy on those rows or None, 'cues_alike_share'}."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.shape[0]} predictions for {labels.shape[0]} test labels")
    correct = predicted == labels
    by_class = [float(correct[labels == c].mean()) if (labels == c).any() else None
                for c in range(palettes.NUM_CLASSES)]
    alike = cues_alike(variant, labels.shape[0])
    return {"by_class": by_class,
            "cues_alike": float(correct[alike].mean()) if alike is not None and alike.any() else None,
            "cues_alike_share": float(alike.mean()) if alike is not None else None}


def of_classifier(variant: str, variables: dict, images: np.ndarray, labels: np.ndarray, pool: str) -> dict:
    """`breakdown` of one trained classifier on the test images."""
    return breakdown(variant, predictions(variables, images, pool), labels)


def describe(result: dict) -> str:
    """One line: the per-class accuracies, and the cues-alike subset where there is one."""
    line = "per class " + " ".join("-" if a is None else f"{100 * a:.0f}" for a in result["by_class"])
    if result["cues_alike"] is not None:
        line += (f"; digit colour = background colour ({100 * result['cues_alike_share']:.1f} % of the split): "
                 f"{100 * result['cues_alike']:.1f} %")
    return line
