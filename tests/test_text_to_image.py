"""TextToImage against diffusers' StableDiffusionPipeline + DDIMScheduler on a random tiny model."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from snapjax import sampling
from snapjax.pipeline import PIPELINE_FILE, TextToImage, image_grid
from tests.conftest import max_rel_err
from tests.tiny_pipeline import build_pipeline

PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(torch pipeline, snapjax pipeline) per (prediction type, spacing), built once."""
    cache = {}

    def get(prediction_type, spacing):
        key = (prediction_type, spacing)
        if key not in cache:
            folder = tmp_path_factory.mktemp("sd") / "pipe"
            torch_pipe = build_pipeline(folder, prediction_type=prediction_type,
                                        timestep_spacing=spacing)
            cache[key] = (torch_pipe, TextToImage.from_pretrained(folder))
        return cache[key]

    return get


def _torch_latents(pipe, noise_BHWC, steps, guidance):
    out = pipe(PROMPTS, latents=torch.from_numpy(noise_BHWC).permute(0, 3, 1, 2),
               num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
    return out.images.permute(0, 2, 3, 1).numpy()


# Tolerance: fp32 on both sides; differences are float rounding accumulated over the steps.
TOL = 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_latents_match_diffusers(pipelines, prediction_type, spacing):
    torch_pipe, pipe = pipelines(prediction_type, spacing)
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    settings = [(8, 7.5)] + ([(5, 1.0)] if (prediction_type, spacing) == ("epsilon", "leading") else [])
    for steps, guidance in settings:
        ours = pipe(PROMPTS, num_steps=steps, guidance_scale=guidance, latents=noise,
                    return_latents=True)
        ref = _torch_latents(torch_pipe, noise, steps, guidance)
        err = max_rel_err(ours, ref)
        assert err < TOL, (prediction_type, spacing, steps, guidance, err)


def test_images_match_diffusers(pipelines):
    torch_pipe, pipe = pipelines("epsilon", "leading")
    noise = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = pipe(PROMPTS, num_steps=4, guidance_scale=7.5, latents=noise)
    ref = torch_pipe(PROMPTS, latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
                     num_inference_steps=4, guidance_scale=7.5, output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (2, 16, 16, 3)
    # uint8 rounding of nearly-equal floats may differ by one level at a few pixels.
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_negative_prompt_and_seed(pipelines):
    _, pipe = pipelines("epsilon", "leading")
    a = pipe(PROMPTS, num_steps=2, seed=3, return_latents=True)
    b = pipe(PROMPTS, num_steps=2, seed=3, return_latents=True)
    c = pipe(PROMPTS, num_steps=2, seed=4, return_latents=True)
    d = pipe(PROMPTS, num_steps=2, seed=3, negative_prompt="green", return_latents=True)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - d).max() > 1e-3
    # A prompt's noise depends on (seed, index), not on how prompts are batched.
    # (A batch of 1 runs other XLA kernels than a batch of 2, hence float32-rounding tolerance.)
    second = pipe(PROMPTS[1:], num_steps=2, seed=3, first_index=1, return_latents=True)
    assert max_rel_err(second[0], a[1]) < 1e-5


def test_seeded_noise_is_the_sampling_modules_convention(pipelines):
    # Training previews draw sampling.initial_noise too: a seed means the same image in both.
    _, pipe = pipelines("epsilon", "leading")
    noise = sampling.initial_noise(5, 2, (8, 8), 4, first_index=3)
    seeded = pipe(PROMPTS, num_steps=2, seed=5, first_index=3, return_latents=True)
    explicit = pipe(PROMPTS, num_steps=2, latents=np.asarray(noise), return_latents=True)
    np.testing.assert_array_equal(seeded, explicit)
    second = np.asarray(sampling.initial_noise(5, 1, (8, 8), 4, first_index=4))
    np.testing.assert_array_equal(second[0], np.asarray(noise)[1])  # (seed, index), not batch


def test_save_and_reload_snapjax_folder(pipelines, tmp_path):
    _, loaded = pipelines("v_prediction", "trailing")
    # A diffusers folder records no sampling defaults: StableDiffusionPipeline's apply.
    assert (loaded.num_steps, loaded.guidance_scale) == (50, 7.5)
    pipe = copy.copy(loaded)
    pipe.num_steps, pipe.guidance_scale = 3, 2.0  # e.g. what a model was evaluated with
    out = pipe.save_pretrained(tmp_path / "snap")
    with pytest.raises(FileExistsError, match="exists"):
        pipe.save_pretrained(tmp_path / "snap")
    again = TextToImage.from_pretrained(out)
    assert again.schedule == pipe.schedule and again.sample_size == pipe.sample_size
    assert (again.num_steps, again.guidance_scale) == (3, 2.0)
    a = loaded(PROMPTS, num_steps=3, guidance_scale=2.0, seed=0, return_latents=True)
    b = again(PROMPTS, seed=0, return_latents=True)  # the folder's defaults
    np.testing.assert_array_equal(a, b)
    c = again(PROMPTS, num_steps=3, guidance_scale=1.0, seed=0, return_latents=True)
    assert np.abs(a - c).max() > 1e-3  # an explicit argument wins over the folder's default


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(num_steps=0), "'num_steps' must be a positive integer, got 0"),
    (lambda m: m.update(guidance_scale="4"), "'guidance_scale' must be a positive number"),
    (lambda m: m.update(steps=8), r"unknown key\(s\) \['steps'\]"),
    (lambda m: m.pop("sample_size"), "missing key 'sample_size'"),
    (lambda m: m["scheduler"].update(prediction_type="x0"), "bad 'scheduler'.*prediction_type"),
    (lambda m: m.update(timesteps=[999, 500, 1]), r"'timesteps' \[999, 500, 1\] is not the grid"),
    (lambda m: m.update(guidance_conditioned=1), "'guidance_conditioned' must be true or false"),
    (lambda m: m.update(guidance_conditioned=True),
     "guidance_conditioned=true but unet/ has guidance_embed_dim=0"),
])
def test_bad_pipeline_file(pipelines, tmp_path, edit, match):
    _, pipe = pipelines("epsilon", "leading")
    out = pipe.save_pretrained(tmp_path / "snap")
    meta = json.loads((out / PIPELINE_FILE).read_text())
    edit(meta)
    (out / PIPELINE_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{PIPELINE_FILE}: {match}"):
        TextToImage.from_pretrained(out)


def test_saved_folder_records_the_exact_grid(pipelines, tmp_path):
    _, pipe = pipelines("epsilon", "leading")
    pipe = copy.copy(pipe)
    pipe.num_steps = 4
    meta = json.loads((pipe.save_pretrained(tmp_path / "snap") / PIPELINE_FILE).read_text())
    assert meta["timesteps"] == [751, 501, 251, 1]  # DDIMScheduler, leading, steps_offset 1
    assert meta["guidance_conditioned"] is False and pipe.unet_calls_per_step == 2


def test_guidance_conditioned_pipeline_samples_with_one_call(pipelines, tmp_path):
    """A UNet given a zero guidance projection is the plain UNet at every w: its folder samples,
    at any scale, what the plain pipeline samples unguided, with one UNet call per step."""
    import jax
    from snapjax.models.unet import with_guidance_input
    _, plain = pipelines("v_prediction", "trailing")
    spec, params = with_guidance_input(plain.unet.spec, plain.unet_params, 16)
    pipe = copy.copy(plain)
    pipe.unet, pipe.unet_params = plain.unet.clone(spec=spec), params
    pipe.num_steps, pipe.guidance_scale = 4, 6.0
    assert pipe.guidance_conditioned and pipe.unet_calls_per_step == 1
    again = TextToImage.from_pretrained(pipe.save_pretrained(tmp_path / "guided"))
    assert again.guidance_conditioned and again.unet.spec.guidance_embed_dim == 16
    assert json.loads((tmp_path / "guided" / PIPELINE_FILE).read_text())["guidance_conditioned"]
    one_call = again(PROMPTS, seed=0, return_latents=True)
    unguided = plain(PROMPTS, num_steps=4, guidance_scale=1.0, seed=0, return_latents=True)
    np.testing.assert_allclose(one_call, unguided, atol=1e-5)
    # with a non-zero projection the scale changes the samples
    kernel = params["time_embedding"]["cond_proj"]["kernel"]
    params["time_embedding"]["cond_proj"]["kernel"] = 0.05 * jax.random.normal(
        jax.random.key(0), kernel.shape)
    pipe.unet_params = params
    assert np.abs(pipe(PROMPTS, seed=0, guidance_scale=2.0, return_latents=True)
                  - pipe(PROMPTS, seed=0, guidance_scale=8.0, return_latents=True)).max() > 1e-3
    with pytest.raises(ValueError, match="negative_prompt: .*guidance-conditioned"):
        pipe(PROMPTS, negative_prompt="blue")


def test_bad_inputs(pipelines, tmp_path):
    _, pipe = pipelines("epsilon", "leading")
    with pytest.raises(ValueError, match=r"latents must be \(2, h, w, 4\)"):
        pipe(PROMPTS, latents=np.zeros((1, 8, 8, 4), np.float32))
    with pytest.raises(ValueError, match="height=18"):
        pipe(PROMPTS, height=18)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        TextToImage.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="without vae/, text_encoder/, tokenizer/"):
        TextToImage.from_pretrained(tmp_path / "half")


def test_image_grid():
    images = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    grid = image_grid(images, columns=2)
    assert grid.shape == (4, 4, 3)
    np.testing.assert_array_equal(grid[:2, 2:], images[1])
    np.testing.assert_array_equal(grid[2:, 2:], 0)
