"""Pure, module-level train steps: one per objective, all of the form

    step(state, batch, rng, frozen, *, <options>) -> (new_state, metrics)

Legend: B batch, H W image height/width, h w latent height/width, C latent channels,
L tokens, D context width, A microbatches.

``frozen`` holds the models that are used but not trained (the VAE that encodes images for the
UNet, a frozen text encoder, the empty-prompt ids or context); it is a separate argument so that
jit does not donate it and the optimizer never sees it. Every option is bound with
``functools.partial`` before ``jax.jit``, so nothing inside the traced code branches on a
config. Randomness: ``jax.random.fold_in(rng, state.step)``, so a resumed run draws exactly
the numbers the uninterrupted run would have drawn.

Gradient accumulation is a ``lax.scan`` over A microbatches inside the step, not
``optax.MultiSteps``: one call stays one optimizer update (step counter, learning rate, EMA and
checkpoints all count real updates), activations are held for one microbatch at a time, and the
accumulated gradient is the full-batch gradient (the losses are means), which the tests check.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from snapjax.diffusion.parametrization import add_noise, from_x_eps
from snapjax.diffusion.schedule import NoiseSchedule, alpha_sigma, alphas_cumprod
from snapjax.models.vae import sample_latent
from snapjax.train import robust
from snapjax.train.state import TrainState

# loss_fn(params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


# ----------------------------------------------------------------------------- shared update

def _split_microbatches(batch: dict, microbatches: int) -> dict:
    """(B, ...) -> (A, B/A, ...) with microbatch i = rows i, i+A, i+2A, ...

    Strided rather than contiguous so that every microbatch takes rows from every device's
    block of the batch: the split needs no communication and keeps all devices busy.
    """
    def split(x):
        x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def _loss_and_grads(loss_fn: LossFn, params, frozen, batch: dict, rng: jax.Array,
                    microbatches: int):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (loss, metrics), grads = grad_fn(params, frozen, batch, rng)
        return loss, metrics, grads

    def body(grads_sum, xs):
        micro, i = xs
        (loss, metrics), grads = grad_fn(params, frozen, micro, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, grads_sum, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads_sum, (losses, metrics) = jax.lax.scan(
        body, zeros, (_split_microbatches(batch, microbatches), jnp.arange(microbatches)))
    grads = jax.tree.map(lambda g: g / microbatches, grads_sum)
    return losses.mean(), jax.tree.map(jnp.mean, metrics), grads


def train_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, ema_decay: float,
               microbatches: int = 1) -> tuple[TrainState, dict]:
    """One optimizer update of ``state.params`` on ``loss_fn``; EMA follows the new params."""
    rng = jax.random.fold_in(rng, state.step)
    loss, metrics, grads = _loss_and_grads(loss_fn, state.params, frozen, batch, rng, microbatches)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - ema_decay)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(params))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics


# ----------------------------------------------------------------------------- UNet diffusion

def model_range(image_BHWC: jax.Array) -> jax.Array:
    """Images as the VAE takes them, float32 in [-1, 1]; uint8 batches (4x less host-to-device
    traffic) are converted here, on device."""
    if jnp.issubdtype(image_BHWC.dtype, jnp.integer):
        return image_BHWC.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    return image_BHWC.astype(jnp.float32)


def min_snr_weight(abar_B: jax.Array, gamma: float | None, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for an eps or v loss; 1 without gamma.

    With snr = abar / (1 - abar): eps loss weight min(snr, gamma) / snr, v loss weight
    min(snr, gamma) / (snr + 1) (the v loss already carries a factor snr + 1 relative to x).
    """
    if gamma is None:
        return jnp.ones_like(abar_B)
    snr = abar_B / (1.0 - abar_B)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "epsilon":
        return clipped / snr
    return clipped  # "sample": the x loss is snr times the eps loss


def cached_inputs(params, frozen, batch: dict, rng: jax.Array, *, caption_dropout: float):
    """Prepared shards: ``latent`` (B, h, w, C), already scaled, and ``context`` (B, L, D).

    Caption dropout swaps in ``frozen["empty_context"]`` (1, L, D), the empty prompt's encoding.
    """
    del params
    latents, ctx = batch["latent"], batch["context"]
    drop_B = jax.random.bernoulli(rng, caption_dropout, (ctx.shape[0],))
    ctx = jnp.where(drop_B[:, None, None], frozen["empty_context"].astype(ctx.dtype), ctx)
    return latents.astype(jnp.float32), ctx


