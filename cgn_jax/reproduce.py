"""`cgn-jax reproduce`: the paper's MNIST experiments end to end, as one resumable command.

It trains a CGN per variant, reruns Table 1 with the official CGNs and with the CGNs it
trained, and merges everything into one Markdown table. Each piece is an ordinary
`cgn-jax` command (printed, logged to its own file), so any of them can be rerun or
debugged alone. Why a scheduler rather than a shell loop:
- the pieces form a small graph (the Table 1 rows of a trained CGN need that CGN, every
  row needs the data bundles), and the independent ones run side by side: MNIST models
  are far too small to fill a GPU, so several processes on one GPU finish sooner than one
  after another (each gets an equal share of GPU memory);
- every piece resumes on its own (`cgn-jax train` from its checkpoint, `cgn-jax table1`
  from stored seeds and its epoch checkpoints), so re-running the same command after a
  preemption or a time limit continues where it stopped, and finished pieces are skipped;
- a SIGTERM reaches every running piece, which checkpoints, and the command exits 143.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from cgn_jax.data import palettes

TABLE1_METHODS = ("original", "irm2", "irm5", "original+gan", "original+cgn", "cgn_official")
GENERATOR_METHODS = ("original+gan", "original+cgn", "cgn_official")
# where a class's mask turned inside out under the official recipe in runs here (docs/results.md)
FRAME_PRIOR_DEFAULT = (palettes.COLORED, palettes.WILDLIFE)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/reproduce", help="everything goes here (re-run to resume)")
    parser.add_argument("--variants", nargs="+", default=list(palettes.VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="classifier seeds per Table 1 row")
    parser.add_argument("--methods", nargs="+", default=list(TABLE1_METHODS), help="Table 1 rows")
    parser.add_argument("--parallel", type=int, default=0,
                        help="pieces run at once (default: 3 on an accelerator, where they share its memory "
                             "equally; 2 on a CPU, where two processes use the cores better than one)")
    parser.add_argument("--frame-prior", nargs="*", metavar="VARIANT", default=None,
                        help="train these variants' CGNs with loss.mask_frame=1.0 (default with no names: colored "
                             "and wildlife, where the official recipe turned masks inside out here); keeps masks "
                             "the right way round; not in the official recipe, see docs/results.md")
    parser.add_argument("--skip", nargs="+", default=[], choices=("official", "train", "ours"),
                        help="leave out a stage: Table 1 with the official CGNs, CGN training, "
                             "Table 1 with the trained CGNs")
    parser.add_argument("--data", default="", help="existing directory of Table 1 bundles (VARIANT.npz); "
                                                   "default: export them into OUT/data")
    parser.add_argument("--train-steps", type=int, default=0, help="CGN training steps (default: the config's "
                                                                    "15 epochs; small values for smoke tests)")
    parser.add_argument("--epochs", type=int, default=10, help="classifier epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="classifier epoch length (smoke tests)")
    parser.add_argument("--limit", type=int, default=0, help="first N training examples in the bundles (smoke tests)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test examples in the bundles")
    parser.add_argument("--dry-run", action="store_true", help="print the pieces and their commands; run nothing")
    # `--config.x=y` arguments (collected by cgn_jax.cli) go to every `cgn-jax train` piece


@dataclasses.dataclass
class Job:
    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    state: str = "waiting"  # waiting, running, done, failed, skipped, stopped
    started: float = 0.0


def plan(args, out: Path) -> list[Job]:
    """The pieces and what each waits for."""
    cli = [sys.executable, "-m", "cgn_jax.cli"]
    data = Path(args.data) if args.data else out / "data"
    quick = []
    if args.steps_per_epoch:
        quick += ["--steps-per-epoch", str(args.steps_per_epoch)]
    t1 = [*cli, "table1", "--data", str(data), "--seeds", *map(str, args.seeds), "--epochs", str(args.epochs),
          *quick, "--no-progress", "--jax-cache", str(out / "jax_cache")]
    jobs = []
    if not args.data and not all((data / f"{v}.npz").is_file() for v in args.variants):
        limits = [f for k, v in (("--limit", args.limit), ("--test-limit", args.test_limit)) if v
                  for f in (k, str(v))]
        jobs.append(Job("data", [*cli, "table1", "--export-data", str(data), "--variants", *args.variants,
                                 "--methods", *args.methods, *limits]))
    needs_data = ("data",) if jobs else ()
    workdirs = {v: out / "cgn" / v for v in args.variants}
    # listed (and so started) in this order: CGN training is the longest chain, so it goes first
    if "train" not in args.skip:
        for variant in args.variants:
            train = [*cli, "train", f"--config=configs/mnist.py:{variant}", f"--workdir={workdirs[variant]}",
                     "--no-progress"]
            if args.train_steps:
                train.append(f"--config.train.num_steps={args.train_steps}")
            if variant in args.frame_prior:
                train.append("--config.loss.mask_frame=1.0")
            jobs.append(Job(f"train:{variant}", train + list(getattr(args, "config_overrides", []) or [])))
    if "official" not in args.skip:
        for variant in args.variants:
            jobs.append(Job(f"official:{variant}", [*t1, "--variants", variant, "--methods", *args.methods,
                                                    "--out", str(out / "table1" / f"official_{variant}.md")],
                            needs_data))
    ours = [m for m in args.methods if m in GENERATOR_METHODS]
    if "ours" not in args.skip and ours:
        for variant in args.variants:
            jobs.append(Job(f"ours:{variant}", [*t1, "--variants", variant, "--methods", *ours,
                                                "--generator", f"{variant}={workdirs[variant]}", "--tag", "cgn-jax",
                                                "--out", str(out / "table1" / f"ours_{variant}.md")],
                            needs_data + ((f"train:{variant}",) if "train" not in args.skip else ())))
    return jobs


def _log_path(out: Path, job: Job) -> Path:
    return out / "logs" / (job.name.replace(":", "_") + ".log")


def _merge(out: Path) -> int:
    """All pieces' Table 1 rows (finished seeds only) in one table: OUT/table1.md and .json."""
    from cgn_jax.cli import main

    parts = sorted((out / "table1").glob("*.json"))
    if not parts:
        return 0
    return main(["table1", "--merge", *map(str, parts), "--out", str(out / "table1.md")])


