#!/usr/bin/env bash
# Run one snapjax command as NUM_PROCESSES cooperating processes on this machine: the
# multi-host code path (jax.distributed.initialize on localhost) without a cluster. With
# NUM_PROCESSES=1 it is just the command.
#
#   NUM_PROCESSES=2 CPU_DEVICES=4 bash launch/local.sh \
#     snapjax train --config configs/world_vae.py --workdir runs/world_vae_2proc
#
# Knobs (environment variables, default in brackets):
#   NUM_PROCESSES   processes to start                                         [1]
#   CPU_DEVICES     fake CPU devices per process (XLA_FLAGS); 0 = leave as is   [0]
#   PORT            coordinator port on localhost                               [a free one]
#   GPUS_PER_PROCESS  with GPUs: give process i the GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES);
#                   0 = every process sees all GPUs                             [0]
#   LOG_DIR         each process's output goes to LOG_DIR/process_<i>.log;
#                   process 0 also prints to the terminal                       [logs/local]
set -euo pipefail

if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi

NUM_PROCESSES="${NUM_PROCESSES:-1}"
CPU_DEVICES="${CPU_DEVICES:-0}"
GPUS_PER_PROCESS="${GPUS_PER_PROCESS:-0}"
LOG_DIR="${LOG_DIR:-logs/local}"
PORT="${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}"

if [[ "$CPU_DEVICES" != 0 ]]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CPU_DEVICES"
fi
if [[ "$NUM_PROCESSES" == 1 ]]; then
  exec "$@"
fi

mkdir -p "$LOG_DIR"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for ((i = 0; i < NUM_PROCESSES; i++)); do
  env=(JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$NUM_PROCESSES" JAX_PROCESS_ID="$i")
  if [[ "$GPUS_PER_PROCESS" != 0 ]]; then
    env+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * GPUS_PER_PROCESS)) $((i * GPUS_PER_PROCESS + GPUS_PER_PROCESS - 1)))")
  fi
  if [[ $i == 0 ]]; then
    env "${env[@]}" "$@" 2>&1 | tee "$LOG_DIR/process_0.log" &
  else
    env "${env[@]}" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
echo "== $NUM_PROCESSES processes done, exit status $status (logs in $LOG_DIR)"
exit "$status"
