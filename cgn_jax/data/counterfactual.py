"""Counterfactual datasets written by `cgn-jax generate`, stored as TFDS datasets.

Storing them as TFDS (array_record, no TensorFlow needed) means a classifier reads a
generated dataset exactly as it reads the real variants, and each dataset carries
its own metadata: which generator made it and how many counterfactuals per shape.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cgn_jax.data.local_info import LocalDatasetInfo

VERSION = tfds.core.Version("1.0.0")
LABEL_KEYS = ("label", "shape_label", "texture_label", "background_label")


@dataclasses.dataclass(eq=False)
class CounterfactualConfig(tfds.core.BuilderConfig):
    pass


class CounterfactualMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images from a CGN, labelled with the class given to each mechanism (label = shape)."""

    VERSION = VERSION
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, arrays: dict[str, np.ndarray] | None = None, metadata: dict | None = None,
                 **kwargs: Any):
        self._arrays = arrays
        self._meta = metadata or {}
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> LocalDatasetInfo:
        label = lambda doc: tfds.features.ClassLabel(num_classes=10, doc=doc)
        return LocalDatasetInfo(
            builder=self,
            description="Counterfactual images sampled from a CGN (cgn-jax generate).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8, encoding="zlib"),
                "label": label("training label: the shape class"),
                "shape_label": label("class fed to the shape mechanism"),
                "texture_label": label("class fed to the texture mechanism"),
                "background_label": label("class fed to the background mechanism"),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(**{k: json.dumps(v) for k, v in self._meta.items()}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self._arrays is None:
            raise ValueError("this builder only writes datasets handed to it by `cgn-jax generate`")
        return {"train": self._generate_examples(self._arrays)}

    def _generate_examples(self, arrays) -> Iterator[tuple[int, dict]]:
        for i in range(arrays["image"].shape[0]):
            yield i, {k: arrays[k][i] for k in ("image", *LABEL_KEYS)}


def write_dataset(out_dir: str | Path, arrays: dict[str, np.ndarray], metadata: dict) -> Path:
    """Write arrays (image uint8 (N,32,32,3) and the label keys) as a TFDS dataset under out_dir."""
    builder = CounterfactualMnist(data_dir=str(out_dir), arrays=arrays, metadata=metadata)
    builder.download_and_prepare()
    return Path(builder.data_dir)


def load_dataset(path: str | Path, limit: int | None = None) -> dict[str, np.ndarray]:
    """Read a dataset written by `write_dataset` (the directory it returned, or its data_dir root)."""
    path = Path(path)
    candidates = [path] + sorted(p.parent for p in path.rglob("dataset_info.json"))
    for c in candidates:
        if (c / "dataset_info.json").is_file():
            builder = tfds.builder_from_directory(str(c))
            break
    else:
        raise FileNotFoundError(f"no counterfactual dataset under {path}; create one with `cgn-jax generate --dataset`")
    src = builder.as_data_source(split="train")
    n = len(src) if limit is None else min(limit, len(src))
    out: dict[str, list] = {k: [] for k in ("image", *LABEL_KEYS)}
    for s in range(0, n, 4096):
        for ex in src.__getitems__(list(range(s, min(n, s + 4096)))):
            for k in out:
                out[k].append(np.asarray(ex[k]))
    return {k: np.stack(v).astype(np.uint8 if k == "image" else np.int64) for k, v in out.items()}
