"""Port pytorch-pretrained-BigGAN (BigGAN-deep) weights to Orbax.

CGN initialises its ImageNet mechanisms from the pretrained BigGAN-deep-256, so the
weights are converted once (`cgn-jax port biggan --src DIR_OR_FILE --dst DIR`) and
restored with `load_biggan`. Torch is not needed: the `.bin` is read with the
torch-free reader.

Spectral norm is folded here: in eval mode the reference uses `W / sigma` with
`sigma = u . (W_mat v)` from the stored `weight_u`/`weight_v` (no power iteration),
so each `weight_orig` is divided by that sigma (computed in float64) and the Flax model
holds plain weights. `conv_to_rgb` keeps only the 3 output channels the reference
uses. The tensors asked for follow the same `BigGANConfig` that builds the Flax model,
so every one of them is used or the conversion fails naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cgn_jax.checkpoint import read_meta, restore_variables, save_variables
from cgn_jax.models.biggan import BigGANConfig, BigGANDeep
from cgn_jax.port.common import PortError, StateDict, conv_kernel, dense_kernel, read_state_dict

WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
DEFAULT_SRC_HELP = ("no default: pass --src DIR holding pytorch-pretrained-BigGAN's pytorch_model.bin and "
                    "config.json (e.g. the biggan-deep-256 files), or the .bin itself with --variant 128|256|512")

# Number of GenBlocks tells the published variants apart.
_VARIANT_BY_BLOCKS = {10: 128, 12: 256, 14: 512}


def _sn_weight(sd: StateDict, prefix: str, shape: tuple[int, ...]) -> np.ndarray:
    """`weight_orig / sigma` with the reference's eval-mode sigma from the stored u, v."""
    w = sd.take(f"{prefix}.weight_orig", shape).astype(np.float64)
    out = shape[0]
    rest = int(np.prod(shape[1:]))
    u = sd.take(f"{prefix}.weight_u", (out,)).astype(np.float64)
    v = sd.take(f"{prefix}.weight_v", (rest,)).astype(np.float64)
    sigma = float(u @ (w.reshape(out, rest) @ v))
    if not np.isfinite(sigma) or sigma == 0.0:
        raise PortError(f"{sd.source}: spectral norm of {prefix!r} from its weight_u/weight_v is {sigma}; "
                        "the checkpoint is damaged")
    return (w / sigma).astype(np.float32)


def _sn_conv(sd, prefix, cin, cout, k, bias=True, keep_out=None) -> dict:
    p = {"kernel": conv_kernel(_sn_weight(sd, prefix, (cout, cin, k, k)))}
    if bias:
        p["bias"] = sd.take(f"{prefix}.bias", (cout,)).astype(np.float32)
    # Output channels are last in both the kernel and the bias.
    return {name: np.ascontiguousarray(v[..., :keep_out]) for name, v in p.items()}


def _stats(sd, prefix, n_stats, c) -> dict:
    return {"running_means": sd.take(f"{prefix}.running_means", (n_stats, c)).astype(np.float32),
            "running_vars": sd.take(f"{prefix}.running_vars", (n_stats, c)).astype(np.float32)}


def _cond_bn(sd, prefix, c, cond_dim, n_stats) -> tuple[dict, dict]:
    params = {name: {"kernel": dense_kernel(_sn_weight(sd, f"{prefix}.{name}", (c, cond_dim)))}
              for name in ("scale", "offset")}
    return params, _stats(sd, prefix, n_stats, c)


def infer_variant(state_dict: dict, source: str = "checkpoint") -> int:
    blocks = {k.split(".")[2] for k in state_dict
              if k.startswith("generator.layers.") and k.endswith(".conv_0.weight_orig")}
    if len(blocks) not in _VARIANT_BY_BLOCKS:
        raise PortError(f"{source}: {len(blocks)} GenBlocks (generator.layers.*.conv_0.weight_orig); a published "
                        "BigGAN-deep has 10 (128), 12 (256) or 14 (512). Pass the checkpoint's config.json")
    return _VARIANT_BY_BLOCKS[len(blocks)]


