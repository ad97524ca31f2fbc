"""TFDS builders for Colored, Double-colored and Wildlife MNIST, and `load_variant`.

Why TFDS: the official loaders re-derive everything at every access from torchvision's
MNIST and draw the test-set colours/textures anew each time, so no two evaluations see the
same test set. Building once into array_record files (readable without TensorFlow) gives a
versioned, seeded, identical-every-time test split, correlation-controlled train splits for
the IRM experiments (one builder config per correlation/seed), and O(1) random access.

What is stored is the *source* of an example (the resized digit and the colour/texture
labels actually used) plus one rendering: the random per-access augmentation of the
training set (colour jitter, texture crops) happens on device in `cgn_jax.data.render`,
so training stays faithful to the official per-access randomness.

Randomness: every random draw is made for the *whole* MNIST split and then cut to
`limit`, so a `limit=N` build is exactly the first N examples of the full build (tests
use small builds). Train draws depend on the config's seed and correlation; the test
split uses a fixed seed of its own, so it is the same for every correlation and seed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cgn_jax.data import idx, palettes
from cgn_jax.data.local_info import LocalDatasetInfo

log = logging.getLogger(__name__)

VERSION = tfds.core.Version("1.0.0")
TEST_SEED = 20210503  # fixed: every build of every config yields the same test split
SPLITS = ("train", "test")
_VARIANT_IDS = {palettes.COLORED: 1, palettes.DOUBLE_COLORED: 2, palettes.WILDLIFE: 3}
_CHUNK = 4096  # examples rendered / read at a time (bounds memory)

_CITATION = """@inproceedings{Sauer2021ICLR,
  author = {Axel Sauer and Andreas Geiger},
  title = {Counterfactual Generative Networks},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2021}}"""


# ============================================================== preprocessing (numpy)
def _nearest_index(mode: str, src: int = palettes.MNIST_SIZE, dst: int = palettes.IMAGE_SIZE):
    """Source row/col of each output pixel for a `src -> dst` nearest resize.

    The official loaders use two different nearest resizes: colored MNIST goes through
    PIL (`transforms.Resize(..., Image.NEAREST)`: pixel centres, floor((i + 0.5) * s)),
    double-colored / wildlife through `F.interpolate(mode='nearest')` (floor(i * s)).
    They pick different rows, so each variant uses its own.
    """
    i = np.arange(dst, dtype=np.float64)
    scale = src / dst
    if mode == "pil":
        j = np.floor((i + 0.5) * scale)
    elif mode == "torch":
        j = np.floor(i * scale)
    else:
        raise ValueError(mode)
    return np.clip(j.astype(np.int64), 0, src - 1)


def prepare_digits(images: np.ndarray, variant: str) -> np.ndarray:
    """(N, 28, 28) uint8 MNIST -> (N, 32, 32, 1) uint8 `digit` as stored for `variant`.

    colored: grey levels 0..255 (LNTL colours the intensity); double-colored / wildlife:
    binarised (x / 255 > 0.1 in float32, as the official code does after the resize) and
    stored as 0 / 255. A nearest resize only picks pixels, so thresholding before it (a
    256-entry lookup table) gives the same result, faster.
    """
    variant = palettes.canonical_variant(variant)
    if variant != palettes.COLORED:
        levels = np.arange(256, dtype=np.float32) / np.float32(255.0)
        lut = np.where(levels > np.float32(palettes.DIGIT_THRESHOLD), 255, 0).astype(np.uint8)
        images = lut[images]
    r = _nearest_index("pil" if variant == palettes.COLORED else "torch")
    return np.take(np.take(images, r, axis=1), r, axis=2)[..., None]


def _draw_labels(labels: np.ndarray, rng: np.random.Generator, correlation: float) -> np.ndarray:
    """Class label == digit label with probability `correlation`, else one of the 9 others.

    Drawing the non-matching class among the *other* nine makes `correlation` exactly the
    expected agreement (0.9 -> 90 %), which is how IRM-style environments are specified.
    """
    keep = rng.random(labels.shape[0]) < correlation
    other = (labels + rng.integers(1, palettes.NUM_CLASSES, labels.shape[0])) % palettes.NUM_CLASSES
    return np.where(keep, labels, other).astype(np.int64)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def padded_textures(textures: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reflect-pad each (10, 150, 150, 3) texture stack by CROP_PADDING (torchvision 'reflect')."""
    p = palettes.CROP_PADDING
    return {k: np.pad(v, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
            for k, v in textures.items()}


def render_numpy(variant: str, digit: np.ndarray, fg: np.ndarray, bg: np.ndarray, *,
                 jitter: np.ndarray | None = None, offsets: np.ndarray | None = None,
                 textures: dict[str, np.ndarray] | None = None,
                 palette: np.ndarray | None = None) -> np.ndarray:
    """Render stored examples to (N, 32, 32, 3) uint8 (the stored `image`).

    jitter: colored (N, 3), double-colored (N, 2, 3) [object, background]; None = mean colours.
    palette: colored only, (10, 3) in [0, 1]; None = the measured LNTL palette.
    offsets: wildlife (N, 2, 2) crop corners (y, x) in the padded texture, [object, background];
    None = centre crop; `textures` as returned by `padded_textures`. uint8 storage clips to
    [0, 1] (the on-device renderer does not, where the official code does not).
    """
    n = digit.shape[0]
    if variant == palettes.COLORED:
        pal = palettes.LNTL_PALETTE if palette is None else np.asarray(palette, np.float32)
        col = pal[fg]  # (N, 3)
        if jitter is None:  # 10 colours x 256 grey levels: a lookup table is exact and fast
            levels = np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0)
            lut = _u8(levels[None] * pal[:, None, :])  # (10, 256, 3)
            flat = fg[:, None, None] * 256 + digit[..., 0].astype(np.int64)
            return np.take(lut.reshape(-1, 3), flat, axis=0)
        d = digit.astype(np.float32) / np.float32(255.0)
        return _u8(d * (col + jitter)[:, None, None, :])
    mask = digit > 127  # binary digit: d * a + (1 - d) * b is a selection
    if variant == palettes.DOUBLE_COLORED:
        obj = palettes.DOUBLE_COLORED_OBJECT[fg]
        back = palettes.DOUBLE_COLORED_BACKGROUND[bg]
        if jitter is not None:
            obj, back = obj + jitter[:, 0], back + jitter[:, 1]
        return np.where(mask, _u8(obj)[:, None, None, :], _u8(back)[:, None, None, :])
    if variant == palettes.WILDLIFE:
        out = palettes.IMAGE_SIZE
        if offsets is None:
            padded = palettes.TEXTURE_SIZE + 2 * palettes.CROP_PADDING
            offsets = np.full((n, 2, 2), (padded - out) // 2, dtype=np.int64)
        crops = []
        for k, (kind, lab) in enumerate((("object", fg), ("background", bg))):
            # (10, H', W', 3, 32, 32) view of every 32x32 window: indexing copies only the crops
            win = np.lib.stride_tricks.sliding_window_view(textures[kind], (out, out), axis=(1, 2))
            crops.append(win[lab, offsets[:, k, 0], offsets[:, k, 1]].transpose(0, 2, 3, 1))
        return np.where(mask, crops[0], crops[1])
    raise ValueError(variant)


def test_draws(variant: str, n_full: int, n: int | None = None):
    """The test split's seeded draws: cue labels (fg, bg) and one draw of the per-access
    augmentation (colour jitter or crop offsets, the other None), for its first `n` of `n_full`.

    Fixed by TEST_SEED, so the split can be re-rendered (e.g. with another palette) image for image.
    """
    variant = palettes.canonical_variant(variant)
    n = n_full if n is None else min(int(n), n_full)
    rng = np.random.default_rng(np.random.SeedSequence([TEST_SEED, _VARIANT_IDS[variant], 1]))
    fg = rng.integers(0, palettes.NUM_CLASSES, n_full)
    bg = fg if variant == palettes.COLORED else rng.integers(0, palettes.NUM_CLASSES, n_full)
    jitter = offsets = None
    if variant == palettes.COLORED:
        jitter = rng.normal(0.0, palettes.COLORED_JITTER_STD, (n_full, 3))[:n].astype(np.float32)
    elif variant == palettes.DOUBLE_COLORED:
        jitter = rng.normal(0.0, palettes.DOUBLE_COLORED_JITTER_STD, (n_full, 2, 3))[:n].astype(np.float32)
    else:
        hi = palettes.TEXTURE_SIZE + 2 * palettes.CROP_PADDING - palettes.IMAGE_SIZE
        offsets = rng.integers(0, hi + 1, (n_full, 2, 2))[:n]
    return fg[:n], bg[:n], jitter, offsets


def make_split(variant: str, images: np.ndarray, labels: np.ndarray, split: str, *,
               correlation: float = 1.0, seed: int = 0, limit: int | None = None,
               textures: dict[str, np.ndarray] | None = None,
               palette: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All stored fields of one split, vectorised: digit, label, fg_label, bg_label, image.

    `images`/`labels` are the MNIST examples of this split (e.g. train[:50000]); `palette`
    (colored only) replaces the measured LNTL colours, with the same draws otherwise.
    """
    variant = palettes.canonical_variant(variant)
    n_full = labels.shape[0]
    n = n_full if limit is None else min(int(limit), n_full)
    vid = _VARIANT_IDS[variant]
    if split == "train":
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), vid, 0]))
        fg = _draw_labels(labels, rng, correlation)
        bg = fg if variant == palettes.COLORED else _draw_labels(labels, rng, correlation)
        jitter = offsets = None
    elif split == "test":
        fg, bg, jitter, offsets = test_draws(variant, n_full, n)
    else:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    labels, fg, bg = labels[:n].astype(np.int64), fg[:n].astype(np.int64), bg[:n].astype(np.int64)
    digit = prepare_digits(images[:n], variant)
    if textures is not None:
        textures = padded_textures(textures)
    image = np.empty((n, palettes.IMAGE_SIZE, palettes.IMAGE_SIZE, 3), np.uint8)
    for s in range(0, n, _CHUNK):
        sl = slice(s, s + _CHUNK)
        image[sl] = render_numpy(
            variant, digit[sl], fg[sl], bg[sl], textures=textures,
            jitter=None if jitter is None else jitter[sl],
            offsets=None if offsets is None else offsets[sl], palette=palette)
    return {"digit": digit, "label": labels, "fg_label": fg, "bg_label": bg, "image": image}


def mnist_split(variant: str, mnist: dict[str, np.ndarray], split: str):
    """(images, labels) of the MNIST examples behind `split` of `variant`.

    colored (LNTL): train = the 60k MNIST train images, test = the 10k MNIST test images.
    double-colored / wildlife (official CGN): train = train[:50000], test = train[50000:].
    """
    if palettes.canonical_variant(variant) == palettes.COLORED:
        return mnist[f"{split}_images"], mnist[f"{split}_labels"]
    sl = slice(0, 50000) if split == "train" else slice(50000, None)
    return mnist["train_images"][sl], mnist["train_labels"][sl]


# ============================================================== TFDS builders
@dataclasses.dataclass(eq=False)
class VariantConfig(tfds.core.BuilderConfig):
    """What identifies a build: train correlation, train seed, and an optional prefix size."""

    correlation: float = 1.0
    seed: int = 0
    limit: int | None = None


_NAME_RE = re.compile(r"^corr(?P<corr>[0-9.]+)_seed(?P<seed>-?\d+)(?:_first(?P<limit>\d+))?$")


def config_name(correlation: float = 1.0, seed: int = 0, limit: int | None = None) -> str:
    """'corr0.9_seed0' / 'corr1_seed0_first512': the config (and directory) name."""
    _check_args(correlation, seed, limit)
    name = f"corr{float(correlation):.6g}_seed{int(seed)}"
    return name if limit is None else f"{name}_first{int(limit)}"


def _check_args(correlation, seed, limit):
    if isinstance(correlation, bool) or not isinstance(correlation, (int, float)) or not (
            0.0 <= float(correlation) <= 1.0) or math.isnan(float(correlation)):
        raise ValueError(f"correlation must be a float in [0, 1], got {correlation!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer))
                              or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")


_CONFIGS: dict[str, VariantConfig] = {}


def make_config(correlation: float = 1.0, seed: int = 0, limit: int | None = None) -> VariantConfig:
    """The (cached, so TFDS sees one object per name) config for these parameters."""
    name = config_name(correlation, seed, limit)
    if name not in _CONFIGS:
        _CONFIGS[name] = VariantConfig(
            name=name, version=VERSION, correlation=float(correlation), seed=int(seed),
            limit=None if limit is None else int(limit),
            description=(
                f"train: P(colour/texture label == digit label) = {float(correlation):g}, "
                f"seed {int(seed)}" + ("" if limit is None else f"; first {limit} examples")))
    return _CONFIGS[name]


class _MnistVariant(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder; subclasses set VARIANT. Builder kwargs: mnist_dir, textures_dir."""

    VARIANT: str = ""
    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [make_config()]

    def __init__(self, *, mnist_dir: str | os.PathLike | None = None,
                 textures_dir: str | os.PathLike | None = None,
                 mnist_tfds_dir: str | os.PathLike | None = None, **kwargs: Any):
        self._mnist_dir = mnist_dir
        self._textures_dir = textures_dir
        self._mnist_tfds_dir = mnist_tfds_dir
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup goes through `importlib_resources` (a backport, not always
        # installed) for any builder defined in a package; this file is the answer anyway.
        return epath.Path(__file__)

    @classmethod
    def get_builder_config(cls, name: str, version=None):
        """Any 'corr<c>_seed<s>[_first<n>]' name is a valid config, not just the listed ones."""
        found = super().get_builder_config(name, version)
        if found is not None:
            return found
        m = _NAME_RE.match(name)
        if m is None:
            return None
        limit = None if m["limit"] is None else int(m["limit"])
        return make_config(float(m["corr"]), int(m["seed"]), limit)

    def _info(self) -> LocalDatasetInfo:
        s = palettes.IMAGE_SIZE
        cls_label = lambda doc: tfds.features.ClassLabel(num_classes=palettes.NUM_CLASSES, doc=doc)
        return LocalDatasetInfo(
            builder=self,
            description=(
                f"{self.VARIANT} MNIST of Counterfactual Generative Networks (Sauer & Geiger, "
                "ICLR 2021): the resized digit, its colour/texture labels, and one rendering "
                "(train: mean colours / centre crops; test: one seeded random augmentation)."),
            features=tfds.features.FeaturesDict({
                "digit": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8, encoding="zlib",
                                              doc="digit resized 28->32 (nearest), 0..255"),
                "label": cls_label("digit class"),
                "fg_label": cls_label("class of the digit colour / object texture"),
                "bg_label": cls_label("class of the background colour / texture"),
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="zlib",
                                              doc="rendered RGB image"),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep MNIST order: index i = i-th example of the split
            homepage="https://github.com/autonomousvision/counterfactual_generative_networks",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(test_seed=TEST_SEED),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg: VariantConfig = self.builder_config
        textures = None
        if self.VARIANT == palettes.WILDLIFE:
            textures = idx.load_textures(self._textures_dir)  # fail early, before MNIST
        mnist = idx.load_mnist(self._mnist_dir, self._mnist_tfds_dir)
        self.info.metadata["mnist_source"] = (
            "idx" if self._mnist_dir is not None else "tfds:mnist (not the official partition)")
        gens = {}
        for split in SPLITS:
            images, labels = mnist_split(self.VARIANT, mnist, split)
            arrays = make_split(self.VARIANT, images, labels, split, correlation=cfg.correlation,
                                seed=cfg.seed, limit=cfg.limit, textures=textures)
            gens[split] = self._generate_examples(arrays)
        return gens

    def _generate_examples(self, arrays: dict[str, np.ndarray]) -> Iterator[tuple[int, dict]]:
        for i in range(arrays["label"].shape[0]):
            yield i, {k: v[i] for k, v in arrays.items()}


class ColoredMnist(_MnistVariant):
    """Colored MNIST (LNTL): digit in the colour of its class on black."""

    VARIANT = palettes.COLORED


class DoubleColoredMnist(_MnistVariant):
    """Double-colored MNIST: class-coloured digit on a class-coloured background."""

    VARIANT = palettes.DOUBLE_COLORED


class WildlifeMnist(_MnistVariant):
    """Wildlife MNIST: digit with an object texture on a background texture."""

    VARIANT = palettes.WILDLIFE


BUILDERS = {palettes.COLORED: ColoredMnist, palettes.DOUBLE_COLORED: DoubleColoredMnist,
            palettes.WILDLIFE: WildlifeMnist}


# ============================================================== loading
def default_data_dir() -> Path:
    """`$CGN_JAX_HOME/tfds` (default ~/.cache/cgn_jax/tfds)."""
    from cgn_jax.paths import cache_dir

    return cache_dir("tfds")


def get_builder(variant: str, *, correlation: float = 1.0, seed: int = 0,
                limit: int | None = None, data_dir: str | os.PathLike | None = None,
                mnist_dir: str | os.PathLike | None = None,
                textures_dir: str | os.PathLike | None = None) -> _MnistVariant:
    """The TFDS builder of `variant` for these parameters (not yet prepared)."""
    cls = BUILDERS[palettes.canonical_variant(variant)]
    name = config_name(correlation, seed, limit)
    return cls(config=name, data_dir=str(data_dir or default_data_dir()),
               mnist_dir=mnist_dir, textures_dir=textures_dir)


def prepare(variant: str, **kwargs: Any) -> _MnistVariant:
    """`get_builder(...)`, built if not on disk yet."""
    builder = get_builder(variant, **kwargs)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def read_split(builder: _MnistVariant, split: str, limit: int | None = None,
               rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Examples of a prepared split as stacked numpy arrays: the first `limit` (default all),
    or only rows [start, stop) of those (random access: the other rows are not read)."""
    src = builder.as_data_source(split=split)
    n = len(src) if limit is None else min(int(limit), len(src))
    start, stop = _check_rows(rows, n)
    keys = list(builder.info.features.keys())
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for s in range(start, stop, _CHUNK):
        examples = src.__getitems__(list(range(s, min(s + _CHUNK, stop))))
        for k in keys:
            parts[k].append(np.stack([np.asarray(ex[k]) for ex in examples]))
    return {k: (np.concatenate(v) if v else np.zeros((0,), np.uint8)).astype(
        np.int64 if k.endswith("label") else np.uint8) for k, v in parts.items()}


def _check_rows(rows, n: int) -> tuple[int, int]:
    if rows is None:
        return 0, n
    start, stop = (int(r) for r in rows)
    if not 0 <= start < stop <= n:
        raise ValueError(f"rows [{start}, {stop}) are not a non-empty range within the split's {n} examples")
    return start, stop


@dataclasses.dataclass(frozen=True)
class VariantSplit:
    """One prepared split: its size is known before any row is read, and the builder is made once."""

    builder: _MnistVariant
    split: str
    limit: int | None = None

    @property
    def size(self) -> int:
        n = self.builder.info.splits[self.split].num_examples
        return n if self.limit is None else min(int(self.limit), n)

    def read(self, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        return read_split(self.builder, self.split, self.limit, rows)


def open_split(variant: str, split: str, *, limit: int | None = None, **kwargs) -> VariantSplit:
    """The split `load_variant` reads, built first if needed (same arguments, without `rows`)."""
    return VariantSplit(_prepared_builder(variant, split, limit=limit, **kwargs), split, limit)


def load_variant(variant: str, split: str, *, mnist_dir: str | os.PathLike | None = None,
                 textures_dir: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None, correlation: float = 1.0,
                 seed: int = 0, limit: int | None = None,
                 rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """One split of an MNIST variant as numpy arrays, building it first if needed.

    Returns {'digit': (N,32,32,1) uint8, 'image': (N,32,32,3) uint8, 'label', 'fg_label',
    'bg_label': (N,) int64}. `limit=N` keeps the first N examples: read from the full build
    when that is on disk, otherwise a small `..._first<N>` build is made (identical prefix).
    `rows=(start, stop)` reads only those rows of the (limited) split: a host of a
    multi-host run loads just its shard (`cgn_jax.data.sharding`).
    """
    return open_split(variant, split, mnist_dir=mnist_dir, textures_dir=textures_dir, data_dir=data_dir,
                      correlation=correlation, seed=seed, limit=limit).read(rows)


def variant_size(variant: str, split: str, *, limit: int | None = None, **kwargs) -> int:
    """Number of examples `load_variant` returns for these arguments (without reading them)."""
    return open_split(variant, split, limit=limit, **kwargs).size


def _prepared_builder(variant: str, split: str, *, mnist_dir=None, textures_dir=None, data_dir=None,
                      correlation: float = 1.0, seed: int = 0, limit: int | None = None) -> _MnistVariant:
    variant = palettes.canonical_variant(variant)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    _check_args(correlation, seed, limit)
    common = dict(correlation=correlation, seed=seed, data_dir=data_dir, mnist_dir=mnist_dir,
                  textures_dir=textures_dir)
    builder = get_builder(variant, limit=None, **common)
    if limit is not None and not builder.is_prepared():
        builder = get_builder(variant, limit=limit, **common)
    if not builder.is_prepared():
        log.info("building %s/%s into %s", builder.name, builder.builder_config.name,
                 builder.data_dir)
        builder.download_and_prepare()
    return builder
