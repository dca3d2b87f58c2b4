"""Core ML conversion on Linux: packages load as specs with Apple's I/O names, shapes and fp16
compute; compression shrinks weights by the expected factor; chunking, the fp32 fallback, the
manifest and the in-graph fixes (v -> epsilon, timestep table, latent scale) are checked.

Core ML cannot run a model on Linux; the numbers of the graphs themselves are checked on the
PyTorch wrappers that were traced (same code), and on a Mac by export/coreml/verify_macos.py.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from export.checkpoint import Component, ExportSource, load_source
from export.coreml.compress import compress, kmeans_lut
from export.coreml.convert import compute_dtypes
from export.coreml.export import CoreMLOptions, export_coreml, package_io
from export.coreml.manifest import MANIFEST_FILE
from export.coreml.wrappers import UnetWrapper, VAEDecoderWrapper
from export.torch.mirror import mirror_from_params
from snapjax.diffusion import parametrization
from snapjax.diffusion.schedule import alphas_cumprod, ddim_timesteps
from snapjax.models import text_encoder as te
from tests.conftest import max_rel_err
from tests.export.tiny_models import (STUDENT_SCHEDULE, UNET_GRAMMAR, UNET_SD, VAE_FULL,
                                      random_params)

F16, F32 = "FLOAT16", "FLOAT32"


@pytest.fixture(scope="module")
def coreml_out(student_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "out"
    manifest = export_coreml(load_source(student_pipeline), out, CoreMLOptions(),
                             log=lambda _: None)
    return out, manifest


def test_packages_follow_apples_names_shapes_and_dtypes(coreml_out):
    out, _ = coreml_out
    for name in ("vocab.json", "merges.txt", MANIFEST_FILE):
        assert (out / name).is_file()
    io = {name: package_io(out / f"{name}.mlpackage")
          for name in ("TextEncoder", "Unet", "VAEDecoder")}
    assert io["TextEncoder"] == ({"input_ids": ((1, 77), F32)},
                                 {"last_hidden_state": ((1, 77, 32), F32),
                                  "pooled_outputs": ((1, 32), F32)})
    assert io["Unet"] == ({"sample": ((2, 4, 8, 8), F16), "timestep": ((2,), F16),
                           "encoder_hidden_states": ((2, 32, 1, 77), F16)},
                          {"noise_pred": ((2, 4, 8, 8), F32)})
    assert io["VAEDecoder"] == ({"z": ((1, 4, 8, 8), F16)}, {"image": ((1, 3, 16, 16), F32)})


def test_packages_compute_in_fp16(coreml_out):
    import coremltools as ct

    out, manifest = coreml_out
    for name in ("TextEncoder", "Unet", "VAEDecoder"):
        spec = ct.models.MLModel(str(out / f"{name}.mlpackage"), skip_model_load=True).get_spec()
        counts = compute_dtypes(spec)
        assert counts.get(F16, 0) > 20 and F32 not in counts, (name, counts)
    assert {r["component"]: r["precision"] for r in manifest["components"]} == {
        "TextEncoder": "float16", "Unet": "float16", "VAEDecoder": "float16"}
    assert all(r["parity"] < 1e-4 and r["fp16_err"] < 0.05 for r in manifest["components"])


def test_manifest_has_the_students_schedule(coreml_out):
    out, manifest = coreml_out
    assert json.loads((out / MANIFEST_FILE).read_text()) == manifest
    s = manifest["schedule"]
    t = ddim_timesteps(STUDENT_SCHEDULE, 8)
    abar = alphas_cumprod(STUDENT_SCHEDULE)
    assert s["timesteps"] == t.tolist() and s["num_steps"] == 8
    np.testing.assert_allclose(s["alphas_cumprod"], abar[t], rtol=1e-6)
    np.testing.assert_allclose(s["alphas_cumprod_prev"][:-1], abar[t[1:]], rtol=1e-6)
    assert s["alphas_cumprod_prev"][-1] == pytest.approx(float(abar[0])) == s["final_alpha_cumprod"]
    assert (s["model_prediction_type"], s["prediction_type"]) == ("v_prediction", "epsilon")
    assert manifest["guidance_scale"] == 4.0 and manifest["unet"]["batch"] == 2
    assert manifest["models"] == {"TextEncoder": ["TextEncoder.mlpackage"],
                                  "Unet": ["Unet.mlpackage"],
                                  "VAEDecoder": ["VAEDecoder.mlpackage"]}
    assert manifest["swift_pipeline"]["exact_with_builtin_schedulers"] is False


def _weights_bytes(package) -> int:
    return (package / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_compression_shrinks_weights_by_the_expected_factor(coreml_out, tmp_path, bits):
    """The decoder's conv and linear weights over the threshold go from 16 to ``bits`` bits; the
    rest (biases, norms) stays fp16. Expected size = rest + compressed + lookup tables/scales."""
    import coremltools as ct

    out, _ = coreml_out
    source = out / "VAEDecoder.mlpackage"
    model = ct.models.MLModel(str(source), skip_model_load=True)
    compress(model, bits, weight_threshold=256).save(str(tmp_path / "c.mlpackage"))
    mirror = mirror_from_params("vae_decoder", VAE_FULL, random_params("vae", VAE_FULL))
    big = sum(p.numel() for p in mirror.parameters() if p.dim() >= 2 and p.numel() > 256)
    before, after = _weights_bytes(source), _weights_bytes(tmp_path / "c.mlpackage")
    expected = before - 2 * big + big * bits / 8
    assert expected * 0.95 < after < expected * 1.06 + 4096, (before, after, expected)
    assert before / after > {8: 1.8, 6: 2.3, 4: 3.2}[bits]


def test_kmeans_lut_is_exact_on_a_lattice_and_beats_uniform_levels():
    lut_fn = kmeans_lut(4)
    lattice = np.repeat(np.linspace(-1, 1, 16), 50).astype(np.float16)
    lut, idx = lut_fn(lattice)
    np.testing.assert_array_equal(lut[idx], lattice)
    w = np.random.default_rng(0).standard_normal(4096).astype(np.float16)
    lut, idx = lut_fn(w)
    uniform = np.linspace(w.min(), w.max(), 16)
    uniform_err = np.abs(uniform[np.abs(w[:, None] - uniform).argmin(1)] - w).mean()
    assert lut.dtype == np.float16 and idx.dtype == np.uint8 and idx.max() < 16
    assert np.abs(lut[idx].astype(np.float32) - w).mean() < 0.8 * uniform_err


def test_chunked_batch1_original_attention_6bit_unet(student_pipeline, tmp_path):
    source = load_source(student_pipeline, components=("unet",))
    opts = CoreMLOptions(attention="original", unet_batch=1, quantize_bits=6, chunk=True,
                         chunk_threshold_bytes=1, latent_size=16)
    manifest = export_coreml(source, tmp_path / "out", opts, log=lambda _: None)
    out = tmp_path / "out"
    assert manifest["models"] == {"Unet": ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]}
    assert not (out / "Unet.mlpackage").exists()
    inputs1, outputs1 = package_io(out / "UnetChunk1.mlpackage")
    inputs2, outputs2 = package_io(out / "UnetChunk2.mlpackage")
    assert inputs1 == {"sample": ((1, 4, 16, 16), F16), "timestep": ((1,), F16),
                       "encoder_hidden_states": ((1, 32, 1, 77), F16)}
    # Swift feeds chunk 2 the original inputs plus chunk 1's outputs.
    assert set(inputs2) <= set(inputs1) | set(outputs1) and "noise_pred" in outputs2
    row = manifest["components"][0]
    assert row["note"] == "6-bit" and row["size_bytes"] < row["size_before_bytes"]


def test_general_grammar_unet_converts_with_apples_io(tmp_path):
    """RAA / rRA units and mid rAAR: the Unet converts, passes parity and fp16 checks, and keeps
    Apple's I/O; the package records its spec."""
    import coremltools as ct

    params = random_params("unet", UNET_GRAMMAR)
    source = ExportSource(tmp_path, {"unet": Component("unet", UNET_GRAMMAR, params, tmp_path)},
                          schedule=STUDENT_SCHEDULE)
    manifest = export_coreml(source, tmp_path / "out", CoreMLOptions(unet_batch=1, latent_size=8),
                             log=lambda _: None)
    package = tmp_path / "out/Unet.mlpackage"
    assert package_io(package) == ({"sample": ((1, 4, 8, 8), F16), "timestep": ((1,), F16),
                                    "encoder_hidden_states": ((1, 32, 1, 77), F16)},
                                   {"noise_pred": ((1, 4, 8, 8), F32)})
    row = manifest["components"][0]
    assert row["precision"] == "float16" and row["parity"] < 1e-4 and row["fp16_err"] < 0.05
    mirror = mirror_from_params("unet", UNET_GRAMMAR, params)
    assert row["params"] == sum(p.numel() for p in mirror.parameters())
    metadata = ct.models.MLModel(str(package), skip_model_load=True).user_defined_metadata
    assert json.loads(metadata["snapjax.spec"]) == json.loads(UNET_GRAMMAR.to_json())


