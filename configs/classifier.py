"""Classifier configs for Table 1: `get_config("VARIANT[,METHOD]")` (":" works as the separator too).

VARIANT: colored | double_colored | wildlife (or their TFDS / official names).
METHOD (default original+cgn) names a row of the paper's Table 1:
  original      real training split only
  irm2, irm5    IRM on the real data in 2 / 5 environments (cgn_jax.irm)
  erm2, erm5    the IRM control: the same environments and warm-up (irm.anneal_steps at
                weight 1), then penalty weight 0, so the penalty's effect shows apart
                from that of the decorrelated images
  original+gan  real images + CGN samples with one label for all mechanisms
  original+cgn  real images + counterfactuals labelled with their shape label
  cgn_only      counterfactuals only
  cgn_official  the official code's recipe for the paper's Original + CGN number: counterfactuals
                only, from one fixed set of 100,000 (10 per shape) generated at the start,
                one pass over it per epoch (1562 steps)

e.g. `cgn-jax train-classifier --config=configs/classifier.py:double_colored,original+cgn`.
The official hyperparameters (Adadelta lr 1.0, x0.7 per epoch, batch 64, 10 epochs) are
the defaults; see cgn_jax/train/classifier.py for what an epoch is in each mode.
"""

import ml_collections

from cgn_jax import table1
from cgn_jax.data.palettes import canonical_variant
from cgn_jax.irm import DEFAULT_ANNEAL_STEPS, DEFAULT_PENALTY_WEIGHT
from cgn_jax.train.classifier import OFFICIAL_CF_DATASET_SIZE

DATA_MODES = ("original", "original+gan", "original+cgn", "cgn_only")
# method -> (data mode, IRM environment correlations), and the setup fields a method fixes:
# one table, in cgn_jax.table1 (which cannot read this file: no ml_collections there)
METHODS, METHOD_SETUP = table1.METHODS, table1.METHOD_SETUP
DEFAULT_METHOD = "original+cgn"


def parse_arg(arg: str) -> tuple[str, str]:
    """'double_colored,original+cgn' -> ('double_colored', 'original+cgn'); ValueError if unknown."""
    text = (arg or "").strip()
    if not text:
        raise ValueError("configs/classifier.py needs a variant, e.g. configs/classifier.py:colored,original+cgn")
    for sep in (",", ":"):
        if sep in text:
            variant, method = (p.strip() for p in text.split(sep, 1))
            break
    else:
        variant, method = text, DEFAULT_METHOD
    variant = canonical_variant(variant)
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"unknown classifier method {method!r}; valid: {', '.join(METHODS)}")
    return variant, method


def get_config(arg: str = "colored") -> ml_collections.ConfigDict:
    variant, method = parse_arg(arg)
    mode, correlations = METHODS[method]
    fixed = METHOD_SETUP.get(method, {})  # the setup fields this method fixes

    c = ml_collections.ConfigDict()
    c.family = "mnist_classifier"
    c.variant = variant
    c.method = method
    c.seed = 0                      # classifier init and data order

    c.dataset = ml_collections.ConfigDict()
    c.dataset.mnist_dir = ""        # "" = ../shared/data/mnist
    c.dataset.textures_dir = ""     # wildlife only; "" = ../shared/data/textures
    c.dataset.data_dir = ""         # TFDS builds; "" = ~/.cache/cgn_jax/tfds
    c.dataset.correlation = 1.0     # train split's P(cue label == digit label) (not IRM)
    c.dataset.seed = 0              # train split's draw of the non-matching cue labels
    c.dataset.limit = 0             # first N training examples (0 = all); for quick runs
    c.dataset.test_limit = 0        # first N test examples (0 = all)

    c.data = ml_collections.ConfigDict()
    c.data.mode = mode              # one of DATA_MODES
    c.data.real_fraction = 0.5      # share of real images per batch in original+gan / original+cgn
    c.data.fixed_augmentation = False  # True: one colour-jitter / crop draw per real image, as a stored data file
    # "on_the_fly": the CGN runs inside the train step (fresh samples every step, nothing on disk);
    # or the path of a dataset written by `cgn-jax generate --dataset` (its --out dir or tfds/ in it);
    # or "fixed": one set of data.fixed_size counterfactuals (data.num_cfs per shape) generated
    # at the start of the run, as the official generate_data.py + train_classifier.py recipe.
    c.data.cf_source = fixed.get("cf_source", "on_the_fly")
    # On the fly: counterfactuals per sampled shape within a batch. 1 = every generated image has
    # its own shape (fresh shapes are free here; the official stored dataset used 10 per shape).
    c.data.num_cfs = fixed.get("num_cfs", 1)
    c.data.fixed_size = OFFICIAL_CF_DATASET_SIZE  # "fixed": images in the set
    # > 0: per-image colour offsets (std on the [0, 1] scale) on the generated counterfactuals'
    # texture and background, on the fly or in the fixed set; 0 = the official procedure
    c.data.cf_colour_jitter = 0.0
    # generated counterfactuals' shape noise scaled by this (< 1 a truncation: cleaner digits, less
    # variety, > 1 more; `cgn-jax generate --mask-report --shape-noise-scale` measures both); 1 = official
    c.data.cf_shape_noise_scale = 1.0
    c.data.cf_limit = 0             # stored dataset: first N images (0 = all)

    c.generator = ml_collections.ConfigDict()
    # Orbax dir, training workdir or .pth; "" = official weights in shared/; several, comma-separated
    # ("A,B"), pool CGNs into one fixed set (data.cf_source="fixed"), an equal share of the shapes each
    c.generator.checkpoint = ""
    c.generator.texture_mode = "tile_crop"
    c.generator.patch_size = 4

    c.irm = ml_collections.ConfigDict()
    c.irm.correlations = tuple(correlations)  # one environment per value; () = no IRM
    # see cgn_jax/irm.py for the choice; the ERM controls drop the penalty after the warm-up
    c.irm.penalty_weight = float(fixed.get("irm_penalty_weight", DEFAULT_PENALTY_WEIGHT))
    c.irm.anneal_steps = DEFAULT_ANNEAL_STEPS
    c.irm.rescale = True            # divide the loss by the penalty weight (Arjovsky et al.); see cgn_jax/irm.py
    c.irm.joint_cues = False        # double-colored / Wildlife: one label for both cues (see cgn_jax/irm.py)

    c.model = ml_collections.ConfigDict()
    c.model.pool = "official"       # "official" (AvgPool2d(7) on 8x8) or "global"
    c.model.grad_kernels = "auto"   # "custom" | "xla" | "auto" (custom on CPU): see cgn_jax/models/cpu_grads.py

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64
    c.train.epochs = 10
    c.train.lr = 1.0
    c.train.lr_decay = 0.7          # StepLR gamma, every epoch
    c.train.rho = 0.9               # Adadelta, as torch.optim.Adadelta
    c.train.eps = 1e-6
    c.train.steps_per_epoch = 0     # 0 = len(real train split) // batch_size

    c.train.steps_per_call = 0      # 0 = one jitted call per epoch
    c.train.eval_batch_size = 500
    return c
