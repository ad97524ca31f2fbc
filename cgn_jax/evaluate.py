"""`cgn-jax evaluate`: the paper's ImageNet-side measurements of a classifier.

    cgn-jax evaluate --what imagenet   --data /data/imagenet/val   --checkpoint runs/in_ensemble
    cgn-jax evaluate --what shape-bias --data /data/cue_conflict   --checkpoint weights/resnet50
    cgn-jax evaluate --what bg-gap     --data /data/in9            --checkpoint runs/in_ensemble

`--checkpoint` is a variables directory (`meta.json` + `variables/`): one written by
`cgn-jax port resnet50` (a plain torchvision ResNet, or an official CGN ensemble) or the
`ensemble/` export of `cgn-jax train-classifier` (its working directory works too). A
plain classifier is reported as head `model`; an ensemble as its three heads, their
combination (`ensemble`) and shape+texture without background (`shape_texture`, the
official BG-gap headline).

The accelerator only returns, per image and head, its top-5 classes and its 16-category
decision; the metrics are computed on the host by `cgn_jax.eval_metrics`, so the rules
live in one tested place. Each run prints a table and writes JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cgn_jax import eval_metrics as M
from cgn_jax import imagenet_data as D
from cgn_jax import parallel
from cgn_jax.models import resnet as R

WHAT = ("imagenet", "shape-bias", "bg-gap", "counterfactual")


class Predictor:
    """Runs a (replicated) classifier over a source; returns per-head top-5 classes and 16-way decisions."""

    def __init__(self, model, variables, *, ensemble: str = "mean_probs", devices=None, replicated: bool = False,
                 dtype=jnp.float32):
        self.model = model
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.variables = variables if replicated else parallel.replicate(variables, self.devices)
        self.ensemble = ensemble
        self.dtype = dtype
        self.num_classes = int(getattr(model, "num_classes", 1000) or 1000)
        self._m16 = jnp.asarray(M.sixteen_class_matrix(self.num_classes)) if self.num_classes == 1000 else None

    def _step(self, mean: tuple, std: tuple):
        m = self.model
        key = (type(m).__name__, m.block, tuple(m.stage_sizes), m.width, m.num_classes, jnp.dtype(m.dtype).name,
               jnp.dtype(self.dtype).name, self.ensemble, tuple(mean), tuple(std), tuple(self.devices))
        if key not in _STEPS:  # compiled once per architecture and setting, whatever the weights
            _STEPS[key] = jax.pmap(_make_predict(m, self.ensemble, mean, std, self.dtype, self._m16),
                                   axis_name=parallel.AXIS, devices=self.devices)
        return _STEPS[key]

    def run(self, source, batch_size: int, *, resize: int | None = 256, image_size: int = 224,
            mean=D.IMAGENET_MEAN, std=D.IMAGENET_STD, num_threads: int = 8, max_batches: int = 0,
            progress: bool = False, desc: str = "eval") -> tuple[dict, dict]:
        """({head: {"top5": (N, 5), "dec16": (N,)}}, {label name: (N,)}) over the whole source (all hosts)."""
        from tqdm import tqdm

        n_dev = len(self.devices)
        shard = (jax.process_index(), jax.process_count())
        it = D.eval_batches(source, batch_size * n_dev, resize=resize, image_size=image_size, shard=shard,
                            num_threads=num_threads)
        total = D.num_eval_batches(source, batch_size * n_dev, shard[1])
        if max_batches:
            total = min(total, int(max_batches))
        step = self._step(tuple(mean), tuple(std))
        preds, labels, pending = {}, {}, []

        def collect(out, batch):
            out = jax.device_get(out)
            valid = batch["valid"].astype(bool)
            for head, d in out.items():
                for k, v in d.items():
                    preds.setdefault(head, {}).setdefault(k, []).append(v.reshape(-1, *v.shape[2:])[valid])
            for k, v in batch.items():
                if k not in ("image", "valid"):
                    labels.setdefault(k, []).append(v[valid])

        bar = tqdm(total=total, desc=desc, disable=not (progress and jax.process_index() == 0), leave=False)
        for i, batch in enumerate(it):
            if i >= total:
                break
            images = D.device_put_stacked(D.split_for_devices({"image": batch["image"]}, n_dev), self.devices)
            pending.append((step(self.variables, images["image"]), batch))
            if len(pending) > 1:  # one batch in flight while the host prepares the next
                collect(*pending.pop(0))
            bar.update(1)
        for p in pending:
            collect(*p)
        D.close_iterator(it)
        bar.close()
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0,), np.int32)
        preds = {h: {k: _gather(cat(v)) for k, v in d.items()} for h, d in preds.items()}
        labels = {k: _gather(cat(v)) for k, v in labels.items()}
        return preds, labels


_STEPS: dict = {}


def _make_predict(model, ensemble: str, mean, std, dtype, m16):
    def step(variables, images):
        x = D.normalize(images, mean, std, dtype)
        logits = model.apply(variables, x, train=False)
        if not isinstance(logits, dict):
            logits = {"model": logits}
        out = {}
        for head, probs in R.prediction_probs(logits, ensemble).items():
            top = jax.lax.top_k(probs, min(5, probs.shape[-1]))[1].astype(jnp.int32)
            if m16 is not None:  # Geirhos' 16 categories: mean probability of the member classes
                dec = jnp.argmax(probs @ m16, axis=-1).astype(jnp.int32)
            else:
                dec = -jnp.ones(probs.shape[:1], jnp.int32)
            out[head] = {"top5": top, "dec16": dec}
        return out

    return step


def _gather(x: np.ndarray) -> np.ndarray:
    """Concatenate a per-host array over all hosts (hosts hold equal-length shards up to padding)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    n = multihost_utils.process_allgather(np.asarray([x.shape[0]]))
    width = int(np.max(n))
    padded = np.zeros((width, *x.shape[1:]), x.dtype)
    padded[: x.shape[0]] = x
    allx = multihost_utils.process_allgather(padded)
    return np.concatenate([allx[i, : int(n[i][0])] for i in range(allx.shape[0])])