def encoded_inputs(params, frozen, batch: dict, rng: jax.Array, *, vae: nn.Module,
                   text_encoder: nn.Module, text_trainable: bool, caption_dropout: float):
    """Raw data: ``image`` (B, H, W, 3) (see :func:`model_range`) and ``input_ids`` (B, L).

    The frozen VAE encodes (a posterior sample, scaled by ``vae.spec.scaling_factor``); the
    text encoder comes from ``params`` when it is trained, else from ``frozen``. Caption
    dropout replaces the ids with ``frozen["empty_ids"]`` (1, L): the empty prompt's context.
    """
    r_drop, r_post = jax.random.split(rng)
    mean, logvar = vae.apply({"params": frozen["vae"]}, model_range(batch["image"]),
                             method="encode")
    latents = sample_latent(mean, logvar, r_post) * vae.spec.scaling_factor
    ids = batch["input_ids"]
    drop_B = jax.random.bernoulli(r_drop, caption_dropout, (ids.shape[0],))
    ids = jnp.where(drop_B[:, None], frozen["empty_ids"].astype(ids.dtype), ids)
    text_params = params["text_encoder"] if text_trainable else frozen["text_encoder"]
    ctx = text_encoder.apply({"params": text_params}, ids)
    return jax.lax.stop_gradient(latents), ctx


def takes_guidance(unet: nn.Module) -> bool:
    """Whether the UNet has a guidance input (a module without a spec, a test double, has not)."""
    return bool(getattr(getattr(unet, "spec", None), "guidance_embed_dim", 0))


def diffusion_loss(params, frozen, batch: dict, rng: jax.Array, *, unet: nn.Module,
                   inputs: Callable, schedule: NoiseSchedule,
                   min_snr_gamma: float | None = None,
                   block_mask: robust.MaskFn | None = None) -> tuple[jax.Array, dict]:
    """Denoising loss of ``params["unet"]`` for the schedule's prediction type (eps or v).

    ``block_mask`` (robust training, :func:`snapjax.train.robust.block_mask_sampler`): draws
    which UNet blocks run, from :func:`snapjax.train.robust.mask_key` of ``rng``; None runs all.
    """
    r_in, r_t, r_eps = jax.random.split(rng, 3)
    x, ctx_BLD = inputs(params, frozen, batch, r_in)
    B = x.shape[0]
    abar_T = jnp.asarray(alphas_cumprod(schedule))
    t_B = jax.random.randint(r_t, (B,), 0, schedule.num_train_timesteps)
    eps = jax.random.normal(r_eps, x.shape, jnp.float32)
    abar_B = abar_T[t_B]
    alpha_B, sigma_B = alpha_sigma(abar_B)
    z_t = add_noise(x, eps, alpha_B, sigma_B)
    target = from_x_eps(x, eps, alpha_B, sigma_B, schedule.prediction_type)
    metrics, unet_kwargs = {}, {}
    if block_mask is not None:  # bound before jit: a static choice, not a traced branch
        mask = block_mask(robust.mask_key(rng), B)
        metrics["robust/keep_fraction"] = jnp.mean(mask)
        unet_kwargs["block_mask"] = mask
    if takes_guidance(unet):
        # A guidance-conditioned UNet's w = 1 output is the plain conditional one: what the
        # denoising loss trains (its guided outputs are learned from a teacher).
        unet_kwargs["guidance_B"] = jnp.ones((B,), jnp.float32)
    pred = unet.apply({"params": params["unet"]}, z_t, t_B, ctx_BLD, **unet_kwargs)
    per_example_B = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
    weight_B = min_snr_weight(abar_B, min_snr_gamma, schedule.prediction_type)
    loss = jnp.mean(weight_B * per_example_B)
    return loss, {"mse": jnp.mean(per_example_B), **metrics}


