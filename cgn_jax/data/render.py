"""On-device rendering of MNIST-variant batches, with the official per-access randomness.

The official PyTorch loaders draw a fresh colour jitter / texture crop every time an
example is read. Doing that on the host per example would make the input pipeline the
bottleneck, and baking one draw into the stored dataset would change the training
distribution. So the stored dataset keeps the digit and the class labels, and this module
renders a whole batch on the accelerator, inside the jitted train step: a pure function
of (key, batch), vmapped with one key per example.

Value range: the output is `2 * x - 1` of the official [0, 1] image, *without* clipping
where the official code does not clip: double-colored MNIST adds N(0, 0.01) to colours
that already sit at 0 or 1 (yellow, lime, aqua, fuchsia), so a few values land slightly
outside [-1, 1] (|excess| ~ 0.02-0.08), exactly as in the official training data. Colored
MNIST (LNTL) is clipped: its official data are uint8 images, so colours are bounded.
Wildlife MNIST crops uint8 textures and needs no clipping.
"""

from __future__ import annotations

import functools
import os

import chex
import einops
import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax.data import palettes

_CLIP_DEFAULT = {palettes.COLORED: True, palettes.DOUBLE_COLORED: False, palettes.WILDLIFE: False}


def make_assets(variant: str, textures_dir: str | os.PathLike | None = None,
                palette: np.ndarray | None = None) -> dict[str, jnp.ndarray]:
    """The constant arrays `render_batch` needs for `variant`, as device arrays.

    colored: {'palette': (10, 3)} (default: the measured LNTL palette, see `palettes`);
    double_colored: {'fg_palette', 'bg_palette': (10, 3)}; all in [0, 1].
    wildlife: {'fg_textures', 'bg_textures': (10, 150, 150, 3)} float32 in [0, 1], read
    from `textures_dir` (object/ and background/), resized 150x150 nearest.
    """
    variant = palettes.canonical_variant(variant)
    if variant == palettes.COLORED:
        pal = palettes.LNTL_PALETTE if palette is None else np.asarray(palette, np.float32)
        chex.assert_shape(pal, (palettes.NUM_CLASSES, 3))
        return {"palette": jnp.asarray(pal, jnp.float32)}
    if variant == palettes.DOUBLE_COLORED:
        return {"fg_palette": jnp.asarray(palettes.DOUBLE_COLORED_OBJECT),
                "bg_palette": jnp.asarray(palettes.DOUBLE_COLORED_BACKGROUND)}
    from cgn_jax.data.idx import load_textures

    tex = load_textures(textures_dir)
    return {"fg_textures": jnp.asarray(tex["object"], jnp.float32) / 255.0,
            "bg_textures": jnp.asarray(tex["background"], jnp.float32) / 255.0}


def _reflect(i: jnp.ndarray, n: int) -> jnp.ndarray:
    """Map indices in [-pad, n - 1 + pad] into [0, n - 1] like np.pad(mode='reflect')."""
    i = jnp.abs(i)
    return jnp.where(i > n - 1, 2 * (n - 1) - i, i)


def _random_crop(key: jax.Array, textures: jnp.ndarray, label: jnp.ndarray) -> jnp.ndarray:
    """RandomCrop(32, padding=3, padding_mode='reflect') of texture `label`: (32, 32, 3).

    torchvision pads 150 -> 156 and draws the corner uniformly in [0, 156 - 32]; indexing
    the unpadded texture through a reflected index gives the same pixels without padding.
    """
    size, pad, out = palettes.TEXTURE_SIZE, palettes.CROP_PADDING, palettes.IMAGE_SIZE
    corner = jax.random.randint(key, (2,), 0, size + 2 * pad - out + 1)
    rows = _reflect(corner[0] + jnp.arange(out) - pad, size)
    cols = _reflect(corner[1] + jnp.arange(out) - pad, size)
    tex = textures[label]  # (150, 150, 3)
    return tex[rows][:, cols]


def _render_one(key: jax.Array, digit: jnp.ndarray, fg: jnp.ndarray, bg: jnp.ndarray,
                assets: dict[str, jnp.ndarray], variant: str) -> jnp.ndarray:
    """One training example in [0, 1] (unclipped): (32, 32, 3)."""
    d = digit.astype(jnp.float32) / 255.0  # (32, 32, 1)
    k_fg, k_bg = jax.random.split(key)
    if variant == palettes.COLORED:
        colour = assets["palette"][fg] + palettes.COLORED_JITTER_STD * jax.random.normal(k_fg, (3,))
        return d * einops.rearrange(colour, "c -> 1 1 c")  # one colour for every pixel
    if variant == palettes.DOUBLE_COLORED:
        std = palettes.DOUBLE_COLORED_JITTER_STD
        obj = assets["fg_palette"][fg] + std * jax.random.normal(k_fg, (3,))
        back = assets["bg_palette"][bg] + std * jax.random.normal(k_bg, (3,))
        # broadcast the per-image colours over the 32x32 pixels
        obj, back = (einops.rearrange(c, "c -> 1 1 c") for c in (obj, back))
        return d * obj + (1.0 - d) * back
    obj = _random_crop(k_fg, assets["fg_textures"], fg)
    back = _random_crop(k_bg, assets["bg_textures"], bg)
    return d * obj + (1.0 - d) * back


def from_uint8(image) -> jnp.ndarray:
    """Stored uint8 images (test renderings, exported counterfactuals) on the models' [-1, 1] scale."""
    return image.astype(jnp.float32) / 127.5 - 1.0


@functools.partial(jax.jit, static_argnames=("variant", "train", "clip"))
def render_batch(key: jax.Array, batch: dict[str, jnp.ndarray], assets: dict[str, jnp.ndarray],
                 variant: str, train: bool = True, clip: bool | None = None,
                 example_keys: jax.Array | None = None) -> jnp.ndarray:
    """Render a batch of stored examples to float32 (B, 32, 32, 3) images in [-1, 1].

    batch: 'digit' (B, 32, 32, 1) uint8, 'fg_label', 'bg_label' (B,) int; for `train=False`
    only 'image' (B, 32, 32, 3) uint8 is used (the stored, seeded test rendering).
    train=True draws fresh augmentation per example from `key` (one split key each), or from
    `example_keys` (B keys) when given, e.g. keys tied to the example for a fixed draw per image.
    clip: clip to [-1, 1]; None = as the official code (see module docstring).
    Pure and jitted with static `variant`/`train`/`clip`: callable inside a jitted step.
    """
    variant = palettes.canonical_variant(variant)
    s = palettes.IMAGE_SIZE
    if not train:
        image = batch["image"]
        chex.assert_rank(image, 4)
        chex.assert_shape(image, (None, s, s, 3))
        return from_uint8(image)
    digit, fg, bg = batch["digit"], batch["fg_label"], batch["bg_label"]
    chex.assert_rank(digit, 4)
    b = digit.shape[0]
    chex.assert_shape(digit, (b, s, s, 1))
    chex.assert_shape([fg, bg], (b,))
    keys = jax.random.split(key, b) if example_keys is None else example_keys
    chex.assert_shape(keys, (b, *keys.shape[1:]))
    render_one = functools.partial(_render_one, assets=assets, variant=variant)
    images = jax.vmap(render_one)(keys, digit, fg, bg)
    out = images * 2.0 - 1.0
    if _CLIP_DEFAULT[variant] if clip is None else clip:
        out = jnp.clip(out, -1.0, 1.0)
    chex.assert_shape(out, (b, s, s, 3))
    return out.astype(jnp.float32)
