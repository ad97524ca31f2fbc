#!/usr/bin/env bash
# Train cgn-jax on a Cloud TPU VM or pod slice: create it, install cgn-jax with jax[tpu] on
# every worker, run `cgn-jax train` on all workers at once, and keep the run directory in
# a bucket so a preempted or deleted VM can resume. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --bucket gs://BUCKET/PATH [options] [-- TRAIN_ARGS...]

Creates a Cloud TPU VM (or pod slice), installs cgn-jax with jax[tpu] on every worker,
and runs `cgn-jax train` on all workers (--worker=all). Each worker trains in
~/runs/RUN; worker 0 uploads it to BUCKET/runs/RUN every --sync-every seconds and at the
end, and every worker first downloads BUCKET/runs/RUN, so re-running resumes.

Required:
  --name NAME            TPU VM name
  --zone ZONE            zone, e.g. us-central2-b (v4), us-west4-a (v5e)
  --bucket URI           gs://bucket/prefix (or a directory mounted on every worker) for checkpoints

Options:
  --project PROJECT      gcloud project (default: gcloud's configured project)
  --accelerator-type T   TPU type (default v4-8; pod slices such as v4-32 have several workers)
  --version V            TPU software version (default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite,
                         v6e: v2-alpha-tpuv6e)
  --spot                 create a Spot TPU VM
  --config SPEC          config PATH:ARG (default configs/mnist.py:colored)
  --run NAME             run name (default: the config argument, e.g. colored)
  --data URI             a copy of shared/ (gs:// or mounted path) synced to ~/shared on every worker and
                         used as CGN_JAX_SHARED (MNIST IDX files, textures); without it colored MNIST
                         falls back to TFDS's `mnist` download
  --src DIR              cgn-jax source to copy and install (default: this checkout)
  --pip SPEC             install cgn-jax from this pip spec instead of --src (e.g. git+https://...)
  --jax-version V        pin jax[tpu]==V (default: latest)
  --sync-every SECONDS   upload interval during training (default 600)
  --skip-create          the TPU VM exists already
  --skip-install         cgn-jax is installed on the workers already
  --delete               delete the TPU VM when training ends
  --dry-run              print the commands instead of running them
  -h, --help             this help

Arguments after `--` go to `cgn-jax train`, e.g. -- --config.train.batch_size=128
(the global batch must split over all TPU devices of the slice).
EOF
}

NAME="" ZONE="" PROJECT="" ACCEL="v4-8" VERSION="tpu-ubuntu2204-base" SPOT=0
CONFIG="configs/mnist.py:colored" RUN="" BUCKET="" DATA="" PIP_SPEC="" JAX_VERSION=""
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SYNC_EVERY=600 SKIP_CREATE=0 SKIP_INSTALL=0 DELETE=0 DRY_RUN=0
TRAIN_ARGS=()

die() { echo "tpu_vm.sh: error: $*" >&2; echo "run launch/tpu_vm.sh --help for the options" >&2; exit 2; }
need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --zone) need "$@"; ZONE="$2"; shift 2 ;;
    --project) need "$@"; PROJECT="$2"; shift 2 ;;
    --accelerator-type) need "$@"; ACCEL="$2"; shift 2 ;;
    --version) need "$@"; VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --run) need "$@"; RUN="$2"; shift 2 ;;
    --bucket) need "$@"; BUCKET="${2%/}"; shift 2 ;;
    --data) need "$@"; DATA="${2%/}"; shift 2 ;;
    --src) need "$@"; SRC="$2"; shift 2 ;;
    --pip) need "$@"; PIP_SPEC="$2"; shift 2 ;;
    --jax-version) need "$@"; JAX_VERSION="$2"; shift 2 ;;
    --sync-every) need "$@"; SYNC_EVERY="$2"; shift 2 ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
done

[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ -n "$BUCKET" ]] || die "--bucket is required (gs://BUCKET/PATH or a directory mounted on every worker)"
[[ "$SYNC_EVERY" =~ ^[0-9]+$ ]] || die "--sync-every must be a number of seconds"
if [[ -z "$RUN" ]]; then RUN="${CONFIG##*:}"; [[ "$RUN" != "$CONFIG" ]] || RUN="run"; fi
# These end up unquoted in remote commands (next to $HOME), so keep them to plain characters.
SAFE='^[A-Za-z0-9_./:@%+=,-]+$'
[[ "$RUN" =~ $SAFE ]] || die "--run '$RUN' may only contain letters, digits and _./:@%+=,-"
[[ "$BUCKET" =~ $SAFE ]] || die "--bucket '$BUCKET' may only contain letters, digits and _./:@%+=,-"
[[ -z "$DATA" || "$DATA" =~ $SAFE ]] || die "--data '$DATA' may only contain letters, digits and _./:@%+=,-"

