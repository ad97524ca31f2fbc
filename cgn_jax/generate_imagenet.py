"""`cgn-jax generate` for the ImageNet CGN: counterfactual datasets, class sheets, interpolations.

The official `imagenet/generate_data.py` makes one image per forward pass; here every
output is made in jitted batches of `--batch-size` (the last batch padded, so one
program serves the whole run) with JPEG encoding overlapped on host threads. The
dataset layout is the official one: `ims/<run>_<i:07d>_x_gen.jpg` and a `labels.csv`
naming the shape, texture and background class of every image (one clean header line,
where the official script appends a pandas header per row).

Class sampling modes are the official ones: `random` (three independent uniform
classes), `best_classes` (the official lists of classes that make good masks, textures
and backgrounds), `fixed_classes` (`--classes SHAPE TEXTURE BACKGROUND`).
Interpolations blend one-hot class vectors of one mechanism (`shape`, `texture`,
`background`) or of all three, with the noise fixed, as the official `interp_sheet`.

Generation is the official eval mode, where spectral norm uses the stored u, v without
a power iteration. Mechanisms trained with `model.spectral_norm=power_iteration` are
therefore folded once on loading (`fold_spectral_norm`: each kernel divided by its
eval-mode sigma) and generated with the same folded model as every other run.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from cgn_jax.models import imagenet_cgn as M
from cgn_jax.models.biggan import FOLDED, POWER_ITERATION, SPECTRAL, fold_spectral_norm

# Official generate_data.py class lists (classes that make good masks / textures / backgrounds).
MASKS = (9, 18, 22, 35, 56, 63, 96, 97, 119, 207, 225, 260, 275, 323, 330, 350, 370, 403, 411, 414, 427, 438, 439,
         441, 460, 484, 493, 518, 532, 540, 550, 559, 561, 570, 604, 647, 688, 713, 724, 749, 751, 756, 759, 779, 780,
         802, 814, 833, 841, 849, 850, 859, 869, 872, 873, 874, 876, 880, 881, 883, 894, 897, 898, 900, 907, 930, 933,
         945, 947, 949, 950, 953, 963, 966, 967, 980)
FOREGROUND = (12, 15, 18, 25, 54, 66, 72, 130, 145, 207, 251, 267, 271, 275, 293, 323, 385, 388, 407, 409, 427, 438,
              439, 441, 454, 461, 468, 482, 483, 486, 490, 492, 509, 530, 555, 607, 608, 629, 649, 652, 681, 688, 719,
              720, 728, 737, 741, 751, 756, 779, 800, 810, 850, 852, 854, 869, 881, 907, 911, 930, 936, 937, 938, 941,
              949, 950, 951, 954, 957, 959, 963, 966, 985, 987, 992)
BACKGROUNDS = (7, 9, 20, 30, 35, 46, 50, 65, 72, 93, 96, 97, 119, 133, 147, 337, 350, 353, 354, 383, 429, 460, 693,
               801, 888, 947, 949, 952, 953, 955, 958, 970, 972, 973, 974, 977, 979, 998)
MODES = ("random", "best_classes", "fixed_classes")
INTERP_MODES = {"all": "all", "shape": "shape", "texture": "texture", "text": "texture", "background": "background",
                "bg": "background"}
CSV_HEADER = ("im_name", "shape_cls", "texture_cls", "bg_cls")
# Every generation call returns all of these, so one compiled program (per batch size) serves
# datasets, sheets and interpolations alike.
OUTPUTS = ("composite", "mask", "premask", "texture", "background")


# ---------------------------------------------------------------------------- loading

def load_cgn(checkpoint: str | Path | None, config):
    """(model, params, nets, meta) from a training workdir, its `cgn/` export, or nothing.

    With no checkpoint the mechanisms are the (pretrained or random) BigGAN of the config:
    the untrained CGN. Frozen networks come from the sources recorded at training time,
    unless the config names others (`--config.model.biggan=DIR` etc.). Power-iteration
    mechanisms (an export whose meta says so, or `model.spectral_norm` without a
    checkpoint) come back folded, for the folded model returned (eval mode).
    """
    from cgn_jax.checkpoint import read_meta, restore_variables

    meta, params, spectral = {}, None, None
    if checkpoint:
        path = Path(checkpoint)
        if (path / "cgn" / "meta.json").is_file():
            path = path / "cgn"
        meta = read_meta(path)
        if meta.get("model") != "imagenet_cgn":
            raise FileNotFoundError(f"{path} is not an ImageNet CGN export (a `cgn-jax train` workdir or its cgn/ dir)")
        model_config = _model_config_from(meta, config)
        biggan_config, nets, _ = M.load_networks(model_config, int(meta.get("seed", config.seed)))
        restored = restore_variables(path)
        params, spectral = restored["params"], restored.get(SPECTRAL)
        if meta.get("spectral_norm", FOLDED) == POWER_ITERATION and spectral is None:
            raise FileNotFoundError(f"{path}: meta.json says spectral_norm=power_iteration but it holds no u, v")
    else:
        biggan_config, nets, _ = M.load_networks(config.model, int(config.seed))
        params, spectral = M.initial_mechanisms(config.model, nets, int(config.seed))
    model = M.ImageNetCGN(biggan_config=biggan_config, u2net_variant=config.model.u2net_variant,
                          dtype=jnp.dtype(config.train.compute_dtype))
    if spectral is not None:
        params = {name: fold_spectral_norm({"params": params[name], SPECTRAL: spectral[name]})["params"]
                  for name in M.MECHANISMS}
    return model, params, nets, meta


def _model_config_from(meta: dict, config):
    """config.model, with the frozen networks the run was trained with unless the config overrides them."""
    mc = config.model.copy_and_resolve_references()
    recorded = meta.get("sources", {})
    for name in ("biggan", "u2net"):
        src = recorded.get(name, "")
        configured = mc[name]
        if configured and configured != M.RANDOM:
            continue  # an explicit directory in the config wins
        if src.startswith(M.RANDOM):
            mc[name] = M.RANDOM
        elif src and Path(src).exists():
            mc[name] = src
    if "biggan_config" in meta and mc.biggan == M.RANDOM:
        mc.arch = dict(meta["biggan_config"])
    mc.u2net_variant = meta.get("u2net_variant", mc.u2net_variant)
    mc.spectral_norm = meta.get("spectral_norm", FOLDED)  # how the frozen networks were made for this run
    return mc


# ---------------------------------------------------------------------------- the jitted pieces

def _uint8(x):
    return jnp.round((jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("model", "outputs"))
def generate_batch(model: M.ImageNetCGN, params, nets, ts, u, y_shape, y_texture, y_background,
                   outputs: tuple = OUTPUTS):
    """uint8 images of the requested `outputs` (composite, premask, mask, texture, background) for a batch.

    Classes are (N,) labels or (N, num_classes) class vectors.
    """
    out = model(params, nets, u, y_shape, y_texture, y_background, ts, with_gt=False, with_bg_saliency=False)
    res = {}
    for name in outputs:
        x = out[name]
        # masks in [0, 1] become grey RGB, so every output saves the same way
        res[name] = _uint8(jnp.repeat(x * 2.0 - 1.0, 3, axis=-1)) if name == "mask" else _uint8(x)
    return res


def sample_classes(rng: np.random.Generator, mode: str, n: int, num_classes: int, classes=(0, 0, 0)) -> np.ndarray:
    """(n, 3) shape / texture / background classes, as the official `sample_classes` for each image."""
    if mode == "random":
        return rng.integers(0, num_classes, (n, 3))
    if mode == "best_classes":
        lists = [np.asarray(c) % num_classes for c in (MASKS, FOREGROUND, BACKGROUNDS)]
        return np.stack([rng.choice(lst, n) for lst in lists], axis=1)
    if mode == "fixed_classes":
        c = np.asarray([int(x) for x in classes])
        if c.shape != (3,) or (c < 0).any() or (c >= num_classes).any():
            raise ValueError(f"--classes needs 3 classes in [0, {num_classes}) (shape texture background), "
                             f"got {classes}")
        return np.broadcast_to(c, (n, 3)).copy()
    raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


# ---------------------------------------------------------------------------- outputs

def generate_dataset(model, params, nets, ts, out: Path, num_images: int, batch_size: int, mode: str,
                     classes=(0, 0, 0), truncation: float = 1.0, seed: int = 0, run_name: str = "cgn",
                     quality: int = 95, progress: bool = True) -> Path:
    """`out/ims/<run>_<i:07d>_x_gen.jpg` + `out/labels.csv`; returns the CSV path."""
    ims = out / "ims"
    ims.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys = sample_classes(rng, mode, num_images, model.num_classes, classes)
    key = jax.random.PRNGKey(seed)
    csv_path = out / "labels.csv"
    with open(csv_path, "w", newline="") as f, concurrent.futures.ThreadPoolExecutor(4) as pool:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        pending = []
        for start in tqdm(range(0, num_images, batch_size), disable=not progress, unit="batch", desc="generate"):
            n = min(batch_size, num_images - start)
            y = jnp.asarray(_pad(ys[start:start + n], batch_size))
            u = model.sample_noise(jax.random.fold_in(key, start // batch_size), batch_size, truncation)
            images = np.asarray(generate_batch(model, params, nets, ts, u, y[:, 0], y[:, 1], y[:, 2])["composite"])
            for j in range(n):
                name = f"{run_name}_{start + j:07d}"
                pending.append(pool.submit(_save_jpeg, images[j], ims / f"{name}_x_gen.jpg", quality))
                writer.writerow((name, *(int(c) for c in ys[start + j])))
        for p in pending:
            p.result()
    return csv_path


def _save_jpeg(image: np.ndarray, path: Path, quality: int) -> None:
    Image.fromarray(image).save(path, quality=quality)


def _row(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one row with `pad` white pixels between images."""
    n, h, w, c = images.shape
    canvas = np.full((h, n * w + (n - 1) * pad, c), 255, np.uint8)
    for i in range(n):
        canvas[:, i * (w + pad): i * (w + pad) + w] = images[i]
    return canvas


