# bash launch/tpu.sh snapjax train --config configs/sd15_robust.py --workdir gs://BUCKET/runs/sd15_robust
# (after configs/sd15_finetune.py made the v-prediction teacher: --config.diffusion.unet_init=
#  gs://BUCKET/runs/sd15_v/model/unet; one host: configs/sd15_robust.py:gpu; compile check for a
#  slice: python launch/aot_check.py --config configs/sd15_robust.py --topology v5p:4x4x2)
"""Robust training of the SD-v1.5 v-prediction teacher (SnapFusion section 3.1), the training
that architecture evolution interleaves with its rounds.

The ``sd15_finetune`` recipe (prepared LAION latents, batch 2048 in 8 microbatches, AdamW with
weight decay 0.01, bf16, flash attention on TPU), with every transformer and ResNet dropped at
random: each runs with probability 0.9 and an independent mask per example (the paper gives no
probabilities; 0.9 at SD's 38 blocks drops about four per example and step). The step costs what
the plain one costs: dropping is a mask, not a different program.

Evolution at this scale (configs/sd15_evolve.py) interleaves this training with rounds that
score blocks by CLIP score on 2K COCO prompts (50 DDIM steps, CFG 7.5) with a local CLIP model.
"""

import ml_collections

from snapjax.config import as_config, base_config
from snapjax.train.robust import RobustConfig


def get_config(arg: str = "pod") -> ml_collections.ConfigDict:
    config = base_config(__file__, "sd15_finetune.py", arg)
    config.robust = as_config(RobustConfig(enabled=True, keep_prob_attention=0.9,
                                           keep_prob_resnet=0.9, per_example=True))
    return config
