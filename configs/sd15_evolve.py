# bash launch/tpu.sh snapjax evolve --config configs/sd15_evolve.py --workdir gs://BUCKET/runs/sd15_evolve
# (after configs/sd15_robust.py robust-trained the v-prediction teacher: --config.diffusion.
#  unet_init=gs://BUCKET/runs/sd15_robust/model/unet; one host: configs/sd15_evolve.py:gpu.
#  Needs a local CLIP folder and the prompts file: docs/evolution.md, "CLIP score at real scale")
"""Architecture evolution of the robust-trained SD-v1.5 UNet (SnapFusion section 3.1, Alg. 1).

``configs/sd15_robust.py`` (prepared LAION latents, batch 2048, every block kept with
probability 0.9 per example) keeps robust-training the UNet between rounds; each round scores
every block by the CLIP score it costs, as the paper does: 2000 COCO-2014 validation captions
(a seeded subset of the prompts file), 50 DDIM steps, CFG 7.5, 512x512 samples, CLIP ViT-L/14
(``evolve.clip_model``, a local transformers folder: nothing is downloaded).

Choices, and what the paper leaves unknown:
- target 0.756: the fraction of SD-v1.5's UNet GFLOP (``macs`` table, 803.3 -> 607.4 at
  512px) that the ``snapfusion`` preset, Table 3's architecture, costs (``snapjax summary
  --preset snapfusion``), so evolution is asked for the paper's UNet cost and chooses its own
  blocks. The paper's target is iPhone latency, which FLOPs rank differently (its high-res
  attention costs far more on the phone than its 4.8% of FLOPs): with a phone table
  (``snapjax export latency-blocks``, docs/evolution.md) set
  ``--config.evolve.latency_source=phone.json`` and the fraction to meet.
- group_size 2, 500 robust steps per round (at batch 2048), 12 rounds at most, 2000 steps
  after the last action: the paper acts "every K iterations" on groups of blocks and gives
  neither K nor the group size. By FLOPs SD's 38 blocks cost 0.5% to 4.8% each, so 24% is
  5 to 10 removals: 3 to 5 rounds of removal, then duplication while the target holds.
- batch_size 16 (pod) / 8 (gpu): prompts sampled and decoded at a time (memory; the
  scores depend on it only through float rounding).

Cost of a round's scoring: 2000 prompts x 50 steps x 2 (CFG) for the full UNet and for each
of the 38 blocks dropped, about 6e18 FLOP, plus 78K CLIP ViT-L/14 images in PyTorch on the
host (on a TPU host that is the CPU). The measure hands the sampler unsharded batches, so on a
slice it does not yet spread prompts over the chips: ``--config.evolve.num_prompts=500``
scores four times faster with noisier ranks.
"""

import ml_collections

from snapjax.config import as_config, base_config
from snapjax.evolve.evolution import EvolveConfig

ROBUST_UNET = "runs/sd15_robust/model/unet"  # sd15_robust's export (its workdir's model/unet)
CLIP_MODEL = "models/clip-vit-large-patch14"
PROMPTS_FILE = "data/coco2014_val_captions.txt"


def get_config(arg: str = "pod") -> ml_collections.ConfigDict:
    if arg not in ("pod", "gpu"):
        raise ValueError(f"configs/sd15_evolve.py: unknown variant {arg!r}; use pod or gpu "
                         "(evolution on the embedded world: configs/world_evolve.py)")
    config = base_config(__file__, "sd15_robust.py", arg)
    config.diffusion.unet_init = ROBUST_UNET
    config.evolve = as_config(EvolveConfig(
        rounds=12, train_steps_per_round=500, final_train_steps=2000, target_latency=0.756,
        latency_source="macs", group_size=2, quality="clip", clip_model=CLIP_MODEL,
        prompts_file=PROMPTS_FILE, num_prompts=2000, sample_steps=50, guidance_scale=7.5,
        batch_size=16 if arg == "pod" else 8, seed=0))
    return config
