"""A guidance-conditioned student (the scale is a UNet input, one call per step) through every
export: the diffusers folder sampled by diffusers' own StableDiffusionPipeline, and the Core ML
Unet with its guidance input, sampled by the manifest's loop, both against snapjax's TextToImage.

The UNet's cond_proj is random (non-zero), so the guidance input changes every output. Images are
uint8; PSNR >= 40 dB means float rounding only (see test_sampling_parity.py).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from export.checkpoint import load_source
from export.coreml.export import CoreMLOptions, export_coreml, package_io
from export.coreml.manifest import GUIDANCE_INPUT
from export.coreml.reference_app import generate, guidance_features, mirror_predictors
from export.torch.export import export_torch
from snapjax.cli import main as snapjax_main
from snapjax.pipeline import TextToImage, read_pipeline_file
from tests.export.tiny_models import STUDENT_SCHEDULE, UNET_GUIDED, psnr_uint8, write_pipeline

PROMPT = "a red circle on the left"
STEPS, GUIDANCE = 4, 5.0
MIN_PSNR = 40.0
G = UNET_GUIDED.guidance_embed_dim


@pytest.fixture(scope="module")
def guided_pipeline(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("guided") / "pipe", unet=UNET_GUIDED,
                          schedule=STUDENT_SCHEDULE, seed=20,
                          sampling={"num_steps": STEPS, "guidance_scale": GUIDANCE})


@pytest.fixture(scope="module")
def guided_torch(guided_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("guided_torch") / "out"
    return out, export_torch(load_source(guided_pipeline), out, log=lambda _: None)


@pytest.fixture(scope="module")
def snapjax_image(guided_pipeline):
    pipe = TextToImage.from_pretrained(guided_pipeline)
    assert pipe.guidance_conditioned and pipe.unet_calls_per_step == 1
    noise = np.random.default_rng(5).standard_normal((1, 8, 8, 4)).astype(np.float32)
    return pipe, noise, pipe([PROMPT], latents=noise)[0]  # the recorded 4 steps at w = 5


def test_stable_diffusion_pipeline_samples_the_guided_student_like_snapjax(guided_torch,
                                                                         snapjax_image):
    """diffusers' pipeline, seeing time_cond_proj_dim, skips the unconditional half and feeds
    get_guidance_scale_embedding(w - 1): one batch-1 UNet call per step, snapjax's image."""
    from diffusers import StableDiffusionPipeline

    out, report = guided_torch
    _, noise, ref = snapjax_image
    assert report["diffusers"] == "diffusers"
    config = json.loads((out / "diffusers/unet/config.json").read_text())
    assert config["time_cond_proj_dim"] == G
    torch_pipe = StableDiffusionPipeline.from_pretrained(
        str(out / "diffusers"), safety_checker=None, requires_safety_checker=False)
    torch_pipe.set_progress_bar_config(disable=True)
    calls = []
    torch_pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args[0].shape[0], kwargs["timestep_cond"].shape)),
        with_kwargs=True)
    image = torch_pipe([PROMPT], latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np").images
    image = (image * 255).round().astype(np.uint8)
    assert calls == [(1, (1, G))] * STEPS
    assert psnr_uint8(image[0], ref) >= MIN_PSNR


def test_coreml_unet_takes_the_guidance_features_and_the_manifest_loop_matches_snapjax(
        guided_pipeline, guided_torch, snapjax_image, tmp_path):
    """The Unet package: batch 1 and a (1, G) timestep_cond input; the manifest says so and how
    to compute it; its loop (on the traced wrappers) makes one call per step and samples snapjax's
    image. A manifest without the scale, or a Unet call without the features, is refused."""
    pipe, noise, ref = snapjax_image
    source = load_source(guided_pipeline, components=("unet",))
    manifest = export_coreml(source, tmp_path / "coreml", CoreMLOptions(latent_size=8),
                             log=lambda _: None)
    package_inputs, outputs = package_io(tmp_path / "coreml/Unet.mlpackage")
    assert package_inputs == {"sample": ((1, 4, 8, 8), "FLOAT16"), "timestep": ((1,), "FLOAT16"),
                      "encoder_hidden_states": ((1, 32, 1, 77), "FLOAT16"),
                      GUIDANCE_INPUT: ((1, G), "FLOAT16")}
    assert outputs == {"noise_pred": ((1, 4, 8, 8), "FLOAT32")}
    unet = manifest["unet"]
    assert (unet["batch"], unet["cfg_order"], unet["guidance_conditioned"], unet["guidance_input"],
            unet["guidance_embed_dim"]) == (1, None, True, "timestep_cond", G)
    assert manifest["unet_calls_per_step"] == 1 and manifest["guidance_scale"] == GUIDANCE
    assert "get_guidance_scale_embedding(guidance_scale - 1, 16)" in unet["guidance_features"]
    assert manifest["schedule"]["timesteps"] == read_pipeline_file(guided_pipeline).timesteps
    row = manifest["components"][0]
    assert row["precision"] == "float16" and row["parity"] < 1e-4 and row["fp16_err"] < 0.05

    # The app's features (float64) are diffusers' (float32 sin of up to 7000 rad: 1e-4).
    from diffusers import StableDiffusionPipeline
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(
        None, torch.tensor([GUIDANCE - 1]), embedding_dim=G).numpy()
    np.testing.assert_allclose(guidance_features(np.array([GUIDANCE]), G), theirs, atol=1e-4)

    predict = mirror_predictors(guided_torch[0], manifest)
    unet_predict, calls = predict["Unet"], []

    def counting(inputs: dict) -> dict:
        calls.append({k: np.shape(v) for k, v in inputs.items()})
        return unet_predict(inputs)

    predict["Unet"] = counting
    ids = pipe.tokenizer([PROMPT]).astype(np.int64)
    image = generate(predict, manifest, ids, None, noise.transpose(0, 3, 1, 2))
    assert calls == [{k: shape for k, (shape, _) in package_inputs.items()}] * STEPS
    assert psnr_uint8(image, ref) >= MIN_PSNR
    # the scale reaches the Unet: another one samples another image (rounding stays above 40 dB)
    other = generate(predict, manifest, ids, None, noise.transpose(0, 3, 1, 2), guidance_scale=1.5)
    assert psnr_uint8(other, ref) < 35.0

    no_scale = copy.deepcopy(manifest)
    del no_scale["guidance_scale"]
    with pytest.raises(ValueError, match="guidance_scale.*guidance-conditioned"):
        generate(predict, no_scale, ids, None, noise.transpose(0, 3, 1, 2))
    z = noise.transpose(0, 3, 1, 2)
    with pytest.raises(ValueError, match="pass timestep_cond"):
        unet_predict({"sample": z, "timestep": np.full(1, 999.0),
                      "encoder_hidden_states": np.zeros((1, 32, 1, 77), np.float32)})


def test_batch_2_is_refused_for_a_guidance_conditioned_unet(guided_pipeline, tmp_path, capsys):
    """No unconditional half to batch: --unet-batch 2 fails before the checkpoint is read."""
    rc = snapjax_main(["export", "coreml", "--checkpoint", str(guided_pipeline), "--out",
                       str(tmp_path / "o"), "--unet-batch", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "--unet-batch 2" in err and "guidance-conditioned" in err
    assert "--unet-batch 1" in err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="guidance-conditioned.*one batch-1 call per step"):
        export_coreml(load_source(guided_pipeline, components=("unet",)), tmp_path / "o",
                      CoreMLOptions(unet_batch=2), log=lambda _: None)
    assert not (tmp_path / "o").exists()


def test_loop_parity_tool_names_a_missing_manifest_and_measures_psnr(tmp_path):
    import math

    from export.coreml.loop_parity import loop_parity, psnr
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr(a, a) == math.inf
    assert psnr(a, b) == pytest.approx(10 * math.log10(4 * 4 * 3))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        loop_parity(str(tmp_path), str(tmp_path), str(tmp_path), ["a"], [0])
