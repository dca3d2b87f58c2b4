"""Deterministic DDIM (eta = 0), matching diffusers' DDIMScheduler, with the whole loop in one jit.

Legend: B batch, H height, W width, C latent channels, L context tokens, D context width,
K sampling steps.

The loop is a ``lax.scan`` over a plan's arrays (timesteps, abar, abar_prev), so a plan is data:
plans of the same length (50 leading or 50 trailing steps, a student's grid) share one compiled
program, and so do different guidance scales. Whether guidance runs at all (a 2B batch or a B
batch) is decided outside jit, by whether an unconditional context is given.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.diffusion.guidance import DenoiseFn, guided_output
from snapjax.diffusion.parametrization import broadcast_like, to_x_eps
from snapjax.diffusion.schedule import NoiseSchedule, SamplingPlan, alpha_sigma, ddim_plan


def ddim_step(model_out: jax.Array, z_t: jax.Array, abar_t: jax.Array, abar_s: jax.Array, *,
              prediction_type: str, clip_range: float | None = None) -> jax.Array:
    """One DDIM step z_t -> z_s = alpha_s x_hat + sigma_s eps_hat (``DDIMScheduler.step``, eta 0).

    ``abar_t``/``abar_s`` are scalars or per-example (B,). ``clip_range`` clamps x_hat (diffusers'
    clip_sample); eps_hat stays the model's, as diffusers does without use_clipped_model_output.
    """
    x_hat, eps_hat = to_x_eps(model_out, z_t, *alpha_sigma(abar_t), prediction_type)
    if clip_range is not None:
        x_hat = jnp.clip(x_hat, -clip_range, clip_range)
    alpha_s, sigma_s = alpha_sigma(abar_s)
    return broadcast_like(alpha_s, x_hat) * x_hat + broadcast_like(sigma_s, eps_hat) * eps_hat


def model_output(denoise_fn: DenoiseFn, z_BHWC: jax.Array, t_B: jax.Array, ctx_cond_BLD: jax.Array,
                 ctx_uncond_BLD: jax.Array | None, guidance_scale: jax.Array | float) -> jax.Array:
    """The (guided, if ``ctx_uncond_BLD`` is given) float32 model output at z_t."""
    if ctx_uncond_BLD is None:
        return denoise_fn(z_BHWC, t_B, ctx_cond_BLD).astype(jnp.float32)
    return guided_output(denoise_fn, z_BHWC, t_B, ctx_cond_BLD, ctx_uncond_BLD, guidance_scale)


def ddim_loop(denoise_fn: DenoiseFn, z_BHWC: jax.Array, ctx_cond_BLD: jax.Array,
              ctx_uncond_BLD: jax.Array | None, timesteps_K: jax.Array, abar_K: jax.Array,
              abar_prev_K: jax.Array, guidance_scale: jax.Array | float = 1.0, *,
              prediction_type: str, clip_range: float | None = None) -> jax.Array:
    """K DDIM steps through the given timesteps (traceable; call it inside your own jit).

    The plan arrays are (K,) for one grid shared by the batch, or (K, B) for a grid per example
    (distillation draws t per example). ``ctx_uncond_BLD=None`` means no guidance.
    """
    batch = z_BHWC.shape[0]

    def step(z, plan_k):
        t, abar_t, abar_s = plan_k
        t_B = jnp.broadcast_to(t, (batch,)).astype(jnp.int32)
        out = model_output(denoise_fn, z, t_B, ctx_cond_BLD, ctx_uncond_BLD, guidance_scale)
        z_s = ddim_step(out, z, abar_t, abar_s, prediction_type=prediction_type,
                        clip_range=clip_range)
        return z_s.astype(z.dtype), None

    z, _ = jax.lax.scan(step, z_BHWC, (timesteps_K, abar_K, abar_prev_K))
    return z


_ddim_loop_jit = jax.jit(ddim_loop, static_argnames=("prediction_type", "clip_range"))


def sample(denoise_fn: DenoiseFn, latents_BHWC: jax.Array, context_cond_BLD: jax.Array,
           context_uncond_BLD: jax.Array | None, *, schedule: NoiseSchedule, num_steps: int,
           guidance_scale: float | jax.Array) -> jax.Array:
    """DDIM sampling from initial noise ``latents_BHWC`` (unscaled: DDIM's init_noise_sigma is 1),
    as StableDiffusionPipeline with ``DDIMScheduler.from_config(schedule.to_diffusers_config())``.

    ``denoise_fn(z_BHWC, t_B, ctx_BLD)`` is typically ``functools.partial(unet.apply,
    {"params": params})``: its bound arguments are passed to the jitted loop as arrays (not baked
    in), so new params do not recompile; reuse the same module object to hit the cache.
    Guidance runs when ``guidance_scale != 1`` (a traced value: changing it does not recompile);
    ``context_uncond_BLD`` (batch B or 1) is then required. Returns float32 latents.
    """
    return sample_plan(denoise_fn, latents_BHWC, context_cond_BLD, context_uncond_BLD,
                       plan=ddim_plan(schedule, num_steps), schedule=schedule,
                       guidance_scale=guidance_scale)


def sample_plan(denoise_fn: DenoiseFn, latents_BHWC: jax.Array, context_cond_BLD: jax.Array,
                context_uncond_BLD: jax.Array | None, *, plan: SamplingPlan,
                schedule: NoiseSchedule, guidance_scale: float | jax.Array) -> jax.Array:
    """:func:`sample` through any plan, e.g. ``plan_from_timesteps(schedule, student_grid)``."""
    z, ctx_cond, ctx_uncond = _check_inputs(latents_BHWC, context_cond_BLD, context_uncond_BLD)
    unguided = isinstance(guidance_scale, numbers.Number) and guidance_scale == 1
    if unguided:
        ctx_uncond = None  # diffusers skips the unconditional half too; the result is the same
    elif ctx_uncond is None:
        raise ValueError(f"guidance_scale={guidance_scale!r} needs context_uncond_BLD (the "
                         "empty-prompt embedding); pass guidance_scale=1 to sample unguided")
    w = jnp.asarray(guidance_scale, jnp.float32)
    if w.ndim > 1 or (w.ndim == 1 and w.shape[0] != z.shape[0]):
        raise ValueError(f"guidance_scale must be a scalar or one per example ({z.shape[0]},), "
                         f"got shape {w.shape}")
    return _ddim_loop_jit(_as_pytree_fn(denoise_fn), z, ctx_cond, ctx_uncond, plan.timesteps,
                          plan.abar, plan.abar_prev, w, prediction_type=schedule.prediction_type,
                          clip_range=schedule.clip_range)


def _check_inputs(latents, ctx_cond, ctx_uncond):
    z = jnp.asarray(latents)
    if z.ndim != 4 or not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"latents_BHWC must be a float (B, H, W, C) array, got {z.dtype}{z.shape}")
    ctx_cond = jnp.asarray(ctx_cond)
    if ctx_cond.ndim != 3 or ctx_cond.shape[0] != z.shape[0]:
        raise ValueError(f"context_cond_BLD must be (B={z.shape[0]}, L, D), got {ctx_cond.shape}")
    if ctx_uncond is not None:
        ctx_uncond = jnp.asarray(ctx_uncond)
        if ctx_uncond.ndim != 3 or ctx_uncond.shape[0] not in (1, z.shape[0]) \
                or ctx_uncond.shape[1:] != ctx_cond.shape[1:]:
            raise ValueError(f"context_uncond_BLD must be (B={z.shape[0]} or 1, "
                             f"{ctx_cond.shape[1]}, {ctx_cond.shape[2]}) like the conditional "
                             f"context, got {ctx_uncond.shape}")
        ctx_uncond = jnp.broadcast_to(ctx_uncond, ctx_cond.shape).astype(ctx_cond.dtype)
    return z.astype(jnp.float32), ctx_cond, ctx_uncond


def _as_pytree_fn(fn: DenoiseFn) -> jax.tree_util.Partial:
    # A jit argument must be a pytree of arrays: a functools.partial becomes a tree_util.Partial
    # whose bound arguments (the params) are leaves and whose function is the static part.
    if isinstance(fn, jax.tree_util.Partial):
        pytree_fn = fn
    elif isinstance(fn, functools.partial):
        pytree_fn = jax.tree_util.Partial(fn.func, *fn.args, **fn.keywords)
    elif callable(fn):
        pytree_fn = jax.tree_util.Partial(fn)
    else:
        raise TypeError(f"denoise_fn must be callable, got {type(fn).__name__}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(pytree_fn):
        if isinstance(leaf, (bool, str)) or not isinstance(leaf, (jax.Array, np.ndarray,
                                                                   np.generic, numbers.Number)):
            raise ValueError(
                f"denoise_fn's bound argument {jax.tree_util.keystr(path)} is "
                f"{type(leaf).__name__}: bind only arrays (params) with functools.partial; put "
                "options such as train=False into the function itself")
    return pytree_fn
