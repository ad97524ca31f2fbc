"""ImageNet CGN configs: `get_config("")` (the paper's setup), `"random"`, `"tiny"`.

* "" (default): BigGAN-deep-256 and U2-Net from converted weights (set `model.biggan`,
  `model.u2net`, `loss.vgg_weights`), the official loss weights, learning rates and
  effective batch (`imagenet/config.py`, `imagenet/train_cgn.py`).
* "random": the same full-size networks with random weights, so step time and memory can
  be measured without any weight file.
* "tiny": a 64x64 BigGAN-deep with 4 base channels and 16 classes, U2-Net-P, random
  weights, a small effective batch: for tests and CPU smoke runs.

Options can be combined with commas, e.g. "random,bf16,remat". "sn_power" sets
`model.spectral_norm="power_iteration"`: the mechanisms train the official way, with
torch's spectral norm power iteration on the unnormalised weights (default "folded":
sigma folded into the weights; see cgn_jax/models/biggan.py).
"""

import ml_collections

# Official LAMBDA / LR values (imagenet/config.py). LAMBDA.PERC and LAMBDA.TEXT are *style*
# weights (train_cgn.py builds PerceptualLoss(style_wgts=...), PercLossText(style_wgts=...)).
L1, PERC_STYLE, BINARY, MASK, TEXT_STYLE, BG = 100.0, (4.0, 4.0, 4.0, 4.0), 300.0, 500.0, (0.0, 5.0, 5.0, 0.0), 2000.0
LR_SHAPE, LR_TEXTURE, LR_BACKGROUND = 8e-6, 3e-5, 1e-5

TINY_ARCH = dict(output_dim=64, channel_width=4, num_classes=16, z_dim=128, class_embed_dim=128,
                 layers=((False, 16, 16), (True, 16, 8), (True, 8, 4), (True, 4, 2), (True, 2, 1)),
                 attention_layer_position=2)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    options = {o.strip() for o in arg.split(",") if o.strip()}
    unknown = options - {"random", "tiny", "bf16", "remat", "sn_power"}
    if unknown:
        raise ValueError(f"unknown imagenet config option(s) {sorted(unknown)}; valid: random, tiny, bf16, remat, "
                         "sn_power (comma-separated), or '' for the paper's setup")
    tiny = "tiny" in options
    random = tiny or "random" in options

    c = ml_collections.ConfigDict()
    c.family = "imagenet"
    c.variant = "imagenet_tiny" if tiny else ("imagenet_random" if random else "imagenet")
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.biggan = "random" if random else ""   # `cgn-jax port biggan` dir, or "random"
    c.model.u2net = "random" if random else ""    # `cgn-jax port u2net` dir, or "random"
    c.model.u2net_variant = "u2netp" if tiny else "u2net"
    # BigGAN architecture for model.biggan="random" (a converted checkpoint brings its own)
    c.model.arch = ml_collections.ConfigDict(TINY_ARCH if tiny else dict(output_dim=256))
    c.model.truncation = 1.0                      # official train_cgn.py --truncation default
    c.model.remat = "remat" in options            # recompute BigGAN blocks / U2-Net in the backward pass
    # mechanisms' spectral norm: "folded" (1/sigma folded into the weights, Adam on those) or
    # "power_iteration" (the official train mode: W_orig / sigma, one power iteration per step)
    c.model.spectral_norm = "power_iteration" if "sn_power" in options else "folded"

    c.loss = ml_collections.ConfigDict()
    c.loss.l1 = L1
    c.loss.perc_style = PERC_STYLE
    c.loss.perc_content = (0.0, 0.0, 0.0, 0.0)
    c.loss.binary = BINARY
    c.loss.mask = MASK
    c.loss.mask_interval = (0.1, 0.9)
    c.loss.text_style = TEXT_STYLE
    c.loss.bg = BG
    c.loss.text_patch = 15                        # PercLossText: 15x15 patches ...
    c.loss.text_top = 100                         # ... from the 100 best windows ...
    c.loss.text_grid = 6                          # ... in a 6x6 grid ...
    c.loss.text_work_size = 128                   # ... cut at 128x128
    c.loss.vgg_weights = "random" if random else ""  # converted VGG16 dir; "" = cache; "random" = random

    c.optim = ml_collections.ConfigDict()
    c.optim.lr_shape = LR_SHAPE
    c.optim.lr_texture = LR_TEXTURE
    c.optim.lr_background = LR_BACKGROUND
    c.optim.b1 = 0.9                              # torch.optim.Adam defaults (utils.Optimizers)
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.per_device_batch = 2 if tiny else 1
    c.train.effective_batch = 4 if tiny else 4000  # examples per optimizer update (official 1 x 4000)
    c.train.num_steps = 3 if tiny else 300         # optimizer updates (official --episodes)
    c.train.log_every = 1                          # in optimizer updates
    c.train.sample_every = 1                       # official: every 4000 iterations = every update
    c.train.checkpoint_every = 1 if tiny else 5
    c.train.keep_checkpoints = 3
    c.train.compute_dtype = "bfloat16" if "bf16" in options else "float32"
    c.train.transfer_guard = "disallow"            # implicit host<->device copies in the step are errors
    c.train.sample_classes = (15, 251, 330, 382, 385, 483, 559, 751, 938, 947, 999)

    c.generate = ml_collections.ConfigDict()
    c.generate.batch_size = 8 if tiny else 32
    c.generate.num_images = 16 if tiny else 1000
    c.generate.mode = "random"                     # random | best_classes | fixed_classes
    c.generate.classes = (0, 0, 0)                 # shape, texture, background for fixed_classes
    c.generate.midpoints = 6
    c.generate.jpeg_quality = 95
    return c
