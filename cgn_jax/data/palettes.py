"""Colour constants and variant names for the three MNIST variants, in one light module.

They live apart from the TFDS builders (which import tensorflow_datasets) so the on-device
renderer and the configs can use them without that import, and so the numbers that make
the port faithful to the official code are written down, with their provenance, once.
"""

from __future__ import annotations

import math

import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 32  # the official loaders resize the 28x28 digits to 32x32 (nearest)
MNIST_SIZE = 28

# ---------------------------------------------------------------- variant names
COLORED = "colored"
DOUBLE_COLORED = "double_colored"
WILDLIFE = "wildlife"
VARIANTS = (COLORED, DOUBLE_COLORED, WILDLIFE)

# TFDS builder name of each variant.
TFDS_NAMES = {
    COLORED: "colored_mnist",
    DOUBLE_COLORED: "double_colored_mnist",
    WILDLIFE: "wildlife_mnist",
}

# Every spelling accepted for a variant (short name, TFDS name, the official config name).
_ALIASES = {}
for _v, _t in TFDS_NAMES.items():
    for _name in (_v, _t, f"{_v}_MNIST"):
        _ALIASES[_name.lower()] = _v


def valid_variant_names() -> list[str]:
    return sorted({*VARIANTS, *TFDS_NAMES.values(), *(f"{v}_MNIST" for v in VARIANTS)})


def canonical_variant(name: str) -> str:
    """'colored' / 'colored_mnist' / 'colored_MNIST' -> 'colored'; ValueError otherwise."""
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown MNIST variant {name!r}; valid names: {', '.join(valid_variant_names())}")
    return _ALIASES[key]


# ---------------------------------------------------------------- colored MNIST (LNTL)
# LNTL ("Learning Not to Learn") never published its ten mean colours. These are measured
# from the official pretrained colored-MNIST CGN (mean foreground colour per texture label,
# RGB in [0, 1]); see shared/README.md. Background is black for every class.
LNTL_PALETTE = np.array(
    [
        [0.78, 0.11, 0.32],
        [0.09, 0.46, 0.48],
        [0.89, 0.84, 0.13],
        [0.06, 0.36, 0.76],
        [0.89, 0.52, 0.21],
        [0.57, 0.20, 0.68],
        [0.26, 0.88, 0.73],
        [0.96, 0.82, 0.83],
        [0.82, 0.88, 0.23],
        [0.63, 0.14, 0.11],
    ],
    dtype=np.float32,
)
# The measured palette has near pairs (2/8 are 0.13 apart in RGB, 0/9 0.26, 1/3 0.30) that the
# jitter below blurs together, so its colour cue names a pair rather than a class. This palette
# keeps every pair at least 0.5 apart (seven cube corners other than black, orange, violet,
# grey), for measuring how the strength of the shortcut depends on the palette
# (`cgn-jax table1 --palette separated`); it is not LNTL's.
SEPARATED_PALETTE = np.array(
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0],
     [0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0], [0.5, 0.0, 1.0], [0.5, 0.5, 0.5]],
    dtype=np.float32,
)
COLORED_PALETTES = {"measured": LNTL_PALETTE, "separated": SEPARATED_PALETTE}
DEFAULT_COLORED_PALETTE = "measured"

# LNTL's training colours are N(mean, sigma^2 I) with variance 0.02 (the official CGN data
# file is `mnist_10color_jitter_var_0.020.npy`).
COLORED_JITTER_VAR = 0.02
COLORED_JITTER_STD = math.sqrt(COLORED_JITTER_VAR)  # ~0.1414

# ---------------------------------------------------------------- double-colored MNIST
# Official `DoubleColoredMNIST`: colors1 (from mokole.com/palette.html) as CSS names; the
# background colour of class i is colors1[i], the digit colour is colors1[i - 6].
DOUBLE_COLORED_CSS = (
    "darkgreen", "darkblue", "#b03060", "orangered", "yellow",
    "burlywood", "lime", "aqua", "fuchsia", "#6495ed",
)
# PIL.ImageColor.getcolor(name, "RGB") of the names above (checked in tests/test_data.py).
_CSS_RGB = {
    "darkgreen": (0, 100, 0),
    "darkblue": (0, 0, 139),
    "#b03060": (176, 48, 96),
    "orangered": (255, 69, 0),
    "yellow": (255, 255, 0),
    "burlywood": (222, 184, 135),
    "lime": (0, 255, 0),
    "aqua": (0, 255, 255),
    "fuchsia": (255, 0, 255),
    "#6495ed": (100, 149, 237),
}
DOUBLE_COLORED_BACKGROUND = (
    np.array([_CSS_RGB[c] for c in DOUBLE_COLORED_CSS], dtype=np.float32) / 255.0)
DOUBLE_COLORED_OBJECT = np.array(
    [_CSS_RGB[DOUBLE_COLORED_CSS[i - 6]] for i in range(NUM_CLASSES)], dtype=np.float32) / 255.0
# [t, b]: class t's digit colour is class b's background colour (one b per t, never b == t)
DOUBLE_COLORED_ALIKE = np.all(DOUBLE_COLORED_OBJECT[:, None] == DOUBLE_COLORED_BACKGROUND[None, :], axis=-1)
DOUBLE_COLORED_JITTER_STD = 0.01  # torch.normal(0, 0.01) added to each colour, per channel
# Here the jitter is drawn afresh around the fixed colours for every image. The official loader
# adds it in place (`colour += noise` on the tensor kept in its colour list), so each of its
# DataLoader workers random-walks the ten colours by 0.01 * sqrt(accesses) over an epoch (about
# 0.25 per channel by the end of a worker's share of a 50,000-image pass over 8 workers); that
# drift is an accident of the code, not the dataset's definition, and is not reproduced.
DIGIT_THRESHOLD = 0.1  # double-colored / wildlife binarise the resized digit at > 0.1

# ---------------------------------------------------------------- wildlife MNIST
TEXTURE_SIZE = 150  # textures are resized to 150x150 (nearest) ...
CROP_PADDING = 3  # ... then RandomCrop(32, padding=3, padding_mode="reflect")
