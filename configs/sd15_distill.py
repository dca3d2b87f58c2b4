# The teacher is configs/sd15_finetune.py's v-prediction SD-v1.5 (the pipeline folder in its
# workdir's model/), copied where every worker reads it: gsutil -m cp -r gs://BUCKET/runs/sd15_v/model
# models/sd15_v. The student of the direct schedule is the evolved efficient UNet's pipeline
# folder (configs/sd15_evolve.py's model/, likewise copied to models/sd15_evolved).
#
# The paper's direct schedule, one command (SD-v1.5 32 -> 16, the efficient UNet 32 -> 16 on
# itself, then the 16-step SD-v1.5 teaches the 16-step efficient UNet 16 -> 8):
# bash launch/tpu.sh snapjax distill --config configs/sd15_distill.py --workdir runs/sd15_distill \
#     --teacher models/sd15_v --teacher-steps 32 --schedule direct --student models/sd15_evolved
# The progressive alternative, SD-v1.5 32 -> 16 -> 8:
# bash launch/tpu.sh snapjax distill --config configs/sd15_distill.py --workdir runs/sd15_progressive \
#     --teacher models/sd15_v --teacher-steps 32 --schedule progressive
# (one 8-GPU host: --config configs/sd15_distill.py:gpu. On a slice, --workdir, --teacher and
#  --student may be gs:// folders, docs/storage.md.)
# 32 -> 16 nests on SD's 1000 timesteps because step distillation lands each DDIM step on the
# grid's next timestep (NoiseSchedule.ddim_landing='next'; diffusers' t - 1000 // 32 would not).
#
# Compile checks without SD-v1.5's weights (shapes from config.unet, config.student_unet,
# config.text_encoder, config.schedule; 4 chips, so 64 microbatches keep the pod's 8 images per
# chip per microbatch; on a 24-GiB host the compile was killed for memory, docs/distill.md.
# On one v5p chip, --topology v5p:1x1x1 --chips-per-host 1,1,1 --config.opt.grad_accum_steps=256,
# it compiles and needs 99.65 GiB of temporaries for 95.74 GiB of HBM: see docs/sd15_chain.md):
# PYTHONPATH=/tmp/libtpu python launch/aot_check.py --config configs/sd15_distill.py \
#     --topology v5p:2x2x1 --config.distill.teacher= \
#     --config.opt.grad_accum_steps=64                                  # SD-v1.5 -> SD-v1.5
# PYTHONPATH=/tmp/libtpu python launch/aot_check.py --config configs/sd15_distill.py:pod_direct \
#     --topology v5p:2x2x1 --config.distill.teacher= \
#     --config.opt.grad_accum_steps=64                                  # SD-v1.5 -> efficient UNet
"""Step distillation of SD-v1.5 (SnapFusion section 4): students of half their teacher's DDIM
steps, 32 -> 16 -> 8, with the CFG-aware loss.

The paper's choices (the ``StepDistillConfig`` defaults): the v-prediction teacher at 32 steps,
trailing grids (each student step is two teacher steps), the x-space loss with the truncated-SNR
weight, the CFG-aware loss with probability 0.1 and w ~ U[2, 14], gamma 0.2 times the original
denoising loss with dynamic scaling (the paper does not give its formula: ours scales it to the
distillation loss's size), AdamW with weight decay 0.01, batch 2048. Ours, where the paper says
nothing: lr 1e-5 constant after 1000 warm-up steps, EMA 0.9999, 10K steps per stage, caption
dropout 0.1, the data (sd15_finetune's prepared LAION latents and contexts, 512x512).

Variants: ``pod`` (default) a TPU slice, FSDP over every chip, flash attention, batch 2048 in 4
microbatches: on a v5p-128 slice (64 chips) 8 images per chip per microbatch. Each image costs
three UNet trainings' memory (the guided student's 2B batch and the original loss's B), so on
N chips set ``--config.opt.grad_accum_steps=2048/(8 N)``. ``gpu`` one 8-GPU host, batch 256,
XLA attention with rematerialised blocks. ``pod_direct`` / ``gpu_direct``: the same run;
``config.student_unet`` (the ``snapfusion`` preset) only gives the ahead-of-time check the
direct stage's student shape. In a real run every UNet's shape comes from its folder.
"""

import ml_collections

from snapjax.checkpoint import CheckpointConfig
from snapjax.config import as_config
from snapjax.data.pipeline import DataConfig
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models.text_encoder import TextEncoderSpec
from snapjax.models.unet_spec import SD15, SNAPFUSION
from snapjax.sharding import MeshConfig
from snapjax.train.loop import TrainConfig
from snapjax.train.objectives import StepDistillConfig
from snapjax.train.optim import OptimConfig
from snapjax.train.robust import RobustConfig

TEACHER = "models/sd15_v"  # sd15_finetune's v-prediction pipeline folder
VARIANTS = ("pod", "pod_direct", "gpu", "gpu_direct")


def get_config(arg: str = "pod") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/sd15_distill.py: unknown variant {arg!r}; use "
                         f"{', '.join(VARIANTS)}")
    pod = arg.startswith("pod")
    config = ml_collections.ConfigDict()
    config.objective = "step_distill"
    # The shapes an ahead-of-time check compiles with distill.teacher="" (folders win otherwise).
    config.schedule = as_config(NoiseSchedule(prediction_type="v_prediction"))
    config.unet = as_config(SD15)
    config.text_encoder = as_config(TextEncoderSpec)
    if arg.endswith("_direct"):
        config.student_unet = as_config(SNAPFUSION)
    config.train = as_config(TrainConfig(
        steps=10_000, batch_size=2048 if pod else 256, log_every=50, compute_dtype="bfloat16"))
    config.mesh = as_config(MeshConfig(data=1, fsdp=-1, tensor=1))
    config.opt = as_config(OptimConfig(lr=1e-5, warmup_steps=1000, schedule="constant",
                                       weight_decay=0.01, ema_decay=0.9999,
                                       grad_accum_steps=4 if pod else 8))
    config.checkpoint = as_config(CheckpointConfig(every_steps=1000, keep=3))
    config.data = ml_collections.ConfigDict(DataConfig(
        source="prepared", path="data/laion_sd15_prepared", resolution=512,
        num_threads=16, prefetch_buffer_size=256).to_dict())
    config.distill = as_config(StepDistillConfig(
        teacher=TEACHER, teacher_steps=32, num_samples=16, eval_samples=0,
        attention="tpu_flash" if pod else "xla", unet_remat=not pod))
    config.robust = as_config(RobustConfig)  # off; on for a robust student
    return config
