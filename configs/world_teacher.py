# snapjax train --config configs/world_teacher.py --workdir runs/world_teacher
# (after configs/world_vae.py wrote runs/world_vae/model; variants: :cpu, the default, sized for
#  a 2-core CPU; :accel for a GPU/TPU)
"""The embedded world's text-to-image teacher: a small SD-structured UNet on the world VAE's
8x8x4 latents, conditioned by a small CLIP-style text encoder trained with it (the world has
no pretrained one), v-prediction, caption dropout 0.1 for classifier-free guidance.

At the end: a sample grid (DDIM, 50 steps, CFG) and the attribute accuracy of generated images
read back by the world's attribute reader; ``<workdir>/model`` becomes a pipeline folder (the EMA
UNet and text encoder, the VAE, the tokenizer and the schedule) for ``snapjax sample`` and
``snapjax export``.
"""

import json

import ml_collections

from snapjax.checkpoint import CheckpointConfig
from snapjax.config import as_config
from snapjax.data.pipeline import DataConfig
from snapjax.data.world import world_tokenizer_folder
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models.text_encoder import TextEncoderSpec
from snapjax.models.unet_spec import UNetSpec
from snapjax.sharding import MeshConfig
from snapjax.train.loop import TrainConfig
from snapjax.train.objectives import DiffusionConfig
from snapjax.train.optim import OptimConfig
from snapjax.train.robust import RobustConfig

TEXT_WIDTH = 64


def _world_vocab_size() -> int:
    return len(json.loads((world_tokenizer_folder() / "vocab.json").read_text()))


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    if arg not in ("cpu", "accel"):
        raise ValueError(f"configs/world_teacher.py: unknown variant {arg!r}; use cpu or accel")
    accel = arg == "accel"
    config = ml_collections.ConfigDict()
    config.objective = "unet_diffusion"
    config.train = as_config(TrainConfig(
        steps=1600, batch_size=32, log_every=50,
        compute_dtype="bfloat16" if accel else "float32"))
    config.mesh = as_config(MeshConfig)
    config.opt = as_config(OptimConfig(lr=1e-3, warmup_steps=100, weight_decay=0.01,
                                       ema_decay=0.995))
    config.checkpoint = as_config(CheckpointConfig(every_steps=500))
    config.data = ml_collections.ConfigDict(DataConfig(source="world", resolution=32).to_dict())
    config.schedule = as_config(NoiseSchedule(prediction_type="v_prediction"))
    config.diffusion = as_config(DiffusionConfig(
        vae="runs/world_vae/model", train_text_encoder=True, caption_dropout=0.1,
        sample_steps=50, guidance_scale=4.0, num_samples=16, eval_samples=128))
    config.robust = as_config(RobustConfig)  # off; configs/world_robust.py turns it on
    config.text_encoder = as_config(TextEncoderSpec(
        vocab_size=_world_vocab_size(), max_length=24, width=TEXT_WIDTH, layers=2, heads=4,
        mlp_dim=4 * TEXT_WIDTH))
    config.unet = as_config(UNetSpec(
        block_channels=(32, 64), down=(("RA",), ("RA",)), up=(("RA", "RA"), ("RA", "RA")),
        mid="RAR", num_heads=(2, 4), context_dim=TEXT_WIDTH, transformer_layers=(1, 1),
        norm_groups=8))
    return config
