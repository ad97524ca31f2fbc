"""Max pooling and small-input convolutions whose gradients XLA:CPU computes slowly, done another way.

On the 2-core development CPU the MNIST classifier's backward pass took about ten times its
forward pass, and two ops held most of it (batch 64, docs/benchmarks.md):
- the gradient of the 3x3/2 max pool, lowered to `select_and_scatter`: about 160 ms against
  6 ms for the pool itself;
- the weight gradient of the first convolution (5x5, 3 input channels, 32x32 outputs):
  about 130 ms against 12 ms forward, since XLA:CPU's backward-filter kernel handles a
  3-channel input badly.
Here the pool's gradient is the incoming gradient routed to each window's first maximum
(what `select_and_scatter` computes) through strided pads, and the weight gradient is one
matrix product of the shifted inputs, laid out channels-first so that the long summation
axis is contiguous. Both give the same values up to float summation order; the forward
passes are XLA's own. `resolve(mode)` turns them on for the CPU only, where they were
measured; accelerators keep XLA's kernels.
"""

from __future__ import annotations

import functools

import einops
import jax
import jax.numpy as jnp

MODES = ("auto", "custom", "xla")
_DIMS = ("NHWC", "HWIO", "NHWC")


def resolve(mode: str) -> str:
    """'custom' or 'xla'; 'auto' is 'custom' on the CPU backend."""
    if mode not in MODES:
        raise ValueError(f"unknown gradient kernels {mode!r}; valid: {', '.join(MODES)}")
    if mode == "auto":
        return "custom" if jax.default_backend() == "cpu" else "xla"
    return mode


# ---------------------------------------------------------------- max pooling
def _windows(x: jax.Array, window: int, stride: int, pad: int) -> list[jax.Array]:
    """The window*window strided views of `x` padded with -inf, one per offset in the window (row-major)."""
    n, h, w, c = x.shape
    ho, wo = (h + 2 * pad - window) // stride + 1, (w + 2 * pad - window) // stride + 1
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    return [jax.lax.slice(padded, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                          (1, stride, stride, 1))
            for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, pad: int) -> jax.Array:
    """Square max pooling of NHWC `x`, padded with -inf (as torch's MaxPool2d and flax's max_pool)."""
    return functools.reduce(jnp.maximum, _windows(x, window, stride, pad))


def _max_pool_fwd(x, window, stride, pad):
    stacked = jnp.stack(_windows(x, window, stride, pad))
    return jnp.max(stacked, axis=0), (jnp.argmax(stacked, axis=0).astype(jnp.int8), x.shape)


def _max_pool_bwd(window, stride, pad, residuals, ct):
    first_max, (n, h, w, c) = residuals
    ho, wo = ct.shape[1:3]
    hp, wp = h + 2 * pad, w + 2 * pad
    zero = jnp.zeros((), ct.dtype)
    grad = jnp.zeros((n, hp, wp, c), ct.dtype)
    for t in range(window * window):
        i, j = divmod(t, window)
        routed = jnp.where(first_max == t, ct, zero)
        # output (a, b) of offset (i, j) read padded input (a*stride + i, b*stride + j)
        grad = grad + jax.lax.pad(routed, zero, ((0, 0, 0), (i, hp - i - (ho - 1) * stride - 1, stride - 1),
                                                 (j, wp - j - (wo - 1) * stride - 1, stride - 1), (0, 0, 0)))
    return (grad[:, pad:pad + h, pad:pad + w],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# ---------------------------------------------------------------- convolution
def _conv(x, kernel, pad):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
    """Stride-1 convolution of NHWC `x` with an HWIO `kernel`, zero padding `pad` on each side."""
    return _conv(x, kernel, pad)


def _conv_same_fwd(x, kernel, pad):
    return _conv(x, kernel, pad), (x, kernel)


def _conv_same_bwd(pad, residuals, ct):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    ho, wo = ct.shape[1:3]
    grad_x = jax.vjp(lambda x: _conv(x, kernel, pad), x)[1](ct)[0]
    # dK[i, j, ci, co] = sum over (n, h, w) of x_padded[n, h + i, w + j, ci] * ct[n, h, w, co]
    channels_first = jnp.pad(einops.rearrange(x, "n h w c -> c n h w"), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    shifted = jnp.stack([channels_first[:, :, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)])
    grad_k = einops.rearrange(shifted, "k c n h w -> (k c) (n h w)") @ einops.rearrange(ct, "n h w o -> (n h w) o")
    return grad_x, einops.rearrange(grad_k, "(i j c) o -> i j c o", i=kh, j=kw).astype(kernel.dtype)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)
