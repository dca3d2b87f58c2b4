# snapjax train --config configs/world_robust.py --workdir runs/world/robust
# (after `snapjax world --workdir runs/world`, which leaves the teacher's pipeline folder in
#  runs/world/teacher/model; a teacher trained elsewhere: --config.teacher_pipeline=FOLDER.
#  Variants: :cpu, the default, sized for a 2-core CPU; :accel for a GPU/TPU)
"""Robust training (SnapFusion's stochastic depth) of the embedded world's teacher UNet.

Fine-tunes the teacher's UNet (its text encoder and VAE stay frozen) with every transformer
and every ResNet dropped at random: each runs with probability 0.8 (``robust.keep_prob_*``),
an independent mask per example and step. The paper does not give its probabilities; 0.8 drops
about one block in five, so a step sees most of the network (the denoising loss stays close to
the teacher's) while every block learns to be skipped, which is what evolution's scores need.
No per-stage override: the world UNet's two stages are equally cheap. At the end every block
runs: the preview, its attribute accuracy and the exported pipeline folder
(``<workdir>/model``, for ``snapjax sample`` and the evolution stage) are the full UNet's.

Everything else is the world teacher's config (data, schedule, sampling, sizes): 800 steps at
a lower, constant learning rate after a short warmup, as a fine-tune.
"""

import ml_collections

from snapjax.config import as_config, base_config
from snapjax.train.optim import OptimConfig
from snapjax.train.robust import RobustConfig

TEACHER_PIPELINE = "runs/world/teacher/model"


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    if arg not in ("cpu", "accel"):
        raise ValueError(f"configs/world_robust.py: unknown variant {arg!r}; use cpu or accel")
    config = base_config(__file__, "world_teacher.py", arg)
    # One key names the teacher; the model paths follow it (override either).
    config.teacher_pipeline = TEACHER_PIPELINE
    teacher = config.get_ref("teacher_pipeline")
    config.diffusion.unet_init = teacher + "/unet"
    config.diffusion.text_encoder = teacher + "/text_encoder"
    config.diffusion.vae = teacher + "/vae"
    config.diffusion.tokenizer = teacher + "/tokenizer"
    config.diffusion.train_text_encoder = False
    config.train.steps = 800
    config.opt = as_config(OptimConfig(lr=3e-4, warmup_steps=50, schedule="constant",
                                       weight_decay=0.01, ema_decay=0.995))
    config.robust = as_config(RobustConfig(enabled=True, keep_prob_attention=0.8,
                                           keep_prob_resnet=0.8, per_example=True))
    return config
