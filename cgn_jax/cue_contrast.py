"""How visible a double-colored digit stays where its two colours are one.

Each double-colored class's digit colour is another class's background colour, so one test
image in ten shows its digit only through the data's per-colour jitter (std 0.01). A
classifier trained on counterfactuals reads those images only if its training images also
keep a faint edge where the texture's and the background's palette colours coincide; a CGN
that learned the palette exactly leaves none. The edge is measured here the same way for a
CGN's counterfactuals and for the real test split: the distance between the mean colour
inside and outside the digit, on the [0, 1] scale, after rounding to uint8 as stored.
"""

from __future__ import annotations

import jax
import numpy as np

from cgn_jax.data import palettes

ALIKE = palettes.DOUBLE_COLORED_ALIKE  # [texture class, background class]: one colour


def real_test_contrast(n: int = 10_000) -> np.ndarray:
    """Edge contrast of the test split's images whose digit and background share a colour.

    Rendered by the split's own renderer from its seeded draws, on a two-pixel "digit" (one
    digit pixel, one background pixel): the same colours as the stored images, without the MNIST
    digits, which the edge does not depend on.
    """
    from cgn_jax.data.builders import render_numpy, test_draws

    fg, bg, jitter, _ = test_draws(palettes.DOUBLE_COLORED, n)
    alike = ALIKE[fg, bg]
    two_pixels = np.broadcast_to(np.array([[[255], [0]]], np.uint8), (int(alike.sum()), 1, 2, 1))
    pixels = render_numpy(palettes.DOUBLE_COLORED, two_pixels, fg[alike], bg[alike], jitter=jitter[alike])
    digit, back = pixels[:, 0, 0].astype(np.float64), pixels[:, 0, 1].astype(np.float64)
    return np.linalg.norm(digit - back, axis=-1) / 255.0


def counterfactual_contrast(model, variables, key: jax.Array, n_shapes: int = 2_000, num_cfs: int = 5,
                            colour_jitter: float = 0.0) -> np.ndarray:
    """Edge contrast of a CGN's counterfactuals (as the classifier's fixed set makes them) whose
    texture and background classes share a colour; about a tenth of n_shapes * num_cfs."""
    from cgn_jax.generate import sample_counterfactuals

    out = jax.device_get(sample_counterfactuals(model, variables, key, n_shapes, num_cfs,
                                                colour_jitter=colour_jitter, with_masks=True))
    alike = ALIKE[out["texture_label"], out["background_label"]]
    image = out["image"][alike].astype(np.float64) / 255.0
    inside = (out["mask"][alike] > 0.5).astype(np.float64)  # (n, h, w, 1)
    n_in, n_all = inside.sum((1, 2)), inside[0].size
    edged = (n_in[:, 0] > 0) & (n_in[:, 0] < n_all)  # an empty or full mask has no edge to measure
    mean_in = (image * inside).sum((1, 2))[edged] / n_in[edged]
    mean_out = (image * (1.0 - inside)).sum((1, 2))[edged] / (n_all - n_in[edged])
    return np.linalg.norm(mean_in - mean_out, axis=-1)


def summary(values: np.ndarray) -> dict:
    """Median, 10th and 90th percentiles, mean and count."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"n": 0}
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {"n": int(values.size), "median": float(median), "p10": float(p10), "p90": float(p90),
            "mean": float(values.mean())}


def describe(name: str, stats: dict) -> str:
    if not stats.get("n"):
        return f"{name}: no image with both colours alike"
    return (f"{name}: median {stats['median']:.4f} (p10 {stats['p10']:.4f}, p90 {stats['p90']:.4f}) "
            f"over {stats['n']} images")
