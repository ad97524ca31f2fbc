"""The fixed parts of a CGN: the composer and the texture layer.

They hold no parameters, so they are plain functions, written for one example and
`jax.vmap`-ed over the batch. The texture layer is what stops the texture
mechanism from drawing shapes: its output is rearranged at random before it is
composed, so only statistics that survive the rearrangement can be learned.
Two modes: `tile_crop` is what the official code does (tile the 32x32 map 2x2 and
take a random 32x32 crop, i.e. a random cyclic shift); `patch_shuffle` is what the
paper describes (cut into PxP patches and permute them).
"""

from __future__ import annotations

import functools

import chex
import einops
import jax
import jax.numpy as jnp

TEXTURE_MODES = ("tile_crop", "patch_shuffle", "none")


def _compose_one(m, f, b):
    return m * f + (1.0 - m) * b


@jax.jit
def compose(m: jax.Array, f: jax.Array, b: jax.Array) -> jax.Array:
    """x = m*f + (1-m)*b for a batch; m (N,H,W,1) broadcasts over the channels of f, b (N,H,W,C)."""
    chex.assert_rank([m, f, b], 4)
    chex.assert_equal_shape([f, b])
    chex.assert_equal_shape_prefix([m, f], 3)
    return jax.vmap(_compose_one)(m, f, b)


def _tile_crop_one(key, x):
    h, w, _ = x.shape
    tiled = jnp.tile(x, (2, 2, 1))
    # Offsets 0..h inclusive, as the official unfold-based crop (offset h == offset 0).
    dy, dx = jax.random.randint(key, (2,), 0, jnp.array([h + 1, w + 1]))
    return jax.lax.dynamic_slice(tiled, (dy, dx, 0), x.shape)


def _patch_shuffle_one(key, x, patch_size):
    patches = einops.rearrange(x, "(nh ph) (nw pw) c -> (nh nw) ph pw c", ph=patch_size, pw=patch_size)
    patches = jax.random.permutation(key, patches, axis=0)
    return einops.rearrange(patches, "(nh nw) ph pw c -> (nh ph) (nw pw) c", nh=x.shape[0] // patch_size)


@functools.partial(jax.jit, static_argnames=("mode", "patch_size"))
def texture_layer(key: jax.Array, x: jax.Array, mode: str = "tile_crop", patch_size: int = 4) -> jax.Array:
    """Rearrange each texture map in the batch x (N,H,W,C) independently (one key per example)."""
    chex.assert_rank(x, 4)
    if mode == "none":
        return x
    keys = jax.random.split(key, x.shape[0])
    if mode == "tile_crop":
        return jax.vmap(_tile_crop_one)(keys, x)
    if mode == "patch_shuffle":
        h, w = x.shape[1:3]
        if h % patch_size or w % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the texture map size {h}x{w}")
        return jax.vmap(functools.partial(_patch_shuffle_one, patch_size=patch_size))(keys, x)
    raise ValueError(f"unknown texture mode {mode!r}; valid: {', '.join(TEXTURE_MODES)}")