# ------------------------------------------------------------------------------ the measurements

def evaluate_imagenet(predictor: Predictor, source, batch_size: int, *, resize=256, image_size=224, **kw) -> dict:
    preds, labels = predictor.run(source, batch_size, resize=resize, image_size=image_size, desc="imagenet", **kw)
    return {head: {**M.topk_accuracy(p["top5"], labels["label"]), "images": int(labels["label"].size)}
            for head, p in preds.items()}


def evaluate_shape_bias(predictor: Predictor, source, batch_size: int, *, resize=256, image_size=224, **kw) -> dict:
    if predictor.num_classes != 1000:
        raise ValueError("shape bias needs a 1000-class ImageNet classifier (the 16-category mapping "
                         f"is defined on ImageNet-1k), this one has {predictor.num_classes} classes")
    preds, labels = predictor.run(source, batch_size, resize=resize, image_size=image_size, desc="shape-bias", **kw)
    return {head: M.shape_bias(p["dec16"], labels["shape"], labels["texture"]) for head, p in preds.items()}


def evaluate_bg_gap(predictor: Predictor, root, batch_size: int, *, image_size=224, normalization: str = "in9",
                    **kw) -> dict:
    """Accuracy on each ImageNet-9 variant present (original optional) and BG-Gap per head."""
    if predictor.num_classes != 1000:
        raise ValueError(f"BG-gap needs a 1000-class ImageNet classifier, this one has {predictor.num_classes}")
    mean, std = (D.IN9_MEAN, D.IN9_STD) if normalization == "in9" else (D.IMAGENET_MEAN, D.IMAGENET_STD)
    variants = [v for v in M.IN9_VARIANTS if (Path(root) / v / "val").is_dir()]
    for needed in ("mixed_same", "mixed_rand"):
        if needed not in variants:
            raise D.DataError(f"ImageNet-9: {Path(root) / needed / 'val'} is missing; BG-Gap needs mixed_same and "
                              "mixed_rand (from the backgrounds challenge release)")
    out: dict = {}
    for v in variants:
        preds, labels = predictor.run(D.in9_source(root, v), batch_size, resize=None, image_size=image_size,
                                      mean=mean, std=std, desc=f"in9 {v}", **kw)
        for head, p in preds.items():
            out.setdefault(head, {})[v] = M.in9_accuracy(p["top5"][:, 0], labels["label"])
    for head, r in out.items():
        r["bg_gap"] = M.bg_gap(r["mixed_same"], r["mixed_rand"])
    return out


def evaluate_counterfactual(predictor: Predictor, source, batch_size: int, *, resize=256, image_size=224,
                            **kw) -> dict:
    """Each head's top-1/top-5 on its own label of held-out counterfactuals (the official CF validation)."""
    preds, labels = predictor.run(source, batch_size, resize=resize, image_size=image_size, desc="cf", **kw)
    out = {}
    for head, p in preds.items():
        for label in ("shape", "texture", "background"):
            acc = M.topk_accuracy(p["top5"], labels[label])
            out.setdefault(head, {}).update({f"{label}_top1": acc["top1"], f"{label}_top5": acc["top5"]})
    return out


# ------------------------------------------------------------------------------------ checkpoints

