"""The sampling manifest an app reads beside the Core ML packages.

It says everything the packages do not: the exact DDIM timesteps the model was trained/distilled
for, alphas_cumprod at those timesteps and at each step's landing point (including the final
alpha), what the exported Unet outputs, guidance, latent size and the latent scale. With it an
app reproduces snapjax's sampler step for step:

    z <- noise (1, C, h, w), float32, N(0, 1)
    for k in range(num_steps):
        t, a_t, a_s = timesteps[k], alphas_cumprod[k], alphas_cumprod_prev[k]
        eps = Unet(sample=[z, z], timestep=[t, t], encoder_hidden_states=[uncond, cond])
        eps = eps[0] + guidance_scale * (eps[1] - eps[0])          # batch 1: two calls
        x = (z - sqrt(1 - a_t) * eps) / sqrt(a_t)
        z = sqrt(a_s) * x + sqrt(1 - a_s) * eps
    image = VAEDecoder(z = z / 0.18215)
"""

from __future__ import annotations

from typing import Any

from snapjax.diffusion.schedule import NoiseSchedule, ddim_plan, final_alpha_cumprod

MANIFEST_FILE = "snapjax_coreml_manifest.json"
FORMAT_VERSION = 1


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
        "model_prediction_type": schedule.prediction_type,
        # The exported Unet converts every parametrisation to epsilon in its graph.
        "prediction_type": "epsilon",
    }


def swift_pipeline_notes(schedule: NoiseSchedule, num_steps: int) -> dict[str, Any]:
    """Whether Apple's StableDiffusionPipeline (Swift) samples this model as snapjax does."""
    notes = ["Unet outputs epsilon (v/x predictions are converted in the graph), as the Swift "
             "schedulers assume."]
    if schedule.clip_sample:
        notes.append("clip_sample is on: the app must clamp x to +-clip_sample_range each step.")
    grid = [int(t) for t in ddim_plan(schedule, num_steps).timesteps]
    notes.append(
        "The Swift schedulers (PNDM, DPM-Solver++) choose their own timesteps; this model was "
        f"trained for the DDIM timesteps {grid}. Sample with the manifest's DDIM loop "
        "(docs/export.md gives a Swift Scheduler for it); DPM-Solver++ at 25 or more steps "
        "approximates a 50-step teacher, not a distilled student.")
    # None of the Swift schedulers is DDIM on a given grid, so no model is sampled exactly.
    return {"exact_with_builtin_schedulers": False, "notes": notes}


def build_manifest(*, schedule: NoiseSchedule, num_steps: int, guidance_scale: float,
                   models: dict[str, Any], latent_channels: int, latent_size: int,
                   image_size: int | None, scaling_factor: float | None, unet_batch: int,
                   context_length: int, vocab_size: int | None, attention: str,
                   components: list[dict]) -> dict:
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
        "unet": {"batch": unet_batch, "cfg_order": ["uncond", "cond"] if unet_batch == 2 else None,
                 "attention": attention,
                 "encoder_hidden_states_layout": "(B, D, 1, L): last_hidden_state transposed",
                 "output": "noise_pred = epsilon"},
        "schedule": schedule_section(schedule, num_steps),
        "guidance_scale": float(guidance_scale),
        "swift_pipeline": swift_pipeline_notes(schedule, num_steps),
        "components": components,
    }

