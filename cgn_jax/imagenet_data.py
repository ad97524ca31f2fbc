"""ImageNet-scale input pipelines for the classifier ensemble and its evaluations.

ResNet-50 steps on an accelerator are short; JPEG decoding and resizing on the host
are not. So decoding and augmentation run in grain worker threads (PIL releases the
GIL while it decodes and resamples), optionally in worker processes, and batches
reach the device as uint8 (a quarter of the bytes of float32); the mean/std
normalisation happens on the device inside the compiled step (`normalize`).

Training order is a pure function of (seed, host, step): grain's random-access
datasets shuffle per epoch and seed each example's augmentation from its index, so a
resumed run starts at its step without replaying the data. Each host reads only its
own shard (`shard=(process_index, process_count)`).

Sources are random-access sequences of records `{"image": path-or-bytes, <labels>}`:
an ImageFolder tree (`root/<wnid>/*.JPEG`, labels by sorted class directory, as
torchvision's ImageFolder), TFDS `imagenet2012` (array_record, prepared from the
manually downloaded archives), the counterfactual datasets written by the official
`imagenet/generate_data.py` (`labels.csv` + `ims/`), Geirhos' cue-conflict stimuli and
the ImageNet-9 backgrounds challenge.

Preprocessing follows torchvision: RandomResizedCrop(224, scale=(0.08, 1),
ratio=(3/4, 4/3)) + horizontal flip for training, Resize(256) + CenterCrop(224) for
evaluation, bilinear resampling throughout. With `draft=True` a JPEG is decoded at
1/2, 1/4 or 1/8 scale when the crop would still cover at least the output size, which
is much cheaper and changes pixels only by the decoder's DCT-domain downscale.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import chex
import einops
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the normalisation the official ImageNet-9 evaluation uses (from the backgrounds challenge code)
IN9_MEAN = (0.4717, 0.4499, 0.3837)
IN9_STD = (0.2600, 0.2516, 0.2575)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
TFDS_ARCHIVES = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}


class DataError(ValueError):
    """A dataset is missing or laid out differently than expected; the message says what to do."""


# ---------------------------------------------------------------------------------------- sources

class ImageFolderSource:
    """`root/<class>/<image>`; labels index the sorted class directories (or `class_names`)."""

    def __init__(self, root: str | Path, class_names: Sequence[str] | None = None, what: str = "dataset"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{what}: directory {self.root} does not exist (expected {self.root}/<class>/<image>)")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not found:
            raise DataError(f"{what}: {self.root} has no class directories (expected {self.root}/<class>/<image>)")
        if class_names is not None:
            unknown = sorted(set(found) - set(class_names))
            if unknown:
                raise DataError(f"{what}: {self.root} has class directories not among the {len(class_names)} "
                                f"expected classes, first {unknown[0]!r}")
            self.classes = list(class_names)
        else:
            self.classes = found
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for c in found:
            files = sorted(f for f in os.listdir(self.root / c) if f.lower().endswith(IMAGE_EXTENSIONS))
            self.samples += [(str(self.root / c / f), index[c]) for f in files]
        if not self.samples:
            raise DataError(f"{what}: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}/<class>/")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return {"image": path, "label": label}


class CounterfactualSource:
    """A counterfactual ImageNet dataset in the official `generate_data.py` layout.

    `root/labels.csv` + `root/ims/<im_name><suffix>`, or several such directories
    `root/train*/` and `root/val*/` (the official loader picks them by `split`). The CSV
    has columns `im_name, shape_cls, texture_cls, bg_cls` after an unnamed index column;
    the official script appends each row as a header line of an empty frame, so every
    row starts with an empty index field, which is accepted too.
    """

    def __init__(self, root: str | Path, split: str = "train", image_suffix: str = "_x_gen.jpg"):
        self.root = Path(root)
        if (self.root / "labels.csv").is_file():
            dirs = [self.root]
        else:
            prefix = "train" if split == "train" else "val"
            dirs = sorted(p for p in self.root.glob(f"{prefix}*") if (p / "labels.csv").is_file())
        if not dirs:
            raise DataError(f"counterfactual data: no labels.csv in {self.root} or {self.root}/{split}*/; "
                            "expected the layout of `cgn-jax generate` / the official generate_data.py "
                            "(labels.csv with im_name,shape_cls,texture_cls,bg_cls and images in ims/)")
        self.records: list[tuple[str, int, int, int]] = []
        for d in dirs:
            self.records += _read_cf_csv(d, image_suffix)
        if not self.records:
            raise DataError(f"counterfactual data: {', '.join(str(d / 'labels.csv') for d in dirs)} list no images")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, s, t, b = self.records[i]
        return {"image": path, "shape": s, "texture": t, "background": b}


def _read_cf_csv(directory: Path, suffix: str) -> list[tuple[str, int, int, int]]:
    csv_path = directory / "labels.csv"
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    need = ("im_name", "shape_cls", "texture_cls", "bg_cls")
    if not all(n in header for n in need):
        raise DataError(f"{csv_path}: header {header} lacks one of {need}")
    cols = [header.index(n) for n in need]
    out = []
    for lineno, row in enumerate(rows[1:], start=2):
        if [c.strip() for c in row] == header:
            continue
        try:
            name = row[cols[0]].strip()
            labels = [int(float(row[c])) for c in cols[1:]]
        except (IndexError, ValueError):
            raise DataError(f"{csv_path}:{lineno}: cannot read a row of {need} from {row}") from None
        path = directory / "ims" / (name if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name + suffix)
        if lineno == 2 and not path.is_file():
            raise DataError(f"{csv_path}: first image {path} does not exist; images must be in {directory}/ims/ "
                            f"named <im_name>{suffix} (set data.cf_image_suffix for another suffix)")
        out.append((str(path), *labels))
    return out


# <shape category><n>-<texture category><m>.png, e.g. airplane1-bicycle2.png
_CUE_CONFLICT_NAME = re.compile(r"^([a-z]+)\d+-([a-z]+)\d+\.\w+$")


class CueConflictSource:
    """Geirhos et al.'s cue-conflict stimuli, `root/<category>/<shape>N-<texture>M.png`.

    Labels index the 16 sorted categories; stimuli whose shape and texture category
    agree are left out here already, as in the official evaluation.
    """

    def __init__(self, root: str | Path):
        from cgn_jax.eval_metrics import geirhos_categories

        self.root = Path(root)
        names = geirhos_categories()[0]
        index = {n: i for i, n in enumerate(names)}
        if not self.root.is_dir():
            raise DataError(f"cue-conflict stimuli: {self.root} does not exist; it should hold the 16 category "
                            "directories of texture-vs-shape/stimuli/style-transfer-preprocessed-512")
        self.records, self.excluded = [], 0
        for path in sorted(self.root.glob("*/*")):
            m = _CUE_CONFLICT_NAME.match(path.name)
            if not m:
                continue
            shape, texture = m.groups()
            if shape not in index or texture not in index:
                raise DataError(f"cue-conflict stimulus {path}: category {shape if shape not in index else texture!r} "
                                f"is not one of the 16 ({', '.join(names)})")
            if shape == texture:
                self.excluded += 1
                continue
            self.records.append((str(path), index[shape], index[texture]))
        if not self.records:
            raise DataError(f"cue-conflict stimuli: no files named <shape>N-<texture>M.png under {self.root}/<category>/")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, s, t = self.records[i]
        return {"image": path, "shape": s, "texture": t}


def in9_source(root: str | Path, variant: str) -> ImageFolderSource:
    """One ImageNet-9 variant, `root/<variant>/val/<class>/*` with the 9 classes in index order."""
    path = Path(root) / variant / "val"
    src = ImageFolderSource(path, what=f"ImageNet-9 {variant}")
    if len(src.classes) != 9:
        raise DataError(f"ImageNet-9 {variant}: {path} has {len(src.classes)} class directories, expected 9 "
                        "(00_dog ... 08_fish of the backgrounds challenge)")
    return src


def tfds_manual_dir(data_dir: str | Path | None, manual_dir: str | Path | None = None) -> Path:
    return Path(manual_dir) if manual_dir else _tfds_data_dir(data_dir) / "downloads" / "manual"


def _tfds_data_dir(data_dir) -> Path:
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets").expanduser()


class TFDSImageNetSource:
    """TFDS `imagenet2012` read as array_record without TensorFlow; JPEG bytes are decoded here.

    If the dataset is not prepared yet, it is prepared from the manually downloaded
    archives; if those are missing, the error names the files and where they go.
    """

    def __init__(self, split: str, data_dir: str | Path | None = None, manual_dir: str | Path | None = None):
        import tensorflow_datasets as tfds

        split = {"val": "validation"}.get(split, split)
        self.data_dir = _tfds_data_dir(data_dir)
        builder = tfds.builder("imagenet2012", data_dir=str(self.data_dir), file_format="array_record")
        if not (Path(builder.data_dir) / "dataset_info.json").is_file():
            manual = tfds_manual_dir(self.data_dir, manual_dir)
            needed = TFDS_ARCHIVES.get(split)
            if needed is None:
                raise DataError(f"TFDS imagenet2012 has no split {split!r} here; use train or validation")
            if not (manual / needed).is_file():
                raise DataError(missing_archives_message(manual, [needed], self.data_dir, split))
            try:
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
            except ImportError as e:
                raise DataError(f"preparing TFDS imagenet2012 failed ({e}); install what it names (e.g. "
                                "`pip install tensorflow-cpu`) for this one-off conversion") from e
        self.classes = list(builder.info.features["label"].names)
        try:
            self._source = builder.as_data_source(
                split=split, deserialize_method=tfds.decode.DeserializeMethod.DESERIALIZE_NO_DECODE)
        except (KeyError, ValueError) as e:
            raise DataError(f"TFDS imagenet2012 in {self.data_dir} has no {split!r} split ({e}); it was prepared "
                            f"without {TFDS_ARCHIVES.get(split, split)}: put that archive in the manual directory, "
                            f"delete {builder.data_dir} and run again") from e

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        ex = self._source[i]
        return {"image": bytes(ex["image"]), "label": int(ex["label"])}


def missing_archives_message(manual: Path, missing: Sequence[str], data_dir: Path, split: str = "train") -> str:
    files = " and ".join(missing)
    return (f"TFDS imagenet2012 ({split} split) is not prepared in {data_dir} and {files} is missing: download it "
            "from https://image-net.org/download-images (free registration; ILSVRC2012_img_train.tar, ~138 GB, "
            "holds the training split, ILSVRC2012_img_val.tar, ~6.3 GB, the validation split) and put it in "
            f"{manual}/ (or set data.tfds_manual_dir / --tfds-manual-dir), then run again: the first run converts "
            "the archives found there to array_record. Or use an ImageFolder directory (root/<wnid>/*.JPEG) instead.")


def open_source(spec: str, split: str, *, tfds_data_dir: str = "", tfds_manual_dir_: str = "",
                what: str = "ImageNet"):
    """`tfds` (TFDS imagenet2012, split train/validation) or an ImageFolder path."""
    if spec == "tfds" or spec.startswith("tfds:"):
        data_dir = spec.partition(":")[2] or tfds_data_dir or None
        return TFDSImageNetSource(split, data_dir, tfds_manual_dir_ or None)
    return ImageFolderSource(spec, what=f"{what} {split}")


# ---------------------------------------------------------------------------------- transforms

def _open(image) -> Image.Image:
    return Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (left, top, crop_width, crop_height)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fallback: the whole image, clipped to the allowed aspect ratios
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _draft(img: Image.Image, min_side_needed: float) -> tuple[float, float]:
    """Let a JPEG decode at reduced scale while its short side stays >= `min_side_needed`; (sx, sy) applied."""
    if img.format != "JPEG":
        return 1.0, 1.0
    w, h = img.size
    factor = min(w, h) / max(min_side_needed, 1.0)
    if factor < 2:
        return 1.0, 1.0
    img.draft("RGB", (math.ceil(w / factor), math.ceil(h / factor)))
    return img.size[0] / w, img.size[1] / h


def train_image(image, rng: np.random.Generator, size: int = 224, scale=(0.08, 1.0),
                draft: bool = True) -> np.ndarray:
    """Decode, random-resized-crop to `size` and flip half the time; (size, size, 3) uint8."""
    img = _open(image)
    left, top, w, h = random_resized_crop_box(*img.size, rng, scale)
    sx = sy = 1.0
    if draft:
        # the crop must keep >= size pixels on its short side after the reduced decode
        sx, sy = _draft(img, size * min(img.size) / max(min(w, h), 1))
    img = img.convert("RGB")
    out = img.resize((size, size), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    if rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.uint8)


def eval_image(image, resize: int | None = 256, size: int = 224, draft: bool = False) -> np.ndarray:
    """Decode, resize the short side to `resize`, center-crop `size`; (size, size, 3) uint8.

    `resize=None` keeps images that are already `size` x `size` as they are (ImageNet-9)
    and otherwise resizes their short side to `size`.
    """
    img = _open(image)
    target = resize or size
    if draft:
        _draft(img, target)
    img = img.convert("RGB")
    w, h = img.size
    if resize is None and (w, h) == (size, size):
        return np.asarray(img, np.uint8)
    if (w <= h and w != target) or (h < w and h != target):  # torchvision Resize(int): short side -> target
        ow, oh = (target, int(target * h / w)) if w <= h else (int(target * w / h), target)
        img = img.resize((ow, oh), Image.BILINEAR)
        w, h = ow, oh
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=jnp.float32):
    """uint8 NHWC -> (x/255 - mean)/std, on the device."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


