"""The `cgn-jax` command: a thin dispatcher.

Each sub-command lives in its own module exposing `add_arguments(parser)` and
`run(args)`; modules are imported only when their command runs, so `--help`
stays fast and a broken optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("cgn_jax.train.cli", "train a CGN (MNIST variants or ImageNet)"),
    "generate": ("cgn_jax.generate", "sample sheets and counterfactual datasets from a trained CGN"),
    "port": ("cgn_jax.port.cli", "convert PyTorch checkpoints (mnist, vgg16, biggan, u2net, resnet50) to Orbax"),
    "bench": ("cgn_jax.bench", "time the real train step of a config"),
    "train-classifier": ("cgn_jax.classifier_cli", "train an invariant classifier"),
    "table1": ("cgn_jax.table1", "rerun the paper's Table 1 (MNIST classifiers)"),
    "reproduce": ("cgn_jax.reproduce", "the paper's MNIST experiments end to end: CGNs, then Table 1 (resumable)"),
    "evaluate": ("cgn_jax.evaluate", "ImageNet top-1/5, shape bias (cue-conflict), BG-gap (ImageNet-9)"),
}


class CLIError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgn-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"cgn-jax {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args, unknown = parser.parse_known_args(rest)
    # `--config.a.b=value` overrides are collected here for commands that take a config.
    overrides = [u for u in unknown if u.startswith("--config.")]
    stray = [u for u in unknown if not u.startswith("--config.")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.config_overrides = overrides
    try:
        return int(module.run(args) or 0)
    except CLIError as e:
        _drop_reports_from_abandoned_reads()
        print(f"cgn-jax {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cgn-jax {name}: interrupted", file=sys.stderr)
        return 130


def _drop_reports_from_abandoned_reads() -> None:
    """Keep the error message the last thing the user reads.

    When Orbax fails on a corrupt checkpoint it closes its event loop while other TensorStore reads
    are still in flight; those finish on their own threads and each prints a traceback saying the
    loop is closed. The process is ending with the real error anyway, so exactly those reports are
    dropped; every other unraisable exception still reaches the previous hook.
    """
    previous = sys.unraisablehook

    def hook(report):
        if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
            return
        previous(report)

    sys.unraisablehook = hook


if __name__ == "__main__":
    # `python -m cgn_jax.cli`: run the imported module's main so that commands raising
    # cgn_jax.cli.CLIError are caught (this file is also loaded as __main__).
    from cgn_jax.cli import main as _main

    sys.exit(_main())
