"""torchvision ResNet (and the official CGN classifier ensemble) state dicts -> Orbax.

The ImageNet classifier ensemble starts from torchvision's pretrained ResNet-50; with no
network access here, the weights must come from a local `.pth` (e.g. torchvision's
`resnet50-0676ba61.pth` or `resnet50-11ad3fa6.pth`, downloaded elsewhere). Two layouts
are recognised by their keys:

* torchvision (`conv1.weight`, `layer1.0.conv1.weight`, ..., `fc.weight`), optionally
  behind DataParallel's `module.` prefix. The output is a plain `ResNet` with its `fc`
  classifier, so the unmodified network can be evaluated (Geirhos' shape-bias baseline);
  training the ensemble takes only the backbone from it, i.e. `fc` is dropped there.
* the official CGN `InvariantEnsemble` (`backbone.0.weight`, `backbone.4.0.conv1.weight`,
  `m_shape.1.weight`, ...), as saved by the official `train_classifier.py`; the output
  is a `ClassifierEnsemble`, ready for `cgn-jax evaluate`.

The block type and the number of blocks per stage are read off the keys and checked
against `variant` (an architecture name, default resnet50); the width comes from
`conv1`, so reduced-width test networks convert through the same code.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cgn_jax.checkpoint import save_variables
from cgn_jax.models.resnet import ARCHS, EXPANSION
from cgn_jax.port.common import PortError, StateDict, batchnorm, conv_kernel, dense_kernel, read_state_dict

DEFAULT_SRC_HELP = "a torchvision resnet50 state dict (.pth), e.g. resnet50-0676ba61.pth; required"

# torchvision ResNet children, as indexed by nn.Sequential(*children[:-1]) in the official ensemble
_ENSEMBLE_STAGE_INDEX = {4: 1, 5: 2, 6: 3, 7: 4}
_ENSEMBLE_HEADS = {"m_shape": "shape", "m_texture": "texture", "m_bg": "background"}


def _strip_module(tensors: dict) -> dict:
    if tensors and all(k.startswith("module.") for k in tensors):
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _to_torchvision_names(tensors: dict) -> tuple[dict, dict]:
    """Rename an official ensemble state dict to torchvision names; (backbone tensors, {head: tensors})."""
    backbone, heads = {}, {h: {} for h in _ENSEMBLE_HEADS.values()}
    for key, value in tensors.items():
        m = re.match(r"backbone\.(\d+)\.(.*)$", key)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx == 0:
                backbone[f"conv1.{rest}"] = value
            elif idx == 1:
                backbone[f"bn1.{rest}"] = value
            elif idx in _ENSEMBLE_STAGE_INDEX:
                backbone[f"layer{_ENSEMBLE_STAGE_INDEX[idx]}.{rest}"] = value
            else:
                backbone[key] = value  # unknown: left for StateDict.finish to report
            continue
        m = re.match(r"(m_shape|m_texture|m_bg)\.\d+\.(weight|bias)$", key)
        if m:
            heads[_ENSEMBLE_HEADS[m.group(1)]][m.group(2)] = value
            continue
        backbone[key] = value
    return backbone, heads


def infer_architecture(tensors: dict, source: str = "checkpoint") -> tuple[str, tuple[int, ...], int]:
    """(block, stage_sizes, width) from torchvision-named keys."""
    if "conv1.weight" not in tensors:
        raise PortError(f"{source}: no conv1.weight; not a torchvision ResNet state dict "
                        f"(first keys: {sorted(tensors)[:4]})")
    width = int(np.shape(tensors["conv1.weight"])[0])
    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in tensors) else "basic"
    stages = []
    for s in range(1, 5):
        ids = {int(m.group(1)) for k in tensors for m in [re.match(rf"layer{s}\.(\d+)\.conv1\.weight$", k)] if m}
        if not ids or ids != set(range(len(ids))):
            raise PortError(f"{source}: stage layer{s} has blocks {sorted(ids)}; not a 4-stage torchvision ResNet")
        stages.append(len(ids))
    return block, tuple(stages), width


def _check_variant(variant, block, stages, source):
    if variant in (None, ""):
        variant = "resnet50"
    if variant == "custom":
        return
    if variant not in ARCHS:
        raise PortError(f"unknown variant {variant!r}; choose one of {', '.join(ARCHS)} (or custom)")
    if ARCHS[variant] != (block, stages):
        raise PortError(f"{source}: the checkpoint is a {block} ResNet with stages {list(stages)}, not {variant} "
                        f"({ARCHS[variant][0]}, {list(ARCHS[variant][1])}); pass the matching --variant")


def backbone_from_torch(sd: StateDict, block: str, stages, width: int) -> tuple[dict, dict]:
    """(params, batch_stats) of `ResNet` (no fc) from torchvision names, taking every tensor it needs."""
    params, stats = {}, {}

    def conv_bn(dst: dict, dst_stats: dict, conv: str, bn: str, src_conv: str, src_bn: str, cin, cout, k):
        dst[conv] = {"kernel": conv_kernel(sd.take(f"{src_conv}.weight", (cout, cin, k, k)))}
        dst[bn], dst_stats[bn] = batchnorm(sd, src_bn, cout)

    conv_bn(params, stats, "conv1", "bn1", "conv1", "bn1", 3, width, 7)
    expansion = EXPANSION[block]
    in_ch = width
    for s, n in enumerate(stages):
        planes = width * 2 ** s
        for k in range(n):
            name, src = f"layer{s + 1}_{k}", f"layer{s + 1}.{k}"
            p, st = params.setdefault(name, {}), stats.setdefault(name, {})
            if block == "bottleneck":
                conv_bn(p, st, "conv1", "bn1", f"{src}.conv1", f"{src}.bn1", in_ch, planes, 1)
                conv_bn(p, st, "conv2", "bn2", f"{src}.conv2", f"{src}.bn2", planes, planes, 3)
                conv_bn(p, st, "conv3", "bn3", f"{src}.conv3", f"{src}.bn3", planes, planes * 4, 1)
            else:
                conv_bn(p, st, "conv1", "bn1", f"{src}.conv1", f"{src}.bn1", in_ch, planes, 3)
                conv_bn(p, st, "conv2", "bn2", f"{src}.conv2", f"{src}.bn2", planes, planes, 3)
            out_ch = planes * expansion
            if sd.has(f"{src}.downsample.0.weight"):
                conv_bn(p, st, "downsample_conv", "downsample_bn", f"{src}.downsample.0", f"{src}.downsample.1",
                        in_ch, out_ch, 1)
            in_ch = out_ch
    return params, stats


def _dense(sd: StateDict, prefix: str, fan_in: int, source: str) -> dict:
    if not sd.has(f"{prefix}.weight"):
        raise PortError(f"{source}: missing tensor {prefix + '.weight'!r}")
    n = int(np.shape(sd.tensors[f"{prefix}.weight"])[0])
    return {"kernel": dense_kernel(sd.take(f"{prefix}.weight", (n, fan_in))),
            "bias": sd.take(f"{prefix}.bias", (n,)).astype(np.float32)}


def variables_from_torch(tensors: dict, variant: str | None = None, source: str = "checkpoint") -> tuple[dict, dict]:
    """(variables, meta) for `ResNet(num_classes=...)` or `ClassifierEnsemble`, by the state dict's layout."""
    tensors = _strip_module({k: v for k, v in tensors.items()})
    ensemble = any(k.startswith("backbone.") for k in tensors)
    heads_src = {}
    if ensemble:
        tensors, heads_src = _to_torchvision_names(tensors)
    block, stages, width = infer_architecture(tensors, source)
    _check_variant(variant, block, stages, source)
    sd = StateDict(tensors, source)
    params, stats = backbone_from_torch(sd, block, stages, width)
    feat = width * 8 * EXPANSION[block]
    if ensemble:
        head_params = {}
        for head, t in heads_src.items():
            hsd = StateDict({f"{head}.{k}": v for k, v in t.items()}, source)
            head_params[head] = _dense(hsd, head, feat, source)
            hsd.finish()
        num_classes = int(head_params["shape"]["bias"].shape[0])
        variables = {"params": {"backbone": params, **head_params}, "batch_stats": {"backbone": stats}}
        kind = "ensemble"
    else:
        params["fc"] = _dense(sd, "fc", feat, source)
        num_classes = int(params["fc"]["bias"].shape[0])
        variables = {"params": params, "batch_stats": stats}
        kind = "classifier"
    sd.finish()
    for path, leaf in _leaves(variables):
        if not np.all(np.isfinite(leaf)):
            raise PortError(f"{source}: tensor for {path} contains NaN or Inf; the file is corrupt")
    arch = next((a for a, spec in ARCHS.items() if spec == (block, stages)), "custom")
    meta = {"model": "resnet", "kind": kind, "arch": arch, "block": block, "stage_sizes": list(stages),
            "width": width, "num_classes": num_classes, "source": source,
            "note": "torchvision layout; mean/std ImageNet normalisation, NHWC input"}
    return variables, meta


def _leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def convert(src, dst, variant=None) -> Path:
    """Convert `src` (a `.pth`) into an Orbax variables directory `dst` (see module docstring)."""
    if not src:
        raise PortError(f"resnet50 needs --src: {DEFAULT_SRC_HELP}")
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"ResNet checkpoint {path} does not exist")
    variables, meta = variables_from_torch(read_state_dict(path), variant, str(path.resolve()))
    return save_variables(dst, variables, meta)