# ----------------------------------------------------------------------------------- pipelines

def _records(source, shard: tuple[int, int]):
    import grain

    index, count = shard
    ds = grain.MapDataset.source(source)
    return ds.slice(slice(index, None, count)) if count > 1 else ds


def _read_options(num_threads: int, prefetch: int):
    import grain

    return grain.ReadOptions(num_threads=max(1, int(num_threads)), prefetch_buffer_size=max(1, int(prefetch)))


def _with_workers(ds, num_workers: int):
    if num_workers and num_workers > 0:
        import grain
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; this program has none to parse
            flags.FLAGS.mark_as_parsed()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_workers)))
    return ds


def train_batches(source, batch_size: int, *, image_size: int = 224, seed: int = 0, start_step: int = 0,
                  shard: tuple[int, int] = (0, 1), num_threads: int = 8, prefetch: int | None = None,
                  num_workers: int = 0, draft: bool = True, scale=(0.08, 1.0)) -> Iterator[dict]:
    """Endless shuffled, augmented batches `{"image": (B, S, S, 3) uint8, <labels>: (B,) int32}` of this host's shard.

    Batch `k` is the same for the same (source, seed, shard) whatever `start_step` is,
    so a resumed run sees exactly the batches it would have seen.
    """
    ds = _records(source, shard)
    if len(ds) < batch_size:
        raise DataError(f"{len(ds)} examples on this host are fewer than one batch of {batch_size}")
    host_seed = int(seed) * 1000 + shard[0]

    def augment(record, rng):
        out = {k: np.int32(v) for k, v in record.items() if k != "image"}
        out["image"] = train_image(record["image"], rng, image_size, scale, draft)
        return out

    ds = ds.shuffle(seed=host_seed).repeat(None).random_map(augment, seed=host_seed + 1)
    ds = ds.slice(slice(int(start_step) * batch_size, None))
    it = ds.to_iter_dataset(_read_options(num_threads, prefetch or max(2 * batch_size, 16)))
    return iter(_with_workers(it, num_workers).batch(batch_size, drop_remainder=True))


