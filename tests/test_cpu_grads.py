"""The CPU gradient forms of cgn_jax.models.cpu_grads against XLA's own kernels."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cgn_jax.models import cpu_grads  # noqa: E402
from cgn_jax.models.classifier import CNN, init_variables  # noqa: E402


def _xla_pool(x, window, stride, pad):
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


@pytest.mark.parametrize("window,stride,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_and_its_gradient_match_xla_including_ties(window, stride, pad):
    key_x, key_ct = jax.random.split(jax.random.PRNGKey(0))
    # small integers after a ReLU: many tied maxima (zeros and repeated values), and exact sums
    x = jax.nn.relu(jax.random.randint(key_x, (3, 12, 12, 4), -3, 4).astype(jnp.float32))
    out = cpu_grads.max_pool(x, window, stride, pad)
    np.testing.assert_array_equal(out, _xla_pool(x, window, stride, pad))
    ct = jax.random.randint(key_ct, out.shape, -5, 6).astype(jnp.float32)
    ours = jax.vjp(lambda x: cpu_grads.max_pool(x, window, stride, pad), x)[1](ct)[0]
    ref = jax.vjp(lambda x: _xla_pool(x, window, stride, pad), x)[1](ct)[0]
    np.testing.assert_array_equal(ours, ref)  # the same (first) maximum of every window gets the gradient
    assert float(jnp.abs(ref).sum()) > 0


@pytest.mark.parametrize("shape,kernel", [((4, 10, 10, 3), (5, 5, 3, 8)), ((2, 6, 7, 6), (3, 3, 6, 5))])
def test_conv_same_and_its_gradients_match_xla(shape, kernel):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(1), 3)
    x, w = jax.random.normal(kx, shape), jax.random.normal(kw, kernel)
    pad = kernel[0] // 2

    def ref(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @jax.jit
    def both(x, w, ct):
        out, vjp = jax.vjp(lambda x, w: cpu_grads.conv_same(x, w, pad), x, w)
        ref_out, ref_vjp = jax.vjp(ref, x, w)
        return out, ref_out, vjp(ct), ref_vjp(ct)

    out, ref_out, grads, ref_grads = both(x, w, jax.random.normal(kc, (shape[0], *shape[1:3], kernel[3])))
    np.testing.assert_array_equal(out, ref_out)
    for ours, theirs in zip(grads, ref_grads):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_the_classifier_is_the_same_function_with_either_kernels():
    x = jax.random.normal(jax.random.PRNGKey(2), (16, 32, 32, 3))
    labels = jnp.arange(16) % 10
    variables = init_variables(CNN(), jax.random.PRNGKey(3))
    fast, plain = CNN(grad_kernels="custom"), CNN(grad_kernels="xla")
    assert jax.tree.structure(fast.init(jax.random.PRNGKey(3), x)) == jax.tree.structure(variables)

    def loss(model, params):
        log_probs, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return -jnp.take_along_axis(log_probs, labels[:, None], 1).mean()

    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(variables["params"])
                          for m in (fast, plain))
    assert float(l1) == float(l2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown gradient kernels 'fast'; valid: auto, custom, xla"):
        CNN(grad_kernels="fast").init(jax.random.PRNGKey(0), x)
