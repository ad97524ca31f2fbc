"""VGG16 convolutional trunk, used only as a frozen feature extractor for the perceptual loss.

The CGN losses read the ReLU output at the end of each block (relu1_2, relu2_2,
relu3_3, relu4_3[, relu5_3]): the activations just before each max-pool, which is
where the official code hooks torchvision's `vgg16().features`. The classifier head
and the last max-pool are never needed, so they are not built.

Layers are named after the VGG paper (`conv{block}_{i}`); `TORCHVISION_INDEX` gives
the index of the same layer in torchvision's `features` Sequential, so a converter
(and a reader) can check the mapping in one place. Parameters stay float32 even when
`dtype` is bfloat16, so the same weights serve both precisions.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax.numpy as jnp

from cgn_jax.models import cpu_grads

# output channels of the convolutions of each block
BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# relu name of each block's output, for logging and docs
BLOCK_OUTPUTS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def conv_layers(num_blocks: int = 5) -> list[tuple[str, int, int, int]]:
    """`(flax name, torchvision features index, in channels, out channels)` of each conv, in order."""
    layers, cin, index = [], 3, 0
    for b, widths in enumerate(BLOCKS[:num_blocks]):
        if b > 0:
            index += 1  # the max-pool between blocks
        for i, cout in enumerate(widths):
            layers.append((f"conv{b + 1}_{i + 1}", index, cin, cout))
            index += 2  # conv, relu
            cin = cout
    return layers


# flax layer name -> torchvision `features.N` index (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TORCHVISION_INDEX: dict[str, int] = {name: idx for name, idx, _, _ in conv_layers(5)}


class VGG16Features(nn.Module):
    """NHWC images -> list of the block outputs relu1_2 ... (one per block, `num_blocks` of them).

    Images are used as given (the CGN feeds [-1, 1] without ImageNet normalisation).
    `precision` goes to the convs (None: backend default, TF32 on recent NVIDIA GPUs).
    """

    num_blocks: int = 4
    dtype: Any = jnp.float32
    precision: Any = None
    # max-pool gradient: "custom" (XLA:CPU's select_and_scatter is 10-20x slower; see
    # cgn_jax.models.cpu_grads), "xla", or "auto" (custom on the CPU); same values
    grad_kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        if not 1 <= self.num_blocks <= len(BLOCKS):
            raise ValueError(f"num_blocks must be in 1..{len(BLOCKS)}, got {self.num_blocks}")
        chex.assert_rank(x, 4)
        chex.assert_axis_dimension(x, -1, 3)
        x = x.astype(self.dtype)
        outputs = []
        custom = cpu_grads.resolve(self.grad_kernels) == "custom"
        for b, widths in enumerate(BLOCKS[: self.num_blocks]):
            if b > 0:  # floor, like torch's MaxPool2d(2, 2)
                x = cpu_grads.max_pool(x, 2, 2, 0) if custom else nn.max_pool(x, (2, 2), strides=(2, 2))
            for i, cout in enumerate(widths):
                x = nn.Conv(cout, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=jnp.float32,
                            precision=self.precision, name=f"conv{b + 1}_{i + 1}")(x)
                x = nn.relu(x)
            outputs.append(x)
        return outputs


def param_shapes(num_blocks: int = 5) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of the `params` collection of `VGG16Features(num_blocks)` without tracing it."""
    return {name: {"kernel": (3, 3, cin, cout), "bias": (cout,)} for name, _, cin, cout in conv_layers(num_blocks)}