def interpolation(model, params, nets, ts, u, ys, y_to: int, mechanism: str, num_points: int, batch_size: int):
    """uint8 outputs along a class interpolation of `mechanism` ("all" or one) from `ys` towards `y_to`.

    `u` (1, z_dim) is shared by all points; returns {"composite", "mask", "texture", "background"},
    each (num_points, H, W, 3).
    """
    mechanism = INTERP_MODES[mechanism]
    nc = model.num_classes
    steps = jnp.linspace(0.0, 1.0, num_points)[:, None]  # official interp: lerp of one-hots
    vecs = []
    for i, name in enumerate(M.MECHANISMS):
        a = jax.nn.one_hot(jnp.asarray([ys[i]]), nc)
        if mechanism in ("all", name):
            b = jax.nn.one_hot(jnp.asarray([y_to]), nc)
            vecs.append(a * (1.0 - steps) + b * steps)
        else:
            vecs.append(jnp.repeat(a, num_points, axis=0))
    outs = []
    for start in range(0, num_points, batch_size):
        n = min(batch_size, num_points - start)
        chunk = [jnp.asarray(_pad(np.asarray(v[start:start + n]), batch_size)) for v in vecs]
        o = generate_batch(model, params, nets, ts, jnp.repeat(u, batch_size, axis=0), *chunk)
        outs.append({k: np.asarray(v[:n]) for k, v in o.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def write_interpolations(model, params, nets, ts, out: Path, num_sheets: int, mechanism: str, mode: str,
                         classes, y_to: int, midpoints: int, batch_size: int, truncation: float, seed: int,
                         run_name: str, gif: bool = False, gif_frames: int = 32, gif_ms: int = 80,
                         progress: bool = True) -> list[Path]:
    """Per sheet: `<run>_<i>_x_gen_interp.jpg` (composites, one row of midpoints + 2), for a single
    mechanism also `<run>_<i>_<mechanism>_interp.jpg` (that mechanism's output), and with `gif`
    `<run>_<i>_interp.gif` (`gif_frames` composites, forth and back)."""
    mechanism = INTERP_MODES[mechanism]
    ims = out / "ims"
    ims.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ys_all = sample_classes(rng, mode, num_sheets, model.num_classes, classes)
    key = jax.random.PRNGKey(seed)
    written = []
    for i in tqdm(range(num_sheets), disable=not progress, unit="sheet", desc=f"interpolate {mechanism}"):
        target = int(rng.integers(0, model.num_classes)) if y_to < 0 else int(y_to) % model.num_classes
        u = model.sample_noise(jax.random.fold_in(key, i), 1, truncation)
        res = interpolation(model, params, nets, ts, u, ys_all[i], target, mechanism, midpoints + 2, batch_size)
        name = f"{run_name}_{i:07d}"
        path = ims / f"{name}_x_gen_interp.jpg"
        Image.fromarray(_row(res["composite"])).save(path, quality=95)
        written.append(path)
        if mechanism != "all":
            path = ims / f"{name}_{mechanism}_interp.jpg"
            Image.fromarray(_row(res[mechanism if mechanism != "shape" else "mask"])).save(path, quality=95)
            written.append(path)
        if gif:
            frames = interpolation(model, params, nets, ts, u, ys_all[i], target, mechanism, gif_frames,
                                   batch_size)["composite"]
            written.append(save_gif(ims / f"{name}_interp.gif", frames, gif_ms))
    return written


def save_gif(path: Path, frames: np.ndarray, ms: int = 80, bounce: bool = True) -> Path:
    """Animated GIF (PIL) of uint8 frames (N, H, W, 3), looping; `bounce` plays it back too."""
    seq = list(frames) + (list(frames[-2:0:-1]) if bounce and len(frames) > 2 else [])
    images = [Image.fromarray(f) for f in seq]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms, loop=0)
    return path


def write_class_sheet(model, params, nets, ts, path: Path, classes=M.SHEET_CLASSES, truncation: float = 1.0,
                      seed: int = 0, batch_size: int | None = None) -> Path:
    """Rows = classes (same noise), columns mask, premask, texture, background, composite (official sheet)."""
    from cgn_jax.sheets import save_sheet

    cls = np.asarray([int(c) % model.num_classes for c in classes])
    u = model.sample_noise(jax.random.PRNGKey(seed), 1, truncation)
    names = ("mask", "premask", "texture", "background", "composite")
    bs = batch_size or len(cls)
    parts = []
    for start in range(0, len(cls), bs):
        n = min(bs, len(cls) - start)
        y = jnp.asarray(_pad(cls[start:start + n], bs))
        o = generate_batch(model, params, nets, ts, jnp.repeat(u, bs, axis=0), y, y, y)
        parts.append({k: np.asarray(v[:n]) for k, v in o.items()})
    out = {k: np.concatenate([p[k] for p in parts]) for k in names}
    scale = 1 if model.image_size >= 128 else 2
    return save_sheet(path, [(n, out[n], 1) for n in names], n_cols=1, title="ImageNet CGN", scale=scale)


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    """ImageNet options, added to `cgn-jax generate`'s parser (options it already has are kept)."""
    have = set(getattr(parser, "_option_string_actions", {}))

    def add(flag, **kw):
        if flag not in have:
            parser.add_argument(flag, **kw)

    add("--checkpoint", default="", help="training workdir or its cgn/ export (default: the untrained CGN)")
    add("--out", default="generated")
    add("--sheet", action="store_true", help="class sheet PNG (rows = classes, columns = mechanisms)")
    add("--dataset", action="store_true", help="counterfactual dataset: ims/*.jpg + labels.csv")
    add("--num-images", type=int, default=None, help="images (or interpolation sheets) to make")
    add("--batch-size", type=int, default=None, help="images per jitted call")
    add("--seed", type=int, default=0)
    add("--mode", choices=MODES, default=None, help="class sampling (default config.generate.mode)")
    add("--classes", type=int, nargs=3, default=None, metavar=("SHAPE", "TEXTURE", "BG"),
        help="classes for --mode fixed_classes")
    add("--run-name", default="cgn", help="image name prefix")
    add("--truncation", type=float, default=None, help="noise truncation (default config.model.truncation)")
    add("--interp", choices=sorted(INTERP_MODES), default="",
        help="interpolation sheets over all mechanisms or one (shape|texture|background)")
    add("--interp-cls", type=int, default=-1, help="class to interpolate to (-1: random per sheet)")
    add("--midpoints", type=int, default=None, help="interpolation midpoints (default config.generate.midpoints)")
    add("--gif", action="store_true", help="also an interpolation GIF per sheet")
    add("--gif-frames", type=int, default=32, help="frames of the interpolation GIF (played forth and back)")


def run(args, config) -> int:
    """Entry point for `cgn-jax generate` with an ImageNet config (family == "imagenet")."""
    g = config.generate
    truncation = float(_arg(args, "truncation") or config.model.truncation)
    model, params, nets, meta = load_cgn(_arg(args, "checkpoint") or None, config)
    ts = model.stats(truncation)
    out = Path(_arg(args, "out") or "generated")
    out.mkdir(parents=True, exist_ok=True)
    seed = int(_arg(args, "seed") or 0)
    bs = int(_arg(args, "batch_size") or g.batch_size)
    mode = _arg(args, "mode") or g.mode
    classes = _arg(args, "classes") or tuple(g.classes)
    run_name = _arg(args, "run_name") or "cgn"
    interp = _arg(args, "interp") or ""
    sheet, dataset = bool(_arg(args, "sheet")), bool(_arg(args, "dataset"))
    if not (sheet or dataset or interp):
        sheet = True
    if sheet:
        path = write_class_sheet(model, params, nets, ts, out / "class_sheet.png", truncation=truncation, seed=seed,
                                 batch_size=bs)
        print(f"wrote {path}")
    if dataset:
        n = int(_arg(args, "num_images") or g.num_images)
        csv_path = generate_dataset(model, params, nets, ts, out, n, bs, mode, classes, truncation, seed, run_name,
                                    int(g.jpeg_quality))
        print(f"wrote {n} images to {out / 'ims'} and labels to {csv_path}")
    if interp:
        n = int(_arg(args, "num_images") or 1)
        paths = write_interpolations(model, params, nets, ts, out, n, interp, mode, classes,
                                     int(_arg(args, "interp_cls") if _arg(args, "interp_cls") is not None else -1),
                                     int(_arg(args, "midpoints") or g.midpoints), bs, truncation, seed, run_name,
                                     gif=bool(_arg(args, "gif")), gif_frames=int(_arg(args, "gif_frames") or 32))
        print(f"wrote {len(paths)} interpolation file(s) to {out / 'ims'}")
    return 0


def _arg(args, name):
    return getattr(args, name, None)