class _Padded:
    """`source` extended to `total` records; the extra ones are flagged `valid=0` and never decoded."""

    def __init__(self, source, total: int):
        self.source, self.total = source, total

    def __len__(self):
        return self.total

    def __getitem__(self, i):
        if i < len(self.source):
            return {**self.source[i], "valid": 1}
        return {**{k: 0 for k in self.source[0] if k != "image"}, "image": None, "valid": 0}


def eval_batches(source, batch_size: int, *, resize: int | None = 256, image_size: int = 224,
                 shard: tuple[int, int] = (0, 1), num_threads: int = 8, prefetch: int | None = None,
                 num_workers: int = 0, draft: bool = False) -> Iterator[dict]:
    """Every example once, in order, in batches of `batch_size` with a `valid` mask.

    The dataset is padded so that every host gets the same number of full batches (a
    pmapped call must happen on all hosts); padded entries have `valid == 0`.
    """
    index, count = shard
    total = math.ceil(len(source) / (batch_size * count)) * batch_size * count
    ds = _records(_Padded(source, total), shard)

    def prepare(record):
        out = {k: np.int32(v) for k, v in record.items() if k != "image"}
        out["image"] = (eval_image(record["image"], resize, image_size, draft) if record["valid"]
                        else np.zeros((image_size, image_size, 3), np.uint8))
        return out

    it = ds.map(prepare).to_iter_dataset(_read_options(num_threads, prefetch or max(2 * batch_size, 16)))
    return iter(_with_workers(it, num_workers).batch(batch_size, drop_remainder=True))


