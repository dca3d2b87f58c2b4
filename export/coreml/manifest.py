"""The sampling manifest an app reads beside the Core ML packages.

It says everything the packages do not: the exact DDIM timesteps the model was trained/distilled
for, alphas_cumprod at those timesteps and at each step's landing point (including the final
alpha), what the exported Unet outputs, guidance, latent size and the latent scale. With it an
app reproduces snapjax's sampler step for step:

    z <- noise (1, C, h, w), float32, N(0, 1)
    for k in range(num_steps):
        t, a_t, a_s = timesteps[k], alphas_cumprod[k], alphas_cumprod_prev[k]
        if unet.guidance_conditioned:                               # one batch-1 call
            eps = Unet(sample=z, timestep=[t], encoder_hidden_states=cond,
                       timestep_cond=guidance_features(guidance_scale))
        else:
            eps = Unet(sample=[z, z], timestep=[t, t], encoder_hidden_states=[uncond, cond])
            eps = eps[0] + guidance_scale * (eps[1] - eps[0])      # batch 1: two calls
        x = (z - sqrt(1 - a_t) * eps) / sqrt(a_t)
        if clip_sample:
            x = clamp(x, -clip_sample_range, clip_sample_range)
        z = sqrt(a_s) * x + sqrt(1 - a_s) * eps
    image = VAEDecoder(z = z / 0.18215)

``guidance_features(w)`` is ``unet.guidance_features``: diffusers' get_guidance_scale_embedding
(w - 1, G), which the app computes in float32 (see GUIDANCE_INPUT below).
"""

from __future__ import annotations

from typing import Any

from snapjax.diffusion.schedule import NoiseSchedule, ddim_plan, final_alpha_cumprod

MANIFEST_FILE = "snapjax_coreml_manifest.json"
FORMAT_VERSION = 1

# A guidance-conditioned Unet's extra input: the (1, G) features of the guidance scale w, i.e.
# diffusers' ``timestep_cond`` = get_guidance_scale_embedding(w - 1, G), which the app computes in
# float32 or better (reference_app.guidance_features). Not w itself: the features are sin/cos of
# (w - 1) * 1000 * f, arguments of thousands of radians that an fp16 graph rounds by whole
# radians (the timestep's float64 table needs integer inputs; w is continuous), while the
# features lie in [-1, 1], where fp16 rounds by at most 2.5e-4. The name is diffusers'.
GUIDANCE_INPUT = "timestep_cond"


def schedule_section(schedule: NoiseSchedule, num_steps: int) -> dict[str, Any]:
    plan = ddim_plan(schedule, num_steps)
    return {
        "sampler": "ddim",
        "eta": 0.0,
        "num_steps": int(num_steps),
        "timesteps": [int(t) for t in plan.timesteps],
        "alphas_cumprod": [float(a) for a in plan.abar],
        "alphas_cumprod_prev": [float(a) for a in plan.abar_prev],
        "final_alpha_cumprod": float(final_alpha_cumprod(schedule)),
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": schedule.beta_schedule,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "timestep_spacing": schedule.timestep_spacing,
        "steps_offset": schedule.steps_offset,
        "clip_sample": schedule.clip_sample,
        # x_hat is clamped to +-clip_sample_range each step when clip_sample is on (DDIMScheduler)
        "clip_sample_range": float(schedule.clip_sample_range),
        "model_prediction_type": schedule.prediction_type,
        # The exported Unet converts every parametrisation to epsilon in its graph.
        "prediction_type": "epsilon",
    }