def run(args) -> int:
    from cgn_jax.cli import CLIError

    try:
        args.variants = [palettes.canonical_variant(v) for v in args.variants]
    except ValueError as e:
        raise CLIError(str(e)) from e
    try:
        if args.frame_prior is None:
            args.frame_prior = []
        else:
            args.frame_prior = [palettes.canonical_variant(v) for v in args.frame_prior] or list(FRAME_PRIOR_DEFAULT)
    except ValueError as e:
        raise CLIError(f"--frame-prior: {e}") from e
    bad = [m for m in args.methods if m not in TABLE1_METHODS]
    if bad:
        raise CLIError(f"unknown Table 1 method(s) {', '.join(bad)}; valid: {', '.join(TABLE1_METHODS)}")
    if args.parallel < 0:
        raise CLIError(f"--parallel must be at least 1 (or 0 for the default), got {args.parallel}")
    if not args.parallel:
        import jax

        args.parallel = 2 if jax.default_backend() == "cpu" else 3
    if args.data and not Path(args.data).is_dir():
        raise CLIError(f"--data {args.data}: no such directory (leave --data out to export the bundles)")
    out = Path(args.out)
    jobs = plan(args, out)
    if args.dry_run:
        for job in jobs:
            after = f"   (after {', '.join(job.needs)})" if job.needs else ""
            print(f"# {job.name}{after}\n{shlex.join(job.argv)}")
        print(f"# then: merge {out}/table1/*.json into {out}/table1.md")
        return 0

    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.parallel > 1:  # accelerators: an equal share of memory each instead of 75% for the first
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.parallel:.2f}")
    by_name = {j.name: j for j in jobs}
    received: list[int] = []

    def on_signal(signum, frame):
        received.append(signum)
        for job in jobs:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            for job in jobs:
                if job.state == "running" and job.proc.poll() is not None:
                    rc = job.proc.returncode
                    job.state = "done" if rc == 0 else ("stopped" if received else "failed")
                    took = time.time() - job.started
                    print(f"reproduce: {job.name}: {job.state} (exit {rc}, {took / 60:.1f} min; "
                          f"log {_log_path(out, job)})", file=sys.stderr)
            for job in jobs:
                if job.state == "waiting" and any(by_name[n].state in ("failed", "skipped", "stopped")
                                                  for n in job.needs if n in by_name):
                    job.state = "skipped"
            running = sum(j.state == "running" for j in jobs)
            for job in jobs:
                if received or running >= args.parallel:
                    break
                if job.state == "waiting" and all(by_name[n].state == "done" for n in job.needs if n in by_name):
                    log = _log_path(out, job).open("a")
                    log.write(f"\n$ {shlex.join(job.argv)}\n")
                    log.flush()
                    job.proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)  # a terminal's Ctrl-C goes through us
                    job.state, job.started = "running", time.time()
                    running += 1
                    print(f"reproduce: {job.name}: started (log {_log_path(out, job)})", file=sys.stderr)
            if not any(j.state in ("running", "waiting") for j in jobs) or (received and not running):
                break
            time.sleep(1.0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    _merge(out)
    failed = [j for j in jobs if j.state in ("failed", "skipped")]
    for job in failed:
        print(f"reproduce: {job.name} {job.state}" + (f": see {_log_path(out, job)}" if job.state == "failed" else
                                                      f" (it needs {', '.join(job.needs)})"), file=sys.stderr)
    if received:
        print("reproduce: stopped; every piece wrote its checkpoint. Re-run the same command to continue.",
              file=sys.stderr)
        return 128 + received[0]
    if failed:
        return 1
    print(f"reproduce: done; Table 1 in {out / 'table1.md'}", file=sys.stderr)
    return 0
