#!/usr/bin/env bash
# Train (or benchmark) cgn-jax on all GPUs of one machine: one process, pmap over the local
# GPUs. `python -m cgn_jax.distributed` is the same entry point the multi-host launchers use;
# on one machine it only runs the `cgn-jax` command. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multi_gpu.sh [options] [-- ARGS...]

Runs `cgn-jax train` (or `cgn-jax bench` with --bench) in one process on all local GPUs,
or on the GPUs listed with --gpus. The global batch is split over them.

Options:
  --config SPEC      config PATH:ARG (default configs/mnist.py:colored)
  --workdir DIR      run directory (default runs/<config argument>); re-running resumes
  --gpus LIST        GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --shared DIR       the shared/ data directory (sets CGN_JAX_SHARED)
  --install          first pip install jax[cuda12] and this checkout into --python's environment
  --jax-version V    pin jax[cuda12]==V with --install
  --python PY        interpreter (default python3)
  --bench            run `cgn-jax bench` on the config instead of training
  --dry-run          print the commands instead of running them
  -h, --help         this help

Arguments after `--` go to `cgn-jax train` (or `cgn-jax bench`), e.g.
  -- --config.train.batch_size=64           (training)
  -- --batch 64 --steps 50 --dtype bfloat16 (with --bench)
EOF
}

CONFIG="configs/mnist.py:colored" WORKDIR="" GPUS="" SHARED="" INSTALL=0 JAX_VERSION="" PY=python3
BENCH=0 DRY_RUN=0
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRA=()

die() { echo "local_multi_gpu.sh: error: $*" >&2; echo "run launch/local_multi_gpu.sh --help for the options" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need "$@"; WORKDIR="$2"; shift 2 ;;
    --gpus) need "$@"; GPUS="$2"; shift 2 ;;
    --shared) need "$@"; SHARED="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --jax-version) need "$@"; JAX_VERSION="$2"; shift 2 ;;
    --python) need "$@"; PY="$2"; shift 2 ;;
    --bench) BENCH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done

[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be a comma-separated list of GPU indices, got '$GPUS'"
if [[ -z "$WORKDIR" ]]; then RUN="${CONFIG##*:}"; [[ "$RUN" != "$CONFIG" ]] || RUN="run"; WORKDIR="runs/$RUN"; fi

show() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
run() { if [[ $DRY_RUN == 1 ]]; then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi; }

if [[ $INSTALL == 1 ]]; then
  run "$PY" -m pip install -U "jax[cuda12]${JAX_VERSION:+==$JAX_VERSION}" "$SRC"
fi

ENVS=(env)
[[ -n "$GPUS" ]] && ENVS+=(CUDA_VISIBLE_DEVICES="$GPUS")
[[ -n "$SHARED" ]] && ENVS+=(CGN_JAX_SHARED="$SHARED")
if [[ $BENCH == 1 ]]; then
  run "${ENVS[@]}" "$PY" -m cgn_jax.distributed bench --config="$CONFIG" "${EXTRA[@]}"
else
  run "${ENVS[@]}" "$PY" -m cgn_jax.distributed train --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]}"
fi
