#!/usr/bin/env bash
# Train TADSR on every worker of a Cloud TPU VM slice (v4-32, v5p-64, ...).
#
# The same `python launch/train.py` command runs on all workers at once (gcloud ... ssh --worker=all);
# tadsr_jax.parallel.initialize() detects the TPU slice by itself, so no multi-host flags are needed.
# Rerunning the command resumes from the latest checkpoint in the workdir. Use a gs:// workdir so that
# every worker sees the same checkpoints.
#
# Usage:
#   launch/tpu_vm.sh --tpu=NAME --zone=ZONE [--project=PROJECT] [--copy] [--setup] [--detach] \
#       [--remote_dir=~/tadsr-jax] -- --config=configs/tadsr_sd21.py --workdir=gs://BUCKET/run [--config.KEY=VALUE ...]
#
# Options (before `--`; everything after `--` is passed to launch/train.py unchanged):
#   --tpu=NAME         TPU VM name (or $TPU_NAME)
#   --zone=ZONE        its zone (or $ZONE)
#   --project=PROJECT  gcloud project (default: gcloud's configured one)
#   --copy             copy this working tree (without .git and caches) to --remote_dir on every worker first
#   --setup            install jax[tpu] and this package (with the [train] extras) on every worker first
#   --detach           run in the background on the workers (survives a lost ssh connection); the log
#                      goes to <remote_dir>/train.log on each worker
#   --remote_dir=DIR   the checkout on the workers (default: ~/tadsr-jax)
#
# Example (first time):
#   launch/tpu_vm.sh --tpu=tadsr-v4-32 --zone=us-central2-b --copy --setup -- \
#       --config=configs/tadsr_sd21.py --workdir=gs://my-bucket/tadsr_sd21 --config.model.pretrained=gs://...
set -euo pipefail

TPU="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT=""
COPY=0
SETUP=0
DETACH=0
REMOTE_DIR="~/tadsr-jax"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

while (($#)); do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --copy) COPY=1 ;;
    --setup) SETUP=1 ;;
    --detach) DETACH=1 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option '$1' (train.py flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

[[ -n "$TPU" ]] || { echo "tpu_vm.sh: --tpu=NAME (or \$TPU_NAME) is required" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "tpu_vm.sh: --zone=ZONE (or \$ZONE) is required" >&2; exit 2; }
(($#)) || { echo "tpu_vm.sh: give the train.py flags after --, e.g. -- --config=... --workdir=gs://..." >&2; exit 2; }

GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && TARGET+=(--project="$PROJECT")

on_all_workers() { "${GCLOUD[@]}" ssh "$TPU" "${TARGET[@]}" --command "$1"; }

if ((COPY)); then
  REPO="$(cd "$(dirname "$0")/.." && pwd)"
  ARCHIVE_DIR="$(mktemp -d)"
  trap 'rm -rf "$ARCHIVE_DIR"' EXIT
  ARCHIVE="$ARCHIVE_DIR/tadsr-jax.tar.gz"
  tar -C "$REPO" --exclude=.git --exclude='__pycache__' --exclude='*.egg-info' --exclude='.pytest_cache' \
      -czf "$ARCHIVE" .
  "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU":/tmp/tadsr-jax.tar.gz "${TARGET[@]}"
  on_all_workers "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/tadsr-jax.tar.gz"
fi

if ((SETUP)); then
  on_all_workers "cd $REMOTE_DIR && python3 -m pip install -U 'jax[tpu]' && python3 -m pip install -e '.[train]'"
fi

# The train.py flags, quoted for the remote shell.
TRAIN_ARGS="$(printf ' %q' "$@")"
if ((DETACH)); then
  on_all_workers "cd $REMOTE_DIR && nohup python3 launch/train.py$TRAIN_ARGS > train.log 2>&1 < /dev/null &"
else
  on_all_workers "cd $REMOTE_DIR && python3 launch/train.py$TRAIN_ARGS"
fi
