"""Classifier-free guidance, applied to the raw model output as StableDiffusionPipeline does.

Legend: B batch, H height, W width, C latent channels, L context tokens, D context width.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from snapjax.diffusion.parametrization import broadcast_like

# denoise_fn(z_BHWC, t_B, ctx_BLD) -> model output (B, H, W, C)
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def cfg_combine(out_uncond: jax.Array, out_cond: jax.Array, w: jax.Array | float) -> jax.Array:
    """out_uncond + w (out_cond - out_uncond); ``w`` a scalar or per-example (B,)."""
    return out_uncond + broadcast_like(w, out_cond) * (out_cond - out_uncond)


def guided_output(denoise_fn: DenoiseFn, z_BHWC: jax.Array, t_B: jax.Array,
                  ctx_cond_BLD: jax.Array, ctx_uncond_BLD: jax.Array,
                  w: jax.Array | float) -> jax.Array:
    """The guided model output, from one denoiser call on a batch of 2B (uncond first, then cond).

    The result is float32 whatever the denoiser's compute dtype, so that the difference
    ``out_cond - out_uncond`` amplified by w does not carry bf16 rounding into the sampler.
    """
    out = denoise_fn(jnp.concatenate([z_BHWC, z_BHWC]), jnp.concatenate([t_B, t_B]),
                     jnp.concatenate([ctx_uncond_BLD, ctx_cond_BLD])).astype(jnp.float32)
    out_uncond, out_cond = jnp.split(out, 2)
    return cfg_combine(out_uncond, out_cond, w)
