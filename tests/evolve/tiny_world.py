"""A random-weight world pipeline at 8x8 images (latents 4x4), built from abstract shapes in
milliseconds: the evolution tests' teacher (no training, no download)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from snapjax.models.unet_spec import TINY

UNET_SPEC = dataclasses.replace(TINY, block_channels=(16, 32), context_dim=16, norm_groups=4,
                                down=(("RA",), ("RA",)), up=(("RA", "RA"), ("RA", "RA")))


def tiny_world_pipeline(seed: int = 0):
    """A :class:`snapjax.pipeline.TextToImage` with the world's tokenizer and random weights
    (fan-in scaled kernels, norms near 1, small biases), v-prediction, 4x4 latents."""
    import jax

    from snapjax import pretrained
    from snapjax.data.world import world_tokenizer_folder
    from snapjax.diffusion.schedule import NoiseSchedule
    from snapjax.models.text_encoder import TextEncoderSpec
    from snapjax.models.tokenizer import Tokenizer
    from snapjax.models.vae import VAESpec
    from snapjax.pipeline import TextToImage

    vocab = len(json.loads((world_tokenizer_folder() / "vocab.json").read_text()))
    text_spec = TextEncoderSpec(vocab_size=vocab, max_length=24, width=16, layers=1, heads=2,
                                mlp_dim=32)
    vae_spec = VAESpec(encoder_channels=(8, 8), decoder_channels=(8, 8), layers_per_block=1,
                       norm_groups=4, mid_attention=False)
    rs = np.random.default_rng(seed)

    def weights(kind, spec):
        def leaf(path, x):
            if path[-1].key in ("kernel", "embedding"):
                fan_in = int(np.prod(x.shape[:-1])) if path[-1].key == "kernel" else 1
                return rs.normal(0, fan_in ** -0.5, x.shape).astype(np.float32)
            base = 1.0 if path[-1].key == "scale" else 0.0
            return (base + rs.normal(0, 0.05, x.shape)).astype(np.float32)
        return jax.tree_util.tree_map_with_path(leaf, pretrained.abstract_params(kind, spec))

    return TextToImage(
        unet=pretrained.build_module("unet", UNET_SPEC), unet_params=weights("unet", UNET_SPEC),
        vae=pretrained.build_module("vae", vae_spec), vae_params=weights("vae", vae_spec),
        text_encoder=pretrained.build_module("text_encoder", text_spec),
        text_encoder_params=weights("text_encoder", text_spec),
        tokenizer=Tokenizer.from_folder(world_tokenizer_folder(), max_length=24),
        schedule=NoiseSchedule(prediction_type="v_prediction"), sample_size=4)
