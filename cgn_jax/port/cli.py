"""`cgn-jax port MODEL --src FILE --dst DIR`: convert a PyTorch checkpoint to Orbax once."""

from __future__ import annotations

import importlib

from cgn_jax.cli import CLIError

# model -> module with `convert(src, dst, **options) -> Path` and `DEFAULT_SRC_HELP`
PORTERS = {
    "mnist": "cgn_jax.port.mnist",
    "vgg16": "cgn_jax.port.vgg16",
    "biggan": "cgn_jax.port.biggan",
    "u2net": "cgn_jax.port.u2net",
    "resnet50": "cgn_jax.port.resnet50",
}


def add_arguments(parser):
    parser.add_argument("model", choices=sorted(PORTERS), help="which network the checkpoint holds")
    parser.add_argument("--src", help="the PyTorch checkpoint (.pth/.bin/.ckpt); some models have a default")
    parser.add_argument("--dst", required=True, help="output directory for the Orbax checkpoint")
    parser.add_argument("--variant", default=None, help="model variant where relevant (e.g. u2net|u2netp, biggan resolution)")


def run(args):
    module = importlib.import_module(PORTERS[args.model])
    try:
        dst = module.convert(args.src, args.dst, variant=args.variant)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e
    print(f"wrote {dst}")
    return 0
