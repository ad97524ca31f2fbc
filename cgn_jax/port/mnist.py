"""Port the official pretrained MNIST CGN generators (PyTorch state dicts) to Flax.

The official `nn.Sequential` indices name the layers; this table maps them onto the
named Flax layers of `cgn_jax.models.mnist_cgn`. Architecture sizes (latent size,
ngf, number of classes) are read off the tensors, so a checkpoint of another size
ports too, and the Flax model built from `meta.json` matches it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax.checkpoint import read_meta, restore_variables, save_variables
from cgn_jax.port.common import PortError, StateDict, batchnorm, conv_kernel, dense_kernel, read_state_dict

# flax layer -> index in the official nn.Sequential
SHAPE_LAYERS = {"linear": 0, "conv1": 4, "bn1": 5, "conv2": 9, "bn2": 10}
TEXTURE_LAYERS = {"linear": 0, "conv1": 3, "bn1": 4, "conv2": 7, "bn2": 8, "conv3": 10, "bn3": 11}
VARIANTS = ("colored", "double_colored", "wildlife")


def infer_sizes(tensors: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
    try:
        n_classes = tensors["label_emb.weight"].shape[0]
        lin_out, lin_in = tensors["f_shape.0.weight"].shape
        ngf = tensors["f_shape.4.weight"].shape[0]
    except KeyError as e:
        raise PortError(f"{source}: missing tensor {e.args[0]!r}; this is not an official MNIST CGN state dict") from None
    init_size = int(round((lin_out / (2 * ngf)) ** 0.5))
    return {"n_classes": int(n_classes), "latent_dim": int(lin_in - n_classes), "ngf": int(ngf),
            "img_size": int(init_size * 4)}


def _mechanism(sd: StateDict, prefix: str, layers: dict, sizes: dict, out_channels: int):
    ngf, inp = sizes["ngf"], sizes["latent_dim"] + sizes["n_classes"]
    init = sizes["img_size"] // 4
    params, stats = {}, {}
    idx = layers["linear"]
    params["linear"] = {
        "kernel": dense_kernel(sd.take(f"{prefix}.{idx}.weight", (ngf * 2 * init * init, inp))),
        "bias": sd.take(f"{prefix}.{idx}.bias", (ngf * 2 * init * init,)).astype(np.float32)}
    if out_channels == 1:  # shape mechanism
        convs = {"conv1": (ngf * 2, ngf), "conv2": (ngf, 1)}
    else:
        convs = {"conv1": (ngf * 2, ngf * 2), "conv2": (ngf * 2, ngf), "conv3": (ngf, out_channels)}
    for name, (cin, cout) in convs.items():
        idx = layers[name]
        params[name] = {"kernel": conv_kernel(sd.take(f"{prefix}.{idx}.weight", (cout, cin, 3, 3)))}
        if name == "conv3":
            params[name]["bias"] = sd.take(f"{prefix}.{idx}.bias", (cout,)).astype(np.float32)
        bn = "bn" + name[-1]
        params[bn], stats[bn] = batchnorm(sd, f"{prefix}.{layers[bn]}", cout)
    return params, stats


def torch_to_flax(tensors: dict[str, np.ndarray], source: str = "checkpoint") -> tuple[dict, dict]:
    """(variables, sizes) from an official MNIST CGN state dict; every tensor must be used."""
    sizes = infer_sizes(tensors, source)
    sd = StateDict(tensors, source)
    n = sizes["n_classes"]
    params = {"label_emb": {"embedding": sd.take("label_emb.weight", (n, n)).astype(np.float32)}}
    stats = {}
    params["f_shape"], stats["f_shape"] = _mechanism(sd, "f_shape", SHAPE_LAYERS, sizes, 1)
    for name in ("f_text1", "f_text2"):
        params[name], stats[name] = _mechanism(sd, name, TEXTURE_LAYERS, sizes, 3)
    sd.finish()
    return {"params": params, "batch_stats": stats}, sizes


def load_torch_mnist_cgn(path: str | Path) -> dict:
    """The official `.pth` as Flax variables `{'params', 'batch_stats'}` (no torch needed)."""
    variables, _ = torch_to_flax(read_state_dict(path), source=str(path))
    return variables


def guess_variant(path: Path) -> str | None:
    """The variant an official file name starts with (colored_MNIST.pth), or None."""
    name = path.name.lower()
    for v in sorted(VARIANTS, key=len, reverse=True):
        if name.startswith(v):
            return v
    return None


def convert(src, dst, variant=None) -> Path:
    if not src:
        raise PortError("pass --src, e.g. ../shared/weights/cgn_mnist/colored_MNIST.pth")
    src = Path(src)
    variables, sizes = torch_to_flax(read_state_dict(src), source=str(src))
    variant = variant or guess_variant(src)
    if variant is not None and variant not in VARIANTS:
        raise PortError(f"unknown MNIST variant {variant!r}; valid: {', '.join(VARIANTS)}")
    meta = {"model": "mnist_cgn", "variant": variant, "source": str(src.resolve()), **sizes}
    return save_variables(dst, variables, meta)


def load_mnist_cgn(path: str | Path, texture_mode: str | None = None, patch_size: int | None = None,
                   dtype=jnp.float32):
    """(model, variables) from a directory written by `convert` or by `cgn-jax train`.

    The texture layer is not a parameter, so it is taken from the checkpoint's meta.json
    (what the generator was trained with) unless given here.
    """
    from cgn_jax.models.mnist_cgn import MnistCGN, init_variables

    meta = read_meta(path)
    if meta.get("model", "mnist_cgn") != "mnist_cgn":
        raise PortError(f"{path} holds a {meta.get('model')!r} checkpoint, not an MNIST CGN")
    sizes = {k: meta[k] for k in ("n_classes", "latent_dim", "ngf", "img_size") if k in meta}
    texture_mode = texture_mode or meta.get("texture_mode", "tile_crop")
    patch_size = int(patch_size or meta.get("patch_size", 4))
    model = MnistCGN(texture_mode=texture_mode, patch_size=patch_size, dtype=dtype, **sizes)
    expected = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
    variables = restore_variables(path, expected=expected)
    return model, variables
