"""`cgn-jax table1`: rerun the paper's Table 1 (MNIST classifiers) and write it as Markdown.

Rows are training methods (Original, IRM with 2 and 5 environments, Original+GAN,
Original+CGN, and the official code's counterfactuals-only recipe), columns the three MNIST variants; each cell is the mean ± std over seeds
of the final train and test accuracy, next to the paper's test accuracy.

Why it is built this way:
- On an accelerator all seeds of a row train together (vmapped) and an epoch is one
  on-device call, so a row costs about `epochs` calls plus one compilation (see
  cgn_jax/train/classifier.py).
- Results are written to a JSON file after every training call (a row's seeds together
  on an accelerator, one seed at a time on a CPU), and seeds already there under the
  same protocol are skipped. A call in progress is checkpointed after every epoch and on
  SIGTERM/Ctrl-C (in `RESULTS.ckpt/`, removed once its seeds are saved), so a run that is
  cut off resumes where it stopped, to the step. A row's seeds may come from several
  calls or machines (`--merge` joins them).
- The accelerator machine may lack the TFDS stack. `--export-data DIR` (run where
  `cgn-jax` is fully installed) writes one self-contained `VARIANT.npz` per variant: the
  real digits with the cue labels of every environment, the test split, the render
  assets and the official generator's weights. `--data DIR` trains from those files with
  nothing but JAX, Flax, optax and numpy.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from cgn_jax import irm, test_breakdown
from cgn_jax.data import palettes
from cgn_jax.train.classifier import OFFICIAL_CF_DATASET_SIZE

VARIANT_ORDER = ("colored", "double_colored", "wildlife")
VARIANT_TITLES = {"colored": "colored MNIST", "double_colored": "double-colored MNIST", "wildlife": "Wildlife MNIST"}
METHOD_ORDER = ("original", "irm2", "irm5", "original+gan", "original+cgn", "cgn_official")
METHOD_TITLES = {"original": "Original", "irm2": "IRM (2 envs)", "irm5": "IRM (5 envs)",
                 "erm2": "ERM control on the 2 IRM envs", "erm5": "ERM control on the 5 IRM envs",
                 "original+gan": "Original + GAN", "original+cgn": "Original + CGN",
                 "cgn_official": "CGN counterfactuals only, official recipe (fixed set)",
                 "cgn_only": "CGN counterfactuals only, fresh every step"}
# method -> (data mode, IRM environment correlations); configs/classifier.py reads this table too
METHODS = {
    "original": ("original", ()),
    "irm2": ("original", irm.ENVIRONMENTS[2]),
    "irm5": ("original", irm.ENVIRONMENTS[5]),
    "erm2": ("original", irm.ENVIRONMENTS[2]),
    "erm5": ("original", irm.ENVIRONMENTS[5]),
    "original+gan": ("original+gan", ()),
    "original+cgn": ("original+cgn", ()),
    "cgn_only": ("cgn_only", ()),
    "cgn_official": ("cgn_only", ()),
}
# Why a separate official-recipe row: the official code makes the paper's "Original + CGN"
# number by training on a stored counterfactual dataset *only* (mnists/generate_data.py: 10,000
# shapes x 10 counterfactuals; then train_classifier.py on *_counterfactual), one pass of
# 100,000 images per epoch. That is twice the updates of an epoch of the real split, and no
# correlated real images in a batch.
# method -> ClassifierSetup fields it fixes (--steps-per-epoch still shortens the epoch).
# The ERM controls (not Table 1 rows) are IRM up to the end of its warm-up (`irm_anneal_steps` at
# weight 1) and plain ERM on the same environments after it: the gap to IRM is the penalty's
# effect, the gap to Original that of the decorrelated images in the 0.9 environment(s).
METHOD_SETUP = {"cgn_official": {"cf_source": "fixed", "num_cfs": 10, "fixed_size": OFFICIAL_CF_DATASET_SIZE},
                "erm2": {"irm_penalty_weight": 0.0}, "erm5": {"irm_penalty_weight": 0.0}}
# Paper, Table 1, test accuracy (%): colored, double-colored, Wildlife MNIST (None: not reported)
PAPER_TEST_ACC = {
    "original": (35.9, 10.3, 10.1),
    "irm2": (59.8, 67.7, 11.3),
    "irm5": (None, 78.9, 76.8),
    "original+gan": (40.7, 10.8, 10.4),
    "original+cgn": (95.1, 89.0, 85.7),
    "cgn_official": (95.1, 89.0, 85.7),  # the number the official recipe produced
}
BUNDLE_VERSION = 1
PALETTE_TAG = "palette-"  # row suffix "@palette-NAME": colored rows run with another palette (--palette)


def add_arguments(parser) -> None:
    parser.add_argument("--variants", nargs="+", default=list(VARIANT_ORDER), help="MNIST variants (columns)")
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ORDER),
                        help=f"rows: {', '.join(METHODS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="one run per seed: vmapped together on accelerators, one after another on a CPU")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default="docs/table1.md", help="Markdown table (rewritten from all results)")
    parser.add_argument("--results", default="", help="raw results JSON (default: --out with .json); resumed")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun rows already in --results (and drop the checkpoints of unfinished calls)")
    parser.add_argument("--data", default="", help="directory of VARIANT.npz bundles from --export-data "
                                                   "(default: build the data here with TFDS)")
    parser.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                        help="combine results JSONs (e.g. one per accelerator call) into --out/--results; no training")
    parser.add_argument("--export-data", default="", metavar="DIR",
                        help="write the self-contained VARIANT.npz bundles for --data and exit")
    parser.add_argument("--mnist-dir", default="", help="MNIST IDX files (default shared/data/mnist)")
    parser.add_argument("--textures-dir", default="", help="Wildlife textures (default shared/data/textures)")
    parser.add_argument("--tfds-dir", default="", help="where TFDS builds go (default ~/.cache/cgn_jax/tfds)")
    parser.add_argument("--weights-dir", default="", help="official CGN .pth files (default shared/weights/cgn_mnist)")
    parser.add_argument("--limit", type=int, default=0, help="first N training examples (quick runs)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test examples (quick runs)")
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="override the epoch length (quick runs)")
    parser.add_argument("--real-fraction", type=float, default=0.5, help="real share of original+X batches")
    parser.add_argument("--fixed-size", type=int, default=0,
                        help="images in cgn_official's fixed counterfactual set (default 100,000 as the official "
                             "code; smaller for quick runs)")
    parser.add_argument("--cf-colour-jitter", type=float, default=0.0, metavar="STD",
                        help="rows that generate counterfactuals: add per-image colour offsets of this std "
                             "([0, 1] scale) to their texture and background (0: the official procedure; "
                             "see cgn_jax.generate.sample_counterfactuals); give such rows their own --out, or --tag "
                             "with --generator")
    parser.add_argument("--cf-shape-noise-scale", type=float, default=1.0, metavar="S",
                        help="rows that generate counterfactuals: multiply the shape mechanism's noise by S > 0 "
                             "(below 1 a truncation: cleaner digits, less variety; 1: the official procedure); "
                             "give such rows their own --out, or --tag with --generator")
    parser.add_argument("--irm-penalty", type=float, default=irm.DEFAULT_PENALTY_WEIGHT)
    parser.add_argument("--irm-anneal-steps", type=int, default=irm.DEFAULT_ANNEAL_STEPS)
    parser.add_argument("--irm-cues", default="independent", choices=("independent", "joint"),
                        help="double-colored and Wildlife IRM environments: the two cue labels as the builders "
                             "draw them (independently) or one label for both cues (see cgn_jax/irm.py)")
    parser.add_argument("--irm-rescale", default="yes", choices=("yes", "no"),
                        help="divide the IRM loss by the penalty weight after the warm-up (Arjovsky et al.; "
                             "see cgn_jax/irm.py)")
    parser.add_argument("--pool", default="official", choices=("official", "global"))
    parser.add_argument("--vmap-seeds", default="auto", choices=("auto", "yes", "no"),
                        help="train a row's seeds in one vmapped computation (auto: on accelerators, not on CPU)")
    parser.add_argument("--jax-cache", default="", metavar="DIR",
                        help="persistent compilation cache (a resumed or repeated run skips recompiling)")
    parser.add_argument("--generator", nargs="+", default=[], metavar="VARIANT=DIR",
                        help="use this CGN (a `cgn-jax train` workdir or its generator/ dir) instead of the "
                             "official weights for VARIANT; its rows are stored under --tag. A VARIANT given "
                             "several times pools those CGNs: they share cgn_official's fixed set, an equal "
                             "share of the shapes each")
    parser.add_argument("--tag", default="", help="row suffix for runs with --generator (default 'cgn-jax'); only with --generator")
    parser.add_argument("--palette", default=palettes.DEFAULT_COLORED_PALETTE, choices=sorted(palettes.COLORED_PALETTES),
                        help="colored MNIST's ten class colours for the real train and test images: 'measured' "
                             "(the LNTL palette, the default) or 'separated' (every pair >= 0.5 apart, to measure "
                             "how much of the colour shortcut the palette decides); rows that run with the real "
                             "data only; pass it to --export-data too")
    parser.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------- data bundles
def env_specs_for(methods) -> list[tuple[float, int]]:
    """Every (correlation, dataset seed) train split the methods need (the plain split is (1.0, 0))."""
    specs = [(1.0, 0)]
    for m in methods:
        for spec in irm.environment_specs(METHODS[m][1]) if METHODS[m][1] else []:
            if spec not in specs:
                specs.append(spec)
    return specs


def collect_variant(variant: str, methods, *, mnist_dir=None, textures_dir=None, tfds_dir=None, weights_dir=None,
                    limit=None, test_limit=None, palette: str = palettes.DEFAULT_COLORED_PALETTE) -> dict[str, np.ndarray]:
    """Everything the methods need for `variant`, as flat numpy arrays (needs the TFDS stack)."""
    from cgn_jax.data import load_variant, make_assets
    from cgn_jax.paths import resolve_dir

    if palette != palettes.DEFAULT_COLORED_PALETTE and variant != palettes.COLORED:
        raise ValueError(f"palette {palette!r} recolours colored MNIST only, not {variant}")
    mnist_dir = resolve_dir(mnist_dir or "", "data", "mnist", what="MNIST")
    if variant == palettes.WILDLIFE:
        textures_dir = resolve_dir(textures_dir or "", "data", "textures", what="textures")
    common = dict(mnist_dir=mnist_dir, textures_dir=textures_dir, data_dir=tfds_dir or None)
    specs = env_specs_for(methods)
    splits = [load_variant(variant, "train", correlation=c, seed=s, limit=limit, **common) for c, s in specs]
    for sp in splits[1:]:
        if not np.array_equal(sp["digit"], splits[0]["digit"]):
            raise ValueError(f"{variant}: the train splits differ in their digits")
    test = load_variant(variant, "test", limit=test_limit, **common)
    if palette != palettes.DEFAULT_COLORED_PALETTE:
        test = dict(test, image=_recoloured_test_images(test, palette, mnist_dir, test_limit))
    out = {"version": np.int64(BUNDLE_VERSION), "variant": np.str_(variant), "palette": np.str_(palette),
           "digit": splits[0]["digit"], "label": splits[0]["label"].astype(np.int32),
           "env_corr": np.array([c for c, _ in specs], np.float64), "env_seed": np.array([s for _, s in specs]),
           "fg_label": np.stack([sp["fg_label"] for sp in splits]).astype(np.int8),
           "bg_label": np.stack([sp["bg_label"] for sp in splits]).astype(np.int8),
           "test_image": test["image"], "test_label": test["label"].astype(np.int32)}
    colours = palettes.COLORED_PALETTES[palette] if variant == palettes.COLORED else None
    for k, v in make_assets(variant, textures_dir, palette=colours).items():
        out[f"asset__{k}"] = np.asarray(v, np.float32)
    if any(METHODS[m][0] != "original" for m in methods):
        from cgn_jax.port.mnist import load_torch_mnist_cgn

        wdir = resolve_dir(weights_dir or "", "weights", "cgn_mnist", what="CGN weights")
        variables = load_torch_mnist_cgn(Path(wdir) / f"{variant}_MNIST.pth")
        out.update(_flatten("gen", variables))
    return out


def _recoloured_test_images(test: dict, palette: str, mnist_dir, test_limit) -> np.ndarray:
    """The colored test split drawn again from MNIST with `palette`: the same digits, colour labels
    and jitter as the stored split (checked), other colours."""
    from cgn_jax.data.builders import make_split, mnist_split
    from cgn_jax.data.idx import load_mnist

    images, labels = mnist_split(palettes.COLORED, load_mnist(mnist_dir), "test")
    split = make_split(palettes.COLORED, images, labels, "test", limit=test_limit,
                       palette=palettes.COLORED_PALETTES[palette])
    if not all(np.array_equal(split[k], test[k]) for k in ("label", "fg_label", "digit")):
        raise ValueError("the colored test split built from MNIST differs from the stored one; rebuild the "
                         "TFDS data (delete ~/.cache/cgn_jax/tfds/colored_mnist) and export again")
    return split["image"]


def _flatten(prefix: str, tree, out=None) -> dict:
    out = {} if out is None else out
    for k, v in tree.items():
        if isinstance(v, dict):
            _flatten(f"{prefix}__{k}", v, out)
        else:
            out[f"{prefix}__{k}"] = np.asarray(v)
    return out


def _unflatten(prefix: str, flat: dict) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        if not key.startswith(prefix + "__"):
            continue
        *parents, leaf = key[len(prefix) + 2:].split("__")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def export_bundles(out_dir, variants, methods, **kw) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in variants:
        t0 = time.perf_counter()
        arrays = collect_variant(v, methods, **kw)
        path = out_dir / f"{v}.npz"
        partial = path.with_name(path.name + ".partial")  # a cut-off export never looks like a bundle
        with partial.open("wb") as f:
            np.savez_compressed(f, **arrays)
        partial.replace(path)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.0f}s)",
              file=sys.stderr)
        paths.append(path)
    return paths


def load_bundle(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if int(arrays.get("version", -1)) != BUNDLE_VERSION:
        raise ValueError(f"{path}: not a table1 data bundle of version {BUNDLE_VERSION}; re-export it")
    return arrays


def method_inputs(bundle: dict, method: str, generator_dirs=()):
    """(data dict, render assets, generator or None) for one method from a bundle.

    `generator_dirs` (one path, or several to pool) replace the bundle's official weights with
    CGNs trained by this project; several give a list of generators (see
    `cgn_jax.train.classifier.fixed_counterfactual_set`).
    """
    from cgn_jax.models.mnist_cgn import MnistCGN
    from cgn_jax.train.classifier import Generator

    mode, correlations = METHODS[method]
    specs = irm.environment_specs(correlations) if correlations else [(1.0, 0)]
    have = [(float(c), int(s)) for c, s in zip(bundle["env_corr"], bundle["env_seed"])]
    missing = [sp for sp in specs if sp not in have]
    if missing:
        raise ValueError(f"the data bundle has no train split for (correlation, seed) {missing}; "
                         f"re-export it with --methods including {method}")
    rows = [have.index(sp) for sp in specs]
    data = {"digit": bundle["digit"], "label": bundle["label"],
            "fg_label": bundle["fg_label"][rows].astype(np.int32), "bg_label": bundle["bg_label"][rows].astype(np.int32),
            "test_image": bundle["test_image"], "test_label": bundle["test_label"]}
    assets = {k[len("asset__"):]: v for k, v in bundle.items() if k.startswith("asset__")}
    generator = None
    if mode != "original" and generator_dirs:
        from cgn_jax.port.mnist import load_mnist_cgn

        pool = []
        for directory in generator_dirs:
            path = Path(directory)
            pool.append(Generator(*load_mnist_cgn(path / "generator" if (path / "generator").is_dir() else path)))
        generator = pool[0] if len(pool) == 1 else pool
    elif mode != "original":
        variables = _unflatten("gen", bundle)
        if not variables:
            raise ValueError(f"the data bundle has no generator weights; re-export it with --methods including {method}")
        generator = Generator(MnistCGN(), variables)
    return data, assets, generator


def method_setup(variant: str, method: str, args):
    """The classifier setup of one Table 1 cell: the method's data mode and fixed fields, then the options."""
    from cgn_jax.train.classifier import COUNTERFACTUAL_MODES, ClassifierSetup

    mode, correlations = METHODS[method]
    fields = {"steps_per_epoch": 0, "irm_penalty_weight": args.irm_penalty, **METHOD_SETUP.get(method, {})}
    if args.steps_per_epoch:
        fields["steps_per_epoch"] = args.steps_per_epoch
    if args.fixed_size and "fixed_size" in fields:
        fields["fixed_size"] = args.fixed_size
    if args.cf_colour_jitter and mode in COUNTERFACTUAL_MODES:
        fields["cf_colour_jitter"] = args.cf_colour_jitter
    if args.cf_shape_noise_scale != 1.0 and mode in COUNTERFACTUAL_MODES:
        fields["cf_shape_noise_scale"] = args.cf_shape_noise_scale
    return ClassifierSetup(variant, mode=mode, irm_correlations=correlations,
                           irm_anneal_steps=args.irm_anneal_steps, irm_rescale=args.irm_rescale == "yes",
                           irm_joint_cues=bool(correlations) and args.irm_cues == "joint",
                           real_fraction=args.real_fraction,
                           epochs=args.epochs, pool=args.pool, **fields)


