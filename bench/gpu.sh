#!/usr/bin/env bash
# Every GPU number of docs/BENCHMARKS.md in one command, for one H100/H200 lease (~10 min):
#
#   bash bench/gpu.sh OUT_DIR
#
# bench/unet_step.py: SD-v1.5 UNet forward at 512x512, batch 2 and 16, snapjax bf16 (XLA and
# cuDNN attention) against diffusers fp16 (eager and torch.compile), same process, same GPU.
# bench/train_step.py: the sd15_finetune training step (bf16, cuDNN attention) at growing
# batch sizes until one runs out of memory: images/s, TFLOP/s and MFU; then with per-block
# rematerialisation (diffusion.unet_remat) at larger batches. Results land in OUT_DIR as each
# part ends, so a lease that runs out still keeps the parts before.
# Knobs: TRAIN_BATCH_SIZES (default 32,64,128), TRAIN_REMAT_BATCH_SIZES (default 128,256;
# empty skips the remat sweep).
# diffusers and ml_collections must import; where they are missing, put their wheels in .whl/
# (docs/BENCHMARKS.md names them) and this script installs them into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_out}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 bench/unet_step.py --batch-sizes 2 16 --resolution 512 --jax-attention xla cudnn \
  --out "$OUT/unet_step.json" 2>&1 | tee "$OUT/unet_step.log"
# cuDNN's fused attention may refuse the backward pass of SD's 160-wide heads: then XLA's.
python3 bench/train_step.py --batch-sizes "${TRAIN_BATCH_SIZES:-32,64,128}" --attention cudnn \
  --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log" ||
python3 bench/train_step.py --batch-sizes "${TRAIN_BATCH_SIZES:-32,64,128}" --attention xla \
  --out "$OUT/train_step_xla.json" 2>&1 | tee "$OUT/train_step_xla.log"
if [ -n "${TRAIN_REMAT_BATCH_SIZES-128,256}" ]; then
  python3 bench/train_step.py --batch-sizes "${TRAIN_REMAT_BATCH_SIZES-128,256}" --remat \
    --attention cudnn --out "$OUT/train_step_remat.json" 2>&1 | tee "$OUT/train_step_remat.log" ||
  true  # an OOM at every size, or cuDNN refusing: the log says which
fi
