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
Quality: the world's attribute reader on 8-step guided samples of 64 fixed held-out captions
(``world``: the all-correct rate ranks, the Fréchet distance is logged beside it).
``--config.evolve.quality=denoise`` ranks by the denoising loss on 64 held-out images instead:
cheaper per round but worse here (its evolved UNet lost 0.022 all-correct and 22% Fréchet
distance where this one lost nothing measurable: docs/evolution.md). One block per action,
100 robust steps after each and 400 after the last (with 40 and none, the denoise-ranked UNet
lost 0.11 all-correct at 50 steps).
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
        group_size=1, quality="world", num_prompts=64, sample_steps=8, guidance_scale=4.0))
    return config
