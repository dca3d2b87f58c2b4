# snapjax world --workdir runs/world
# (the whole SnapFusion chain on the embedded world; `--stages robust,evolve` runs a subset,
#  `--STAGE.KEY=VALUE` overrides one stage's config, e.g. `--teacher.train.steps=2000`,
#  `--config.eval.seeds=(0,1)` this file's keys. Variants: :cpu, the default; :accel)
"""The embedded world's SnapFusion chain, stage by stage, sized to run on a 2-core CPU.

Each stage is the command its docs page describes, run on its own config (``configs/world_*.py``)
with the folders of the stages before it; ``stage_overrides`` shortens some of them so that the
chain fits the 45-minute budget of a laptop (each stage's config alone is the longer run its
docs page measured):

* robust training 300 steps instead of 800: evolution keeps robust-training (with the same
  block probabilities) for 1200 more steps, so the chain's UNet sees 1500 robust steps;
* evolution 50 robust steps after each action and 200 after the last, instead of 100 and 400;
* the decoder learns from 2048 teacher latents sampled in 8 DDIM steps (the world teacher
  samples as well at 8 steps as at 50: docs/distill.md) for 800 steps, instead of 4096 latents
  at 50 steps for 1500;
* step distillation's three stages (the paper's direct schedule, scaled to the world's
  8 -> 4 -> 2) 200 steps each instead of 300.

The evaluation compares every model on the same 256 held-out captions x 3 noise seeds over
the guidance sweep, on the trailing DDIM grid (the students' grid; the teacher samples as well
on it: docs/distill.md); the reference is the teacher at 50 steps. The ablations
(``--stages ablations,report``, not run by default) train their variants with the same sizing.
"""

import ml_collections


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    if arg not in ("cpu", "accel"):
        raise ValueError(f"configs/world_chain.py: unknown variant {arg!r}; use cpu or accel")
    config = ml_collections.ConfigDict()
    config.variant = arg  # the variant every stage's config is loaded with
    # Per stage: --config.KEY=VALUE flags for that stage's own config file.
    config.stage_overrides = ml_collections.ConfigDict({
        "vae": (),
        "teacher": (),
        "robust": ("--config.train.steps=300",),
        "evolve": ("--config.evolve.train_steps_per_round=50",
                   "--config.evolve.final_train_steps=200"),
        "decoder": ("--config.train.steps=800",),
        "distill": ("--config.train.steps=200",),
    })
    config.latents = ml_collections.ConfigDict(
        {"train_count": 2048, "heldout_count": 512, "steps": 8, "batch_size": 64})
    # The direct schedule: teacher N -> N/2, efficient UNet N -> N/2, then N/2 -> N/4.
    config.distill_teacher_steps = 8
    config.eval = ml_collections.ConfigDict({
        "num_prompts": 256, "seeds": (0, 1, 2), "guidance": (1.0, 2.0, 4.0),
        "reference_steps": 50, "spacing": "trailing", "batch_size": 64, "latency": True})
    config.export = ml_collections.ConfigDict({"torch": True, "coreml": True})
    # `--stages ablations,report`: these variants, each trained with the chain's sizing.
    config.ablations = ml_collections.ConfigDict({"run": (
        "direct_vs_progressive", "cfg_aware_loss", "original_loss_gamma", "guidance_conditioned",
        "decoder_init", "robust_vs_plain", "evolution_vs_naive")})
    return config
