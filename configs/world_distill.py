# snapjax train --config configs/world_distill.py --workdir runs/world/distill/teacher_4
# (after `snapjax world --workdir runs/world`, which leaves the teacher's pipeline folder in
#  runs/world/teacher/model; variants: :cpu, the default, sized for a 2-core CPU; :accel)
# The paper's schedules as one command each (docs/distill.md), scaled to the world's 8 -> 4 -> 2:
# snapjax distill --config configs/world_distill.py --workdir runs/world/distill \
#     --teacher runs/world/teacher/model --teacher-steps 8 --schedule direct \
#     --student runs/world/evolve/model
# snapjax distill --config configs/world_distill.py --workdir runs/world/distill \
#     --teacher runs/world/teacher/model --teacher-steps 8 --schedule progressive
# A guidance-conditioned student (one UNet call per step): --config.distill.guidance_embed_dim=64
#     --config.distill.cfg_prob=1 --config.distill.guidance_min=1
"""Step distillation on the embedded world: the world teacher's 8 DDIM steps become 4.

The world's flat shapes on 8x8 latents denoise in few steps, so the paper's counts (32 -> 16 ->
8) say nothing here: the world's are scaled to where DDIM breaks (8 -> 4 -> 2; docs/distill.md
has the teacher at every count). Trailing grids (the student's steps are every second teacher
step), the x loss with the truncated-SNR weight, CFG-aware loss with probability 0.1 and
w ~ U[2, 14], gamma 0.2 (dynamic) times the original loss, caption dropout 0.1: the paper's
choices. The student starts as the teacher's UNet (progressive); ``distill.student_init``
starts it elsewhere (direct distillation into the efficient UNet).
"""

import ml_collections

from snapjax.checkpoint import CheckpointConfig
from snapjax.config import as_config
from snapjax.data.pipeline import DataConfig
from snapjax.sharding import MeshConfig
from snapjax.train.loop import TrainConfig
from snapjax.train.objectives import StepDistillConfig
from snapjax.train.optim import OptimConfig
from snapjax.train.robust import RobustConfig

TEACHER = "runs/world/teacher/model"


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    if arg not in ("cpu", "accel"):
        raise ValueError(f"configs/world_distill.py: unknown variant {arg!r}; use cpu or accel")
    config = ml_collections.ConfigDict()
    config.objective = "step_distill"
    config.train = as_config(TrainConfig(
        steps=300, batch_size=32, log_every=50,
        compute_dtype="bfloat16" if arg == "accel" else "float32"))
    config.mesh = as_config(MeshConfig)
    config.opt = as_config(OptimConfig(lr=2e-4, warmup_steps=50, schedule="constant",
                                       weight_decay=0.01, ema_decay=0.99))
    config.checkpoint = as_config(CheckpointConfig(every_steps=150))
    config.data = ml_collections.ConfigDict(DataConfig(source="world", resolution=32).to_dict())
    config.distill = as_config(StepDistillConfig(
        teacher=TEACHER, teacher_steps=8, guidance_scale=4.0, num_samples=16, eval_samples=128))
    config.robust = as_config(RobustConfig)  # off; on for a robust student
    return config