def load_classifier(path: str | Path, dtype: str = "float32"):
    """(model, variables, meta) from a variables directory or a train-classifier working directory."""
    from cgn_jax.checkpoint import read_meta, restore_variables

    path = Path(path)
    if not (path / "meta.json").is_file() and (path / "ensemble" / "meta.json").is_file():
        path = path / "ensemble"
    meta = read_meta(path)
    if meta.get("model") != "resnet":
        raise FileNotFoundError(
            f"{path} is not a classifier checkpoint (no meta.json with model 'resnet'); pass the directory written by "
            "`cgn-jax port resnet50 --dst DIR` or a `cgn-jax train-classifier` working directory")
    block, stages = meta["block"], tuple(meta["stage_sizes"])
    dt = R._dtype(dtype)
    if meta["kind"] == "ensemble":
        model = R.ClassifierEnsemble(block, stages, int(meta["width"]), int(meta["num_classes"]), dt)
    else:
        model = R.ResNet(block, stages, int(meta["width"]), int(meta["num_classes"]), dt)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), False))
    variables = restore_variables(path, expected=shapes)
    return model, variables, meta


# ------------------------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--what", required=True, choices=WHAT, help="which measurement")
    parser.add_argument("--data", required=True,
                        help="imagenet: ImageFolder val dir or tfds[:DATA_DIR]; shape-bias: cue-conflict stimuli dir; "
                             "bg-gap: ImageNet-9 root (original/ mixed_same/ mixed_rand/); counterfactual: a "
                             "counterfactual dataset dir")
    parser.add_argument("--checkpoint", required=True, help="variables dir (cgn-jax port resnet50) or train workdir")
    parser.add_argument("--batch-size", type=int, default=64, help="per device")
    parser.add_argument("--out", default=None, help="JSON output (default: <checkpoint>/eval_<what>.json)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--ensemble", default=None, choices=("mean_probs", "mean_logits"),
                        help="how heads combine (default: the checkpoint's training setting, else mean_probs)")
    parser.add_argument("--in9-normalization", default="in9", choices=("in9", "imagenet"),
                        help="bg-gap input normalisation: in9 (the official evaluation's mean/std) or imagenet")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--threads", type=int, default=16, help="host decode threads")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (smoke runs)")
    parser.add_argument("--tfds-manual-dir", default="")


def run(args) -> int:
    from cgn_jax.cli import CLIError
    from cgn_jax.checkpoint import CheckpointMismatchError

    try:
        model, variables, meta = load_classifier(args.checkpoint, args.dtype)
    except (FileNotFoundError, CheckpointMismatchError) as e:
        raise CLIError(str(e)) from e
    method = args.ensemble or meta.get("ensemble", "mean_probs")
    predictor = Predictor(model, variables, ensemble=method, dtype=R._dtype(args.dtype))
    kw = dict(num_threads=args.threads, max_batches=args.max_batches, progress=True)
    t0 = time.perf_counter()
    try:
        results, table = _measure(args, predictor, kw)
    except D.DataError as e:
        raise CLIError(str(e)) from e
    record = {"what": args.what, "data": str(args.data), "checkpoint": str(Path(args.checkpoint).resolve()),
              "ensemble": method, "dtype": args.dtype, "seconds": round(time.perf_counter() - t0, 1),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    out = Path(args.out) if args.out else _default_out(args.checkpoint, args.what)
    if jax.process_index() == 0:
        print(table)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        print(f"wrote {out}")
    return 0


def _default_out(checkpoint, what: str) -> Path:
    return Path(checkpoint) / f"eval_{what.replace('-', '_')}.json"


def _measure(args, predictor, kw) -> tuple[dict, str]:
    size, bs = args.image_size, args.batch_size
    if args.what == "imagenet":
        source = D.open_source(args.data, "validation", tfds_manual_dir_=args.tfds_manual_dir)
        res = evaluate_imagenet(predictor, source, bs, resize=args.resize, image_size=size, **kw)
        return res, M.format_table(res, ["top1", "top5", "images"], "ImageNet validation accuracy (%)")
    if args.what == "shape-bias":
        res = evaluate_shape_bias(predictor, D.CueConflictSource(args.data), bs, resize=args.resize,
                                  image_size=size, **kw)
        rows = {h: {"shape bias %": _pct(r["shape_bias"]), "shape match %": _pct(r["shape_match"]),
                    "texture match %": _pct(r["texture_match"]), "stimuli": r["stimuli"]} for h, r in res.items()}
        return res, M.format_table(rows, ["shape bias %", "shape match %", "texture match %", "stimuli"],
                                   "Shape bias on cue-conflict stimuli (Geirhos et al. 2019)")
    if args.what == "bg-gap":
        res = evaluate_bg_gap(predictor, args.data, bs, image_size=size, normalization=args.in9_normalization, **kw)
        cols = [v for v in M.IN9_VARIANTS if any(v in r for r in res.values())] + ["bg_gap"]
        return res, M.format_table(res, cols, "ImageNet-9 top-1 accuracy (%) and BG-Gap = mixed_same - mixed_rand")
    res = evaluate_counterfactual(predictor, D.CounterfactualSource(args.data, "val"), bs, resize=args.resize,
                                  image_size=size, **kw)
    cols = ["shape_top1", "texture_top1", "background_top1"]
    return res, M.format_table(res, cols, "Counterfactual validation: top-1 (%) on each label")


def _pct(x):
    return None if x is None else 100.0 * x
