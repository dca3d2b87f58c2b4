"""A decoder pruned from the teacher (snapjax.models.prune) through the PyTorch mirror and export.

Reference: snapjax's ``VAEDecoder`` on the pruned spec and weights. Tolerance as in
test_mirror_parity.py: max |mirror - snapjax| / max |snapjax| < 1e-4 (fp32).
"""

from __future__ import annotations

import dataclasses

import torch

from export.checkpoint import load_source
from export.parity import example_inputs, mirror_forward, snapjax_forward
from export.torch.diffusers_folder import vae_misfit
from export.torch.export import export_torch
from export.torch.mirror import load_mirror, mirror_from_params
from snapjax import pretrained
from snapjax.models import vae
from snapjax.models.prune import prune_decoder
from tests.conftest import max_rel_err
from tests.export.tiny_models import random_params

TOL = 1e-4


def _pruned():
    teacher = vae.TINY
    return prune_decoder(teacher, random_params("vae", teacher))


def test_mirror_matches_the_pruned_decoder():
    spec, params = _pruned()
    assert spec.decoder_channels == (16, 32) and spec.decoder_groups == 4
    mirror = mirror_from_params("vae_decoder", spec, params)
    norms = [m for m in mirror.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
    inputs = example_inputs("vae_decoder", spec, latent_size=4)
    ref = snapjax_forward("vae_decoder", spec, params, inputs)
    assert max_rel_err(mirror_forward(mirror, "vae_decoder", inputs), ref) < TOL


def test_export_writes_the_mirror_with_parity_and_no_diffusers_folder(tmp_path):
    spec, params = _pruned()
    pretrained.save_model(tmp_path / "vae", "vae", spec, params)
    report = export_torch(load_source(tmp_path / "vae"), tmp_path / "out", log=lambda _: None)
    (row,) = report["components"]
    assert row["component"] == "vae_decoder" and row["parity"] < TOL
    assert report["diffusers"] is None
    inputs = example_inputs("vae_decoder", spec, latent_size=4)
    loaded = load_mirror(tmp_path / "out" / "vae_decoder")
    assert max_rel_err(mirror_forward(loaded, "vae_decoder", inputs),
                       snapjax_forward("vae_decoder", spec, params, inputs)) < TOL


def test_diffusers_cannot_hold_other_decoder_groups():
    params = random_params("vae", vae.TINY)
    assert vae_misfit(vae.TINY, params) is None
    reason = vae_misfit(dataclasses.replace(vae.TINY, decoder_norm_groups=4), params)
    assert "4 GroupNorm groups and the encoder 8" in reason and "norm_num_groups" in reason


def test_coreml_exports_the_pruned_decoder_with_parity(tmp_path):
    """The pruned decoder converts with Apple's VAEDecoder I/O; the mirror that is traced matches
    snapjax (parity) and survives fp16 (the export's own checks, recorded in the manifest)."""
    from export.coreml.export import CoreMLOptions, export_coreml, package_io

    spec, params = _pruned()
    pretrained.save_model(tmp_path / "vae", "vae", spec, params)
    manifest = export_coreml(load_source(tmp_path / "vae"), tmp_path / "coreml",
                             CoreMLOptions(latent_size=4), log=lambda _: None)
    (row,) = manifest["components"]
    assert row["component"] == "VAEDecoder" and row["precision"] == "float16"
    assert row["parity"] < TOL and row["fp16_err"] < 0.05
    mirror = mirror_from_params("vae_decoder", spec, params)
    assert row["params"] == sum(p.numel() for p in mirror.parameters())
    io = package_io(tmp_path / "coreml" / "VAEDecoder.mlpackage")
    assert io == ({"z": ((1, 4, 4, 4), "FLOAT16")}, {"image": ((1, 3, 8, 8), "FLOAT32")})