# ---------------------------------------------------------------- results
def _stats(values) -> tuple[float, float]:
    a = np.asarray(values, np.float64) * 100.0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _fmt(values) -> str:
    if not values:
        return "–"
    mean, std = _stats(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


# table rows and curve colours follow this order; each ERM control sits under its IRM row
ROW_ORDER = ("original", "irm2", "erm2", "irm5", "erm5", "original+gan", "original+cgn", "cgn_official", "cgn_only")


def _palette_of(row: str) -> str | None:
    """The palette a "method@palette-NAME" row ran with; None for the default and for CGN tags."""
    tag = row.partition("@")[2]
    return tag[len(PALETTE_TAG):] if tag.startswith(PALETTE_TAG) else None


def _row_title(row: str) -> str:
    method, _, tag = row.partition("@")
    if palette := _palette_of(row):
        return f"{METHOD_TITLES.get(method, method)} (palette: {palette})"
    return METHOD_TITLES.get(method, method) + (f" (CGN: {tag})" if tag else "")


def _ordered_rows(runs: dict) -> list[str]:
    """Row names ("method" or "method@generator tag") in table order."""
    return sorted({r.get("row", r["method"]) for r in runs.values() if r["method"] in ROW_ORDER},
                  key=lambda row: (ROW_ORDER.index(row.split("@")[0]), row))


def _changed_setup(row: dict) -> dict:
    """The row's setup fields that differ from what `cgn-jax table1` runs by default for its method."""
    import argparse

    setup = row.get("setup")
    if not isinstance(setup, dict) or row.get("method") not in METHODS:
        return {}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = method_setup(row["variant"], row["method"], parser.parse_args([]))
    default = _jsonable({k: getattr(default, k) for k in default.__dataclass_fields__})
    stored = _jsonable({**_setup_defaults(), **setup})
    return {k: v for k, v in stored.items() if k in default and v != default[k]}


def render_markdown(results: dict) -> str:
    runs = results.get("runs", {})
    if not runs:  # e.g. the first run was interrupted: say so instead of an empty table
        return ("No run has finished yet. An interrupted run keeps its checkpoint; "
                "re-run the same command to continue it.\n")
    variants = [v for v in VARIANT_ORDER if any(r["variant"] == v for r in runs.values())]
    rows = _ordered_rows(runs)
    head = "| Method | " + " | ".join(f"{VARIANT_TITLES[v]}: train | test | paper test" for v in variants) + " |"
    sep = "|---|" + "---:|---:|---:|" * len(variants)
    lines = [head, sep]
    for row in rows:
        m = row.partition("@")[0]
        cells = [_row_title(row)]
        for v in variants:
            r = runs.get(f"{v}/{row}")
            # the paper's numbers are for its data, not for another palette
            paper = None if _palette_of(row) else PAPER_TEST_ACC.get(m, (None,) * 3)[VARIANT_ORDER.index(v)]
            cells += [_fmt(r["train_acc"]) if r else "", _fmt(r["test_acc"]) if r else "",
                      "–" if paper is None else f"{paper:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    meta = results.get("meta", {})
    seeds = sorted({s for r in runs.values() for s in r["seeds"]})
    epochs = sorted({r["epochs"] for r in runs.values()})
    total = sum(r["timing"]["total_seconds"] for r in runs.values())
    notes = [
        "",
        f"Accuracy in %, mean ± sample std over seeds {seeds}, after {'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''} "
        "(train: running accuracy over the last epoch's training batches, as the official script prints it; "
        "test: the seeded randomised test split). Paper: Sauer & Geiger (ICLR 2021), Table 1, test accuracy.",
        "Rows without a CGN tag use the official pretrained MNIST CGNs; tagged rows use CGNs trained by `cgn-jax train`.",
        *(["Rows tagged with a palette render colored MNIST's real train and test images with that palette "
           "instead of the measured LNTL one (`cgn_jax.data.palettes`); the paper's numbers do not apply to them."]
          if any(map(_palette_of, rows)) else []),
        f"Ran on {', '.join(sorted({r.get('device', meta.get('device', '?')) for r in runs.values()}))} in "
        f"{total / 60:.1f} min of training (compilation included).",
    ]
    for key, r in sorted(runs.items()):
        if sorted(r["seeds"]) != seeds:
            notes.append(f"{key}: seeds {sorted(r['seeds'])} only.")
    for key, r in sorted(runs.items()):
        changed = _changed_setup(r)
        if changed:
            notes.append(f"{key}: run with {', '.join(f'{k}={v}' for k, v in sorted(changed.items()))} "
                         "(not the default).")
    for key, r in sorted(runs.items()):
        if r.get("inverted_classes"):
            notes.append(f"{key}: the CGN's mask is inverted (covers the background) for classes "
                         f"{', '.join(map(str, r['inverted_classes']))} (`cgn_jax.mask_stats`).")
    return "\n".join(lines + notes) + "\n"


def render_curves(results: dict, path) -> Path | None:
    """Test accuracy after each epoch, one panel per variant and one line per row (mean over
    seeds, band = min..max): shows whether a row had converged and how far seeds spread.
    None (nothing drawn) without matplotlib, which an accelerator-only install may lack."""
    try:
        import matplotlib
    except ImportError:
        return None
    from cgn_jax.train.logging import finish_panel, panel_figure, save_figure

    runs = results.get("runs", {})
    variants = [v for v in VARIANT_ORDER if any(r["variant"] == v for r in runs.values())]
    if not variants:
        return None
    fig, axes = panel_figure(len(variants), size=(4.6, 4.6))
    colours = matplotlib.colormaps["tab10"].colors
    row_names = _ordered_rows(runs)
    for ax, variant in zip(axes, variants):
        for row_name in row_names:
            row = runs.get(f"{variant}/{row_name}")
            if row is None:
                continue
            curves = [[e["test_acc"][j] * 100 for e in part.get("history", [])]
                      for part in _parts(row) for j in range(len(part["seeds"]))]
            curves = [c for c in curves if c]
            n = min((len(c) for c in curves), default=0)
            if not n:
                continue
            a = np.array([c[:n] for c in curves])
            epochs = np.arange(1, n + 1)
            name, _, tag = row_name.partition("@")
            # one colour per method in every panel; rows from CGNs trained here are dashed
            colour = colours[ROW_ORDER.index(name) % len(colours)]
            label = (METHOD_TITLES.get(name, name) + (f" (CGN: {tag})" if tag else "")
                     + f", {len(a)} seed{'s' if len(a) > 1 else ''}")
            ax.plot(epochs, a.mean(0), marker=".", color=colour, linestyle="--" if tag else "-", label=label)
            if len(a) > 1:
                ax.fill_between(epochs, a.min(0), a.max(0), color=colour, alpha=0.2)
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        finish_panel(ax, f"{VARIANT_TITLES[variant]}: test accuracy", "epoch", legend_size=8, legend_below=True)
    return save_figure(fig, path)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


# a row's protocol: what must agree for seeds of different calls to share a row
_PROTOCOL_KEYS = ("epochs", "limit", "generator", "setup", "palette")  # palette: None = the default


def _setup_defaults() -> dict:
    import dataclasses

    from cgn_jax.train.classifier import ClassifierSetup

    return {f.name: f.default for f in dataclasses.fields(ClassifierSetup) if f.default is not dataclasses.MISSING}


def _protocol(row: dict) -> dict:
    """The row's protocol with setup fields at their default left out: a field added after a row
    was stored (absent there) and the same field at its default (present in a new row) agree, so
    old rows still match and checkpoint names (`_digest`) do not change when a field is added."""
    protocol = _jsonable({k: row.get(k) for k in _PROTOCOL_KEYS})
    if isinstance(protocol["setup"], dict):
        defaults = _jsonable(_setup_defaults())
        protocol["setup"] = {k: v for k, v in protocol["setup"].items() if k not in defaults or v != defaults[k]}
    return protocol


def _parts(row: dict) -> list[dict]:
    """The training calls a row is made of (results written before parts existed: one)."""
    if "parts" in row:
        return row["parts"]
    return [{k: row[k] for k in ("seeds", "train_acc", "test_acc", "history", "timing", "device") if k in row}]


def _with_parts(row: dict, parts: list[dict]) -> dict:
    """`row` holding `parts`, its per-seed lists (in seed order) and total time rebuilt from them."""
    per_seed = {}
    for part in parts:
        for i, seed in enumerate(part["seeds"]):
            per_seed[seed] = (part["train_acc"][i], part["test_acc"][i])
    seeds = sorted(per_seed)
    devices = sorted({p.get("device", row.get("device", "?")) for p in parts})
    return {**{k: v for k, v in row.items() if k != "history"}, "parts": parts, "seeds": seeds,
            "train_acc": [per_seed[s][0] for s in seeds], "test_acc": [per_seed[s][1] for s in seeds],
            "device": ", ".join(devices),
            "timing": {"total_seconds": sum(p["timing"]["total_seconds"] for p in parts)}}


class ProtocolMismatch(ValueError):
    """Two rows under one key ran different protocols: averaging their seeds would mean nothing."""


def combine_rows(old: dict | None, new: dict, where: str = "") -> dict:
    """`new`'s seeds added to `old`'s, replacing seeds both hold; rows of two protocols never mix."""
    if old is None:
        return _with_parts(new, _parts(new))
    if _protocol(old) != _protocol(new):
        raise ProtocolMismatch(f"{where or new.get('variant', '?') + '/' + new.get('row', '?')}: another protocol "
                               f"({'; '.join(protocol_differences(old, new))})")
    new_parts = _parts(new)
    taken = {s for p in new_parts for s in p["seeds"]}
    kept = [p for p in _parts(old) if not taken & set(p["seeds"])]
    if any(taken & set(p["seeds"]) for p in _parts(old)):
        print(f"table1: {where}: seeds {sorted(taken)} were already stored; the new results replace them",
              file=sys.stderr)
    return _with_parts(new, kept + new_parts)


def protocol_differences(old: dict, new: dict) -> list[str]:
    """What makes two rows' protocols differ, as "field: old -> new" (setup fields as setup.NAME)."""
    a, b = _protocol(old), _protocol(new)
    out = [f"{k}: {a.get(k)} -> {b.get(k)}" for k in _PROTOCOL_KEYS if k != "setup" and a.get(k) != b.get(k)]
    sa, sb = a.get("setup") or {}, b.get("setup") or {}
    if isinstance(sa, dict) and isinstance(sb, dict):
        defaults = _jsonable(_setup_defaults())
        out += [f"setup.{k}: {sa.get(k, defaults.get(k))} -> {sb.get(k, defaults.get(k))}"
                for k in sorted(set(sa) | set(sb)) if sa.get(k, defaults.get(k)) != sb.get(k, defaults.get(k))]
    elif sa != sb:
        out.append(f"setup: {sa} -> {sb}")
    return out


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def _digest(protocol: dict) -> str:
    """Short stable name of a protocol: checkpoints of another protocol never meet this one's."""
    return hashlib.sha1(json.dumps(_protocol(protocol), sort_keys=True).encode()).hexdigest()[:12]


def _remove_checkpoints(directory: Path, root: Path) -> None:
    """Drop a finished call's checkpoints, then the directories it leaves empty up to `root`."""
    shutil.rmtree(directory, ignore_errors=True)
    for parent in directory.parents:
        if parent == root.parent or not parent.is_dir() or any(parent.iterdir()):
            break
        parent.rmdir()


def run(args) -> int:
    from cgn_jax.cli import CLIError

    if getattr(args, "config_overrides", None):
        raise CLIError("table1 takes no --config.* overrides; use its own options (see --help)")
    try:
        variants = [palettes.canonical_variant(v) for v in args.variants]
    except ValueError as e:
        raise CLIError(str(e)) from e
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        raise CLIError(f"unknown method(s) {', '.join(bad)}; valid: {', '.join(METHODS)}")
    dirs = dict(mnist_dir=args.mnist_dir or None, textures_dir=args.textures_dir or None,
                tfds_dir=args.tfds_dir or None, weights_dir=args.weights_dir or None)
    limits = dict(limit=args.limit or None, test_limit=args.test_limit or None)
    if args.cf_colour_jitter < 0:
        raise CLIError(f"--cf-colour-jitter is a standard deviation; got {args.cf_colour_jitter}")
    if not args.cf_shape_noise_scale > 0.0:
        raise CLIError(f"--cf-shape-noise-scale must be positive (1: the official procedure); "
                       f"got {args.cf_shape_noise_scale}")
    if args.tag.startswith(PALETTE_TAG):
        raise CLIError(f"--tag {args.tag}: tags starting with {PALETTE_TAG!r} name --palette rows; choose another tag")
    if args.tag and not args.generator:
        raise CLIError(f"--tag {args.tag}: tags name the rows of a CGN given with --generator; rows from the "
                       "official weights are not tagged, so write a variant of them (e.g. --cf-colour-jitter) "
                       "to its own --out table")
    if args.palette != palettes.DEFAULT_COLORED_PALETTE:
        if variants != [palettes.COLORED]:
            raise CLIError(f"--palette {args.palette} recolours colored MNIST only; pass --variants colored")
        with_cgn = [m for m in args.methods if METHODS[m][0] != "original"]
        if with_cgn:
            raise CLIError(f"--palette {args.palette} changes the real images only, and the official CGN draws "
                           f"the measured colours, so {', '.join(with_cgn)} would mix two palettes; run it with "
                           "original, irm2, irm5, erm2 or erm5")
    if args.export_data:
        try:
            export_bundles(args.export_data, variants, args.methods, palette=args.palette, **dirs, **limits)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(str(e)) from e
        return 0

    out = Path(args.out)
    results_path = Path(args.results) if args.results else out.with_suffix(".json")
    if args.merge:
        merged = {"runs": {}}
        for path in args.merge:
            try:
                part = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise CLIError(f"cannot read results {path}: {e}") from e
            for key, row in part.get("runs", {}).items():
                try:
                    merged["runs"][key] = combine_rows(merged["runs"].get(key), row, f"{path}: {key}")
                except ProtocolMismatch as e:
                    raise CLIError(f"cannot merge {e}, unlike an earlier file's row; one row averages seeds of "
                                   "one protocol only, so merge those files into separate --out tables") from e
            merged["meta"] = part.get("meta", merged.get("meta", {}))
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(merged, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(merged))
        render_curves(merged, out.with_suffix(".png"))
        print(f"merged {len(merged['runs'])} rows into {out} and {results_path}", file=sys.stderr)
        return 0

    import jax

    from cgn_jax.train.classifier import SetupError, epoch_summary, group_checkpoint_dir, train_classifier
    from cgn_jax.train.signals import StopOnSignal

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(args.jax_cache).absolute()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

    checkpoints = results_path.with_name(results_path.stem + ".ckpt")
    if args.fresh and checkpoints.exists():
        shutil.rmtree(checkpoints)
    results = {"runs": {}}
    if results_path.is_file() and not args.fresh:
        results = json.loads(results_path.read_text())
        results.setdefault("runs", {})
    device = jax.devices()[0]
    results["meta"] = {"device": f"{jax.device_count()} x {getattr(device, 'device_kind', device.platform)}",
                       "jax": jax.__version__, "python": platform.python_version()}

    def save():
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(_jsonable(results), indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_markdown(results))
        render_curves(results, out.with_suffix(".png"))

    generators = {}
    for item in args.generator:
        name, sep, path = item.partition("=")
        try:
            name = palettes.canonical_variant(name)
        except ValueError as e:
            raise CLIError(f"--generator {item}: {e}") from e
        if not sep or not Path(path).is_dir():
            raise CLIError(f"--generator {item}: expected VARIANT=DIR with DIR a `cgn-jax train` workdir or "
                           "its generator/ directory")
        if path in generators.get(name, []):
            raise CLIError(f"--generator {item} is given twice; a pool takes each CGN once")
        generators.setdefault(name, []).append(path)
    on_the_fly = [m for m in args.methods if METHODS[m][0] != "original"
                  and METHOD_SETUP.get(m, {}).get("cf_source") != "fixed"]
    for name, dirs in generators.items():
        if len(dirs) > 1 and name in variants and on_the_fly:
            raise CLIError(f"--generator gives {len(dirs)} CGNs for {name}: a pool shares the fixed set of "
                           f"cgn_official, but {', '.join(on_the_fly)} sample inside the train step from one "
                           "CGN; run those rows with one --generator")

    palette = None if args.palette == palettes.DEFAULT_COLORED_PALETTE else args.palette
    for variant in variants:
        gen_dirs = generators.get(variant, [])
        gen_dir = " + ".join(gen_dirs)  # the protocol's "generator": one path, or the pool's paths
        suffix = f"@{args.tag or 'cgn-jax'}" if gen_dir else (f"@{PALETTE_TAG}{palette}" if palette else "")
        methods = [m for m in args.methods if not (gen_dir and METHODS[m][0] == "original")]
        if gen_dir and len(methods) < len(args.methods):
            print(f"table1: {variant}: --generator given, so only the rows that use a generator run "
                  f"({', '.join(methods) or 'none'})", file=sys.stderr)
        plans = []
        for method in methods:
            key = f"{variant}/{method}{suffix}"
            try:
                setup = method_setup(variant, method, args)
            except (SetupError, ValueError) as e:
                raise CLIError(f"{key}: {e}") from e
            protocol = {"epochs": args.epochs, "limit": args.limit, "generator": gen_dir or "official", "palette": palette,
                        "setup": {k: getattr(setup, k) for k in setup.__dataclass_fields__}}
            stored = results["runs"].get(key)
            if stored and _protocol(stored) != _protocol(protocol):  # training would replace the stored seeds
                raise CLIError(f"{key}: {results_path} already holds this row with another protocol "
                               f"({'; '.join(protocol_differences(stored, protocol))}); give this run another "
                               "--out (or, with --generator, another --tag), or pass --fresh to start the file over")
            done = set(stored["seeds"]) if stored else set()
            todo = [s for s in args.seeds if s not in done]
            if todo:
                plans.append((method, key, setup, protocol, todo))
            else:
                print(f"table1: {key}: seeds {list(args.seeds)} already in {results_path}", file=sys.stderr)
        if not plans:
            continue
        try:
            if args.data:
                bundle = load_bundle(Path(args.data) / f"{variant}.npz")
            else:
                bundle = collect_variant(variant, [p[0] for p in plans], palette=args.palette, **dirs, **limits)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(str(e)) from e
        held = str(bundle.get("palette", palettes.DEFAULT_COLORED_PALETTE))  # bundles before --palette: the default
        if held != args.palette:
            raise CLIError(f"{Path(args.data) / f'{variant}.npz'} holds the {held!r} palette, not {args.palette!r}; "
                           f"pass --palette {held}, or export the data again with --palette {args.palette}")
        for method, key, setup, protocol, todo in plans:
            mode, correlations = METHODS[method]
            try:
                data, assets, generator = method_inputs(bundle, method, gen_dirs)
                masks = {}
                if generator is not None:
                    from cgn_jax import mask_stats
                    from cgn_jax.train.classifier import pool_members

                    members = pool_members(generator)
                    frame_means = [mask_stats.check_generator(g.model, g.variables, f"table1 {key}, generator"
                                                              + (f" {gen_dirs[i]}" if len(members) > 1 else ""))
                                   for i, g in enumerate(members)]
                    per_member = [[round(float(m), 4) for m in f] for f in frame_means]
                    masks = {"mask_frame_means": per_member[0] if len(per_member) == 1 else per_member,
                             "inverted_classes": sorted({c for f in frame_means
                                                         for c in mask_stats.inverted_classes(f)})}
                vmap = {"auto": None, "yes": True, "no": False}[args.vmap_seeds]
                if vmap is None:
                    vmap = jax.devices()[0].platform != "cpu"
                # seeds trained together share one call; apart, each is saved as soon as it ends
                row_checkpoints = checkpoints / _slug(key) / _digest(protocol)
                for group in ([todo] if vmap else [[s] for s in todo]):
                    log_epoch = None
                    if args.no_progress:  # a background run still says how far it got
                        def log_epoch(record, key=key):
                            print(f"table1: {key}: {epoch_summary(record, setup.epochs)}", file=sys.stderr,
                                  flush=True)
                    with StopOnSignal() as stop:
                        res = train_classifier(setup, data, assets, generator, seeds=group, vmap_seeds=vmap,
                                               progress=not args.no_progress, checkpoint_dir=row_checkpoints,
                                               stop=stop, on_epoch=log_epoch)
                    if res["status"] == "interrupted":
                        save()
                        print(f"table1: {key}: seeds {group}: stopped by {signal.Signals(res['signal']).name}; "
                              f"checkpoint in {res['checkpoint_dir']}; re-run the same command to continue",
                              file=sys.stderr)
                        return 128 + res["signal"]
                    last = res["history"][-1]
                    breakdowns = [test_breakdown.of_classifier(variant, v, data["test_image"], data["test_label"],
                                                               setup.pool) for v in res["variables"]]
                    for seed, b in zip(group, breakdowns):
                        print(f"table1: {key}: seed {seed}: test {test_breakdown.describe(b)}", file=sys.stderr)
                    row = {
                        "variant": variant, "method": method, "row": method + suffix, **protocol,
                        "mode": mode, "irm_correlations": list(correlations), **masks,
                        "steps_per_epoch": res["steps_per_epoch"],
                        "parts": [{"seeds": list(group), "train_acc": last["train_acc"], "test_acc": last["test_acc"],
                                   "test_breakdown": breakdowns, "history": res["history"], "timing": res["timing"],
                                   "device": results["meta"]["device"]}],
                    }
                    results["runs"][key] = combine_rows(results["runs"].get(key), row, key)
                    print(f"table1: {key}: seeds {group}: test acc {_fmt(last['test_acc'])}, train acc "
                          f"{_fmt(last['train_acc'])} ({res['timing']['total_seconds']:.0f}s)", file=sys.stderr)
                    save()
                    _remove_checkpoints(group_checkpoint_dir(row_checkpoints, group), checkpoints)
                _remove_checkpoints(row_checkpoints, checkpoints)  # and what the groups shared (a fixed set)
            except (SetupError, ValueError, FileNotFoundError) as e:
                raise CLIError(f"{key}: {e}") from e
    save()
    print(f"wrote {out} and {results_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from cgn_jax.cli import main

    sys.exit(main(["table1", *sys.argv[1:]]))
