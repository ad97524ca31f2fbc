"""The sub-pixel form of upsample+conv3x3 is the same function as the direct one (values and gradients)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgn_jax.models.upsample_conv import UpsampleConv3x3, resolve_mode, upsample2x_conv3x3

HIGHEST = jax.lax.Precision.HIGHEST


@pytest.mark.parametrize("shape", [(2, 4, 4, 3, 5), (3, 5, 7, 8, 2), (1, 1, 1, 4, 4)])
def test_phase_form_equals_direct(shape):
    n, h, w, cin, cout = shape
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
    x = jax.random.normal(kx, (n, h, w, cin))
    k = jax.random.normal(kk, (3, 3, cin, cout))
    direct = upsample2x_conv3x3(x, k, "direct", HIGHEST)
    phase = upsample2x_conv3x3(x, k, "phase", HIGHEST)
    assert phase.shape == direct.shape == (n, 2 * h, 2 * w, cout)
    np.testing.assert_allclose(phase, direct, rtol=1e-5, atol=1e-5)

    g = jax.random.normal(kg, direct.shape)
    grads = {m: jax.grad(lambda x, k: jnp.sum(upsample2x_conv3x3(x, k, m, HIGHEST) * g), (0, 1))(x, k)
             for m in ("direct", "phase")}
    for a, b in zip(grads["phase"], grads["direct"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_a_wrong_phase_would_be_caught():
    """Guard against a vacuous comparison: a one-pixel shift of the direct form differs."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 2))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 2))
    direct = upsample2x_conv3x3(x, k, "direct", HIGHEST)
    assert float(jnp.abs(jnp.roll(direct, 1, axis=1) - upsample2x_conv3x3(x, k, "phase", HIGHEST)).max()) > 0.1


def test_module_has_nn_conv_parameters():
    """Same names, shapes and initial values as nn.Conv, so ported weights and checkpoints still load."""
    x = jnp.ones((2, 4, 4, 6))
    init = nn.initializers.orthogonal(scale=0.1)
    ours = UpsampleConv3x3(5, use_bias=True, kernel_init=init, mode="phase").init(jax.random.PRNGKey(3), x)
    ref = nn.Conv(5, (3, 3), padding=1, use_bias=True, kernel_init=init).init(jax.random.PRNGKey(3), jnp.ones((2, 8, 8, 6)))
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    np.testing.assert_array_equal(ours["params"]["kernel"], ref["params"]["kernel"])


def test_modes():
    assert resolve_mode("auto", 16) == ("phase" if jax.default_backend() == "cpu" else "direct")
    assert resolve_mode("auto", 1000) == "direct" and resolve_mode("phase", 1000) == "phase"
    with pytest.raises(ValueError, match="valid: auto, phase, direct"):
        resolve_mode("fast")
