"""8-step sampling from the same noise: snapjax vs PyTorch, and vs the app recipe of the manifest.

Reference: snapjax's TextToImage (DDIM, v-prediction, trailing spacing, guidance 4), itself
checked against diffusers' StableDiffusionPipeline in tests/test_text_to_image.py. Images are
uint8; PSNR >= 40 dB means they differ by float rounding only (a 1-level difference at every
pixel would already be 48 dB).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from export.checkpoint import load_source
from export.coreml.manifest import schedule_section
from export.coreml.reference_app import generate, mirror_predictors
from export.torch.export import export_torch
from export.torch.mirror import load_mirror, mirror_from_params
from export.torch.sampling import ddim_sample, decode_to_uint8
from snapjax.pipeline import TextToImage
from tests.export.tiny_models import STUDENT_SCHEDULE, psnr_uint8

PROMPT = "a red circle on the left"
STEPS, GUIDANCE = 8, 4.0
MIN_PSNR = 40.0


@pytest.fixture(scope="module")
def student_torch(student_pipeline, tmp_path_factory):
    """The student's mirror folders (export torch, no diffusers folder)."""
    out = tmp_path_factory.mktemp("student_torch") / "torch"
    export_torch(load_source(student_pipeline), out, diffusers=False, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def snapjax_image(student_pipeline):
    pipe = TextToImage.from_pretrained(student_pipeline)
    noise = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    image = pipe([PROMPT], num_steps=STEPS, guidance_scale=GUIDANCE, latents=noise)[0]
    return pipe, noise, image


def test_mirror_sampling_with_diffusers_ddim_matches_snapjax(student_pipeline, snapjax_image):
    pipe, noise, ref = snapjax_image
    source = load_source(student_pipeline)
    mirrors = {k: mirror_from_params(m, c.spec, c.params) for k, m, c in (
        (k, m, source.components[k]) for k, m in
        (("unet", "unet"), ("vae", "vae_decoder"), ("text_encoder", "text_encoder")))}
    with torch.no_grad():
        ids = torch.from_numpy(pipe.tokenizer([PROMPT, ""]).astype(np.int64))
        ctx, _ = mirrors["text_encoder"](ids)
    latents = ddim_sample(mirrors["unet"], torch.from_numpy(noise).permute(0, 3, 1, 2), ctx[:1],
                          ctx[1:], schedule=STUDENT_SCHEDULE, num_steps=STEPS,
                          guidance_scale=GUIDANCE)
    image = decode_to_uint8(mirrors["vae"], latents, source.components["vae"].spec.scaling_factor)
    assert psnr_uint8(image[0].numpy(), ref) >= MIN_PSNR


def test_manifest_recipe_matches_snapjax(student_torch, snapjax_image):
    """The loop an app runs (epsilon from the exported Unet graph, manifest alphas, Swift's
    latent scaling) reproduces snapjax's v-prediction sampler."""
    pipe, noise, ref = snapjax_image
    manifest = {"schedule": schedule_section(STUDENT_SCHEDULE, STEPS), "guidance_scale": GUIDANCE,
                "unet": {"batch": 2, "attention": "split_einsum"}}
    ids = pipe.tokenizer([PROMPT, ""]).astype(np.int64)
    image = generate(mirror_predictors(student_torch, manifest), manifest, ids[:1], ids[1:],
                     noise.transpose(0, 3, 1, 2))
    assert manifest["schedule"]["timesteps"] == [999, 874, 749, 624, 499, 374, 249, 124]
    assert psnr_uint8(image, ref) >= MIN_PSNR


def test_manifest_recipe_clamps_x_like_snapjax_and_diffusers(student_torch, snapjax_image):
    """clip_sample with a non-default range: the manifest records the range, and its loop clamps
    x_hat as snapjax's ddim_step (clip_range) and diffusers' DDIMScheduler (clip_sample=True) do;
    without the clamp the loop lands elsewhere, so the clamp is exercised."""
    pipe, noise, _ = snapjax_image
    schedule = dataclasses.replace(STUDENT_SCHEDULE, clip_sample=True, clip_sample_range=1.5)
    clipped = copy.copy(pipe)
    clipped.schedule = schedule
    ref = clipped([PROMPT], num_steps=STEPS, guidance_scale=GUIDANCE, latents=noise)[0]
    manifest = {"schedule": schedule_section(schedule, STEPS), "guidance_scale": GUIDANCE,
                "unet": {"batch": 2, "attention": "original"}}
    assert (manifest["schedule"]["clip_sample"], manifest["schedule"]["clip_sample_range"]) == (
        True, 1.5)
    predict = mirror_predictors(student_torch, manifest)
    ids = pipe.tokenizer([PROMPT, ""]).astype(np.int64)
    image = generate(predict, manifest, ids[:1], ids[1:], noise.transpose(0, 3, 1, 2))
    assert psnr_uint8(image, ref) >= MIN_PSNR
    # diffusers' DDIMScheduler(clip_sample=True, clip_sample_range=1.5) on the same mirrors
    mirrors = {k: load_mirror(student_torch / k) for k in ("unet", "text_encoder", "vae_decoder")}
    with torch.no_grad():
        ctx, _ = mirrors["text_encoder"](torch.from_numpy(ids))
    latents = ddim_sample(mirrors["unet"], torch.from_numpy(noise).permute(0, 3, 1, 2), ctx[:1],
                          ctx[1:], schedule=schedule, num_steps=STEPS, guidance_scale=GUIDANCE)
    theirs = decode_to_uint8(mirrors["vae_decoder"], latents,
                             mirrors["vae_decoder"].spec.scaling_factor)
    assert psnr_uint8(image, theirs[0].numpy()) >= MIN_PSNR
    unclamped = copy.deepcopy(manifest)
    unclamped["schedule"]["clip_sample"] = False
    other = generate(predict, unclamped, ids[:1], ids[1:], noise.transpose(0, 3, 1, 2))
    assert psnr_uint8(other, ref) < 30.0
