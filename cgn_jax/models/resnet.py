"""ResNet backbones and the CGN classifier ensemble, laid out so torchvision weights map 1:1.

The CGN ImageNet classifier starts from an ImageNet-pretrained torchvision ResNet-50,
so the module tree mirrors torchvision's: `conv1`/`bn1`, then `layer{1..4}_{k}` blocks
with `conv1..3`/`bn1..3` and an optional `downsample_conv`/`downsample_bn`, and the
stride of a bottleneck on its 3x3 conv (torchvision's "v1.5"). Padding is explicit
(torch's symmetric padding, not Flax's "SAME", which pads strided convs asymmetrically),
so a converted state dict reproduces torch's features to float rounding.

`width` scales every stage (64 is the real network; tests use 4), and `dtype` is the
compute dtype (bfloat16 on accelerators); parameters and BatchNorm statistics stay
float32. BatchNorm can be synced over a pmap axis (`axis_name`) or frozen
(`use_running_average`), the latter being what the official ensemble training does.

The ensemble shares one backbone between three linear heads (shape, texture,
background); how the heads are combined is a separate, pure function so evaluation
can report each head as well as the combination.
"""

from __future__ import annotations

from typing import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision's layer counts per stage
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}
HEADS = ("shape", "texture", "background")


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for kernel and bias alike."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv_bn(x, features: int, kernel: int, stride: int, conv_name: str, bn_name: str, dtype, norm: dict):
    """conv (no bias, torch's symmetric padding) + BatchNorm, named like torchvision's `convN`/`bnN` pair.

    Must be called inside a compact method: the modules become children of the caller.
    """
    pad = kernel // 2
    x = nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                dtype=dtype, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                name=conv_name)(x)
    return nn.BatchNorm(**norm, dtype=dtype, name=bn_name)(x)


class BasicBlock(nn.Module):
    planes: int
    stride: int
    downsample: bool
    dtype: jnp.dtype
    norm: dict

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, norm=self.norm)
        y = nn.relu(_conv_bn(x, self.planes, 3, self.stride, "conv1", "bn1", **kw))
        y = _conv_bn(y, self.planes, 3, 1, "conv2", "bn2", **kw)
        if self.downsample:
            x = _conv_bn(x, self.planes, 1, self.stride, "downsample_conv", "downsample_bn", **kw)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    planes: int
    stride: int
    downsample: bool
    dtype: jnp.dtype
    norm: dict

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, norm=self.norm)
        y = nn.relu(_conv_bn(x, self.planes, 1, 1, "conv1", "bn1", **kw))
        y = nn.relu(_conv_bn(y, self.planes, 3, self.stride, "conv2", "bn2", **kw))
        y = _conv_bn(y, self.planes * 4, 1, 1, "conv3", "bn3", **kw)
        if self.downsample:
            x = _conv_bn(x, self.planes * 4, 1, self.stride, "downsample_conv", "downsample_bn", **kw)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """torchvision-layout ResNet on NHWC images; pooled features, or logits when `num_classes` is set.

    `train=True` uses batch statistics (synced over `axis_name` when given) unless
    `freeze_bn` is set, in which case the running statistics are used and never updated.
    """
    block: str = "bottleneck"
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    num_classes: int | None = None
    dtype: jnp.dtype = jnp.float32
    axis_name: str | None = None
    freeze_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        chex.assert_rank(x, 4)
        norm = dict(use_running_average=(not train) or self.freeze_bn, momentum=0.9, epsilon=1e-5,
                    axis_name=self.axis_name if train and not self.freeze_bn else None)
        x = x.astype(self.dtype)
        x = _conv_bn(x, self.width, 7, 2, "conv1", "bn1", self.dtype, norm)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        expansion = EXPANSION[self.block]
        in_ch = self.width
        for stage, n in enumerate(self.stage_sizes):
            planes = self.width * 2 ** stage
            for k in range(n):
                stride = 2 if (k == 0 and stage > 0) else 1
                downsample = k == 0 and (stride != 1 or in_ch != planes * expansion)
                x = block_cls(planes, stride, downsample, dtype=self.dtype, norm=norm,
                              name=f"layer{stage + 1}_{k}")(x)
                in_ch = planes * expansion
        feats = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes is None:
            return feats
        return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_torch_linear_init(in_ch),
                        bias_init=_torch_linear_init(in_ch), name="fc")(feats).astype(jnp.float32)


def feature_dim(block: str, width: int, num_stages: int = 4) -> int:
    return width * 2 ** (num_stages - 1) * EXPANSION[block]


class ClassifierEnsemble(nn.Module):
    """One ResNet backbone, three linear heads; returns `{head: logits}` (float32)."""
    block: str = "bottleneck"
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    num_classes: int = 1000
    dtype: jnp.dtype = jnp.float32
    axis_name: str | None = None
    freeze_bn: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = ResNet(self.block, tuple(self.stage_sizes), self.width, None, self.dtype, self.axis_name,
                       self.freeze_bn, name="backbone")(x, train)
        d = feature_dim(self.block, self.width, len(self.stage_sizes))
        return {h: nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_torch_linear_init(d),
                            bias_init=_torch_linear_init(d), name=h)(feats).astype(jnp.float32)
                for h in HEADS}


def combine(logits: dict, heads: Sequence[str], method: str = "mean_probs") -> jnp.ndarray:
    """Probabilities of the combination of `heads`.

    `mean_probs` averages the heads' softmax probabilities; `mean_logits` is the
    official code's rule (softmax of the averaged logits).
    """
    stacked = jnp.stack([logits[h] for h in heads])
    if method == "mean_probs":
        return jnp.mean(jax.nn.softmax(stacked, axis=-1), axis=0)
    if method == "mean_logits":
        return jax.nn.softmax(jnp.mean(stacked, axis=0), axis=-1)
    raise ValueError(f"unknown ensemble method {method!r}; use mean_probs or mean_logits")


def prediction_probs(logits: dict, method: str = "mean_probs") -> dict:
    """Softmax probabilities of every head plus the combinations evaluation reports.

    `ensemble` uses all three heads; `shape_texture` leaves the background head out
    (the official BG-gap headline). A plain classifier (`{"model": logits}`) passes through.
    """
    out = {h: jax.nn.softmax(v, axis=-1) for h, v in logits.items()}
    if all(h in logits for h in HEADS):
        out["ensemble"] = combine(logits, HEADS, method)
        out["shape_texture"] = combine(logits, ("shape", "texture"), method)
    return out


def ensemble_from_config(model_config, axis_name: str | None = None, train_bn: bool | None = None) -> ClassifierEnsemble:
    block, stages = _arch(model_config)
    freeze = bool(model_config.freeze_bn_stats) if train_bn is None else not train_bn
    return ClassifierEnsemble(block, stages, int(model_config.width), int(model_config.num_classes),
                              _dtype(model_config.dtype), axis_name, freeze)


def resnet_from_config(model_config, num_classes: int | None = 1000) -> ResNet:
    block, stages = _arch(model_config)
    return ResNet(block, stages, int(model_config.width), num_classes, _dtype(model_config.dtype))


def _arch(model_config):
    arch = str(model_config.arch)
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of {', '.join(ARCHS)}")
    block, stages = ARCHS[arch]
    custom = tuple(model_config.get("stage_sizes", ()) or ())
    return block, custom or stages


def _dtype(name: str):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[str(name)]
    except KeyError:
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {name!r}") from None