def test_component_failing_the_fp16_check_is_exported_in_fp32(tmp_path):
    import coremltools as ct

    spec = te.TINY
    params = random_params("text_encoder", spec)
    # A feed-forward that produces activations beyond fp16's range (as some VAEs do).
    params["layers_0"]["fc1"]["kernel"] = params["layers_0"]["fc1"]["kernel"] * 3e4
    component = Component("text_encoder", spec, params, tmp_path)
    source = ExportSource(tmp_path, {"text_encoder": component})
    with pytest.warns(UserWarning, match="float32"):
        manifest = export_coreml(source, tmp_path / "out", log=lambda _: None)
    row = manifest["components"][0]
    assert row["precision"] == "float32" and "fp16 check failed" in row["note"]
    model = ct.models.MLModel(str(tmp_path / "out/TextEncoder.mlpackage"), skip_model_load=True)
    assert F16 not in compute_dtypes(model.get_spec())


def test_unet_graph_outputs_epsilon_for_a_v_model():
    """The wrapper (what is traced) vs snapjax's parametrisation on the mirror's raw output."""
    params = random_params("unet", UNET_SD)
    mirror = mirror_from_params("unet", UNET_SD, params, attention="split_einsum")
    wrapper = UnetWrapper(mirror_from_params("unet", UNET_SD, params, attention="split_einsum"),
                          STUDENT_SCHEDULE).eval()
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.standard_normal((2, 4, 8, 8)).astype(np.float32))
    t = torch.tensor([999.0, 3.0])
    ctx = torch.from_numpy(rng.standard_normal((2, 77, 32)).astype(np.float32))
    with torch.no_grad():
        v = mirror(z, t, ctx).numpy()
        eps = wrapper(z, t, ctx.transpose(1, 2)[:, :, None, :]).numpy()
    abar = alphas_cumprod(STUDENT_SCHEDULE)[[999, 3]]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    ref = parametrization.convert(v, z.numpy(), alpha, sigma, "v_prediction", "epsilon")
    # The sinusoid table (float64) differs from the float32 sin(t f) by float32 rounding only.
    assert max_rel_err(eps, ref) < 1e-4


def test_decoder_graph_rescales_swifts_latent():
    spec = dataclasses.replace(VAE_FULL, scaling_factor=0.13025)
    params = random_params("vae", spec)
    wrapper = VAEDecoderWrapper(mirror_from_params("vae_decoder", spec, params)).eval()
    mirror = mirror_from_params("vae_decoder", spec, params)
    latent = torch.randn(1, 4, 4, 4)
    with torch.no_grad():  # Swift passes latent / 0.18215; the model wants latent / 0.13025
        np.testing.assert_allclose(wrapper(latent / 0.18215).numpy(),
                                   mirror(latent / 0.13025).numpy(), rtol=1e-4, atol=1e-5)
