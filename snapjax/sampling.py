"""The one sampling path: prompts' token ids -> DDIM (+ classifier-free guidance) -> images.

Legend: B batch, L tokens, D context width, H/W image side, h/w latent side, C latent channels,
N droppable UNet blocks (``spec.block_names()``).

Training previews and their scores, evolution's quality measurements, evaluation and
``snapjax sample`` (:class:`snapjax.pipeline.TextToImage`) all sample through these functions,
so an image seen during training is the image ``snapjax sample`` makes from the exported
folder with the same prompt and seed. Every step is a module-level jit keyed on the module
objects (static) with params, noise and masks as traced arguments: new params, a new guidance
scale or a new block mask reuse the compiled program.

Noise convention: example i's initial latent is ``normal(fold_in(key(seed), first_index + i))``,
so an image depends on its prompt's index and the seed, not on how prompts are batched.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from snapjax.diffusion import ddim
from snapjax.diffusion.schedule import NoiseSchedule


def _identity(x):
    return x


@functools.partial(jax.jit, static_argnums=0)
def encode_text(text_encoder: nn.Module, params, input_ids_BL: jax.Array) -> jax.Array:
    """The text encoder's last hidden state (B, L, D), float32."""
    return text_encoder.apply({"params": params}, input_ids_BL).astype(jnp.float32)


def initial_noise(seed: int, batch: int, latent_hw: tuple[int, int], channels: int,
                  first_index: int = 0) -> jax.Array:
    """Standard normal (B, h, w, C) latents, example i from ``(seed, first_index + i)``."""
    h, w = latent_hw
    return _noise(jnp.asarray(seed, jnp.uint32), jnp.asarray(first_index, jnp.int32),
                  shape=(batch, h, w, channels))


@functools.partial(jax.jit, static_argnames="shape")
def _noise(seed, first_index, *, shape):
    keys = jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(seed)))(
        first_index + jnp.arange(shape[0]))
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


def ddim_latents(unet: nn.Module, unet_params, noise_BhwC: jax.Array, ctx_cond_BLD: jax.Array,
                 ctx_uncond_BLD: jax.Array | None, *, schedule: NoiseSchedule, num_steps: int,
                 guidance_scale: float | jax.Array,
                 block_mask: jax.Array | None = None) -> jax.Array:
    """DDIM from ``noise_BhwC`` to final float32 latents (unscaled, as the UNet sees them).

    Guidance runs unless ``guidance_scale`` is the number 1; ``ctx_uncond_BLD`` (batch 1 or B)
    is then the empty or negative prompt's context. A guidance-conditioned UNet
    (``spec.guidance_embed_dim > 0``) takes the scale as its input instead: one call per step,
    ``ctx_uncond_BLD`` unused. ``block_mask``: the UNet's (N,) or per-example
    (B, N) mask (1 run, 0 drop), a traced argument: every mask of one shape shares one compiled
    sampler. None runs every block (what evaluation and ``snapjax sample`` do).
    """
    bound = {}
    guided = not (isinstance(guidance_scale, numbers.Number) and guidance_scale == 1)
    if unet.spec.guidance_embed_dim:
        # A guidance-conditioned UNet outputs the guided prediction itself: one call per step on
        # the B batch, no unconditional half (what diffusers' pipeline does with such a UNet).
        bound["guidance_B"] = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32),
                                               (noise_BhwC.shape[0],))
        guided, guidance_scale, ctx_uncond_BLD = False, 1, None
    if block_mask is not None:
        mask = jnp.asarray(block_mask, jnp.float32)
        if mask.ndim == 2 and guided:
            # Guidance calls the UNet once on the 2B batch [uncond; cond] (ddim.guided_output):
            # each example's row goes with both of its halves.
            mask = jnp.concatenate([mask, mask])
        bound["block_mask"] = mask
    denoise = functools.partial(unet.apply, {"params": unet_params}, **bound)
    return ddim.sample(denoise, noise_BhwC, ctx_cond_BLD, ctx_uncond_BLD, schedule=schedule,
                       num_steps=num_steps, guidance_scale=guidance_scale)


@functools.partial(jax.jit, static_argnums=0)
def decode(vae: nn.Module, params, latents_BhwC: jax.Array) -> jax.Array:
    """Latents -> float32 images in [-1, 1] (the VAE decoder, clipped)."""
    x_BHWC = vae.apply({"params": params}, latents_BhwC / vae.spec.scaling_factor,
                       method="decode")
    return jnp.clip(x_BHWC.astype(jnp.float32), -1.0, 1.0)


@jax.jit
def to_uint8(images_BHWC: jax.Array) -> jax.Array:
    """float [-1, 1] -> uint8 as diffusers does: round((x / 2 + 0.5).clamp(0, 1) * 255)."""
    x = jnp.clip(images_BHWC.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(x * 255).astype(jnp.uint8)


def sample_latents(unet: nn.Module, unet_params, text_encoder: nn.Module, text_params,
                   ids_BL: np.ndarray, uncond_ids_BL: np.ndarray | None,
                   noise_BhwC: jax.Array, *, schedule: NoiseSchedule, num_steps: int,
                   guidance_scale: float | jax.Array, block_mask: jax.Array | None = None,
                   put: Callable = _identity) -> jax.Array:
    """Token ids -> final latents: :func:`encode_text`, then :func:`ddim_latents`.

    ``uncond_ids_BL`` (B or 1 rows; None without guidance): the negative or empty prompt.
    ``put`` places host arrays next to the params (e.g. replicated on their mesh, so that this
    also runs with params spread over several processes).
    """
    ctx_cond = encode_text(text_encoder, text_params, put(np.asarray(ids_BL, np.int32)))
    ctx_uncond = None
    if uncond_ids_BL is not None:
        ctx_uncond = encode_text(text_encoder, text_params,
                                 put(np.asarray(uncond_ids_BL, np.int32)))
    return ddim_latents(unet, unet_params, put(noise_BhwC), ctx_cond, ctx_uncond,
                        schedule=schedule, num_steps=num_steps, guidance_scale=guidance_scale,
                        block_mask=block_mask)


def generate(unet: nn.Module, unet_params, text_encoder: nn.Module, text_params, vae: nn.Module,
             vae_params, ids_BL: np.ndarray, uncond_ids_BL: np.ndarray | None,
             noise_BhwC: jax.Array, *, schedule: NoiseSchedule, num_steps: int,
             guidance_scale: float | jax.Array, block_mask: jax.Array | None = None,
             put: Callable = _identity) -> np.ndarray:
    """Token ids -> uint8 images (B, H, W, 3) on the host: :func:`sample_latents`, then
    :func:`decode` and :func:`to_uint8`. Noise from :func:`initial_noise`."""
    latents = sample_latents(unet, unet_params, text_encoder, text_params, ids_BL,
                             uncond_ids_BL, noise_BhwC, schedule=schedule, num_steps=num_steps,
                             guidance_scale=guidance_scale, block_mask=block_mask, put=put)
    return host_array(to_uint8(decode(vae, vae_params, latents)))


def host_array(x: jax.Array) -> np.ndarray:
    """A device array as numpy, also when it is spread over several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
