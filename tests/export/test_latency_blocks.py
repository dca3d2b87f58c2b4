"""Per-block Core ML packages for a latency table (`snapjax export latency-blocks`) and the
timing script's table, on Linux: package specs and blocks.json are checked; prediction, which
needs macOS, is replaced by a fake predictor on a fake clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from export.coreml.export import package_io
from export.coreml.latency_blocks import BLOCKS_FILE, FIXED_FILE, resolve_spec
from export.coreml.time_blocks_macos import median_ms, write_latency_table
from snapjax import pretrained
from snapjax.cli import main as snapjax_main
from snapjax.evolve.signature import block_signature
from snapjax.evolve.latency import latency_table, skeleton
from snapjax.models.unet_spec import SNAPFUSION, UNetSpec
from tests.export.tiny_models import UNET_GRAMMAR, UNET_GUIDED, UNET_SD, random_params

SIDE = 8  # latent side: --resolution 64 over SD's VAE factor 8
F16, F32 = "FLOAT16", "FLOAT32"


@pytest.fixture(scope="module")
def latency_out(tmp_path_factory) -> Path:
    """The CLI's packages for a UNet model folder holding the general-grammar tiny spec."""
    tmp = tmp_path_factory.mktemp("latency")
    model = pretrained.save_model(tmp / "unet", "unet", UNET_GRAMMAR,
                                  random_params("unet", UNET_GRAMMAR))
    out = tmp / "blocks"
    assert snapjax_main(["export", "latency-blocks", "--spec", str(model), "--resolution", "64",
                         "--out", str(out)]) == 0
    return out


def test_one_package_per_distinct_signature(latency_out):
    meta = json.loads((latency_out / BLOCKS_FILE).read_text())
    assert meta["latent_side"] == SIDE and meta["context_length"] == 77
    blocks = UNET_GRAMMAR.blocks()
    signatures = {b.name: block_signature(UNET_GRAMMAR, b, SIDE) for b in blocks}
    entries = {e["signature"]: e for e in meta["blocks"]}
    assert len(entries) == len(meta["blocks"]) == len(set(signatures.values()))
    for sig, entry in entries.items():  # every block named once, under its signature
        assert entry["names"] == [n for n, s in signatures.items() if s == sig]
        assert entry["removed"] == [b.name for b in blocks if b.removed and b.name in
                                    entry["names"]]
    # A shortcut-only package exactly for the ResNets whose channels change.
    changing = {signatures[b.name] for b in blocks if b.has_shortcut_conv}
    assert {s for s, e in entries.items() if e["shortcut"]} == changing
    assert "res:32->64@4x4" in changing and entries["res:32->64@4x4"]["removed"] == ["down_1_0_res"]
    files = {meta["fixed"]["file"]} | {e[k]["file"] for e in meta["blocks"]
                                       for k in ("package", "shortcut") if e[k]}
    assert meta["fixed"]["file"] == FIXED_FILE
    assert {p.name for p in latency_out.glob("*.mlpackage")} == files
    assert len(files) == 1 + len(entries) + len(changing)


def test_package_specs_have_the_blocks_io(latency_out):
    meta = json.loads((latency_out / BLOCKS_FILE).read_text())
    spec = UNET_GRAMMAR
    assert package_io(latency_out / FIXED_FILE) == (
        {"sample": ((1, 4, SIDE, SIDE), F16), "timestep": ((1,), F16)},
        {"out": ((1, 4, SIDE, SIDE), F32), "temb": ((1, spec.time_dim), F32)})
    assert meta["fixed"]["inputs"] == {"sample": [1, 4, SIDE, SIDE], "timestep": [1]}
    for entry in meta["blocks"]:
        block = spec.block(entry["names"][0])
        side = SIDE // 2 ** block.stage
        x = (1, block.in_channels, side, side)
        second = (("temb", (1, spec.time_dim)) if block.kind == "res"
                  else ("context", (1, 77, spec.context_dim)))
        inputs, outputs = package_io(latency_out / entry["package"]["file"])
        assert inputs == {"x": (x, F16), second[0]: (second[1], F16)}, entry["signature"]
        assert outputs == {"out": ((1, block.out_channels, side, side), F32)}
        assert entry["package"]["inputs"] == {"x": list(x), second[0]: list(second[1])}
        if entry["shortcut"]:
            assert package_io(latency_out / entry["shortcut"]["file"]) == (
                {"x": (x, F16)}, {"out": ((1, block.out_channels, side, side), F32)})


def test_fixed_package_is_the_skeleton(latency_out):
    """Every block removed: no attention and no ResNet branch left, only what no block action
    changes (the skeleton the latency tables price as fixed)."""
    import coremltools as ct

    model = ct.models.MLModel(str(latency_out / FIXED_FILE), skip_model_load=True)
    recorded = UNetSpec.from_dict(json.loads(model.user_defined_metadata["snapjax.spec"]))
    assert recorded == skeleton(UNET_GRAMMAR) and recorded.block_names() == ()
    function = model.get_spec().mlProgram.functions["main"]
    ops = [op.type for op in function.block_specializations[function.opset].operations]
    # conv_in, 5 head shortcuts (channels change), the down- and upsampler, conv_out.
    assert ops.count("conv") == 9 and "matmul" not in ops and "linear" in ops


