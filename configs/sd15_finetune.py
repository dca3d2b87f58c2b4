# bash launch/tpu.sh snapjax train --config configs/sd15_finetune.py --workdir gs://BUCKET/runs/sd15_v
# (one host: snapjax train --config configs/sd15_finetune.py:gpu --workdir runs/sd15_v;
#  laptop-sized rehearsal on the world models: snapjax train --config configs/sd15_finetune.py:cpu
#  --workdir runs/sd15_v_cpu, after the world VAE and teacher runs)
"""Fine-tune Stable Diffusion v1.5's UNet from eps- to v-prediction (SnapFusion's teacher).

Reads latents + text contexts that ``snapjax prepare`` cached with SD-v1.5's VAE and CLIP text
encoder (ArrayRecord shards), so neither runs in the step; both are still loaded for the sample
grids. Model paths may be diffusers folders (``.../unet``, ``.../vae``) or snapjax model folders.

Variants: ``pod`` (default) a TPU pod slice, FSDP over all chips, global batch 2048 (paper) in
8 microbatches, flash attention; ``gpu`` one 8-GPU host; ``cpu`` the same code path on the world
models (fine-tunes the world teacher's UNet, text encoder frozen), minutes on a laptop.

Memory (launch/aot_check.py, libtpu's compile for the topology, docs/training.md): on the
default slice (v4-32: 16 chips of 32 GiB) each chip runs 16 images per microbatch. On a larger
slice lower ``opt.grad_accum_steps`` (chips x images per chip x steps = 2048); to fit more images
per chip add ``--config.diffusion.unet_remat=True``.
"""

import ml_collections

from snapjax.checkpoint import CheckpointConfig
from snapjax.config import as_config
from snapjax.data.pipeline import DataConfig
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models.text_encoder import TextEncoderSpec
from snapjax.models.unet_spec import SD15
from snapjax.sharding import MeshConfig
from snapjax.train.loop import TrainConfig
from snapjax.train.objectives import DiffusionConfig
from snapjax.train.optim import OptimConfig
from snapjax.train.robust import RobustConfig

SD15_FOLDER = "models/stable-diffusion-v1-5"


def get_config(arg: str = "pod") -> ml_collections.ConfigDict:
    if arg not in ("pod", "gpu", "cpu"):
        raise ValueError(f"configs/sd15_finetune.py: unknown variant {arg!r}; use pod, gpu or cpu")
    config = ml_collections.ConfigDict()
    config.objective = "unet_diffusion"
    config.schedule = as_config(NoiseSchedule(prediction_type="v_prediction"))
    config.unet = as_config(SD15)  # unused when diffusion.unet_init is set (its spec wins)
    config.text_encoder = as_config(TextEncoderSpec)  # likewise, with diffusion.text_encoder
    config.checkpoint = as_config(CheckpointConfig(every_steps=1000, keep=3))
    config.robust = as_config(RobustConfig)  # off: the teacher runs every block
    if arg == "cpu":
        config.train = as_config(TrainConfig(steps=200, batch_size=16, log_every=20))
        config.mesh = as_config(MeshConfig)
        config.opt = as_config(OptimConfig(lr=1e-4, warmup_steps=20, ema_decay=0.99))
        config.data = ml_collections.ConfigDict(DataConfig(source="world", resolution=32).to_dict())
        config.diffusion = as_config(DiffusionConfig(
            unet_init="runs/world_teacher/model/unet",
            text_encoder="runs/world_teacher/model/text_encoder", vae="runs/world_vae/model",
            min_snr_gamma=5.0, sample_steps=50, guidance_scale=4.0, eval_samples=0))
        return config
    pod = arg == "pod"
    config.train = as_config(TrainConfig(
        steps=30_000, batch_size=2048 if pod else 256, log_every=50, sample_every=2000,
        compute_dtype="bfloat16"))
    # FSDP over every chip; a pod slice adds data parallelism across slices via data=-1 + fsdp.
    config.mesh = as_config(MeshConfig(data=1, fsdp=-1, tensor=1))
    config.opt = as_config(OptimConfig(lr=1e-5, warmup_steps=1000, schedule="constant",
                                       weight_decay=0.01, ema_decay=0.9999,
                                       grad_accum_steps=8))
    config.data = ml_collections.ConfigDict(DataConfig(
        source="prepared", path="data/laion_sd15_prepared", resolution=512,
        num_threads=16, prefetch_buffer_size=256).to_dict())
    config.diffusion = as_config(DiffusionConfig(
        unet_init=f"{SD15_FOLDER}/unet", text_encoder=f"{SD15_FOLDER}/text_encoder",
        vae=f"{SD15_FOLDER}/vae", tokenizer=f"{SD15_FOLDER}/tokenizer", min_snr_gamma=5.0,
        sample_steps=50, guidance_scale=7.5, num_samples=16, eval_samples=0,
        # TPU: the 4096-token self-attention never stores its scores (46 -> 14 GiB per chip
        # at 8 images on v5p). GPU: cuDNN's fused kernel needs its own check (bench/gpu.sh).
        attention="tpu_flash" if pod else "xla"))
    return config