def unet_diffusion_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any, *,
                        unet: nn.Module, schedule: NoiseSchedule, inputs: Callable,
                        optimizer: optax.GradientTransformation, ema_decay: float,
                        min_snr_gamma: float | None = None,
                        block_mask: robust.MaskFn | None = None,
                        microbatches: int = 1) -> tuple[TrainState, dict]:
    """One UNet update. ``inputs`` is :func:`cached_inputs` or :func:`encoded_inputs` with
    their options (caption dropout, text encoder) bound; ``block_mask`` as in
    :func:`diffusion_loss` (each microbatch draws its own masks)."""
    loss_fn = functools.partial(diffusion_loss, unet=unet, inputs=inputs, schedule=schedule,
                                min_snr_gamma=min_snr_gamma, block_mask=block_mask)
    return train_step(state, batch, rng, frozen, loss_fn=loss_fn, optimizer=optimizer,
                      ema_decay=ema_decay, microbatches=microbatches)


# ----------------------------------------------------------------------------- VAE

def vae_loss(params, frozen, batch: dict, rng: jax.Array, *, vae: nn.Module, kl_weight: float,
             recon: str) -> tuple[jax.Array, dict]:
    """KL autoencoder: reconstruction (L1 or L2, mean per pixel) + kl_weight * KL (mean per
    latent element) of the posterior from N(0, 1). No adversarial or perceptual term."""
    del frozen
    x = model_range(batch["image"])
    mean, logvar = vae.apply({"params": params["vae"]}, x, method="encode")
    z = sample_latent(mean, logvar, rng)
    x_rec = vae.apply({"params": params["vae"]}, z, method="decode")
    diff = x_rec - x
    rec = jnp.mean(jnp.abs(diff)) if recon == "l1" else jnp.mean(jnp.square(diff))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl, {"recon": rec, "kl": kl, "latent_std": jnp.std(mean)}


def vae_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any, *, vae: nn.Module,
             kl_weight: float, recon: str, optimizer: optax.GradientTransformation,
             ema_decay: float, microbatches: int = 1) -> tuple[TrainState, dict]:
    """One update of ``state.params["vae"]`` on :func:`vae_loss`."""
    if recon not in ("l1", "l2"):
        raise ValueError(f"vae_step: recon={recon!r}, expected 'l1' or 'l2'")
    loss_fn = functools.partial(vae_loss, vae=vae, kl_weight=kl_weight, recon=recon)
    return train_step(state, batch, rng, frozen, loss_fn=loss_fn, optimizer=optimizer,
                      ema_decay=ema_decay, microbatches=microbatches)


# ----------------------------------------------------------------------------- decoder distillation

DECODER_LOSSES = ("mse", "l1")


def decoder_distill_loss(params, frozen, batch: dict, rng: jax.Array, *, student: nn.Module,
                         teacher: nn.Module, loss: str) -> tuple[jax.Array, dict]:
    """The pruned decoder ``params["decoder"]`` against the frozen ``frozen["teacher"]`` on the
    same latents: ``batch["latent"]`` (B, h, w, C), scaled as the UNet sees them (prepared
    shards, generated or encoded). Pixel MSE (SnapFusion) or L1 between the two images, both
    unclipped; ``psnr`` is of the clipped images against each other (peak-to-peak 2)."""
    del rng
    z = batch["latent"].astype(jnp.float32) / teacher.spec.scaling_factor
    target = jax.lax.stop_gradient(
        teacher.apply({"params": frozen["teacher"]}, z).astype(jnp.float32))
    image = student.apply({"params": params["decoder"]}, z).astype(jnp.float32)
    diff = image - target
    mse, l1 = jnp.mean(jnp.square(diff)), jnp.mean(jnp.abs(diff))
    shown_mse = jnp.mean(jnp.square(jnp.clip(image, -1, 1) - jnp.clip(target, -1, 1)))
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(shown_mse, 1e-12))
    return (mse if loss == "mse" else l1), {"mse": mse, "l1": l1, "psnr": psnr}


def decoder_distill_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any, *,
                         student: nn.Module, teacher: nn.Module, loss: str,
                         optimizer: optax.GradientTransformation, ema_decay: float,
                         microbatches: int = 1) -> tuple[TrainState, dict]:
    """One update of the student decoder on :func:`decoder_distill_loss`; the teacher is in
    ``frozen``, never donated or optimised."""
    if loss not in DECODER_LOSSES:
        raise ValueError(f"decoder_distill_step: loss={loss!r}, expected one of {DECODER_LOSSES}")
    loss_fn = functools.partial(decoder_distill_loss, student=student, teacher=teacher, loss=loss)
    return train_step(state, batch, rng, frozen, loss_fn=loss_fn, optimizer=optimizer,
                      ema_decay=ema_decay, microbatches=microbatches)