def swift_pipeline_notes(schedule: NoiseSchedule, num_steps: int, *,
                         guidance_conditioned: bool = False) -> dict[str, Any]:
    """Whether Apple's StableDiffusionPipeline (Swift) samples this model as snapjax does."""
    notes = ["Unet outputs epsilon (v/x predictions are converted in the graph), as the Swift "
             "schedulers assume."]
    if guidance_conditioned:
        notes.append(f"The Unet is guidance-conditioned: one batch-1 call per step with the "
                     f"guidance features as input {GUIDANCE_INPUT!r} (unet.guidance_features), no "
                     "unconditional pass; the Swift pipeline does not feed that input.")
    if schedule.clip_sample:
        notes.append(f"clip_sample is on: the app must clamp the predicted x to "
                     f"+-{float(schedule.clip_sample_range):g} (schedule.clip_sample_range) each "
                     "step, as the manifest's loop does.")
    grid = [int(t) for t in ddim_plan(schedule, num_steps).timesteps]
    notes.append(
        "The Swift schedulers (PNDM, DPM-Solver++) choose their own timesteps; this model was "
        f"trained for the DDIM timesteps {grid}. Sample with the manifest's DDIM loop "
        "(docs/export.md gives a Swift Scheduler for it); DPM-Solver++ at 25 or more steps "
        "approximates a 50-step teacher, not a distilled student.")
    # None of the Swift schedulers is DDIM on a given grid, so no model is sampled exactly.
    return {"exact_with_builtin_schedulers": False, "notes": notes}


def guidance_features_recipe(dim: int) -> str:
    half = dim // 2
    return (f"{GUIDANCE_INPUT} = [sin(a_0..a_{half - 1}), cos(a_0..a_{half - 1})]"
            + (" + [0]" if dim % 2 else "")
            + f", a_i = (guidance_scale - 1) * 1000 * 10000^(-i / {half - 1}), shape (1, {dim}), "
            "in float32 or better: diffusers' get_guidance_scale_embedding(guidance_scale - 1, "
            f"{dim})")


def unet_section(*, unet_batch: int, attention: str, guidance_embed_dim: int) -> dict[str, Any]:
    """What the Unet package takes and how the loop calls it. A guidance-conditioned UNet (the
    scale is an input, the output is already guided) is called once per step at batch 1."""
    conditioned = bool(guidance_embed_dim)
    if conditioned and unet_batch != 1:
        raise ValueError(f"a guidance-conditioned Unet runs at batch 1, not {unet_batch}")
    return {
        "batch": unet_batch,
        "cfg_order": ["uncond", "cond"] if unet_batch == 2 else None,
        "guidance_conditioned": conditioned,
        "guidance_input": GUIDANCE_INPUT if conditioned else None,
        "guidance_embed_dim": guidance_embed_dim or None,
        "guidance_features": guidance_features_recipe(guidance_embed_dim) if conditioned else None,
        "attention": attention,
        "encoder_hidden_states_layout": "(B, D, 1, L): last_hidden_state transposed",
        "output": "noise_pred = epsilon" + (" (guided)" if conditioned else ""),
    }


def unet_calls_per_step(unet: dict[str, Any]) -> int:
    """Unet predictions per sampling step in the manifest's loop (each of ``batch`` examples)."""
    return 1 if unet["guidance_conditioned"] else 2 // unet["batch"]


def build_manifest(*, schedule: NoiseSchedule, num_steps: int, guidance_scale: float,
                   models: dict[str, Any], latent_channels: int, latent_size: int,
                   image_size: int | None, scaling_factor: float | None, unet_batch: int,
                   context_length: int, vocab_size: int | None, attention: str,
                   components: list[dict], guidance_embed_dim: int = 0) -> dict:
    unet = unet_section(unet_batch=unet_batch, attention=attention,
                        guidance_embed_dim=guidance_embed_dim)
    return {
        "format": "snapjax-coreml-manifest",
        "version": FORMAT_VERSION,
        "models": models,
        "tokenizer": {"vocab": "vocab.json", "merges": "merges.txt", "max_length": context_length,
                      "vocab_size": vocab_size},
        "latent": {"channels": latent_channels, "height": latent_size, "width": latent_size,
                   "image_height": image_size, "image_width": image_size,
                   "scaling_factor": scaling_factor,
                   "decoder_input": "z = latent / 0.18215 (Apple's convention; the graph "
                                    "rescales to this VAE's scaling factor)"},
        "unet": unet,
        "schedule": schedule_section(schedule, num_steps),
        "guidance_scale": float(guidance_scale),
        "unet_calls_per_step": unet_calls_per_step(unet),
        "swift_pipeline": swift_pipeline_notes(schedule, num_steps,
                                               guidance_conditioned=unet["guidance_conditioned"]),
        "components": components,
    }

