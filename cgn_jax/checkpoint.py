"""Saving and restoring model variables (pretrained or ported) with Orbax.

A variables directory holds an Orbax checkpoint under `variables/` and a small
`meta.json` naming the model and config that produced it. Orbax writes to a
temporary directory and renames on success, so an interrupted save never leaves a
half-written checkpoint behind. Restoring checks names and shapes against what the
model expects and names the first mismatch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    pass


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten_with_names(tree) -> dict[str, Any]:
    return {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_tree_matches(expected, got, what: str = "checkpoint") -> None:
    """Raise naming the first tensor that is missing, unexpected or mis-shaped."""
    exp, act = flatten_with_names(expected), flatten_with_names(got)
    for name, leaf in exp.items():
        if name not in act:
            raise CheckpointMismatchError(
                f"{what} has no tensor {name!r} (expected shape {tuple(np.shape(leaf))}); "
                "was it written for a different model or config?")
        if tuple(np.shape(act[name])) != tuple(np.shape(leaf)):
            raise CheckpointMismatchError(
                f"{what}: tensor {name!r} has shape {tuple(np.shape(act[name]))}, the model expects "
                f"{tuple(np.shape(leaf))}; check that the config (variant, ngf, latent size) matches the checkpoint")
    for name in act:
        if name not in exp:
            raise CheckpointMismatchError(
                f"{what} has an unexpected tensor {name!r}; it was written for a different model or config")


def save_variables(dst: str | Path, variables, meta: dict | None = None) -> Path:
    """Write `variables` (a pytree of arrays) and `meta` to `dst/`, atomically."""
    dst = Path(dst).absolute()
    dst.mkdir(parents=True, exist_ok=True)
    target = dst / "variables"
    with ocp.StandardCheckpointer() as checkpointer:  # closed: no saver thread outlives the call
        checkpointer.save(target, jax.tree.map(np.asarray, variables), force=True)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:  # every process joins Orbax's save; one writes the (atomic) meta.json
        tmp = dst / f".meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta or {}, indent=2, sort_keys=True))
        os.replace(tmp, dst / "meta.json")
    return dst


def read_meta(src: str | Path) -> dict:
    path = Path(src) / "meta.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _stored_shapes(target: Path):
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(target)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    if tree is None:
        tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def restore_variables(src: str | Path, expected=None, sharding=None):
    """Restore variables written by `save_variables`.

    `expected` (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape(model.init, ...)`)
    is checked name by name and shape by shape before anything is read. With `sharding`
    (a `jax.sharding.Sharding`, e.g. replicated over a mesh, or a pytree of them) Orbax
    reads each array straight onto those devices and jax Arrays are returned; otherwise
    host numpy arrays.
    """
    src = Path(src).absolute()
    target = src / "variables"
    if not target.is_dir():
        raise FileNotFoundError(
            f"no cgn-jax checkpoint at {src} (expected {target}/); create one with `cgn-jax port ...` "
            "or `cgn-jax train`, or check the path")
    try:
        stored = _stored_shapes(target)
    except Exception as e:  # orbax raises a variety of errors for damaged directories
        raise CheckpointMismatchError(
            f"checkpoint {src} is unreadable ({type(e).__name__}: {e}); it is corrupt or incomplete: "
            "re-create it (e.g. rerun `cgn-jax port`)") from e
    if expected is not None:
        check_tree_matches(expected, stored, what=f"checkpoint {src}")
    abstract = None
    if sharding is not None:
        shardings = (sharding if not isinstance(sharding, jax.sharding.Sharding)
                     else jax.tree.map(lambda _: sharding, stored))
        abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), stored, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(target) if abstract is None else checkpointer.restore(target, abstract)
    except Exception as e:
        raise CheckpointMismatchError(
            f"checkpoint {src} could not be read ({type(e).__name__}: {e}); it is corrupt or incomplete: "
            "re-create it") from e
    return restored if sharding is not None else jax.tree.map(np.asarray, restored)
