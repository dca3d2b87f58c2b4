#!/usr/bin/env bash
# Run one snapjax command on NVIDIA GPUs: one process per host that sees all of the host's GPUs
# (JAX spreads the mesh over them), on one host or, under SLURM, on NODES hosts.
#
#   bash launch/gpu.sh snapjax train --config configs/sd15_finetune.py:gpu --workdir runs/sd15_v
#   NODES=4 PARTITION=a3 bash launch/gpu.sh snapjax train --config configs/sd15_finetune.py \
#     --workdir /shared/runs/sd15_v
#
# Knobs (environment variables, default in brackets):
#   NODES        hosts; >1 goes through srun, and JAX finds its peers from SLURM     [1]
#   PARTITION    SLURM partition (NODES>1)                                            []
#   TIME         SLURM time limit (NODES>1)                                           [24:00:00]
#   MEM_FRACTION share of GPU memory JAX preallocates (XLA_PYTHON_CLIENT_MEM_FRACTION) [0.92]
#   XLA_EXTRA    more XLA_FLAGS                                                       []
#   SRUN_EXTRA   more srun flags                                                      []
# The workdir must be on storage every host sees when NODES > 1. SLURM sends SIGTERM before
# a job's time limit or a preemption: snapjax then saves and exits 0 (use --signal=TERM@120).
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi

NODES="${NODES:-1}"
PARTITION="${PARTITION:-}"
TIME="${TIME:-24:00:00}"
MEM_FRACTION="${MEM_FRACTION:-0.92}"
XLA_EXTRA="${XLA_EXTRA:-}"
SRUN_EXTRA="${SRUN_EXTRA:-}"

export XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"
# Overlap the FSDP all-gathers / reduce-scatters with compute.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true $XLA_EXTRA"

if [[ "$NODES" == 1 ]]; then
  exec "$@"
fi

partition=()
if [[ -n "$PARTITION" ]]; then partition=(--partition "$PARTITION"); fi
# shellcheck disable=SC2086
exec srun --nodes "$NODES" --ntasks-per-node 1 --time "$TIME" --signal=TERM@120 \
  "${partition[@]}" $SRUN_EXTRA env SNAPJAX_DISTRIBUTED=1 "$@"
