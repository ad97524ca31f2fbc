"""The numbers the paper's ImageNet evaluation reports, as plain numpy on predictions.

Kept apart from models and data so each rule can be checked against hand-built
predictions, and so the same code scores a trained ensemble, a ported torchvision
ResNet-50 or predictions made elsewhere:

* top-k accuracy on ImageNet;
* shape bias on Geirhos et al.'s cue-conflict stimuli: 1000-way probabilities become
  16 entry-level categories by averaging the member classes' probabilities (their
  `ImageNetProbabilitiesTo16ClassesMapping`), the decision is the best category, and
  shape bias = shape decisions / (shape + texture decisions), stimuli whose shape and
  texture category agree left out;
* the background gap on ImageNet-9 (Xiao et al.): the 1000-way top-1 class is mapped
  to one of 9 super-classes by the published table (a class outside the 9 counts as
  wrong), and BG-Gap = accuracy on Mixed-Same - accuracy on Mixed-Rand.

The class tables live in `cgn_jax/resources/` as JSON.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import chex
import numpy as np

IN9_VARIANTS = ("original", "mixed_same", "mixed_rand")


def _resource(name: str) -> dict:
    return json.loads((resources.files("cgn_jax") / "resources" / name).read_text())


@functools.lru_cache(maxsize=None)
def geirhos_categories() -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    """(the 16 category names, sorted; the ImageNet indices of each)."""
    cats = _resource("geirhos_16_classes.json")["categories"]
    names = tuple(sorted(cats))
    return names, tuple(tuple(cats[n]) for n in names)


def sixteen_class_matrix(num_classes: int = 1000) -> np.ndarray:
    """(num_classes, 16) matrix whose product with probabilities gives each category's mean probability."""
    names, members = geirhos_categories()
    m = np.zeros((num_classes, len(names)), np.float32)
    for c, idx in enumerate(members):
        m[list(idx), c] = 1.0 / len(idx)
    return m


def decisions_16(probs: np.ndarray) -> np.ndarray:
    """Category index (into `geirhos_categories()[0]`) for each row of 1000-way probabilities.

    Ties go to the first category in sorted order, as in Geirhos' loop with a strict `>`.
    """
    probs = np.asarray(probs, np.float64)
    chex.assert_rank(probs, 2)
    return np.argmax(probs @ sixteen_class_matrix(probs.shape[1]).astype(np.float64), axis=1)


def shape_bias(decisions, shape_labels, texture_labels) -> dict:
    """Shape bias and the fractions of shape / texture decisions over the cue-conflict stimuli.

    All arguments are category indices. Stimuli with shape == texture are excluded.
    `shape_bias` is None when no decision matched either cue.
    """
    d, s, t = (np.asarray(a, np.int64) for a in (decisions, shape_labels, texture_labels))
    chex.assert_equal_shape([d, s, t])
    keep = s != t
    d, s, t = d[keep], s[keep], t[keep]
    n_shape, n_texture = int(np.sum(d == s)), int(np.sum(d == t))
    n = int(d.size)
    return {"shape_bias": n_shape / (n_shape + n_texture) if n_shape + n_texture else None,
            "shape_decisions": n_shape, "texture_decisions": n_texture, "stimuli": n,
            "excluded_same_cue": int(np.sum(~keep)),
            "shape_match": n_shape / n if n else None, "texture_match": n_texture / n if n else None}


@functools.lru_cache(maxsize=None)
def in9_table() -> np.ndarray:
    """(1000,) int: ImageNet class -> ImageNet-9 class, -1 for classes outside the nine."""
    return np.asarray(_resource("in_to_in9.json")["in_to_in9"], np.int64)


def in9_class_names() -> tuple[str, ...]:
    return tuple(_resource("in_to_in9.json")["in9_classes"])


def to_in9(top1_imagenet) -> np.ndarray:
    """Map 1000-way top-1 predictions to ImageNet-9 classes (-1: predicted a class outside the nine)."""
    return in9_table()[np.asarray(top1_imagenet, np.int64)]


def in9_accuracy(top1_imagenet, labels) -> float:
    """Top-1 accuracy (in %) on ImageNet-9 of 1000-way top-1 predictions."""
    pred, labels = to_in9(top1_imagenet), np.asarray(labels, np.int64)
    chex.assert_equal_shape([pred, labels])
    return 100.0 * float(np.mean(pred == labels)) if labels.size else float("nan")


def bg_gap(acc_mixed_same: float, acc_mixed_rand: float) -> float:
    """BG-Gap in percentage points: how much accuracy depends on the background."""
    return float(acc_mixed_same) - float(acc_mixed_rand)


def topk_accuracy(topk_indices, labels, ks=(1, 5)) -> dict:
    """Top-k accuracies (in %) from the (N, K) highest-scoring class indices, best first."""
    idx, labels = np.asarray(topk_indices), np.asarray(labels)
    chex.assert_rank(idx, 2)
    if max(ks) > idx.shape[1]:
        raise ValueError(f"top-{max(ks)} needs {max(ks)} predictions per example, got {idx.shape[1]}")
    hit = idx == labels[:, None]
    return {f"top{k}": 100.0 * float(np.mean(np.any(hit[:, :k], axis=1))) if labels.size else float("nan")
            for k in ks}


def format_table(rows: dict[str, dict], columns: list[str], title: str = "") -> str:
    """A plain-text table: one row per head, one column per metric (None shows as '-')."""
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    header = ["head"] + columns
    body = [[name] + [cell(r.get(c)) for c in columns] for name, r in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [title] if title else []
    out += [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    return "\n".join(out)
