"""snapjax models vs their PyTorch mirrors, fp32, same weights and inputs.

Reference: snapjax's own Flax modules (themselves checked against diffusers/transformers in
tests/models and tests/convert). Tolerance: max |mirror - snapjax| / max |snapjax| < 1e-4, what
float32 rounding leaves after a few dozen layers computed in a different op order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.parity import example_inputs, mirror_forward, snapjax_forward
from export.torch.mirror import load_mirror, mirror_from_params, save_mirror
from snapjax.models import text_encoder as te
from tests.conftest import max_rel_err
from tests.export.tiny_models import (UNET_GRAMMAR, UNET_GUIDED, UNET_MID_R, UNET_REMOVED,
                                      UNET_SD, VAE_FULL, VAE_HALF, random_params)

TOL = 1e-4


@pytest.mark.parametrize("spec", [UNET_SD, UNET_REMOVED, UNET_GRAMMAR, UNET_MID_R],
                         ids=["sd15_shape", "removed_R_and_A", "RAA_rRA_mid_rAAR", "mid_R"])
def test_unet(spec):
    params = random_params("unet", spec)
    inputs = example_inputs("unet", spec, latent_size=8, context_length=7)
    ref = snapjax_forward("unet", spec, params, inputs)
    for attention in ("original", "split_einsum"):
        mirror = mirror_from_params("unet", spec, params, attention=attention)
        err = max_rel_err(mirror_forward(mirror, "unet", inputs), ref)
        assert err < TOL, (attention, err)


def test_guidance_input_matches_flax_and_matters():
    """The guidance path with a random (non-zero) cond_proj: the scale (one per example) and its
    precomputed features give the Flax UNet's output, another scale another output; the mirror
    refuses a missing or an unexpected guidance input."""
    spec = UNET_GUIDED
    params = random_params("unet", spec)
    # Flax (G, F) kernel -> torch Linear(G, F).weight (F, G), as every Dense kernel.
    kernel = np.asarray(params["time_embedding"]["cond_proj"]["kernel"])
    mirror = mirror_from_params("unet", spec, params)
    np.testing.assert_array_equal(mirror.time_embedding.cond_proj.weight.detach().numpy(),
                                  kernel.T)
    assert mirror.time_embedding.cond_proj.bias is None
    sample, t, ctx, _ = example_inputs("unet", spec, latent_size=8, context_length=7)
    # Two examples that differ only in the scale: the outputs must differ.
    sample, t, ctx = sample[[0, 0]], t[[0, 0]], ctx[[0, 0]]
    w = np.array([2.0, 7.5], np.float32)
    ref = snapjax_forward("unet", spec, params, (sample, t, ctx, w))
    assert max_rel_err(ref[1], ref[0]) > 100 * TOL
    tensors = [torch.from_numpy(x) for x in (sample, t, ctx)]
    assert max_rel_err(mirror_forward(mirror, "unet", (sample, t, ctx, w)), ref) < TOL
    with torch.no_grad():
        from export.torch.layers import guidance_embedding
        features = guidance_embedding(torch.from_numpy(w), spec.guidance_embed_dim)
        by_features = mirror(*tensors, timestep_cond_BG=features).numpy()
        with pytest.raises(ValueError, match="guidance-conditioned.*exactly one"):
            mirror(*tensors)
        with pytest.raises(ValueError, match="exactly one"):
            mirror(*tensors, torch.from_numpy(w), timestep_cond_BG=features)
        with pytest.raises(ValueError, match=r"guidance_B must be a scalar or shape \(2,\)"):
            mirror(*tensors, torch.ones(3))
        plain = mirror_from_params("unet", UNET_SD, random_params("unet", UNET_SD))
        with pytest.raises(ValueError, match="has none"):
            plain(*tensors, torch.from_numpy(w))
    assert max_rel_err(by_features, ref) < TOL
    # diffusers' own features: StableDiffusionPipeline.get_guidance_scale_embedding(w - 1)
    from diffusers import StableDiffusionPipeline
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w - 1), embedding_dim=spec.guidance_embed_dim)
    # float32 sin of arguments up to 7000 rad: the op order leaves a few 1e-5
    np.testing.assert_allclose(features.numpy(), theirs.numpy(), atol=1e-4)


def test_removed_blocks_have_no_parameters():
    mirror = mirror_from_params("unet", UNET_REMOVED, random_params("unet", UNET_REMOVED))
    names = {n.split(".")[0] for n, _ in mirror.named_parameters()}
    # down_0_1 is 'r' at unchanged width: nothing left; up_1_0 is 'r' after a concat: its 1x1 conv.
    assert "down_0_1_res" not in names and "down_0_1_attn" not in names
    assert {k for k, _ in mirror.up_1_0_res.named_parameters()} == {"conv_shortcut.weight",
                                                                    "conv_shortcut.bias"}
    assert "mid_attn" not in names and "up_0_0_attn" in names and "up_0_0_res" in names


@pytest.mark.parametrize("spec", [UNET_GRAMMAR, UNET_MID_R], ids=["RAA_rRA_mid_rAAR", "mid_R"])
def test_unet_mirror_has_the_flax_modules(spec):
    """Same modules with parameters, under the same names, as the Flax tree; no extra block."""
    from flax import traverse_util

    from snapjax.models.unet import abstract_unet_params, count_params

    abstract = abstract_unet_params(spec)
    mirror = mirror_from_params("unet", spec, random_params("unet", spec))
    modules = {n.rsplit(".", 1)[0] for n, _ in mirror.named_parameters()}
    assert modules == {".".join(path[:-1]) for path in traverse_util.flatten_dict(abstract)}
    assert sum(p.numel() for p in mirror.parameters()) == count_params(abstract)
    if spec is UNET_MID_R:
        assert "mid_res_0" in {m.split(".")[0] for m in modules}
        assert not hasattr(mirror, "mid_res_1") and not hasattr(mirror, "mid_attn")


@pytest.mark.parametrize("spec", [VAE_FULL, VAE_HALF], ids=["full_width", "half_width"])
def test_vae_decoder(spec):
    params = random_params("vae", spec)
    inputs = example_inputs("vae_decoder", spec, latent_size=4)
    ref = snapjax_forward("vae_decoder", spec, params, inputs)
    mirror = mirror_from_params("vae_decoder", spec, params)
    assert max_rel_err(mirror_forward(mirror, "vae_decoder", inputs), ref) < TOL
    if spec is VAE_HALF:  # the pruned decoder is about 4x smaller
        full = sum(p.numel() for p in mirror_from_params(
            "vae_decoder", VAE_FULL, random_params("vae", VAE_FULL)).parameters())
        assert sum(p.numel() for p in mirror.parameters()) < full / 3


def test_text_encoder_hidden_and_pooled():
    spec = te.TINY
    params = random_params("text_encoder", spec)
    inputs = example_inputs("text_encoder", spec)
    ref = snapjax_forward("text_encoder", spec, params, inputs)
    mirror = mirror_from_params("text_encoder", spec, params)
    with torch.no_grad():  # Apple's text encoder takes float ids
        hidden, pooled = mirror(torch.from_numpy(inputs[0]).float())
    assert max_rel_err(hidden.numpy(), ref) < TOL
    ref_pooled = np.asarray(te.pooled_output(ref, inputs[0], spec.eos_token_id))
    assert max_rel_err(pooled.numpy(), ref_pooled) < TOL


def test_mirror_folder_round_trip_uses_the_shared_names(tmp_path):
    from safetensors.numpy import load_file

    from snapjax.convert.unet import unet_module_map

    params = random_params("unet", UNET_SD)
    save_mirror(tmp_path / "unet", "unet", UNET_SD, params)
    names = set(load_file(str(tmp_path / "unet" / "model.safetensors")))
    prefixes = {n.rsplit(".", 1)[0] for n in names}
    assert prefixes == set(unet_module_map(UNET_SD).values())  # diffusers names, all of them
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in names
    inputs = example_inputs("unet", UNET_SD, latent_size=8, context_length=5)
    a = mirror_forward(mirror_from_params("unet", UNET_SD, params), "unet", inputs)
    b = mirror_forward(load_mirror(tmp_path / "unet"), "unet", inputs)
    np.testing.assert_array_equal(a, b)