def test_skeleton_of_a_guidance_conditioned_unet_keeps_cond_proj():
    """The fixed part of a guidance-conditioned UNet runs: its guidance input is a constant zero,
    so its time embedding is the MLP of the sinusoid alone."""
    import torch

    from export.coreml.latency_blocks import _Skeleton
    from export.torch.unet import UNetMirror

    mirror = UNetMirror(skeleton(UNET_GUIDED)).eval()
    sample, t = torch.randn(1, 4, SIDE, SIDE), torch.full((1,), 500.0)
    with torch.no_grad():
        out, temb = _Skeleton(mirror)(sample, t)
        features = mirror._time_features(t)
        plain = mirror.time_embedding.linear_2(torch.nn.functional.silu(
            mirror.time_embedding.linear_1(features)))
    assert out.shape == sample.shape and torch.allclose(temb, plain, atol=1e-6)


def test_presets_and_folders_give_spec_and_vae_factor(latency_out, student_pipeline):
    assert resolve_spec("snapfusion") == (SNAPFUSION, 8)
    assert resolve_spec(str(latency_out.parent / "unet")) == (UNET_GRAMMAR, 8)
    spec, factor = resolve_spec(str(student_pipeline))  # the tiny VAE downsamples 2x
    assert spec == UNET_SD and factor == 2
    with pytest.raises(ValueError, match="neither a UNet preset"):
        resolve_spec("no_such_preset")


def test_median_ms_times_after_warmup():
    ticks = iter([0.0, 0.001, 1.0, 1.100, 2.0, 2.002])  # calls of 1, 100 and 2 ms
    calls = []
    ms = median_ms(lambda inputs: calls.append(inputs), {"x": 1}, warmup=2, repeats=3,
                   clock=lambda: next(ticks))
    assert ms == pytest.approx(2.0) and len(calls) == 5


def test_latency_table_from_a_fake_predictor(latency_out, tmp_path):
    """Fake Core ML: each call advances a fake clock by a cost per package. A ResNet's entry is
    block - shortcut, clamped at 0; the JSON has exactly the snapjax-latency-v1 keys."""
    meta = json.loads((latency_out / BLOCKS_FILE).read_text())
    now = [0.0]
    calls: dict[str, int] = {}
    cost_ms = {FIXED_FILE: 11.0}
    clamped = "res:96->32@8x8"
    for i, e in enumerate(meta["blocks"]):
        cost_ms[e["package"]["file"]] = 5.0 + i
        if e["shortcut"]:
            cost_ms[e["shortcut"]["file"]] = 2.0 if e["signature"] != clamped else 100.0

    def load(path: Path):
        shapes = {e["package"]["file"]: e["package"]["inputs"] for e in meta["blocks"]}

        def predict(inputs):
            if path.name in shapes:
                assert {k: list(v.shape) for k, v in inputs.items()} == shapes[path.name]
            assert all(v.dtype.name == "float32" for v in inputs.values())
            calls[path.name] = calls.get(path.name, 0) + 1
            now[0] += cost_ms[path.name] / 1000
            return {"out": None}
        return predict

    out = tmp_path / "latency.json"
    table = write_latency_table(latency_out, out, load, device="fake phone", warmup=2,
                                repeats=3, clock=lambda: now[0], log=lambda _: None)
    assert json.loads(out.read_text()) == table
    assert list(table) == ["format", "unit", "device", "latent_side", "blocks", "fixed"]
    assert (table["format"], table["unit"], table["device"], table["latent_side"]) == (
        "snapjax-latency-v1", "ms", "fake phone", SIDE)
    assert table["fixed"] == pytest.approx(11.0)
    assert set(calls) == set(cost_ms) and set(calls.values()) == {5}
    for i, e in enumerate(meta["blocks"]):
        expected = 5.0 + i - (2.0 if e["shortcut"] else 0.0)
        assert table["blocks"][e["signature"]] == pytest.approx(
            0.0 if e["signature"] == clamped else expected), e["signature"]
    # snapjax's evolution reads it: every droppable block priced, fixed as measured.
    priced = latency_table(UNET_GRAMMAR, resolution=8 * SIDE, source=str(out))
    assert set(priced) == set(UNET_GRAMMAR.block_names()) and priced.fixed == table["fixed"]


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")
def test_timing_script_exits_with_a_clear_message_on_linux(tmp_path):
    result = subprocess.run([sys.executable, "-m", "export.coreml.time_blocks_macos",
                             "--blocks", str(tmp_path), "--out", str(tmp_path / "t.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "only on macOS" in result.stderr
    assert not (tmp_path / "t.json").exists()
