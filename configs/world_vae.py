# snapjax train --config configs/world_vae.py --workdir runs/world_vae
# (variants: configs/world_vae.py:cpu, the default, sized for a 2-core CPU; :accel for a GPU/TPU)
"""A small KL autoencoder for the embedded world: 32x32 images <-> 8x8x4 latents.

After the last step the EMA weights go to ``<workdir>/model`` (a snapjax VAE folder whose
scaling_factor is measured on the data), which configs/world_teacher.py encodes with.
"""

import ml_collections

from snapjax.checkpoint import CheckpointConfig
from snapjax.config import as_config
from snapjax.data.pipeline import DataConfig
from snapjax.models.vae import VAESpec
from snapjax.sharding import MeshConfig
from snapjax.train.loop import TrainConfig
from snapjax.train.objectives import VAELossConfig
from snapjax.train.optim import OptimConfig


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    if arg not in ("cpu", "accel"):
        raise ValueError(f"configs/world_vae.py: unknown variant {arg!r}; use cpu or accel")
    accel = arg == "accel"
    config = ml_collections.ConfigDict()
    config.objective = "vae"
    config.train = as_config(TrainConfig(
        steps=800, batch_size=16, log_every=50,
        compute_dtype="bfloat16" if accel else "float32"))
    config.mesh = as_config(MeshConfig)
    config.opt = as_config(OptimConfig(lr=2e-3, warmup_steps=50, weight_decay=0.0,
                                       ema_decay=0.99))
    config.checkpoint = as_config(CheckpointConfig(every_steps=200))
    config.data = ml_collections.ConfigDict(DataConfig(source="world", resolution=32).to_dict())
    # Three stages: 4x downsampling, so the teacher's UNet works on 8x8 latents.
    config.vae = as_config(VAESpec(encoder_channels=(16, 32, 64), decoder_channels=(16, 32, 64),
                                   layers_per_block=1, norm_groups=8, mid_attention=False))
    # L2, not L1: L1's sign-only gradient leaves the few object pixels grey for hundreds of
    # steps on these mostly-black images (measured: object-pixel error 0.45 vs 0.21 at step 400).
    config.vae_loss = as_config(VAELossConfig(recon="l2", kl_weight=1e-4))
    return config
