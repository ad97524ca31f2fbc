"""The CGN ImageNet classifier ensemble: a ResNet-50 backbone with shape, texture and background heads.

    cgn-jax train-classifier --config=configs/imagenet_classifier.py --workdir=runs/in_ensemble \
        --config.model.pretrained=weights/resnet50 --config.data.train=/data/imagenet/train \
        --config.data.val=/data/imagenet/val --config.data.counterfactual=/data/cgn_cf

Variants (`--config=configs/imagenet_classifier.py:<variant>`):
  (none)    the official recipe: pretrained backbone with frozen BatchNorm statistics,
            SGD lr 1e-3 (momentum 0.9, weight decay 1e-4, x0.1 every 15 epochs), 32 real +
            32 counterfactual images per device, 45 epochs
  scratch   the same ensemble trained from random init, BatchNorm statistics trained and
            synced over all devices; lr 0.1 (torchvision's recipe for 256 images)
  baseline  no counterfactuals: real images only (the shape head alone learns)
  tiny      a reduced network (ResNet-50 layout, widths /16, one block per stage) on 32x32
            crops, for smoke tests on a CPU
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.family = "imagenet_classifier"
    c.task = "imagenet_classifier"
    c.variant = variant or "official"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.arch = "resnet50"          # resnet18/34/50/101/152 (torchvision layouts)
    c.model.stage_sizes = ()           # overrides the arch's blocks per stage when non-empty
    c.model.width = 64                 # channels of the stem; 64 is the real network
    c.model.num_classes = 1000
    c.model.dtype = "float32"          # compute dtype: float32 or bfloat16 (params stay float32)
    c.model.pretrained = ""            # directory written by `cgn-jax port resnet50` ("" = random init)
    c.model.freeze_bn_stats = True     # official: BatchNorm in eval mode during training (needs model.pretrained)
    c.model.ensemble = "mean_probs"    # how heads combine: mean_probs, or mean_logits (official code)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""                  # ImageFolder dir (root/<wnid>/*.JPEG) or "tfds" / "tfds:DATA_DIR"
    c.data.val = ""                    # same, for the validation split ("" = no ImageNet eval)
    c.data.tfds_data_dir = ""          # TFDS data_dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.tfds_manual_dir = ""        # where ILSVRC2012_img_{train,val}.tar are ("" = <data_dir>/downloads/manual)
    c.data.counterfactual = ""         # counterfactual dataset (labels.csv + ims/, or train*/ val*/ of those)
    c.data.cf_image_suffix = "_x_gen.jpg"
    c.data.cf_ratio = 1.0              # counterfactual images per real image in a batch
    c.data.image_size = 224
    c.data.resize_size = 256           # eval: short side, then center crop image_size
    c.data.min_crop_scale = 0.08
    c.data.draft_decode = True         # training: decode JPEGs at reduced scale when the crop allows
    c.data.num_threads = 16            # decode threads per process (PIL holds the GIL part of the time)
    c.data.num_workers = 0             # decode processes per stream (real, counterfactual); 0: threads only
    c.data.prefetch = 0                # decoded examples buffered (0: 2 batches)

    c.train = ml_collections.ConfigDict()
    c.train.per_device_batch_size = 32  # real images per device; counterfactuals add cf_ratio times as many
    c.train.epochs = 45
    c.train.num_steps = 0              # > 0 overrides epochs
    c.train.optimizer = "sgd"          # sgd or adam
    c.train.lr = 1e-3
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.lr_decay_epochs = 15       # lr *= lr_decay_factor every this many epochs (0: constant)
    c.train.lr_decay_factor = 0.1
    # which prediction learns from real images: "shape_head" (the shape head only; texture and
    # background heads see counterfactuals only) or "mean_logits" (the official code: the
    # average of all three heads' logits)
    c.train.real_target = "shape_head"
    c.train.log_every = 100
    c.train.checkpoint_every = 2000    # steps; a checkpoint is also written at the end of every epoch
    c.train.keep_checkpoints = 3
    c.train.eval_every_epochs = 1      # 0: no evaluation during training
    c.train.tensorboard = True

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64             # per device
    c.eval.shape_bias_dir = ""         # cue-conflict stimuli (<category>/<shape>N-<texture>M.png)
    c.eval.in9_dir = ""                # ImageNet-9 root with original/ mixed_same/ mixed_rand/
    c.eval.max_batches = 0             # > 0: evaluate only this many batches per dataset (smoke runs)

    if variant in ("", "official"):
        pass
    elif variant == "scratch":
        c.model.freeze_bn_stats = False
        c.train.lr = 0.1
        c.train.lr_decay_epochs = 30
        c.train.epochs = 90
    elif variant == "baseline":
        c.data.cf_ratio = 0.0
    elif variant == "tiny":
        c.model.width = 4
        c.model.stage_sizes = (1, 1, 1, 1)
        c.model.freeze_bn_stats = False
        c.data.image_size = 32
        c.data.resize_size = 36
        c.data.num_threads = 2
        c.train.per_device_batch_size = 8
        c.train.epochs = 1
        c.train.lr = 0.01
        c.train.log_every = 1
        c.train.checkpoint_every = 0
        c.train.tensorboard = False
        c.eval.batch_size = 8
    else:
        raise ValueError(f"unknown imagenet_classifier variant {variant!r}; use official, scratch, baseline or tiny")
    return c
