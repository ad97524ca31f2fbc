"""Texture-loss targets: a grid of patches cut from where the mask says the object is.

The ImageNet CGN's texture mechanism is taught by a style loss against a picture made
only of object texture: patches of the composite target (x_gt) taken from the windows
with the highest mean mask value, tiled into a grid and stretched to image size. This
is the official `shared/losses.py::get_sampled_patches` (called by `PercLossText` with
15x15 patches at 128x128, the 100 best windows, a 6x6 grid), written so the whole batch
is one vmapped, jitted program instead of a Python loop over images.

Resizes are PyTorch's `F.interpolate(mode='bicubic', align_corners=False)`, not
`jax.image.resize`: PyTorch uses the cubic kernel with a = -0.75, clamps taps at the
border and never antialiases, while `jax.image.resize('bicubic')` uses a = -0.5 and
antialiases when shrinking. The two differ by several percent at edges, so the
PyTorch kernel is built here as a (out, in) matrix per axis (exact, and two small
matmuls on the device).
"""

from __future__ import annotations

import functools
import math

import chex
import einops
import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient (OpenCV's too)


def _cubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of PyTorch's 1-D bicubic resize (align_corners=False).

    Source coordinate `(o + 0.5) * in/out - 0.5` (not clamped at 0, as PyTorch does for
    cubic), four taps at floor-1 .. floor+2, each clamped to [0, in_size - 1].
    """
    if in_size == out_size:  # PyTorch copies the input unchanged
        return np.eye(in_size, dtype=np.float32)
    scale = in_size / out_size
    mat = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = (o + 0.5) * scale - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k in range(-1, 3):
            mat[o, min(max(i0 + k, 0), in_size - 1)] += _cubic(np.float64(k - t))
    return mat.astype(np.float32)


def resize_bicubic(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """PyTorch-exact bicubic resize of (..., H, W, C) images to `size` (float32 result)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = x.shape[-3], x.shape[-2]
    x = x.astype(jnp.float32)
    if (h, w) == (out_h, out_w):
        return x
    hi = jax.lax.Precision.HIGHEST  # a few KFLOPs per pixel; keep it exact on TF32/bf16 hardware
    x = jnp.einsum("oh,...hwc->...owc", jnp.asarray(bicubic_matrix(h, out_h)), x, precision=hi)
    return jnp.einsum("pw,...owc->...opc", jnp.asarray(bicubic_matrix(w, out_w)), x, precision=hi)


def window_means(prob: jax.Array, patch: int) -> jax.Array:
    """Mean of `prob` (H, W, C) over every `patch` x `patch` window (stride 1, no padding): (H-p+1, W-p+1)."""
    chex.assert_rank(prob, 3)
    total = jax.lax.reduce_window(prob.astype(jnp.float32), 0.0, jax.lax.add, (patch, patch, prob.shape[-1]),
                                  (1, 1, 1), "VALID")
    return total[..., 0] / (patch * patch * prob.shape[-1])


def sample_windows(key: jax.Array, prob: jax.Array, patch: int = 15, top: int = 100, count: int = 36):
    """Top-left corners (rows, cols), each (count,), drawn uniformly with replacement among
    the `top` windows of `prob` (H, W, C) with the highest mean (official: argsort, last `top`,
    `randint(top, (n_up**2,))`)."""
    means = window_means(prob, patch)
    n_cols = means.shape[1]
    _, best = jax.lax.top_k(means.reshape(-1), top)
    chosen = best[jax.random.randint(key, (count,), 0, top)]
    return chosen // n_cols, chosen % n_cols


def patch_grid(key: jax.Array, mask: jax.Array, image: jax.Array, out_size: int, patch: int = 15, top: int = 100,
               grid: int = 6, work_size: int = 128) -> jax.Array:
    """One example: mask (H, W, 1), image (H, W, C) -> (out_size, out_size, C) patch-grid texture target.

    Both are resized to `work_size` (bicubic), `grid`**2 windows are sampled from the
    `top` with the highest mean mask, cut from the image and laid out row-major in a
    `grid` x `grid` grid (torchvision `make_grid(nrow=grid, padding=0)`), which is resized
    to `out_size`.
    """
    chex.assert_rank([mask, image], 3)
    chex.assert_equal_shape_prefix([mask, image], 2)
    prob = resize_bicubic(mask, work_size)
    paint = resize_bicubic(image, work_size)
    rows, cols = sample_windows(key, prob, patch, top, grid * grid)
    cut = lambda r, c: jax.lax.dynamic_slice(paint, (r, c, 0), (patch, patch, paint.shape[-1]))  # noqa: E731
    patches = jax.vmap(cut)(rows, cols)
    tiled = einops.rearrange(patches, "(gh gw) ph pw c -> (gh ph) (gw pw) c", gh=grid, gw=grid)
    return resize_bicubic(tiled, out_size)


@functools.partial(jax.jit, static_argnames=("patch", "top", "grid", "work_size"))
def sample_patch_grids(keys: jax.Array, masks: jax.Array, images: jax.Array, patch: int = 15, top: int = 100,
                       grid: int = 6, work_size: int = 128) -> jax.Array:
    """Batched `patch_grid`: keys (N, 2) one per example, masks (N, H, W, 1), images (N, H, W, C)
    -> (N, H, W, C) float32. Gradients are stopped: the target is a constant, as in the official."""
    chex.assert_rank([masks, images], 4)
    chex.assert_axis_dimension(keys, 0, masks.shape[0])
    masks, images = jax.lax.stop_gradient(masks), jax.lax.stop_gradient(images)
    one = functools.partial(patch_grid, out_size=images.shape[1], patch=patch, top=top, grid=grid,
                            work_size=work_size)
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"square images expected, got {images.shape[1]}x{images.shape[2]}")
    if top > (work_size - patch + 1) ** 2:
        raise ValueError(f"top={top} exceeds the {(work_size - patch + 1) ** 2} windows of a {work_size}px map")
    return jax.vmap(one)(keys, masks, images)
