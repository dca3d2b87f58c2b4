"""The PyTorch side of the sampling check: DDIM with diffusers' own ``DDIMScheduler``.

Legend: B batch, C latent channels, h w latent size, L tokens, D context width.

``unet_fn(z_BChw, t_B, ctx_BLD)`` is a mirror (or anything with that signature); guidance runs
the unconditional and conditional halves in one batch, uncond first, as StableDiffusionPipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from snapjax.diffusion.schedule import NoiseSchedule


def ddim_sample(unet_fn: Callable, latents_BChw: torch.Tensor, ctx_cond_BLD: torch.Tensor,
                ctx_uncond_BLD: torch.Tensor | None, *, schedule: NoiseSchedule, num_steps: int,
                guidance_scale: float = 1.0) -> torch.Tensor:
    """Final latents of ``num_steps`` DDIM steps (eta 0) from ``latents_BChw``."""
    from diffusers import DDIMScheduler

    if not schedule.diffusers_samples_exactly(num_steps):
        raise ValueError(f"DDIMScheduler cannot take this schedule's {num_steps}-step grid (its "
                         "steps land on the next grid timestep, ddim_landing='next'); sample it "
                         "with the manifest's loop (export.coreml.reference_app)")
    scheduler = DDIMScheduler.from_config(schedule.to_diffusers_config())
    scheduler.set_timesteps(num_steps)
    z = latents_BChw * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    if guided and ctx_uncond_BLD is None:
        raise ValueError("guidance needs the unconditional context")
    B = z.shape[0]
    with torch.no_grad():
        for t in scheduler.timesteps:
            if guided:
                out = unet_fn(torch.cat([z, z]), t.expand(2 * B),
                              torch.cat([ctx_uncond_BLD.expand_as(ctx_cond_BLD), ctx_cond_BLD]))
                out_uncond, out_cond = out.chunk(2)
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            else:
                out = unet_fn(z, t.expand(B), ctx_cond_BLD)
            z = scheduler.step(out, t, z).prev_sample
    return z


def decode_to_uint8(decoder: Callable, latents_BChw: torch.Tensor,
                    scaling_factor: float) -> torch.Tensor:
    """B H W 3 uint8 images from diffusion latents, as StableDiffusionPipeline post-processes."""
    with torch.no_grad():
        x = decoder(latents_BChw / scaling_factor)
    x = (x.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
