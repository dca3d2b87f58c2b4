# snapjax evolve --config configs/world_evolve.py --workdir runs/world/evolve
# (after `snapjax world --workdir runs/world` and
#  `snapjax train --config configs/world_robust.py --workdir runs/world/robust`, which leave the
#  robust-trained teacher in runs/world/robust/model; another start: --config.teacher_pipeline=F.
#  Variants: :cpu, the default, sized for a 2-core CPU; :accel for a GPU/TPU)
"""Architecture evolution of the embedded world's UNet (SnapFusion, Algorithm 1).

Starts from the robust-trained world teacher and keeps robust-training it (configs/
world_robust.py's probabilities) while evolution rounds remove the blocks whose loss of quality
per unit of latency is smallest, until the UNet costs at most 60% of the teacher's (by the
``macs`` table: batch-1 GFLOP), then duplicates the most valuable blocks while that holds.
Quality: minus the denoising loss on 64 fixed held-out world images (``denoise``): on the
world it ranks blocks far more stably than reader accuracy of 64 samples, whose sampling noise
(about +-0.06 all-correct) is larger than most blocks' effect; ``--config.evolve.quality=world``
scores by reader accuracy of 8-step samples instead. One block per action, 100 robust steps
after each and 400 after the last (with 40 and none, the evolved UNet lost 0.11 all-correct
accuracy at 50 steps: docs/evolution.md).
"""

import ml_collections

from snapjax.config import as_config, base_config
from snapjax.evolve.evolution import EvolveConfig


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    if arg not in ("cpu", "accel"):
        raise ValueError(f"configs/world_evolve.py: unknown variant {arg!r}; use cpu or accel")
    config = base_config(__file__, "world_robust.py", arg)
    config.teacher_pipeline = "runs/world/robust/model"
    config.evolve = as_config(EvolveConfig(
        rounds=16, train_steps_per_round=100, final_train_steps=400, target_latency=0.6,
        latency_source="macs",
        group_size=1, quality="denoise", num_prompts=64, sample_steps=8, guidance_scale=4.0))
    return config
