# snapjax generate-latents --pipeline models/stable-diffusion-v1-5 --prompts data/coco_captions.txt \
#     --count 100000 --out data/sd15_generated_latents                 (50 DDIM steps, guidance 2-10)
# snapjax generate-latents --pipeline models/stable-diffusion-v1-5 --prompts data/coco_val.txt \
#     --seed 1 --count 64 --out data/sd15_generated_latents_heldout
# bash launch/tpu.sh snapjax train --config configs/sd15_decoder.py --workdir gs://BUCKET/runs/sd15_decoder
# (one host: configs/sd15_decoder.py:gpu; compile check for a slice without SD-v1.5's files:
#  python launch/aot_check.py --config configs/sd15_decoder.py --topology v5p:2x2x1
#  --config.decoder.teacher=)
"""SD-v1.5's efficient decoder (SnapFusion section 3.2): the VAE decoder with every width
halved (128/256/512/512 -> 64/128/256/256, 32 -> 16 GroupNorm groups of the teacher's size;
12.4 M params, 0.25x the FLOPs), initialised from the teacher's most important channels and
trained with a pixel MSE to reproduce SD-v1.5's decoder on latents SD-v1.5 generated from text
prompts (a prompts file such as COCO or LAION captions; 50 DDIM steps, guidance per latent
from [2, 10]). Only the decoder trains. The paper gives no prompt set, iterations, learning
rate or batch: these are ours (AdamW, lr 1e-4, batch 256 at 512x512, 20K steps).
"""

import ml_collections

from snapjax.checkpoint import CheckpointConfig
from snapjax.config import as_config
from snapjax.data.pipeline import DataConfig
from snapjax.models import vae
from snapjax.sharding import MeshConfig
from snapjax.train.loop import TrainConfig
from snapjax.train.objectives import DecoderDistillConfig
from snapjax.train.optim import OptimConfig

SD15_FOLDER = "models/stable-diffusion-v1-5"


def get_config(arg: str = "pod") -> ml_collections.ConfigDict:
    if arg not in ("pod", "gpu"):
        raise ValueError(f"configs/sd15_decoder.py: unknown variant {arg!r}; use pod or gpu")
    config = ml_collections.ConfigDict()
    config.objective = "decoder_distill"
    config.train = as_config(TrainConfig(steps=20_000, batch_size=256, log_every=50,
                                         sample_every=2000, compute_dtype="bfloat16"))
    config.mesh = as_config(MeshConfig(data=1, fsdp=-1, tensor=1))
    config.opt = as_config(OptimConfig(lr=1e-4, warmup_steps=500, weight_decay=0.01,
                                       ema_decay=0.999, grad_accum_steps=2 if arg == "pod" else 8))
    config.checkpoint = as_config(CheckpointConfig(every_steps=1000, keep=3))
    config.data = ml_collections.ConfigDict(DataConfig(
        source="prepared", path="data/sd15_generated_latents", resolution=512,
        num_threads=16, prefetch_buffer_size=256).to_dict())
    config.vae = as_config(vae.preset("sd15"))  # the teacher's shape when decoder.teacher=""
    config.decoder = as_config(DecoderDistillConfig(
        teacher=SD15_FOLDER, ratio=0.5, init="teacher", loss="mse",
        eval_latents="data/sd15_generated_latents_heldout", eval_count=64, num_samples=8))
    return config
