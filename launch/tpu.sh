#!/usr/bin/env bash
# Run one snapjax command on every worker of a Cloud TPU VM slice:
#   create the slice, copy this source tree, install, run the same command on all workers
#   (each calls jax.distributed.initialize()), stream their logs, delete the slice.
#
#   TPU_NAME=sd15-v ACCELERATOR_TYPE=v5p-64 ZONE=us-east5-a \
#     bash launch/tpu.sh snapjax train --config configs/sd15_finetune.py \
#       --workdir gs://my-bucket/runs/sd15_v
#
# The workdir must be shared by all workers (a gs:// bucket), so that checkpoints written by
# all hosts land in one place and a restarted slice resumes from them.
#
# Every knob is an environment variable (default in brackets):
#   TPU_NAME          slice name                                  [snapjax-$USER]
#   ZONE              GCP zone                                    [us-central2-b]
#   PROJECT           GCP project                                 [gcloud's default]
#   ACCELERATOR_TYPE  slice type, e.g. v4-32, v5litepod-16, v5p-64, v6e-16   [v4-32]
#   RUNTIME_VERSION   TPU VM image                                [tpu-ubuntu2204-base]
#   SPOT              1: a spot (preemptible) slice; snapjax saves on SIGTERM   [0]
#   CREATE            0: reuse an existing slice named TPU_NAME   [1]
#   INSTALL           0: skip copying the tree and pip install    [1]
#   DELETE            never | always | success: when to delete the slice at the end  [always]
#   REMOTE_DIR        where the tree goes on each worker          [snapjax]
#   JAX_PIP           how to install JAX for TPU                  ["jax[tpu]"]
#   PIP_PACKAGES      the training dependencies (torch/coremltools are for export only)
#                     [flax optax orbax-checkpoint ml_collections grain array-record
#                      transformers tokenizers safetensors pillow tqdm tensorboardX gcsfs]
#   RUN_ENV           extra "K=V K2=V2" for the command           []
#   LOG_DIR           where the streamed log is kept locally      [logs/$TPU_NAME]
#   DRY_RUN           1: print the gcloud commands instead of running them   [0]
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi

TPU_NAME="${TPU_NAME:-snapjax-${USER:-user}}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"
CREATE="${CREATE:-1}"
INSTALL="${INSTALL:-1}"
DELETE="${DELETE:-always}"
REMOTE_DIR="${REMOTE_DIR:-snapjax}"
JAX_PIP="${JAX_PIP:-jax[tpu]}"
PIP_PACKAGES="${PIP_PACKAGES:-flax optax orbax-checkpoint ml_collections grain array-record transformers tokenizers safetensors pillow tqdm tensorboardX gcsfs}"
RUN_ENV="${RUN_ENV:-}"
LOG_DIR="${LOG_DIR:-logs/$TPU_NAME}"
DRY_RUN="${DRY_RUN:-0}"

case "$DELETE" in never|always|success) ;; *) echo "DELETE=$DELETE: use never, always or success" >&2; exit 2;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROJECT_FLAG=()
if [[ -n "$PROJECT" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi

run() {  # a gcloud call, or its echo with DRY_RUN=1
  if [[ "$DRY_RUN" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

tpu() { run gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${PROJECT_FLAG[@]}"; }

on_all_workers() { tpu ssh "$TPU_NAME" --worker=all --command "$1"; }

status=0
cleanup() {
  if [[ "$DELETE" == always || ( "$DELETE" == success && $status -eq 0 ) ]]; then
    echo "== deleting $TPU_NAME"
    tpu delete "$TPU_NAME" --quiet || true
  else
    echo "== keeping $TPU_NAME (DELETE=$DELETE, exit status $status)"
  fi
}

if [[ "$CREATE" == 1 ]]; then
  echo "== creating $TPU_NAME ($ACCELERATOR_TYPE in $ZONE)"
  spot=()
  if [[ "$SPOT" == 1 ]]; then spot=(--spot); fi
  tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${spot[@]}"
fi
trap 'status=$?; cleanup' EXIT

if [[ "$INSTALL" == 1 ]]; then
  echo "== copying the source tree to every worker"
  tarball="$(mktemp -t snapjax-src.XXXXXX.tar.gz)"
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -)
  tpu scp "$tarball" "$TPU_NAME:snapjax-src.tar.gz" --worker=all
  rm -f "$tarball"
  echo "== installing"
  on_all_workers "mkdir -p $REMOTE_DIR && tar -xzf snapjax-src.tar.gz -C $REMOTE_DIR && \
    python3 -m pip install -q -U '$JAX_PIP' $PIP_PACKAGES && \
    python3 -m pip install -q --no-deps -e $REMOTE_DIR"
fi

mkdir -p "$LOG_DIR"
log="$LOG_DIR/$(date +%Y%m%d-%H%M%S).log"
cmd="$(printf '%q ' "$@")"
echo "== running on every worker: $cmd"
echo "== log: $log"
# SNAPJAX_DISTRIBUTED=1: every worker calls jax.distributed.initialize(), which finds the other
# workers through the TPU metadata. ~/.local/bin: where pip puts the snapjax entry point.
set +e
on_all_workers "cd $REMOTE_DIR && export PATH=\$HOME/.local/bin:\$PATH SNAPJAX_DISTRIBUTED=1 $RUN_ENV && $cmd" \
  2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "== exit status $status"
exit "$status"
