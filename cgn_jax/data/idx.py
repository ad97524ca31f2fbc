"""Raw sources of the MNIST variants: the MNIST IDX files and the Wildlife textures.

The official code downloads MNIST through torchvision; here it is read from the four
original IDX files in a local directory (no network, no torch), so the splits are exactly
the official ones (train[:50000] / train[50000:] index into the original file order). The
fallback to TFDS's own prepared `mnist` exists for machines that already have it, but its
stored order is not the file order, so train[:50000] there is a different partition.
Textures are read from a directory so the user can point at the official repository's
`mnists/data/textures` (or `shared/data/textures`).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from cgn_jax.data import palettes

# file stem -> (split, field)
MNIST_FILES = {
    "train-images-idx3-ubyte": ("train", "images"),
    "train-labels-idx1-ubyte": ("train", "labels"),
    "t10k-images-idx3-ubyte": ("test", "images"),
    "t10k-labels-idx1-ubyte": ("test", "labels"),
}
MNIST_SIZES = {"train": 60000, "test": 10000}

_IDX_DTYPES = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
_TEXTURE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in .gz) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), "
                         f"file holds {len(data) - offset} bytes")
    arr = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def _find_idx(mnist_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (mnist_dir / name).is_file():
            return mnist_dir / name
    raise FileNotFoundError(
        f"MNIST file {mnist_dir / (stem + '.gz')} not found; pass mnist_dir= a directory "
        f"holding the four MNIST IDX files ({', '.join(s + '.gz' for s in MNIST_FILES)})")


def load_mnist_idx(mnist_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The four IDX files of `mnist_dir` as {train,test}_{images,labels}.

    images: (N, 28, 28) uint8, labels: (N,) int64, in the original file order. The arrays
    are read-only and cached per (file, mtime): building several configs (e.g. the IRM
    environments) in one process decompresses MNIST once.
    """
    mnist_dir = Path(mnist_dir).expanduser()
    if not mnist_dir.is_dir():
        raise FileNotFoundError(
            f"MNIST directory {mnist_dir} does not exist; pass mnist_dir= a directory holding "
            f"the four MNIST IDX files ({', '.join(s + '.gz' for s in MNIST_FILES)})")
    files = tuple((str(p.resolve()), p.stat().st_mtime_ns)
                  for p in (_find_idx(mnist_dir, stem) for stem in MNIST_FILES))
    return dict(_load_mnist_files(files, str(mnist_dir)))


@functools.lru_cache(maxsize=2)
def _load_mnist_files(files: tuple[tuple[str, int], ...], mnist_dir: str) -> dict[str, np.ndarray]:
    out = {}
    for (path, _), (split, field) in zip(files, MNIST_FILES.values()):
        arr = read_idx(path)
        arr = arr.astype(np.int64) if field == "labels" else arr
        arr.flags.writeable = False
        out[f"{split}_{field}"] = arr
    for split, n in MNIST_SIZES.items():
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        if images.shape != (n, palettes.MNIST_SIZE, palettes.MNIST_SIZE) or labels.shape != (n,):
            raise ValueError(f"MNIST {split} files in {mnist_dir} hold images {images.shape} and "
                             f"labels {labels.shape}; expected ({n}, 28, 28) and ({n},)")
    return out


def load_mnist_tfds(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """TFDS's prepared `mnist` (no download) in the same layout as `load_mnist_idx`."""
    import tensorflow_datasets as tfds

    hint = ("pass mnist_dir= a directory holding the four MNIST IDX files "
            "(train-images-idx3-ubyte.gz, ...)")
    try:
        builder = tfds.builder("mnist", data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:  # noqa: BLE001 - any failure means "no usable TFDS mnist"
        raise FileNotFoundError(f"no MNIST source: mnist_dir was not given and TFDS's 'mnist' "
                                f"is unavailable ({type(e).__name__}: {e}); {hint}") from e
    if not prepared:
        raise FileNotFoundError(
            f"no MNIST source: mnist_dir was not given and TFDS's 'mnist' is not prepared in "
            f"{builder.data_dir}; {hint}")
    try:
        sources = builder.as_data_source()
        sources["train"], sources["test"]  # noqa: B018 - both splits must exist
    except Exception as e:  # noqa: BLE001 - e.g. prepared as tfrecord, which needs TensorFlow
        raise FileNotFoundError(
            f"no MNIST source: TFDS's 'mnist' in {builder.data_dir} is not readable without "
            f"TensorFlow ({type(e).__name__}: {e}); {hint}") from e
    warnings.warn(
        "reading MNIST from TFDS's 'mnist': its example order differs from the IDX files, so "
        "train[:50000]/train[50000:] are not the official partition; pass mnist_dir= for that",
        stacklevel=3)
    out = {}
    for split in ("train", "test"):
        src = sources[split]
        examples = src.__getitems__(list(range(len(src))))
        out[f"{split}_images"] = np.stack([ex["image"][..., 0] for ex in examples]).astype(np.uint8)
        out[f"{split}_labels"] = np.array([ex["label"] for ex in examples], dtype=np.int64)
    return out


def load_mnist(mnist_dir: str | os.PathLike | None = None,
               tfds_data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """MNIST from `mnist_dir` (IDX files) if given, else from TFDS's prepared 'mnist'."""
    if mnist_dir is not None:
        return load_mnist_idx(mnist_dir)
    return load_mnist_tfds(tfds_data_dir)


def _texture_files(textures_dir: Path, kind: str) -> list[Path]:
    sub = textures_dir / kind
    if not sub.is_dir():
        raise FileNotFoundError(
            f"texture directory {sub} does not exist; pass textures_dir= a directory with "
            "'object/' and 'background/' subdirectories of 10 images each (e.g. the official "
            "repository's mnists/data/textures)")
    files = sorted(p for p in sub.iterdir() if p.suffix.lower() in _TEXTURE_SUFFIXES)
    if len(files) != palettes.NUM_CLASSES:
        raise ValueError(
            f"texture directory {sub} holds {len(files)} images; expected exactly "
            f"{palettes.NUM_CLASSES} (one per class, sorted by file name: index = class)")
    return files


def load_textures(textures_dir: str | os.PathLike | None,
                  size: int = palettes.TEXTURE_SIZE) -> dict[str, np.ndarray]:
    """{'object', 'background'}: (10, size, size, 3) uint8, resized with PIL nearest.

    Sorted by file name, index = class, as in the official `WildlifeMNIST`.
    """
    from PIL import Image

    if textures_dir is None:
        raise FileNotFoundError(
            "Wildlife MNIST needs textures: pass textures_dir= a directory with 'object/' and "
            "'background/' subdirectories (e.g. shared/data/textures)")
    textures_dir = Path(textures_dir).expanduser()
    if not textures_dir.is_dir():
        raise FileNotFoundError(
            f"texture directory {textures_dir} does not exist; pass textures_dir= a directory "
            "with 'object/' and 'background/' subdirectories")
    out = {}
    for kind in ("object", "background"):
        ims = []
        for p in _texture_files(textures_dir, kind):
            with Image.open(p) as im:
                ims.append(np.asarray(im.convert("RGB").resize((size, size), Image.NEAREST)))
        out[kind] = np.stack(ims).astype(np.uint8)
    return out