# Print a command so that it can be pasted into a shell (quotes only where needed).
show() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
run() { if [[ $DRY_RUN == 1 ]]; then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi; }

# A shell-quoted word for the remote commands: as is when plain, in double quotes when that
# is safe (e.g. "jax[tpu]"), else printf %q.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  elif [[ "$1" != *[\\\"\$\`\!]* ]]; then printf '"%s"' "$1"
  else printf '%q' "$1"; fi
}

# `sync SRC DST` as a remote command: gcloud storage for gs://, rsync for a mounted path.
# (Arguments are checked plain paths or $HOME/..., expanded on the worker.)
sync_cmd() {
  if [[ "$1" == gs://* || "$2" == gs://* ]]; then
    echo "gcloud storage rsync --recursive $1 $2"
  else
    echo "mkdir -p $2 && rsync -a $1/ $2/"
  fi
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && WHERE+=(--project="$PROJECT")
ssh_all() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

REMOTE_RUN='$HOME/runs/'"$RUN"
REMOTE_BUCKET="$BUCKET/runs/$RUN"
JAX_SPEC="jax[tpu]${JAX_VERSION:+==$JAX_VERSION}"

# 1. the TPU VM (all workers of a pod slice come with it)
if [[ $SKIP_CREATE == 0 ]]; then
  CREATE=(create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  [[ $SPOT == 1 ]] && CREATE+=(--spot)
  run "${GCLOUD[@]}" "${CREATE[@]}"
fi

# 2. cgn-jax with jax[tpu] on every worker
if [[ $SKIP_INSTALL == 0 ]]; then
  if [[ -n "$PIP_SPEC" ]]; then
    ssh_all "python3 -m pip install -U $(q "$JAX_SPEC") $(q "$PIP_SPEC")"
  else
    [[ $DRY_RUN == 1 || -f "$SRC/setup.cfg" ]] || die "--src $SRC is not a cgn-jax checkout (no setup.cfg)"
    TARBALL="${TMPDIR:-/tmp}/cgn-jax-src-$NAME.tar.gz"
    run tar -czf "$TARBALL" -C "$SRC" --exclude=.git --exclude=runs --exclude=build --exclude='*.egg-info' \
      --exclude=__pycache__ --exclude=.venv .
    run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:cgn-jax-src.tar.gz" "${WHERE[@]}" --worker=all
    ssh_all "set -e; rm -rf \$HOME/cgn-jax && mkdir -p \$HOME/cgn-jax && tar -xzf \$HOME/cgn-jax-src.tar.gz -C \$HOME/cgn-jax && python3 -m pip install -U $(q "$JAX_SPEC") \$HOME/cgn-jax"
  fi
fi

# 3. data and the previous state of this run, on every worker
ENV_SHARED=""
if [[ -n "$DATA" ]]; then
  ssh_all "$(sync_cmd "$DATA" '$HOME/shared')"
  ENV_SHARED='export CGN_JAX_SHARED=$HOME/shared; '
fi
ssh_all "mkdir -p $REMOTE_RUN && ($(sync_cmd "$REMOTE_BUCKET" "$REMOTE_RUN") || echo \"no previous run in $REMOTE_BUCKET\")"

# 4. train on all workers; worker 0 (the JAX process 0) uploads the run directory
ARGS=""
for a in "${TRAIN_ARGS[@]}"; do ARGS+=" $(q "$a")"; done
UPLOAD="$(sync_cmd "$REMOTE_RUN" "$REMOTE_BUCKET")"
TRAIN="set -uo pipefail; ${ENV_SHARED}cd \$HOME/cgn-jax 2>/dev/null || cd \$HOME; "
TRAIN+="W=\$(curl -s -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0); "
TRAIN+="if [ \"\$W\" = 0 ]; then (while sleep $SYNC_EVERY; do $UPLOAD; done) & SYNC=\$!; fi; "
TRAIN+="python3 -m cgn_jax.distributed train --config=$(q "$CONFIG") --workdir=$REMOTE_RUN --no-progress$ARGS 2>&1 | tee -a $REMOTE_RUN/train_worker\$W.log; "
TRAIN+="S=\${PIPESTATUS[0]}; if [ \"\$W\" = 0 ]; then kill \$SYNC; $UPLOAD; fi; exit \$S"
ssh_all "$TRAIN"

# 5. optionally give the TPU back
if [[ $DELETE == 1 ]]; then
  run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
fi