def close_iterator(it) -> None:
    """Stop an iterator's decode threads and worker processes (grain iterators and generators alike)."""
    close = getattr(it, "close", None)
    if close is not None:
        close()


def num_eval_batches(source, batch_size: int, process_count: int = 1) -> int:
    return math.ceil(len(source) / (batch_size * process_count))


def split_for_devices(batch: dict, n_devices: int) -> dict:
    """(n_devices * b, ...) leaves -> (n_devices, b, ...), the layout pmap takes."""
    out = {}
    for k, v in batch.items():
        chex.assert_axis_dimension(v, 0, n_devices * (v.shape[0] // n_devices))
        out[k] = einops.rearrange(v, "(d b) ... -> d b ...", d=n_devices)
    return out


def device_put_stacked(batch: dict, devices: Sequence) -> dict:
    """Put a (n_devices, ...) tree on `devices`, one slice each (asynchronous)."""
    mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def prefetch_to_devices(batches: Iterator[dict], devices: Sequence, size: int = 2) -> Iterator[dict]:
    """Keep `size` batches in flight to the devices, so transfers overlap the running step."""
    import collections

    queue = collections.deque()
    for batch in batches:
        queue.append(device_put_stacked(split_for_devices(batch, len(devices)), devices))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


# ---------------------------------------------------------------------------------- benchmark

def write_synthetic_jpegs(root: str | Path, n: int, size=(400, 350), classes: int = 4, seed: int = 0,
                          quality: int = 90, threads: int | None = None) -> Path:
    """An ImageFolder tree of `n` smooth random JPEGs (ImageNet-like size and file size) for tests/benchmarks."""
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for c in range(min(classes, n)):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)

    def one(i):
        rng = np.random.default_rng([seed, i])
        fx, fy, ph = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(fx * xx * (c + 1) + ph * 50) * np.cos(fy * yy * (c + 1)) for c in range(3)], -1)
        img = np.clip((base + rng.normal(0, 0.15, (h, w, 3))) * 0.5 + 0.5, 0, 1) * 255
        Image.fromarray(img.astype(np.uint8)).save(root / f"n{i % classes:08d}" / f"img_{i:05d}.JPEG", quality=quality)

    with ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(n)))
    return root


