"""`cgn-jax generate`: sample sheets and counterfactual datasets from an MNIST CGN.

(ImageNet configs are handed to `cgn_jax.generate_imagenet`.)

Counterfactuals are made the way the official `generate_data.py` makes them: one
mask per (noise, shape label), then for each of K counterfactuals fresh noise and
random labels for the texture and background mechanisms, composed with that mask.
All of it, K counterfactuals included, is one jitted call per batch.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import einops
import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax import mask_stats
from cgn_jax.compose import compose, texture_layer
from cgn_jax.models.mnist_cgn import MASK_CLAMP, MnistCGN


def load_generator(checkpoint: str, config=None):
    """(model, variables) from an Orbax generator dir (ported or trained) or an official .pth.

    The texture layer comes from the config, except for a generator trained here: its
    meta.json records the layer it was trained with, and that one is used (with a warning
    when the config asks for another). A generator of another variant than the config's is
    loaded with a warning: mixing them is legal but rarely meant.
    """
    import sys

    from cgn_jax.checkpoint import read_meta
    from cgn_jax.port.mnist import guess_variant, load_mnist_cgn, load_torch_mnist_cgn

    texture = dict(texture_mode=config.model.texture_mode, patch_size=config.model.patch_size) if config else {}
    path = Path(checkpoint)
    if path.suffix in (".pth", ".pt", ".bin"):
        _warn_if_other_variant(path, guess_variant(path), getattr(config, "variant", None))
        variables = load_torch_mnist_cgn(path)
        return MnistCGN(**texture), variables
    if (path / "generator").is_dir():  # a training workdir
        path = path / "generator"
    meta = read_meta(path)
    _warn_if_other_variant(path, meta.get("variant"), getattr(config, "variant", None))
    if "texture_mode" in meta:
        recorded = dict(texture_mode=meta["texture_mode"], patch_size=int(meta.get("patch_size", 4)))
        if texture and texture != recorded:
            print(f"cgn-jax: {path} was trained with texture layer {recorded}; using it instead of the "
                  f"config's {texture}", file=sys.stderr)
        texture = recorded
    return load_mnist_cgn(path, **texture)


def _warn_if_other_variant(path: Path, recorded: str | None, wanted: str | None) -> None:
    import sys

    if recorded and wanted and recorded != wanted:
        print(f"cgn-jax: {path} is a {recorded} generator but the config is for {wanted}; its images will not "
              f"look like {wanted} MNIST. Pass --config=configs/mnist.py:{recorded} (or a {wanted} generator) "
              "if that is not what you meant", file=sys.stderr)


def write_mask_report(model, variables, config, path: Path, key: jax.Array, colour_jitter: float = 0.0,
                      shape_noise_scale: float = 1.0) -> dict:
    """Train the digit probe on real MNIST, judge the generator's masks with it, print and save the table.

    Double-colored: also the edge contrast where texture and background colours coincide
    (`cgn_jax.cue_contrast`), next to the real test split's.
    """
    import json

    from cgn_jax import cue_contrast, shape_probe
    from cgn_jax.data import palettes
    from cgn_jax.data.idx import load_mnist
    from cgn_jax.paths import resolve_dir

    mnist = load_mnist(resolve_dir(config.dataset.mnist_dir, "data", "mnist", what="MNIST"))
    k_train, k_masks = jax.random.split(key)
    start = time.perf_counter()
    params = shape_probe.train_probe(shape_probe.binarised_digits(mnist["train_images"]), mnist["train_labels"],
                                     k_train)
    test = shape_probe.predict(params, shape_probe.binarised_digits(mnist["test_images"]))
    probe_acc = float((test == mnist["test_labels"]).mean())
    print(f"digit probe: {100 * probe_acc:.2f} % on real MNIST test digits ({time.perf_counter() - start:.0f} s)")
    report = shape_probe.mask_report(model, variables, params, k_masks, shape_noise_scale=shape_noise_scale)
    if shape_noise_scale != 1.0:
        print(f"masks from the shape noise scaled by {shape_noise_scale:g}")
    print(shape_probe.format_report(report))
    result = {"probe_test_accuracy": probe_acc, "shape_noise_scale": shape_noise_scale,
              **{k: [float(v) for v in vals] for k, vals in report.items()}}
    if palettes.canonical_variant(config.variant) == palettes.DOUBLE_COLORED:
        contrast = {"colour_jitter": colour_jitter,
                    "counterfactuals": cue_contrast.summary(cue_contrast.counterfactual_contrast(
                        model, variables, jax.random.fold_in(key, 1), colour_jitter=colour_jitter)),
                    "real_test": cue_contrast.summary(cue_contrast.real_test_contrast())}
        print("edge contrast where digit and background colours coincide ([0, 1] colour distance):")
        print("  " + cue_contrast.describe(f"counterfactuals (colour jitter {colour_jitter:g})",
                                           contrast["counterfactuals"]))
        print("  " + cue_contrast.describe("real test split", contrast["real_test"]))
        result["cues_alike_contrast"] = contrast
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


CF_LOOPS = ("auto", "vmap", "map")


def _over_counterfactuals(fn, keys, loop: str):
    """`fn` for every key, stacked. "vmap" runs the mechanisms once on num_cfs x n_shapes images;
    "map" runs them num_cfs times on n_shapes images. "auto" maps on the CPU, where XLA's
    convolutions are about 2.5x faster per image at batch 100 than at 1000 (docs/benchmarks.md),
    and vmaps on accelerators, which want the large batch."""
    if loop not in CF_LOOPS:
        raise ValueError(f"unknown counterfactual loop {loop!r}; valid: {', '.join(CF_LOOPS)}")
    if loop == "auto":
        loop = "map" if jax.default_backend() == "cpu" else "vmap"
    if keys.shape[0] == 1:  # no loop for one counterfactual per shape (the classifier's default)
        return jax.tree.map(lambda x: x[None], fn(keys[0]))
    return jax.lax.map(fn, keys) if loop == "map" else jax.vmap(fn)(keys)


@functools.partial(jax.jit, static_argnames=("model", "n_shapes", "num_cfs", "as_uint8", "loop", "colour_jitter",
                                             "with_masks", "shape_noise_scale"))
def sample_counterfactuals(model: MnistCGN, variables, key, n_shapes: int, num_cfs: int, as_uint8: bool = True,
                           loop: str = "auto", colour_jitter: float = 0.0, with_masks: bool = False,
                           shape_noise_scale: float = 1.0):
    """n_shapes masks x num_cfs counterfactuals each: images (num_cfs*n_shapes, 32, 32, 3) and labels.

    `loop` only changes how the work is batched (`_over_counterfactuals`), not the result.
    `colour_jitter` > 0 adds an independent per-image colour offset (normal, this std on the data's
    [0, 1] colour scale) to the texture and to the background, as the real double-colored data
    jitters each colour: a CGN that learned the palette exactly leaves no trace of the shape
    where the two colours coincide, and the classifier then never learns to read the faint
    edge the test images keep there (docs/results.md). 0 leaves the procedure (and keys) as is.
    `with_masks` adds each image's clamped mask as "mask" (float32, (N, 32, 32, 1)).
    `shape_noise_scale` < 1 shrinks the shape mechanism's noise towards 0, as BigGAN's truncation
    trick does: fewer shapes that a reader of real digits would name wrongly (label noise for a
    classifier trained on them), at the cost of variety (`cgn-jax generate --mask-report` shows
    both); > 1 widens it for more variety. 1 leaves the procedure (and keys) as is.
    """
    k_y, k_u, k_cf = jax.random.split(key, 3)
    y = jax.random.randint(k_y, (n_shapes,), 0, model.n_classes)
    u = model.sample_noise(k_u, n_shapes)
    if shape_noise_scale != 1.0:
        u = shape_noise_scale * u
    mask = jnp.clip(model.apply(variables, u, y, method=MnistCGN.shape).astype(jnp.float32), *MASK_CLAMP)

    def one_counterfactual(k):
        k_ut, k_ub, k_yt, k_yb, k_st, k_sb = jax.random.split(k, 6)
        y_t = jax.random.randint(k_yt, (n_shapes,), 0, model.n_classes)
        y_b = jax.random.randint(k_yb, (n_shapes,), 0, model.n_classes)
        fg = model.apply(variables, model.sample_noise(k_ut, n_shapes), y_t, method=MnistCGN.texture)
        bg = model.apply(variables, model.sample_noise(k_ub, n_shapes), y_b, method=MnistCGN.background)
        if model.texture_mode != "none":
            fg = texture_layer(k_st, fg.astype(jnp.float32), model.texture_mode, model.patch_size)
            bg = texture_layer(k_sb, bg.astype(jnp.float32), model.texture_mode, model.patch_size)
        if colour_jitter:
            k_jf, k_jb = jax.random.split(jax.random.fold_in(k, 1))
            # [0, 1] std -> the generator's [-1, 1] scale; one offset per image, broadcast over pixels
            fg = fg.astype(jnp.float32) + 2.0 * colour_jitter * jax.random.normal(k_jf, (n_shapes, 1, 1, 3))
            bg = bg.astype(jnp.float32) + 2.0 * colour_jitter * jax.random.normal(k_jb, (n_shapes, 1, 1, 3))
        return compose(mask, fg, bg), y_t, y_b

    images, y_t, y_b = _over_counterfactuals(one_counterfactual, jax.random.split(k_cf, num_cfs), loop)
    images = einops.rearrange(images, "k b h w c -> (k b) h w c")
    if as_uint8:
        images = jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5).astype(jnp.uint8)
    y_s = einops.repeat(y, "b -> (k b)", k=num_cfs)
    out = {"image": images, "label": y_s, "shape_label": y_s, "texture_label": y_t.reshape(-1),
           "background_label": y_b.reshape(-1)}
    if with_masks:
        out["mask"] = einops.repeat(mask, "b h w c -> (k b) h w c", k=num_cfs)
    return out


def write_sheet(model: MnistCGN, variables, path, key, n_cfs: int = 6):
    """Rows = shape classes; columns: mask, foreground, background, composite, then counterfactual
    composites whose texture label is class+j and background label class+2j (mod 10)."""
    from cgn_jax.sheets import save_sheet, to_uint8

    n = model.n_classes
    y = jnp.arange(n)
    k_u, k_t = jax.random.split(key)
    u = model.sample_noise(k_u, n)
    rngs = {"texture": k_t}
    base = model.apply(variables, y, y, y, u=u, rngs=rngs)
    cfs = [model.apply(variables, y, (y + j) % n, (y + 2 * j) % n, u=u, rngs=rngs)["image"] for j in range(1, n_cfs + 1)]
    cf = einops.rearrange(jnp.stack(cfs), "j b h w c -> (b j) h w c")
    panels = [("mask", to_uint8(base["mask"], (0, 1)), 1), ("foreground", to_uint8(base["foreground"]), 1),
              ("background", to_uint8(base["background"]), 1), ("composite", to_uint8(base["image"]), 1),
              (f"counterfactuals: texture y+j, background y+2j, j=1..{n_cfs}", to_uint8(cf), n_cfs)]
    return save_sheet(path, panels, n_cols=1, title="rows: shape class 0-9")


def generate_dataset(model, variables, key, num_images: int, num_cfs: int, batch_size: int, progress=True,
                     colour_jitter: float = 0.0, shape_noise_scale: float = 1.0):
    """num_images counterfactuals in jitted batches of `batch_size` images (batch_size // num_cfs shapes)."""
    from tqdm import tqdm

    n_shapes = max(1, batch_size // num_cfs)
    per_call = n_shapes * num_cfs
    calls = -(-num_images // per_call)
    parts = []
    for i in tqdm(range(calls), desc="generating", unit="batch", disable=not progress):
        parts.append(sample_counterfactuals(model, variables, jax.random.fold_in(key, i), n_shapes, num_cfs,
                                            colour_jitter=colour_jitter, shape_noise_scale=shape_noise_scale))
    out = jax.device_get(parts)
    return {k: np.concatenate([p[k] for p in out])[:num_images] for k in out[0]}


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=False, default="",
                        help="generator: Orbax dir from `cgn-jax port mnist`/`cgn-jax train` (a workdir works), or an official .pth")
    parser.add_argument("--config", default="configs/mnist.py:colored",
                        help="config (variant, texture layer, generate.* settings); layer sizes such as "
                             "model.ngf come from the checkpoint, so overriding them here has no effect")
    parser.add_argument("--out", default="generated", help="output directory")
    parser.add_argument("--sheet", action="store_true", help="write a counterfactual sample sheet PNG")
    parser.add_argument("--dataset", action="store_true", help="write a counterfactual TFDS dataset")
    parser.add_argument("--mask-report", action="store_true",
                        help="judge the shape mechanism: a CNN trained on real MNIST names 500 masks per class; "
                             "prints per-class probe accuracy, area, non-binary share, variety and frame mean, "
                             "and writes mask_report.json (MNIST from config.dataset.mnist_dir or ../shared)")
    parser.add_argument("--colour-jitter", type=float, default=0.0, metavar="STD",
                        help="per-image colour offsets of this std ([0, 1] scale) on the texture and background "
                             "of --dataset counterfactuals and of the --mask-report contrast line (0: the "
                             "official procedure; see sample_counterfactuals)")
    parser.add_argument("--shape-noise-scale", type=float, default=1.0, metavar="S",
                        help="multiply the shape mechanism's noise by S > 0 for --dataset and --mask-report "
                             "(below 1 a truncation: cleaner digits, less variety; above 1 more variety; "
                             "1: the official procedure)")
    parser.add_argument("--num-images", type=int, default=None, help="dataset size (default config.generate.num_images)")
    parser.add_argument("--num-cfs", type=int, default=None, help="counterfactuals per shape (default config.generate.num_cfs)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per jitted call (default config.generate.batch_size)")
    parser.add_argument("--seed", type=int, default=0)
    # options of ImageNet configs (configs/imagenet.py): interpolation sheets, GIFs, CSV datasets
    from cgn_jax.generate_imagenet import add_arguments as add_imagenet_arguments

    add_imagenet_arguments(parser)


def run(args):
    from cgn_jax.cli import CLIError
    from cgn_jax.config_loading import ConfigError, load_config
    from cgn_jax.data.counterfactual import write_dataset
    from cgn_jax.paths import shared_dir

    try:
        config = load_config(args.config, args.config_overrides)
    except (ConfigError, ValueError) as e:
        raise CLIError(str(e)) from e
    if config.get("family") == "imagenet":
        from cgn_jax import generate_imagenet

        try:
            return generate_imagenet.run(args, config)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(str(e)) from e
    checkpoint = args.checkpoint or config.model.pretrained
    if not checkpoint:
        shared = shared_dir()
        official = shared / "weights" / "cgn_mnist" / f"{config.variant}_MNIST.pth" if shared else None
        if official is None or not official.is_file():
            raise CLIError("no generator given: pass --checkpoint DIR (from `cgn-jax train` or `cgn-jax port mnist`)")
        checkpoint = str(official)
        print(f"using the official pretrained {config.variant} generator {official}")
    try:
        model, variables = load_generator(checkpoint, config)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e
    mask_stats.check_generator(model, variables, checkpoint)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.PRNGKey(args.seed)
    if not (args.sheet or args.dataset or args.mask_report):
        args.sheet = True
    if args.colour_jitter < 0:
        raise CLIError(f"--colour-jitter is a standard deviation; got {args.colour_jitter}")
    if not args.shape_noise_scale > 0.0:
        raise CLIError(f"--shape-noise-scale must be positive (1: the official procedure); got {args.shape_noise_scale}")
    if args.mask_report:
        try:
            write_mask_report(model, variables, config, out / "mask_report.json", jax.random.fold_in(key, 2),
                              colour_jitter=args.colour_jitter, shape_noise_scale=args.shape_noise_scale)
        except FileNotFoundError as e:
            raise CLIError(str(e)) from e
    if args.sheet:
        path = write_sheet(model, variables, out / f"counterfactuals_{config.variant}.png", key)
        print(f"wrote {path}")
    if args.dataset:
        num = args.num_images or config.generate.num_images
        cfs = args.num_cfs or config.generate.num_cfs
        bs = args.batch_size or config.generate.batch_size
        start = time.perf_counter()
        arrays = generate_dataset(model, variables, jax.random.fold_in(key, 1), num, cfs, bs,
                                  colour_jitter=args.colour_jitter, shape_noise_scale=args.shape_noise_scale)
        seconds = time.perf_counter() - start
        meta = {"generator": str(Path(checkpoint).resolve()), "variant": config.variant, "num_cfs": cfs,
                "seed": args.seed, "num_images": num, "colour_jitter": args.colour_jitter,
                "shape_noise_scale": args.shape_noise_scale}
        path = write_dataset(out / "tfds", arrays, meta)
        print(f"generated {num} images in {seconds:.1f}s ({num / seconds:.0f} images/s incl. compilation); wrote {path}")
    return 0
