"""Which way round a CGN's masks are, class by class.

A MNIST CGN can settle on the inverted solution for some classes. The mask then
covers the background, and the background mechanism paints the digit. Colored MNIST has
a black background for every class, so its losses do not prefer one assignment over the
other. The composite still looks right, so the loss curves do not show it. But the
counterfactuals of such a class keep the colour tied to the digit, and they no longer
help a classifier (docs/results.md). MNIST digits sit in the central 20x20 of the 32x32
canvas, so the frame around it is background in every real image: a mask whose mean over
that frame is high covers the background. (The mean over the whole canvas does not
separate the two: an inverted mask is not 1 everywhere, and an H100-trained colored CGN's
inverted classes averaged 0.43-0.46 against 0.13-0.16 for its correct ones. On the frame
they averaged 0.60-0.69 against 0.01-0.03, and the official weights 0.01-0.07.) The check
is cheap, so training runs it at every sample sheet, and `cgn-jax generate`,
`train-classifier` and `table1` run it on the generator they load.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np


# mean mask on the frame above this (over a class's samples): the mask covers the background
INVERTED_ABOVE = 0.5
# |tanh output| above this: slope 1 - y^2 < 2e-3 (pre-activation beyond ~3.8)
SATURATED_ABOVE = 0.999
# width of the frame as a share of the side: 6 pixels of 32, outside MNIST's 20x20 digit box
FRAME = 6 / 32


def frame(size: int) -> np.ndarray:
    """(size, size) bool, True on the outer frame of the canvas."""
    w = int(round(FRAME * size))
    out = np.ones((size, size), bool)
    out[w:size - w, w:size - w] = False
    return out


def per_class_frame_mean(mask, labels, n_classes: int) -> np.ndarray:
    """Mean mask value on the frame over each class's samples, (n_classes,); NaN for a class without samples.

    mask: (N, H, W, 1) in [0, 1] with H == W; labels: (N,) shape labels.
    """
    mask, labels = np.asarray(mask, np.float64), np.asarray(labels)
    chex.assert_rank(mask, 4)
    chex.assert_shape(labels, (mask.shape[0],))
    if mask.shape[1] != mask.shape[2]:
        raise ValueError(f"masks must be square, got {mask.shape[1]}x{mask.shape[2]}")
    return _class_means(mask[:, frame(mask.shape[1]), :].reshape(mask.shape[0], -1).mean(1), labels, n_classes)


def per_class_saturated(x, labels, n_classes: int, threshold: float = SATURATED_ABOVE) -> np.ndarray:
    """Share of each class's values with |x| > threshold, (n_classes,); NaN for a class without samples.

    x: (N, ...) tanh outputs (a texture or background mechanism). A class stuck at |x| ~ 1
    gets almost no gradient through its tanh, whatever the losses ask: the full colored run
    kept class 0's background white for 14,000 steps that way (docs/results.md). Saturation
    is not always wrong (double-colored has pure yellow, lime, aqua and fuchsia), so this
    is logged and plotted, not flagged.
    """
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    chex.assert_shape(labels, (x.shape[0],))
    return _class_means((np.abs(x.reshape(x.shape[0], -1)) > threshold).mean(1), labels, n_classes)


def _class_means(per_sample: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    sums = np.bincount(labels, weights=per_sample, minlength=n_classes)[:n_classes]
    counts = np.bincount(labels, minlength=n_classes)[:n_classes]
    with np.errstate(invalid="ignore"):
        return sums / counts


def inverted_classes(means, threshold: float = INVERTED_ABOVE) -> list[int]:
    return [int(c) for c in np.flatnonzero(np.asarray(means) > threshold)]


def describe(means, threshold: float = INVERTED_ABOVE) -> str:
    """One line, e.g. 'mask inverted ... for classes 0, 3 (of 10)' or 'masks the right way round for all 10 classes'."""
    n = len(means)
    bad = inverted_classes(means, threshold)
    if not bad:
        return f"masks the right way round for all {n} classes"
    return (f"mask inverted (it covers the background: mean {threshold:g}+ on the canvas frame) for classes "
            f"{', '.join(map(str, bad))} (of {n})")


@functools.partial(jax.jit, static_argnames=("model", "per_class", "shape_noise_scale"))
def _class_masks(model, variables, key, per_class: int, shape_noise_scale: float):
    from cgn_jax.models.mnist_cgn import MASK_CLAMP, MnistCGN

    y = jnp.repeat(jnp.arange(model.n_classes), per_class)
    u = shape_noise_scale * model.sample_noise(key, y.shape[0])
    return jnp.clip(model.apply(variables, u, y, method=MnistCGN.shape).astype(jnp.float32), *MASK_CLAMP), y


def class_masks(model, variables, key: jax.Array, per_class: int,
                shape_noise_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A `MnistCGN`'s clamped masks (N, H, W, 1) for `per_class` noise vectors (times
    `shape_noise_scale`) of each class in turn, and their labels (N,)."""
    return jax.device_get(_class_masks(model, variables, key, per_class, shape_noise_scale))


def generator_frame_means(model, variables, key: jax.Array, per_class: int = 64) -> np.ndarray:
    """`per_class_frame_mean` of a `MnistCGN`'s (clamped) masks for `per_class` noise vectors per class."""
    return per_class_frame_mean(*class_masks(model, variables, key, per_class), model.n_classes)


def check_generator(model, variables, what: str) -> np.ndarray:
    """`generator_frame_means` (key 0), with a warning on stderr naming `what` when a class is inverted."""
    import sys

    means = generator_frame_means(model, variables, jax.random.PRNGKey(0))
    if inverted_classes(means):
        print(f"cgn-jax: warning: {what}: {describe(means)}; counterfactuals of those classes keep the "
              "texture or colour tied to the digit", file=sys.stderr)
    return means
