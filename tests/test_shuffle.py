"""Random-access epoch shuffling (`cgn_jax.data.shuffle`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.data.shuffle import index_shuffle


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4096, 60000])
def test_is_a_permutation_of_range_n(n):
    perm = np.asarray(jax.jit(lambda k, i: index_shuffle(k, i, n))(jax.random.PRNGKey(n), jnp.arange(n)))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    assert perm.dtype == np.int32


def test_keys_select_different_orders_and_batches_agree_with_the_whole():
    n = 60000
    a = np.asarray(index_shuffle(jax.random.PRNGKey(0), jnp.arange(n), n))
    b = np.asarray(index_shuffle(jax.random.PRNGKey(1), jnp.arange(n), n))
    assert np.mean(a == b) < 0.01 and abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.02
    # a batch of positions maps exactly as in the full permutation (what each step computes)
    pos = jnp.arange(4096, 4096 + 16)
    np.testing.assert_array_equal(np.asarray(index_shuffle(jax.random.PRNGKey(0), pos, n)), a[4096:4112])


def test_every_position_is_equally_likely():
    """Where index 0 lands over 20,000 keys, n = 100: a chi-square test at the 0.1% level."""
    pos = np.asarray(jax.vmap(lambda k: index_shuffle(k, jnp.int32(0), 100))(
        jax.random.split(jax.random.PRNGKey(3), 20000)))
    counts = np.bincount(pos, minlength=100)
    chi2 = ((counts - 200.0) ** 2 / 200.0).sum()
    assert chi2 < 148.2, chi2  # chi-square, 99 degrees of freedom, p = 0.001


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="1 <= n"):
        index_shuffle(jax.random.PRNGKey(0), jnp.arange(1), 0)
