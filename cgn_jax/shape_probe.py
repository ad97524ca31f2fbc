"""How good a MNIST CGN's shape mechanism is, class by class.

The frame check in `mask_stats` only tells which way round a mask is. A mask can be the
right way round and still be a poor digit, and then a counterfactual carries a shape label
its image does not show. So a small CNN trained on real binarised MNIST names the masks:
its accuracy per class says how readable each class's shapes are. Beside it: mask area, the
share of pixels that are neither foreground nor background, and the variety of a class's
masks (mean L2 distance to the class's mean mask), which a collapsed class loses.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from einops import rearrange

# pixels of a mask strictly between these count as neither foreground nor background
NON_BINARY = (0.1, 0.9)


class DigitProbe(nn.Module):
    """Three strided 3x3 convolutions and a linear layer.

    About 97 % on binarised MNIST test digits after `train_probe`'s default two epochs.
    """

    @nn.compact
    def __call__(self, x):
        chex.assert_rank(x, 4)
        for features in (32, 64, 64):
            x = nn.relu(nn.Conv(features, (3, 3), strides=2)(x))
        return nn.Dense(10)(rearrange(x, "n h w c -> n (h w c)"))


def binarised_digits(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 MNIST -> (N, 32, 32, 1) uint8 in {0, 1}, as the CGN's masks are trained to look."""
    from cgn_jax.data.builders import prepare_digits

    return (prepare_digits(images, "double_colored") > 127).astype(np.uint8)


def train_probe(images: np.ndarray, labels: np.ndarray, key: jax.Array, epochs: int = 2,
                batch: int = 128) -> dict:
    """Probe parameters trained with Adam on `binarised_digits` images, which stay on the device.

    One jitted call per step, dispatched asynchronously, not a `lax.scan` over the epoch: on
    the 2-core dev CPU the scan took about 2 s per step against 0.04 s for top-level steps.
    """
    chex.assert_rank(images, 4)
    chex.assert_shape(labels, (images.shape[0],))
    steps = images.shape[0] // batch
    if steps == 0:
        raise ValueError(f"need at least {batch} images to train the digit probe, got {images.shape[0]}")
    net, tx = DigitProbe(), optax.adam(1e-3)
    k_init, key = jax.random.split(key)
    params = net.init(k_init, jnp.zeros((1,) + images.shape[1:], jnp.float32))
    x, y = jnp.asarray(images, jnp.uint8), jnp.asarray(labels, jnp.int32)  # uint8 on device: 4x smaller

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, order, i):
        idx = jax.lax.dynamic_slice_in_dim(order, i * batch, batch)

        def loss(p):
            logits = net.apply(p, x[idx].astype(jnp.float32))
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        updates, opt = tx.update(jax.grad(loss)(params), opt)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for k in jax.random.split(key, epochs):
        order = jax.random.permutation(k, images.shape[0])
        for i in range(steps):
            params, opt = step(params, opt, order, i)
    return params


@jax.jit
def _predict(params, x):
    return jnp.argmax(DigitProbe().apply(params, x.astype(jnp.float32)), -1)


def predict(params: dict, images, batch: int = 1000) -> np.ndarray:
    """Probe class per image, images (N, 32, 32, 1) in [0, 1]."""
    return np.concatenate([np.asarray(_predict(params, images[i:i + batch])) for i in range(0, len(images), batch)])


def mask_report(model, variables, params: dict, key: jax.Array, per_class: int = 500,
                shape_noise_scale: float = 1.0) -> dict[str, np.ndarray]:
    """Per-class statistics, each (n_classes,), of a `MnistCGN`'s clamped masks for `per_class` noise
    vectors (times `shape_noise_scale`, as `cgn_jax.generate.sample_counterfactuals` scales them)."""
    from cgn_jax import mask_stats

    n_classes = model.n_classes
    m, y = mask_stats.class_masks(model, variables, key, per_class, shape_noise_scale)
    m = np.asarray(m, np.float64)
    chex.assert_shape(m, (y.shape[0], None, None, 1))
    by_class = rearrange(m, "(k n) h w c -> k n (h w c)", k=n_classes)
    distance = np.sqrt(((by_class - by_class.mean(1, keepdims=True)) ** 2).sum(-1))  # (k, n)
    named = rearrange(predict(params, m), "(k n) -> k n", k=n_classes)
    lo, hi = NON_BINARY
    return {
        "digit_accuracy": (named == np.arange(n_classes)[:, None]).mean(1),
        "area": by_class.mean((1, 2)),
        "non_binary": ((by_class > lo) & (by_class < hi)).mean((1, 2)),
        "variety": distance.mean(1),
        "frame_mean": mask_stats.per_class_frame_mean(m, y, n_classes),
    }


def format_report(report: dict[str, np.ndarray]) -> str:
    """A per-class table with a mean row; accuracy and non-binary share in %."""
    cols = [("digit_accuracy", "probe acc %", 100, "{:.1f}"), ("area", "area", 1, "{:.3f}"),
            ("non_binary", "non-binary %", 100, "{:.1f}"), ("variety", "variety", 1, "{:.2f}"),
            ("frame_mean", "frame mean", 1, "{:.3f}")]
    head = "class | " + " | ".join(title for _, title, _, _ in cols)
    lines = [head, "-" * len(head)]
    rows = [(str(c), [report[k][c] * s for k, _, s, _ in cols]) for c in range(len(report["area"]))]
    rows.append(("mean", [np.mean(report[k]) * s for k, _, s, _ in cols]))
    for name, values in rows:
        lines.append(f"{name:>5} | " + " | ".join(f.format(v).rjust(len(t)) for v, (_, t, _, f) in zip(values, cols)))
    return "\n".join(lines)
