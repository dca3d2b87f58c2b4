"""Quality measures for evolution: how good the UNet is with a given block mask.

A measure is called as ``measure(unet, unet_params, block_mask) -> {name: value}`` and names
the one value evolution ranks by (``measure.key``, higher is better). Each holds its validation
set fixed (the same prompts, noise and timesteps every round), and the mask is a traced
argument of one compiled sampler, so scoring every block of a round compiles nothing new.

  ``world``    the attribute reader's all-correct rate of short DDIM samples (with guidance)
               on held-out world captions; the Fréchet distance to real world images beside it.
  ``denoise``  minus the denoising loss (the objective's own prediction type) on a fixed batch
               of encoded world images, noise and timesteps: cheap, and far less noisy per
               prompt than sampling, so smaller validation sets rank blocks.
  ``clip``     mean CLIP score (:mod:`snapjax.eval.clip_score`, a local CLIP folder) of DDIM
               samples (with guidance) of fixed prompts from a file: the paper's measure at
               real scale (2K COCO validation captions, 50 steps, CFG 7.5). Any data source.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from snapjax import sampling
from snapjax.diffusion.parametrization import add_noise, from_x_eps
from snapjax.diffusion.schedule import NoiseSchedule, alpha_sigma, alphas_cumprod

MEASURES = ("world", "denoise", "clip")


@dataclasses.dataclass
class WorldSampleQuality:
    """Reader accuracy (and Fréchet distance) of DDIM samples of fixed held-out prompts."""

    text_encoder: object
    text_params: object
    vae: object
    vae_params: object
    schedule: NoiseSchedule
    world: object  # WorldSpec of the training data
    tokenizer: object
    num_prompts: int = 64
    num_steps: int = 8
    guidance_scale: float = 4.0
    seed: int = 0
    key: str = "accuracy/all"

    def __post_init__(self):
        from snapjax.data.world import render_batch
        from snapjax.eval import reader as reader_lib
        eval_world = dataclasses.replace(self.world, seed=reader_lib.EVAL_WORLD_SEED)
        self._real, captions, self._labels = render_batch(np.arange(self.num_prompts), eval_world)
        ids = np.asarray(self.tokenizer(captions), np.int32)
        empty = np.asarray(self.tokenizer([""]), np.int32)
        self._ctx = sampling.encode_text(self.text_encoder, self.text_params, ids)
        self._uncond = sampling.encode_text(self.text_encoder, self.text_params, empty)
        self._reader = reader_lib.get_reader(self.world)
        self._reader_lib = reader_lib

    def __call__(self, unet, unet_params, block_mask) -> dict[str, float]:
        h = self.world.resolution // self.vae.spec.downsample_factor
        noise = sampling.initial_noise(self.seed, self.num_prompts, (h, h), unet.spec.in_channels)
        latents = sampling.ddim_latents(unet, unet_params, noise, self._ctx, self._uncond,
                                        schedule=self.schedule, num_steps=self.num_steps,
                                        guidance_scale=self.guidance_scale,
                                        block_mask=block_mask)
        images = np.asarray(sampling.to_uint8(sampling.decode(self.vae, self.vae_params,
                                                              latents)))
        scores = self._reader_lib.score(self._reader, images, self._labels,
                                        reference_images=self._real)
        return {"accuracy/all": scores["accuracy/all"],
                "accuracy/mean": scores["accuracy/mean"],
                "frechet_distance": scores["frechet_distance"]}


@functools.partial(jax.jit, static_argnames="unet")
def _denoise_loss(unet, params, z_BhwC, t_B, ctx_BLD, target_BhwC, block_mask):
    # The target is already in the schedule's prediction type (computed once, outside jit).
    pred = unet.apply({"params": params}, z_BhwC, t_B, ctx_BLD, block_mask)
    return jnp.mean(jnp.square(pred - target_BhwC))


@dataclasses.dataclass
class DenoiseQuality:
    """Minus the denoising loss on a fixed batch: ``latents_BhwC`` (scaled, as the UNet trains
    on them) with their contexts, one fixed timestep and noise draw per example."""

    latents_BhwC: np.ndarray
    context_BLD: np.ndarray
    schedule: NoiseSchedule
    seed: int = 0
    key: str = "neg_loss"

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        B = self.latents_BhwC.shape[0]
        # Timesteps spread evenly over the schedule (stratified), so every noise level counts.
        t = ((np.arange(B) + rng.uniform(size=B)) / B * self.schedule.num_train_timesteps)
        self._t = jnp.asarray(np.minimum(t.astype(np.int32),
                                         self.schedule.num_train_timesteps - 1))
        eps = jnp.asarray(rng.standard_normal(self.latents_BhwC.shape, np.float32))
        x = jnp.asarray(self.latents_BhwC, jnp.float32)
        abar = jnp.asarray(alphas_cumprod(self.schedule))[self._t]
        alpha, sigma = alpha_sigma(abar)
        self._z = add_noise(x, eps, alpha, sigma)
        self._target = from_x_eps(x, eps, alpha, sigma, self.schedule.prediction_type)
        self._ctx = jnp.asarray(self.context_BLD, jnp.float32)

    def __call__(self, unet, unet_params, block_mask) -> dict[str, float]:
        loss = float(_denoise_loss(unet, unet_params, self._z, self._t, self._ctx, self._target,
                                   jnp.asarray(block_mask, jnp.float32)))
        return {"neg_loss": -loss, "loss": loss}


@dataclasses.dataclass
class ClipScoreQuality:
    """Mean CLIP score (0 to 100) of DDIM samples (with guidance) of fixed prompts.

    Prompts go through the sampler ``batch_size`` at a time (the last chunk padded with copies,
    so one compiled sampler serves every chunk and every mask); prompt i's noise is
    ``initial_noise(seed, ...)``'s example i whatever the chunking. The CLIP text features
    are computed once; CLIP scores a chunk on the host while the device samples the next.
    ``clip_cosine`` beside: the mean unclamped cosine (the paper's scale when none is negative).
    """

    text_encoder: object
    text_params: object
    vae: object
    vae_params: object
    schedule: NoiseSchedule
    tokenizer: object  # the diffusion model's, for its text encoder
    scorer: object  # snapjax.eval.clip_score.ClipScorer
    prompts: list[str]
    sample_size: int  # latent side
    num_steps: int = 50
    guidance_scale: float = 7.5
    batch_size: int = 16
    seed: int = 0
    key: str = "clip_score"

    def __post_init__(self):
        if not self.prompts or self.batch_size < 1:
            raise ValueError(f"ClipScoreQuality needs prompts ({len(self.prompts)} given) and "
                             f"batch_size >= 1 ({self.batch_size})")
        ids = np.asarray(self.tokenizer(self.prompts), np.int32)
        pad = -len(self.prompts) % self.batch_size
        self._ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
        empty = np.asarray(self.tokenizer([""]), np.int32)
        self._uncond = sampling.encode_text(self.text_encoder, self.text_params, empty)
        self._text_feats = np.asarray(self.scorer.text_features(self.prompts), np.float64)

    def _images(self, unet, unet_params, mask, start: int) -> jax.Array:
        bs = self.batch_size
        ctx = sampling.encode_text(self.text_encoder, self.text_params,
                                   self._ids[start:start + bs])
        noise = sampling.initial_noise(self.seed, bs, (self.sample_size, self.sample_size),
                                       unet.spec.in_channels, first_index=start)
        latents = sampling.ddim_latents(unet, unet_params, noise, ctx, self._uncond,
                                        schedule=self.schedule, num_steps=self.num_steps,
                                        guidance_scale=self.guidance_scale, block_mask=mask)
        return sampling.to_uint8(sampling.decode(self.vae, self.vae_params, latents))

    def _cosine(self, images, start: int) -> np.ndarray:
        stop = min(start + self.batch_size, len(self.prompts))
        feats = self.scorer.image_features(sampling.host_array(images)[:stop - start])
        return np.sum(np.asarray(feats, np.float64) * self._text_feats[start:stop], axis=-1)

    def __call__(self, unet, unet_params, block_mask) -> dict[str, float]:
        from snapjax.eval.clip_score import scores_from_cosine
        mask = jnp.asarray(block_mask, jnp.float32)
        cos, pending = [], None
        for start in range(0, len(self.prompts), self.batch_size):
            images = self._images(unet, unet_params, mask, start)  # dispatched, not awaited
            if pending is not None:
                cos.append(self._cosine(*pending))
            pending = (images, start)
        cos.append(self._cosine(*pending))
        cos = np.concatenate(cos)
        return {"clip_score": float(scores_from_cosine(cos).mean()),
                "clip_cosine": float(cos.mean())}


def build_measure(kind: str, *, text_encoder, text_params, vae, vae_params, tokenizer,
                  schedule: NoiseSchedule, world=None, num_prompts: int, num_steps: int,
                  guidance_scale: float, seed: int, clip_model: str = "",
                  prompts: list[str] | None = None, sample_size: int | None = None,
                  batch_size: int = 16):
    """The measure ``kind``: "world" or "denoise" on ``num_prompts`` held-out items of
    ``world``; "clip" on ``prompts`` (already the subset to use) with the CLIP model folder
    ``clip_model``, sampling ``sample_size`` latents ``batch_size`` prompts at a time."""
    if kind not in MEASURES:
        raise ValueError(f"quality measure {kind!r}: expected one of {MEASURES}")
    if kind == "clip":
        if not clip_model or not prompts or not sample_size:
            raise ValueError("quality measure 'clip' needs clip_model (a CLIP model folder), "
                             "prompts and sample_size (the latent side)")
        from snapjax.eval.clip_score import ClipScorer
        return ClipScoreQuality(text_encoder, text_params, vae, vae_params, schedule, tokenizer,
                                ClipScorer.from_folder(clip_model), list(prompts), sample_size,
                                num_steps=num_steps, guidance_scale=guidance_scale,
                                batch_size=batch_size, seed=seed)
    if world is None:
        raise ValueError(f"quality measure {kind!r} scores on the embedded world: pass world")
    if kind == "world":
        return WorldSampleQuality(text_encoder, text_params, vae, vae_params, schedule, world,
                                  tokenizer, num_prompts=num_prompts, num_steps=num_steps,
                                  guidance_scale=guidance_scale, seed=seed)
    from snapjax.data.world import render_batch
    from snapjax.eval import reader as reader_lib
    eval_world = dataclasses.replace(world, seed=reader_lib.EVAL_WORLD_SEED)
    images, captions, _ = render_batch(np.arange(num_prompts), eval_world)
    x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    mean, _ = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(vae_params, x)
    ids = jnp.asarray(np.asarray(tokenizer(captions), np.int32))
    ctx = sampling.encode_text(text_encoder, text_params, ids)
    return DenoiseQuality(np.asarray(mean) * vae.spec.scaling_factor, np.asarray(ctx), schedule,
                          seed=seed)
