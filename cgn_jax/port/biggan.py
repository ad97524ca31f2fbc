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

Training the official way (`BigGANDeep(spectral_norm="power_iteration")`) needs what
folding drops, so the converter also writes `DST/spectral_norm/`: per spectrally
normalised layer (same path as its params) `sigma`, `u` (out,) and `v` (torch's
`weight_v` reordered to the Flax kernel's (kh, kw, in) layout), and for conv_to_rgb its
full unnormalised `kernel_orig`. `load_biggan(path, spectral_norm="power_iteration")`
recovers `weight_orig = folded * sigma` (up to float32 rounding) from it. It is a
separate directory so that `DST/variables/` and its loaders stay exactly as before;
conversions made before it existed are refused in that mode with the fix (re-run
`cgn-jax port biggan`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cgn_jax.checkpoint import check_tree_matches, read_meta, restore_variables, save_variables
from cgn_jax.models.biggan import (FOLDED, POWER_ITERATION, SPECTRAL, BigGANConfig, BigGANDeep, check_spectral_norm,
                                   spectral_layers)
from cgn_jax.port.common import PortError, StateDict, conv_kernel, dense_kernel, read_state_dict

WEIGHTS_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
DEFAULT_SRC_HELP = ("no default: pass --src DIR holding pytorch-pretrained-BigGAN's pytorch_model.bin and "
                    "config.json (e.g. the biggan-deep-256 files), or the .bin itself with --variant 128|256|512")

SPECTRAL_NORM_DIR = "spectral_norm"  # beside variables/: what spectral_norm="power_iteration" needs

# Number of GenBlocks tells the published variants apart.
_VARIANT_BY_BLOCKS = {10: 128, 12: 256, 14: 512}


def _sn_weight(sd: StateDict, prefix: str, shape: tuple[int, ...], record: dict | None = None) -> np.ndarray:
    """`weight_orig / sigma` with the reference's eval-mode sigma from the stored u, v.

    `record` receives `sigma` and `u`, `v` (v in the Flax kernel's order: (in,) for a
    linear layer, (kh, kw, in) for a conv).
    """
    w = sd.take(f"{prefix}.weight_orig", shape).astype(np.float64)
    out = shape[0]
    rest = int(np.prod(shape[1:]))
    u = sd.take(f"{prefix}.weight_u", (out,)).astype(np.float64)
    v = sd.take(f"{prefix}.weight_v", (rest,)).astype(np.float64)
    sigma = float(u @ (w.reshape(out, rest) @ v))
    if not np.isfinite(sigma) or sigma == 0.0:
        raise PortError(f"{sd.source}: spectral norm of {prefix!r} from its weight_u/weight_v is {sigma}; "
                        "the checkpoint is damaged")
    if record is not None:
        # torch flattens (out, in, kh, kw) to (out, in*kh*kw); Flax kernels are (kh, kw, in, out)
        v_flax = v.reshape(shape[1:]).transpose(1, 2, 0) if len(shape) == 4 else v
        record.update(sigma=np.float32(sigma), u=u.astype(np.float32),
                      v=np.ascontiguousarray(v_flax.astype(np.float32)))
    return (w / sigma).astype(np.float32)


def _sn_conv(sd, prefix, cin, cout, k, bias=True, keep_out=None, record=None) -> dict:
    p = {"kernel": conv_kernel(_sn_weight(sd, prefix, (cout, cin, k, k), record))}
    if bias:
        p["bias"] = sd.take(f"{prefix}.bias", (cout,)).astype(np.float32)
    # Output channels are last in both the kernel and the bias.
    return {name: np.ascontiguousarray(v[..., :keep_out]) for name, v in p.items()}


def _stats(sd, prefix, n_stats, c) -> dict:
    return {"running_means": sd.take(f"{prefix}.running_means", (n_stats, c)).astype(np.float32),
            "running_vars": sd.take(f"{prefix}.running_vars", (n_stats, c)).astype(np.float32)}


def _cond_bn(sd, prefix, c, cond_dim, n_stats, record: dict) -> tuple[dict, dict]:
    params = {}
    for name in ("scale", "offset"):
        record[name] = {}
        params[name] = {"kernel": dense_kernel(_sn_weight(sd, f"{prefix}.{name}", (c, cond_dim), record[name]))}
    return params, _stats(sd, prefix, n_stats, c)


def infer_variant(state_dict: dict, source: str = "checkpoint") -> int:
    blocks = {k.split(".")[2] for k in state_dict
              if k.startswith("generator.layers.") and k.endswith(".conv_0.weight_orig")}
    if len(blocks) not in _VARIANT_BY_BLOCKS:
        raise PortError(f"{source}: {len(blocks)} GenBlocks (generator.layers.*.conv_0.weight_orig); a published "
                        "BigGAN-deep has 10 (128), 12 (256) or 14 (512). Pass the checkpoint's config.json")
    return _VARIANT_BY_BLOCKS[len(blocks)]


def torch_to_flax(state_dict: dict, config: BigGANConfig, source: str = "checkpoint",
                  spectral_norm: str = FOLDED) -> dict:
    """pytorch-pretrained-BigGAN state dict (name -> array) -> Flax `{'params', 'batch_stats'}`.

    Every tensor must be used; a missing, mis-shaped or unexpected one raises `PortError`
    naming it. With `spectral_norm="power_iteration"`: the variables of that mode
    (unnormalised kernels and the "spectral" u, v collection).
    """
    variables, sn = convert_state_dict(state_dict, config, source)
    if check_spectral_norm(spectral_norm) == FOLDED:
        return variables
    return unfold_spectral_norm(variables, sn)


def convert_state_dict(state_dict: dict, config: BigGANConfig, source: str = "checkpoint") -> tuple[dict, dict]:
    """(folded `{'params', 'batch_stats'}`, spectral norm data) of a pytorch-pretrained-BigGAN state dict.

    The spectral norm data mirrors the params' paths: per spectrally normalised layer
    `sigma`, `u`, `v` (Flax order), and for conv_to_rgb its full `kernel_orig`.
    """
    cfg = config
    sd = StateDict(state_dict, f"{source} (BigGAN-deep-{cfg.output_dim}, channel_width {cfg.channel_width})")
    ch, cond, ns = cfg.channel_width, cfg.cond_dim, cfg.n_stats
    sn = {"gen_z": {}}
    params = {
        "embeddings": {"kernel": dense_kernel(sd.take("embeddings.weight", (cfg.z_dim, cfg.num_classes)))},
        "gen_z": {"kernel": dense_kernel(_sn_weight(sd, "generator.gen_z", (4 * 4 * 16 * ch, cond), sn["gen_z"])),
                  "bias": sd.take("generator.gen_z.bias", (4 * 4 * 16 * ch,)).astype(np.float32)},
    }
    stats = {}
    index = 0
    for i, (_, cin, cout) in enumerate(cfg.layers):
        cin, cout = ch * cin, ch * cout
        if i == cfg.attention_layer_position:
            pre = f"generator.layers.{index}"
            rec = sn[f"layers_{index}"] = {name: {} for name in ("snconv1x1_theta", "snconv1x1_phi", "snconv1x1_g",
                                                                  "snconv1x1_o_conv")}
            conv = lambda name, c_in, c_out: _sn_conv(sd, f"{pre}.{name}", c_in, c_out, 1, bias=False,  # noqa: E731
                                                      record=rec[name])
            params[f"layers_{index}"] = {
                "snconv1x1_theta": conv("snconv1x1_theta", cin, cin // 8),
                "snconv1x1_phi": conv("snconv1x1_phi", cin, cin // 8),
                "snconv1x1_g": conv("snconv1x1_g", cin, cin // 2),
                "snconv1x1_o_conv": conv("snconv1x1_o_conv", cin // 2, cin),
                "gamma": sd.take(f"{pre}.gamma", (1,)).astype(np.float32),
            }
            index += 1
        pre = f"generator.layers.{index}"
        mid = cin // 4
        block_p, block_s, rec = {}, {}, {}
        for j, (c_bn, c_in, c_out, k) in enumerate([(cin, cin, mid, 1), (mid, mid, mid, 3),
                                                     (mid, mid, mid, 3), (mid, mid, cout, 1)]):
            rec[f"bn_{j}"], rec[f"conv_{j}"] = {}, {}
            block_p[f"bn_{j}"], block_s[f"bn_{j}"] = _cond_bn(sd, f"{pre}.bn_{j}", c_bn, cond, ns, rec[f"bn_{j}"])
            block_p[f"conv_{j}"] = _sn_conv(sd, f"{pre}.conv_{j}", c_in, c_out, k, record=rec[f"conv_{j}"])
        params[f"layers_{index}"], stats[f"layers_{index}"], sn[f"layers_{index}"] = block_p, block_s, rec
        index += 1
    params["bn"] = {"scale": sd.take("generator.bn.weight", (ch,)).astype(np.float32),
                    "bias": sd.take("generator.bn.bias", (ch,)).astype(np.float32)}
    stats["bn"] = _stats(sd, "generator.bn", ns, ch)
    sn["conv_to_rgb"] = {}
    params["conv_to_rgb"] = _sn_conv(sd, "generator.conv_to_rgb", ch, ch, 3, keep_out=3, record=sn["conv_to_rgb"])
    sn["conv_to_rgb"]["kernel_orig"] = conv_kernel(np.asarray(sd.tensors["generator.conv_to_rgb.weight_orig"]))
    sd.finish()
    return {"params": params, "batch_stats": stats}, sn


def unfold_spectral_norm(folded: dict, sn: dict) -> dict:
    """Folded variables + the converter's spectral norm data -> power-iteration variables.

    Each kernel becomes `folded * sigma` (computed in float64: `weight_orig` up to float32
    rounding), conv_to_rgb's the stored full `kernel_orig`; u, v go to the "spectral"
    collection. Other collections pass through.
    """
    params = {k: v for k, v in folded["params"].items()}
    spectral = {}
    for path, entry in spectral_layers(sn).items():
        node, snode = params, spectral
        for name in path[:-1]:
            node[name] = dict(node[name])
            node, snode = node[name], snode.setdefault(name, {})
        layer = node[path[-1]] = dict(node[path[-1]])
        if "kernel_orig" in entry:
            layer["kernel"] = np.asarray(entry["kernel_orig"], np.float32)
        else:
            layer["kernel"] = (np.asarray(layer["kernel"], np.float64) * float(entry["sigma"])).astype(np.float32)
        snode[path[-1]] = {"u": np.asarray(entry["u"], np.float32), "v": np.asarray(entry["v"], np.float32)}
    out = {k: v for k, v in folded.items() if k != "params"}
    out["params"], out[SPECTRAL] = params, spectral
    return out


def spectral_norm_shapes(config: BigGANConfig) -> dict:
    """The tree `convert` writes to `DST/spectral_norm/` for `config` (ShapeDtypeStructs)."""
    import jax

    shapes = BigGANDeep(config, spectral_norm=POWER_ITERATION).init_shapes()
    f32 = lambda shape: jax.ShapeDtypeStruct(tuple(shape), np.float32)  # noqa: E731
    tree = {}
    for path, uv in spectral_layers(shapes[SPECTRAL]).items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = {"sigma": f32(()), "u": f32(uv["u"].shape), "v": f32(uv["v"].shape)}
    tree["conv_to_rgb"]["kernel_orig"] = f32(shapes["params"]["conv_to_rgb"]["kernel"].shape)
    return tree


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
    variables, sn = convert_state_dict(state_dict, config, source=str(src))
    dst = Path(dst)
    # the spectral norm data first: the main meta.json, written last, marks a complete conversion
    save_variables(dst / SPECTRAL_NORM_DIR, sn, {"model": "biggan-deep spectral norm data", "config": config.to_dict(),
                                                 "contents": "per layer sigma, u, v (Flax order); conv_to_rgb "
                                                             "kernel_orig (all outputs)"})
    meta = {"model": "biggan-deep", "config": config.to_dict(), "source": src.name,
            "spectral_norm": "folded into weights (sigma from stored u, v)",
            "spectral_norm_data": f"{SPECTRAL_NORM_DIR}/ (for spectral_norm='power_iteration')",
            "conv_to_rgb": "first 3 output channels only"}
    return save_variables(dst, variables, meta)


def read_spectral_norm_data(path, config: BigGANConfig) -> dict:
    """The `spectral_norm/` tree `convert` writes beside the folded weights, checked against `config`."""
    sn_dir = Path(path) / SPECTRAL_NORM_DIR
    if not (sn_dir / "variables").is_dir():
        raise FileNotFoundError(
            f"{path} has no {SPECTRAL_NORM_DIR}/ (per-layer sigma, u, v), which spectral_norm='power_iteration' "
            "needs: it was converted before that mode existed. Re-run `cgn-jax port biggan --src <biggan-deep dir> "
            f"--dst {path}` to add it (the folded weights stay the same), or use model.spectral_norm=folded")
    return restore_variables(sn_dir, expected=spectral_norm_shapes(config))


def load_biggan(path, spectral_norm: str = FOLDED, **module_kwargs):
    """(BigGANDeep module, variables) from a directory written by `convert`.

    The config comes from the checkpoint's meta.json; names and shapes are checked
    against the model before anything is read. `module_kwargs` e.g. `dtype=jnp.bfloat16`.
    `spectral_norm="power_iteration"`: the variables of that mode (unnormalised kernels,
    "spectral" u, v), from the folded weights and `spectral_norm/`.
    """
    check_spectral_norm(spectral_norm)
    meta = read_meta(path)
    if "config" not in meta:
        raise FileNotFoundError(f"{path} has no meta.json with a BigGAN config; create it with `cgn-jax port biggan`")
    config = BigGANConfig.from_dict(meta["config"])
    module = BigGANDeep(config=config, spectral_norm=spectral_norm, **module_kwargs)
    variables = restore_variables(path, expected=BigGANDeep(config=config).init_shapes())
    if spectral_norm == FOLDED:
        return module, variables
    return module, power_iteration_variables(path, variables, config)


def power_iteration_variables(path, folded: dict, config: BigGANConfig | None = None) -> dict:
    """The power-iteration variables of the checkpoint at `path`, given its folded variables.

    Only `spectral_norm/` (sigma, u, v: small) is read, so a caller that already holds
    the folded weights does not read the large kernels twice.
    """
    if config is None:
        config = BigGANConfig.from_dict(read_meta(path)["config"])
    variables = unfold_spectral_norm(folded, read_spectral_norm_data(path, config))
    module = BigGANDeep(config=config, spectral_norm=POWER_ITERATION)
    check_tree_matches(module.init_shapes(), variables, what=f"power-iteration variables from {path}")
    return variables