class _Cycle:
    def __init__(self, source, n: int):
        self.source, self.n = source, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[i % len(self.source)]


def measure_throughput(source, batch_size: int = 64, batches: int = 8, train: bool = True, **kw) -> dict:
    """Images/s decoded and augmented (train) or resized/cropped (eval) by the host pipeline."""
    import time

    if not train:  # evaluation reads a source once: cycle it to the length measured
        source = _Cycle(source, (batches + 1) * batch_size)
    it = train_batches(source, batch_size, **kw) if train else eval_batches(source, batch_size, **kw)
    next(it)  # thread start-up and first fill are not steady state
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    close_iterator(it)
    n = batches * batch_size
    # CPU seconds (all threads of this process; worker processes not counted) per image: what a core sustains
    return {"images_per_s": n / dt, "images_per_cpu_s": n / max(cpu, 1e-9), "images": n, "seconds": dt,
            "cpu_seconds": cpu}


def _bench_main(argv=None) -> int:
    import argparse
    import json
    import platform
    import tempfile
    import time

    p = argparse.ArgumentParser(description="host input-pipeline throughput on synthetic ImageNet-like JPEGs")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--size", default="400x350")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batches", type=int, default=5)
    args = p.parse_args(argv)
    w, h = map(int, args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_jpegs(tmp, args.images, (w, h))
        src = ImageFolderSource(tmp)
        rows = []
        for mode, kw in (("train (RRC+flip), draft", dict(train=True, draft=True)),
                         ("train (RRC+flip), full decode", dict(train=True, draft=False)),
                         ("eval (resize 256, crop 224)", dict(train=False))):
            for t in args.threads:
                r = measure_throughput(src, args.batch_size, args.batches, num_threads=t, **kw)
                rows.append({"mode": mode, "threads": t, **r})
                print(f"{mode:32s} threads={t:2d}  {r['images_per_s']:8.1f} images/s (wall)  "
                      f"{r['images_per_cpu_s']:8.1f} images per CPU-second", flush=True)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg(), "image_size": [w, h], "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_bench_main())
