"""MNIST variants of CGN: raw sources, TFDS builders and the on-device renderer.

The TFDS builders (and so `tensorflow_datasets`) are imported lazily: training code that
only renders batches on device should not pay for that import.
"""

from cgn_jax.data.palettes import VARIANTS, canonical_variant, valid_variant_names

_LAZY = {
    "load_variant": "cgn_jax.data.builders",
    "get_builder": "cgn_jax.data.builders",
    "prepare": "cgn_jax.data.builders",
    "read_split": "cgn_jax.data.builders",
    "variant_size": "cgn_jax.data.builders",
    "open_split": "cgn_jax.data.builders",
    "make_split": "cgn_jax.data.builders",
    "default_data_dir": "cgn_jax.data.builders",
    "load_mnist": "cgn_jax.data.idx",
    "load_mnist_idx": "cgn_jax.data.idx",
    "load_textures": "cgn_jax.data.idx",
    "read_idx": "cgn_jax.data.idx",
    "make_assets": "cgn_jax.data.render",
    "render_batch": "cgn_jax.data.render",
}

__all__ = ["VARIANTS", "canonical_variant", "valid_variant_names", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