# ----------------------------------------------------------------------------- step distillation

GAMMA_SCALINGS = ("dynamic", "constant")
CFG_MIXES = ("cond", "w_one")


def step_distill_loss(params, frozen, batch: dict, rng: jax.Array, *, student: nn.Module,
                      teacher: nn.Module, inputs: Callable, uncond: Callable,
                      schedule: NoiseSchedule, teacher_schedule: NoiseSchedule, grid,
                      space: str, cfg_prob: float, guidance_range: tuple[float, float],
                      gamma: float, gamma_scaling: str, cfg_mix: str = "cond",
                      block_mask: robust.MaskFn | None = None) -> tuple[jax.Array, dict]:
    """Step distillation of ``params["unet"]`` from the frozen ``frozen["teacher"]`` (any UNet
    spec: direct distillation); see :mod:`snapjax.diffusion.distill`.

    Each example draws one of the student's K steps (``grid``: (t, t_mid, s) int arrays (K,))
    and noises its latent to z_t. Vanilla loss: the student's output against the teacher's
    two-step target. CFG-aware loss (with probability ``cfg_prob`` per step): w ~ U[guidance_range]
    per example and every teacher and student output is w out(c) - (w - 1) out(empty)
    (``uncond(frozen)``: the empty prompt's context (1, L, D)). A guidance-conditioned student
    (``spec.guidance_embed_dim > 0``) gives its guided output in one call with w as its input;
    each of its examples takes a drawn w with probability ``cfg_prob`` and w = 1 otherwise. A
    guidance-conditioned teacher is called the same way. ``cfg_mix`` (for 0 < p < 1): "cond"
    runs only the chosen loss (``lax.cond``), "w_one" runs the guided loss every step with w = 1
    on plain steps (the same loss, no branch). Plus ``gamma`` times the student's
    plain denoising loss on the same latents at a uniform timestep; ``dynamic`` scales that term
    to the distillation loss's size (``gamma * sg(L_distill / L_orig) * L_orig``), ``constant``
    adds it as is.
    """
    from snapjax.diffusion import distill
    from snapjax.diffusion.guidance import guided_output

    r_in, r_k, r_eps, r_cfg, r_w, r_orig = jax.random.split(rng, 6)
    x, ctx_BLD = inputs(params, frozen, batch, r_in)
    B = x.shape[0]
    t_K, mid_K, s_K = (jnp.asarray(a, jnp.int32) for a in grid)
    k_B = jax.random.randint(r_k, (B,), 0, t_K.shape[0])
    t_B, mid_B, s_B = t_K[k_B], mid_K[k_B], s_K[k_B]
    abar_B = distill.abar_of(schedule, t_B)
    alpha_B, sigma_B = alpha_sigma(abar_B)
    z_t = add_noise(x, jax.random.normal(r_eps, x.shape, jnp.float32), alpha_B, sigma_B)

    metrics, masked = {}, {}
    if block_mask is not None:  # bound before jit: a static choice
        mask = block_mask(robust.mask_key(rng), B)
        metrics["robust/keep_fraction"] = jnp.mean(mask)
        masked = {"block_mask": mask}

    def student_apply(z, t, ctx, **kw):
        return student.apply({"params": params["unet"]}, z, t, ctx, **kw)

    def teacher_apply(z, t, ctx, **kw):
        return teacher.apply({"params": frozen["teacher"]}, z, t, ctx, **kw)

    def guided(apply, conditioned, z, t, empty, w_B, **kw):
        """w out(c) - (w - 1) out(empty): one call with w for a guidance-conditioned UNet, two
        (a 2B batch) otherwise."""
        if conditioned:
            return apply(z, t, ctx_BLD, guidance_B=w_B, **kw).astype(jnp.float32)
        if "block_mask" in kw:  # the 2B batch's rows: uncond then cond, one mask row each
            kw = {**kw, "block_mask": jnp.concatenate([kw["block_mask"]] * 2)}
        return guided_output(lambda zz, tt, c: apply(zz, tt, c, **kw), z, t, ctx_BLD, empty, w_B)

    def loss_at(w_B):
        """The distillation loss with every teacher and student output guided at w_B."""
        empty = jnp.broadcast_to(uncond(frozen).astype(ctx_BLD.dtype), ctx_BLD.shape)
        target = distill.two_step_target(
            lambda z, t: guided(teacher_apply, teacher_conditioned, z, t, empty, w_B), z_t, t_B,
            mid_B, s_B, teacher_schedule)
        out = guided(student_apply, student_conditioned, z_t, t_B, empty, w_B, **masked)
        return distill.distill_loss(out, z_t, jax.lax.stop_gradient(target), abar_B,
                                    prediction_type=schedule.prediction_type, space=space)

    def vanilla():
        # The plain loss is the guided one at w = 1 (out(c)), without the unconditional calls.
        ones = {"guidance_B": jnp.ones((B,), jnp.float32)}
        target = distill.two_step_target(
            lambda z, t: teacher_apply(z, t, ctx_BLD, **(ones if teacher_conditioned else {})),
            z_t, t_B, mid_B, s_B, teacher_schedule)
        out = student_apply(z_t, t_B, ctx_BLD, **masked,
                            **(ones if student_conditioned else {}))
        return distill.distill_loss(out, z_t, jax.lax.stop_gradient(target), abar_B,
                                    prediction_type=schedule.prediction_type, space=space)

    def drawn_w():
        return jax.random.uniform(r_w, (B,), minval=guidance_range[0], maxval=guidance_range[1])

    student_conditioned, teacher_conditioned = takes_guidance(student), takes_guidance(teacher)
    if student_conditioned:
        # One student call whatever w is, so the choice is per example and costs nothing: w is
        # drawn with probability cfg_prob and is 1 (the plain loss) otherwise.
        use_B = jax.random.bernoulli(r_cfg, cfg_prob, (B,))
        per_example = loss_at(jnp.where(use_B, drawn_w(), 1.0))
        used_cfg = jnp.mean(use_B.astype(jnp.float32))
    elif cfg_prob >= 1.0:
        per_example, used_cfg = loss_at(drawn_w()), jnp.float32(1)
    elif cfg_prob <= 0.0:
        per_example, used_cfg = vanilla(), jnp.float32(0)
    elif cfg_mix == "cond":
        use = jax.random.bernoulli(r_cfg, cfg_prob)
        per_example = jax.lax.cond(use, lambda: loss_at(drawn_w()), vanilla)
        used_cfg = use.astype(jnp.float32)
    else:
        # "w_one": the plain loss is the guided one at w = 1, so no branch is needed, at the cost
        # of the unconditional calls on plain steps too. XLA:CPU runs the lax.cond step 3x slower
        # than either branch alone (docs/distill.md), more than the extra calls cost there.
        use = jax.random.bernoulli(r_cfg, cfg_prob)
        per_example = loss_at(jnp.where(use, drawn_w(), 1.0))
        used_cfg = use.astype(jnp.float32)
    distill_term = jnp.mean(per_example)
    metrics.update({"distill": distill_term, "cfg_aware": used_cfg})
    loss = distill_term
    if gamma > 0:
        orig, _ = diffusion_loss(params, frozen, batch, r_orig, unet=student,
                                 inputs=lambda *_: (x, ctx_BLD), schedule=schedule,
                                 block_mask=block_mask)
        scale = (jax.lax.stop_gradient(distill_term / jnp.maximum(orig, 1e-12))
                 if gamma_scaling == "dynamic" else 1.0)
        loss = distill_term + gamma * scale * orig
        metrics["orig"] = orig
    return loss, metrics


def step_distill_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any, *,
                      optimizer: optax.GradientTransformation, ema_decay: float,
                      microbatches: int = 1, **options) -> tuple[TrainState, dict]:
    """One student update on :func:`step_distill_loss` (its keyword options bound); the
    teacher is in ``frozen``, never donated, optimised or checkpointed."""
    if options.get("gamma_scaling") not in GAMMA_SCALINGS:
        raise ValueError(f"step_distill_step: gamma_scaling={options.get('gamma_scaling')!r}, "
                         f"expected one of {GAMMA_SCALINGS}")
    if options.get("cfg_mix", "cond") not in CFG_MIXES:
        raise ValueError(f"step_distill_step: cfg_mix={options.get('cfg_mix')!r}, expected one "
                         f"of {CFG_MIXES}")
    loss_fn = functools.partial(step_distill_loss, **options)
    return train_step(state, batch, rng, frozen, loss_fn=loss_fn, optimizer=optimizer,
                      ema_decay=ema_decay, microbatches=microbatches)
