"""Port the public U^2-Net PyTorch weights (`u2net.pth`, `u2netp.pth`) to Orbax.

CGN uses the pretrained full U^2-Net frozen, so the weights are converted once with
`cgn-jax port u2net --src u2net.pth --dst DIR` and then restored with `load_u2net`.
The tensors the converter asks for are derived from the same layer description the
Flax model is built from (`cgn_jax.models.u2net.rsu_layers`), so a checkpoint either
converts completely, with every tensor used, or fails naming the tensor at fault.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cgn_jax.checkpoint import read_meta, restore_variables, save_variables
from cgn_jax.models.u2net import U2Net, rsu_layers, side_in_channels, variant_stages
from cgn_jax.port.common import PortError, StateDict, batchnorm, conv_kernel, read_state_dict

DEFAULT_SRC_HELP = ("no default: pass --src u2net.pth (the full U^2-Net weights that the official CGN "
                    "repository fetches with scripts/download_weights.sh into imagenet/weights/u2net.pth) "
                    "or u2netp.pth with --variant u2netp")

# The mid channels of `stage1.rebnconv1` tell the variants apart.
_VARIANT_BY_STAGE1_MID = {32: "u2net", 16: "u2netp"}
_PROBE = "stage1.rebnconv1.conv_s1.weight"


def _strip_data_parallel(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def infer_variant(state_dict: dict, source: str = "checkpoint") -> str:
    state_dict = _strip_data_parallel(state_dict)
    if _PROBE not in state_dict:
        raise PortError(f"{source}: missing tensor {_PROBE!r}; this is not a U2-Net state dict")
    mid = int(np.shape(state_dict[_PROBE])[0])
    if mid not in _VARIANT_BY_STAGE1_MID:
        raise PortError(f"{source}: tensor {_PROBE!r} has {mid} output channels; expected 32 (u2net) or "
                        "16 (u2netp), so the U2-Net variant cannot be told")
    return _VARIANT_BY_STAGE1_MID[mid]


def _conv(sd: StateDict, prefix: str, in_ch: int, out_ch: int, k: int) -> dict:
    return {"kernel": conv_kernel(sd.take(f"{prefix}.weight", (out_ch, in_ch, k, k))),
            "bias": sd.take(f"{prefix}.bias", (out_ch,)).astype(np.float32)}


def torch_to_flax(state_dict: dict, variant: str | None = None, out_ch: int = 1,
                  source: str = "checkpoint") -> dict:
    """PyTorch `U2NET`/`U2NETP` state dict (name -> array) -> Flax `{'params', 'batch_stats'}`.

    Every tensor except `num_batches_tracked` must be used; a missing, mis-shaped or
    unexpected one raises `PortError` naming it.
    """
    state_dict = _strip_data_parallel(state_dict)
    if variant is None:
        variant = infer_variant(state_dict, source)
    stages = variant_stages(variant)
    sd = StateDict(state_dict, f"{source} (U2-Net variant {variant!r})")
    params, stats = {}, {}
    for spec in stages:
        p_stage, s_stage = {}, {}
        for layer in rsu_layers(spec):
            prefix = f"{spec.name}.{layer.name}"
            conv = _conv(sd, f"{prefix}.conv_s1", layer.in_ch, layer.out_ch, 3)
            bn_p, bn_s = batchnorm(sd, f"{prefix}.bn_s1", layer.out_ch)
            p_stage[layer.name] = {"conv_s1": conv, "bn_s1": bn_p}
            s_stage[layer.name] = {"bn_s1": bn_s}
        params[spec.name], stats[spec.name] = p_stage, s_stage
    for i, in_ch in enumerate(side_in_channels(variant), start=1):
        params[f"side{i}"] = _conv(sd, f"side{i}", in_ch, out_ch, 3)
    params["outconv"] = _conv(sd, "outconv", 6 * out_ch, out_ch, 1)
    sd.finish()
    return {"params": params, "batch_stats": stats}


def convert(src, dst, variant: str | None = None) -> Path:
    """Read a PyTorch U2-Net checkpoint (torch not needed) and write an Orbax one to `dst`."""
    if src is None:
        raise ValueError(DEFAULT_SRC_HELP)
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"U2-Net checkpoint {src} not found; {DEFAULT_SRC_HELP}")
    state_dict = read_state_dict(src)
    if variant is None:
        variant = infer_variant(state_dict, str(src))
    variables = torch_to_flax(state_dict, variant, source=str(src))
    meta = {"model": "u2net", "config": {"variant": variant, "out_ch": 1}, "source": src.name}
    return save_variables(dst, variables, meta)


def load_u2net(path, variant: str | None = None, **module_kwargs):
    """(U2Net module, variables) from a directory written by `convert`.

    `variant` defaults to the one recorded in the checkpoint's meta.json; names and
    shapes are checked against the model before anything is read.
    """
    meta_cfg = read_meta(path).get("config", {})
    variant = variant or meta_cfg.get("variant", "u2net")
    module = U2Net(variant=variant, **module_kwargs)
    expected = module.init_shapes()
    return module, restore_variables(path, expected=expected)
