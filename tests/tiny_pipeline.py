"""A random-weight, few-MB Stable Diffusion pipeline in diffusers layout, built without downloads.

Shared by the pipeline, sampling and export tests: SD-v1.5's structure (cross-attention stages,
a plain deepest stage, CLIP text tower, KL VAE) at widths that run in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from snapjax.models.tokenizer import write_clip_vocab

WORDS = ("a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right", "photo")
CONTEXT_DIM = 32


def _perturb(module: torch.nn.Module, seed: int) -> None:
    # diffusers zero-initialises some layers (e.g. proj_out); noise on every weight makes sure
    # no zero hides a wrong mapping.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def build_components(seed: int = 0, prediction_type: str = "epsilon",
                     timestep_spacing: str = "leading", tokenizer_dir: Path | None = None):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    assert tokenizer_dir is not None
    write_clip_vocab(tokenizer_dir, WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CONTEXT_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    for i, m in enumerate((unet, vae, text_encoder)):
        _perturb(m, seed + i)
        m.eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
        timestep_spacing=timestep_spacing)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def build_pipeline(folder: Path, **kwargs):
    """Save a StableDiffusionPipeline to ``folder``; returns the torch pipeline."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    parts = build_components(tokenizer_dir=folder.parent / f"{folder.name}-vocab", **kwargs)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return pipe
