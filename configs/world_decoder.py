# snapjax generate-latents --pipeline runs/world/teacher/model --world-captions --count 4096 \
#     --out runs/world/latents/train
# snapjax generate-latents --pipeline runs/world/teacher/model --world-captions --world-seed 1 \
#     --seed 1 --count 512 --out runs/world/latents/heldout
# snapjax train --config configs/world_decoder.py --workdir runs/world/decoder
# (after `snapjax world --workdir runs/world`, which leaves the teacher's pipeline folder in
#  runs/world/teacher/model; variants: :cpu, the default, sized for a 2-core CPU; :accel)
"""The embedded world's efficient decoder (SnapFusion section 3.2): the world VAE's decoder
pruned to half of every width from the teacher's most important channels, then trained to
reproduce the teacher decoder's images of latents the world teacher generated (50 DDIM steps,
guidance drawn from [2, 10] per latent, the training world's captions). Only the decoder
trains; ``<workdir>/model`` is the teacher's pipeline folder with the pruned decoder.

The preview and its PSNR use 512 held-out latents (other captions, other noise). Ablations
(docs/decoder.md): ``--config.decoder.init=random``; real-image latents with
``snapjax prepare --source world --resolution 32 --limit 4096 --model runs/world/teacher/model
--out runs/world/latents/real`` and ``--config.data.path=runs/world/latents/real``.
"""

import ml_collections

from snapjax.checkpoint import CheckpointConfig
from snapjax.config import as_config
from snapjax.data.pipeline import DataConfig
from snapjax.sharding import MeshConfig
from snapjax.train.loop import TrainConfig
from snapjax.train.objectives import DecoderDistillConfig
from snapjax.train.optim import OptimConfig

LATENTS = "runs/world/latents"


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    if arg not in ("cpu", "accel"):
        raise ValueError(f"configs/world_decoder.py: unknown variant {arg!r}; use cpu or accel")
    config = ml_collections.ConfigDict()
    config.objective = "decoder_distill"
    config.train = as_config(TrainConfig(
        steps=1500, batch_size=32, log_every=50,
        compute_dtype="bfloat16" if arg == "accel" else "float32"))
    config.mesh = as_config(MeshConfig)
    config.opt = as_config(OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.0,
                                       ema_decay=0.99))
    config.checkpoint = as_config(CheckpointConfig(every_steps=500))
    config.data = ml_collections.ConfigDict(DataConfig(
        source="prepared", path=f"{LATENTS}/train", resolution=32).to_dict())
    config.decoder = as_config(DecoderDistillConfig(
        teacher="runs/world/teacher/model", ratio=0.5, init="teacher", loss="mse",
        eval_latents=f"{LATENTS}/heldout", eval_count=512, num_samples=16))
    return config