def torch_to_flax(state_dict: dict, config: BigGANConfig, source: str = "checkpoint") -> dict:
    """pytorch-pretrained-BigGAN state dict (name -> array) -> Flax `{'params', 'batch_stats'}`.

    Every tensor must be used; a missing, mis-shaped or unexpected one raises `PortError`
    naming it.
    """
    cfg = config
    sd = StateDict(state_dict, f"{source} (BigGAN-deep-{cfg.output_dim}, channel_width {cfg.channel_width})")
    ch, cond, ns = cfg.channel_width, cfg.cond_dim, cfg.n_stats
    params = {
        "embeddings": {"kernel": dense_kernel(sd.take("embeddings.weight", (cfg.z_dim, cfg.num_classes)))},
        "gen_z": {"kernel": dense_kernel(_sn_weight(sd, "generator.gen_z", (4 * 4 * 16 * ch, cond))),
                  "bias": sd.take("generator.gen_z.bias", (4 * 4 * 16 * ch,)).astype(np.float32)},
    }
    stats = {}
    index = 0
    for i, (_, cin, cout) in enumerate(cfg.layers):
        cin, cout = ch * cin, ch * cout
        if i == cfg.attention_layer_position:
            pre = f"generator.layers.{index}"
            params[f"layers_{index}"] = {
                "snconv1x1_theta": _sn_conv(sd, f"{pre}.snconv1x1_theta", cin, cin // 8, 1, bias=False),
                "snconv1x1_phi": _sn_conv(sd, f"{pre}.snconv1x1_phi", cin, cin // 8, 1, bias=False),
                "snconv1x1_g": _sn_conv(sd, f"{pre}.snconv1x1_g", cin, cin // 2, 1, bias=False),
                "snconv1x1_o_conv": _sn_conv(sd, f"{pre}.snconv1x1_o_conv", cin // 2, cin, 1, bias=False),
                "gamma": sd.take(f"{pre}.gamma", (1,)).astype(np.float32),
            }
            index += 1
        pre = f"generator.layers.{index}"
        mid = cin // 4
        block_p, block_s = {}, {}
        for j, (c_bn, c_in, c_out, k) in enumerate([(cin, cin, mid, 1), (mid, mid, mid, 3),
                                                     (mid, mid, mid, 3), (mid, mid, cout, 1)]):
            block_p[f"bn_{j}"], block_s[f"bn_{j}"] = _cond_bn(sd, f"{pre}.bn_{j}", c_bn, cond, ns)
            block_p[f"conv_{j}"] = _sn_conv(sd, f"{pre}.conv_{j}", c_in, c_out, k)
        params[f"layers_{index}"], stats[f"layers_{index}"] = block_p, block_s
        index += 1
    params["bn"] = {"scale": sd.take("generator.bn.weight", (ch,)).astype(np.float32),
                    "bias": sd.take("generator.bn.bias", (ch,)).astype(np.float32)}
    stats["bn"] = _stats(sd, "generator.bn", ns, ch)
    params["conv_to_rgb"] = _sn_conv(sd, "generator.conv_to_rgb", ch, ch, 3, keep_out=3)
    sd.finish()
    return {"params": params, "batch_stats": stats}


def _resolve_src(src, variant) -> tuple[Path, BigGANConfig | None]:
    if src is None:
        raise ValueError(DEFAULT_SRC_HELP)
    src = Path(src)
    config_file = None
    if src.is_dir():
        weights, config_file = src / WEIGHTS_NAME, src / CONFIG_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{src} has no {WEIGHTS_NAME}; {DEFAULT_SRC_HELP}")
        if not config_file.is_file():
            config_file = None
        src = weights
    elif not src.is_file():
        raise FileNotFoundError(f"BigGAN checkpoint {src} not found; {DEFAULT_SRC_HELP}")
    elif (src.parent / CONFIG_NAME).is_file() and src.name == WEIGHTS_NAME:
        config_file = src.parent / CONFIG_NAME
    config = None
    if config_file is not None:
        config = BigGANConfig.from_dict(json.loads(config_file.read_text()))
        if variant is not None and int(variant) != config.output_dim:
            raise ValueError(f"--variant {variant} contradicts {config_file} (output_dim {config.output_dim})")
    return src, config


def convert(src, dst, variant: int | str | None = None) -> Path:
    """Read a pytorch-pretrained-BigGAN checkpoint (torch not needed) and write an Orbax one to `dst`.

    `src` is the `pytorch_model.bin` or a directory holding it and `config.json`. Without
    a config.json the published config of `variant` (default: inferred from the number
    of blocks) is used.
    """
    src, config = _resolve_src(src, variant)
    state_dict = read_state_dict(src)
    if config is None:
        config = BigGANConfig.variant(variant if variant is not None else infer_variant(state_dict, str(src)))
    variables = torch_to_flax(state_dict, config, source=str(src))
    meta = {"model": "biggan-deep", "config": config.to_dict(), "source": src.name,
            "spectral_norm": "folded into weights (sigma from stored u, v)",
            "conv_to_rgb": "first 3 output channels only"}
    return save_variables(dst, variables, meta)


def load_biggan(path, **module_kwargs):
    """(BigGANDeep module, variables) from a directory written by `convert`.

    The config comes from the checkpoint's meta.json; names and shapes are checked
    against the model before anything is read. `module_kwargs` e.g. `dtype=jnp.bfloat16`.
    """
    meta = read_meta(path)
    if "config" not in meta:
        raise FileNotFoundError(f"{path} has no meta.json with a BigGAN config; create it with `cgn-jax port biggan`")
    module = BigGANDeep(config=BigGANConfig.from_dict(meta["config"]), **module_kwargs)
    return module, restore_variables(path, expected=module.init_shapes())
