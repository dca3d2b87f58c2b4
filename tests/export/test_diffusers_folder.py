"""The diffusers folder written by the torch export: loads in StableDiffusionPipeline and samples
the same image as snapjax; specs diffusers cannot express get mirrors only, with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.checkpoint import load_source
from export.torch.export import export_torch
from export.torch.mirror import load_mirror
from snapjax.pipeline import TextToImage
from export.parity import example_inputs, mirror_forward, snapjax_forward
from tests.conftest import max_rel_err
from tests.export.tiny_models import (STUDENT_SCHEDULE, UNET_GRAMMAR, psnr_uint8,
                                      random_params, write_pipeline)

PROMPTS = ["a red circle on the left"]


@pytest.fixture(scope="module")
def exported(student_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch_export") / "out"
    report = export_torch(load_source(student_pipeline), out, log=lambda _: None)
    return out, report


def test_folder_layout_and_report(exported):
    out, report = exported
    for name in ("unet", "vae_decoder", "text_encoder"):
        assert (out / name / "model.safetensors").is_file()
        assert load_mirror(out / name).kind == name
    for name in ("vocab.json", "merges.txt"):
        assert (out / "tokenizer" / name).is_file()
        assert (out / "diffusers/tokenizer" / name).is_file()
    assert report["diffusers"] == "diffusers"
    saved = json.loads((out / "export_report.json").read_text())
    rows = {r["component"]: r for r in saved["components"]}
    assert set(rows) == {"unet", "vae_decoder", "text_encoder"}
    assert all(r["parity"] < 1e-4 and r["params"] > 0 and r["size_bytes"] > 0
               for r in rows.values())
    scheduler = json.loads((out / "diffusers/scheduler/scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert (scheduler["prediction_type"], scheduler["timestep_spacing"],
            scheduler["set_alpha_to_one"]) == ("v_prediction", "trailing", False)


def test_stable_diffusion_pipeline_samples_like_snapjax(exported, student_pipeline):
    from diffusers import StableDiffusionPipeline

    out, _ = exported
    torch_pipe = StableDiffusionPipeline.from_pretrained(
        str(out / "diffusers"), safety_checker=None, requires_safety_checker=False)
    torch_pipe.set_progress_bar_config(disable=True)
    noise = np.random.default_rng(3).standard_normal((1, 8, 8, 4)).astype(np.float32)
    ref = TextToImage.from_pretrained(student_pipeline)(PROMPTS, num_steps=8, guidance_scale=4.0,
                                                         latents=noise)
    image = torch_pipe(PROMPTS, latents=torch.from_numpy(noise).permute(0, 3, 1, 2),
                       num_inference_steps=8, guidance_scale=4.0, output_type="np").images
    image = (image * 255).round().astype(np.uint8)
    assert image.shape == ref.shape == (1, 16, 16, 3)
    assert psnr_uint8(image, ref) >= 40.0


def test_exported_diffusers_folder_imports_back(exported, student_pipeline):
    """The diffusers folder is also a snapjax checkpoint: import it and get the same params."""
    out, _ = exported
    again = load_source(out / "diffusers")
    first = load_source(student_pipeline)
    for kind in ("unet", "vae", "text_encoder"):
        a, b = first.components[kind], again.components[kind]
        assert a.spec == b.spec
        flat_a = dict(jax_leaves(a.params))
        for path, value in jax_leaves(b.params):
            np.testing.assert_array_equal(value, flat_a[path])


def jax_leaves(tree):
    import jax
    return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in
            jax.tree_util.tree_leaves_with_path(tree)]


def test_spec_that_does_not_fit_gets_mirrors_only(removed_pipeline, tmp_path):
    report = export_torch(load_source(removed_pipeline), tmp_path / "out", log=lambda _: None)
    assert report["diffusers"] is None and not (tmp_path / "out" / "diffusers").exists()
    reasons = " ".join(report["diffusers_misfits"])
    assert "removed ResNet" in reasons and "pruned decoder" in reasons
    for name in ("unet", "vae_decoder", "text_encoder"):
        assert (tmp_path / "out" / name / "model.safetensors").is_file()
    assert all(r["parity"] < 1e-4 for r in report["components"])


def test_general_grammar_unet_gets_mirrors_only(tmp_path):
    """A UNet with 'RAA' units and mid 'rAAR' (full VAE): the mirrors are written and match
    snapjax; the diffusers folder is not, and the report says it is the UNet's units."""
    pipe = write_pipeline(tmp_path / "pipe", unet=UNET_GRAMMAR, schedule=STUDENT_SCHEDULE)
    out = tmp_path / "out"
    report = export_torch(load_source(pipe), out, log=lambda _: None)
    assert report["diffusers"] is None and not (out / "diffusers").exists()
    assert len(report["diffusers_misfits"]) == 1
    assert report["diffusers_misfits"][0].startswith("UNet: ")
    assert "'RAA'" in report["diffusers_misfits"][0]
    mirror = load_mirror(out / "unet")
    assert mirror.spec == UNET_GRAMMAR
    inputs = example_inputs("unet", UNET_GRAMMAR, latent_size=8, context_length=5)
    ref = snapjax_forward("unet", UNET_GRAMMAR, random_params("unet", UNET_GRAMMAR), inputs)
    assert max_rel_err(mirror_forward(mirror, "unet", inputs), ref) < 1e-4
