"""The composer and the texture layer: exact semantics, per-example randomness."""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.compose import compose, texture_layer


def test_compose_formula_and_broadcast():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    m = jax.random.uniform(k1, (3, 8, 8, 1))
    f = jax.random.normal(k2, (3, 8, 8, 3))
    b = jax.random.normal(k3, (3, 8, 8, 3))
    np.testing.assert_allclose(compose(m, f, b), m * f + (1 - m) * b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(compose(jnp.ones_like(m), f, b), f)
    np.testing.assert_array_equal(compose(jnp.zeros_like(m), f, b), b)


def _patches(x, p):
    return einops.rearrange(np.asarray(x), "n (a ph) (b pw) c -> n (a b) (ph pw c)", ph=p, pw=p)


@pytest.mark.parametrize("patch", [4, 8])
def test_patch_shuffle_permutes_patches(patch):
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 32, 32, 3))
    y = texture_layer(jax.random.PRNGKey(1), x, mode="patch_shuffle", patch_size=patch)
    px, py = _patches(x, patch), _patches(y, patch)
    orders = []
    for i in range(x.shape[0]):
        # every output patch is an input patch, each used once
        match = [int(np.flatnonzero((px[i] == q).all(axis=1))[0]) for q in py[i]]
        assert sorted(match) == list(range(px.shape[1]))
        assert match != list(range(px.shape[1]))
        orders.append(tuple(match))
    assert len(set(orders)) == len(orders)  # independent permutation per example


def test_tile_crop_is_a_cyclic_shift():
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 32, 32, 3))
    y = np.asarray(texture_layer(jax.random.PRNGKey(3), x, mode="tile_crop"))
    shifts = set()
    for i in range(x.shape[0]):
        found = [(dy, dx) for dy in range(32) for dx in range(32)
                 if np.array_equal(np.roll(np.asarray(x[i]), (-dy, -dx), axis=(0, 1)), y[i])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 1  # shifts differ between examples


def test_texture_layer_is_deterministic_per_key_and_jittable():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    a = texture_layer(jax.random.PRNGKey(5), x, mode="patch_shuffle", patch_size=4)
    b = jax.jit(lambda k, v: texture_layer(k, v, mode="patch_shuffle", patch_size=4))(jax.random.PRNGKey(5), x)
    np.testing.assert_array_equal(a, b)
    c = texture_layer(jax.random.PRNGKey(6), x, mode="patch_shuffle", patch_size=4)
    assert not np.array_equal(a, c)


def test_texture_layer_bad_arguments():
    x = jnp.zeros((2, 32, 32, 3))
    with pytest.raises(ValueError, match="unknown texture mode"):
        texture_layer(jax.random.PRNGKey(0), x, mode="swirl")
    with pytest.raises(ValueError, match="does not divide"):
        texture_layer(jax.random.PRNGKey(0), x, mode="patch_shuffle", patch_size=5)
