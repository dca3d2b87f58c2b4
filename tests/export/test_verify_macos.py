"""verify_macos.py refuses to run off macOS with a message saying why and what to do."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from export.coreml.verify_macos import example_inputs, psnr


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")
def test_exits_with_a_clear_message_on_linux(tmp_path):
    result = subprocess.run([sys.executable, "-m", "export.coreml.verify_macos",
                             "--coreml", str(tmp_path), "--mirrors", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "only on macOS" in result.stderr and "Mac" in result.stderr


def test_psnr_is_apples_measure():
    ref = np.array([1.0, -2.0, 0.5, 0.0])
    noisy = ref + np.array([0.01, -0.01, 0.01, -0.01])
    # 20 log10(max|ref| / rms(diff)) = 20 log10(2 / 0.01)
    assert psnr(noisy, ref) == pytest.approx(20 * np.log10(2 / 0.01), abs=1e-3)


def test_example_inputs_follow_the_package_io():
    manifest = {"tokenizer": {"vocab_size": 50}, "schedule": {"timesteps": [999, 500]}}
    io = {"sample": ((2, 4, 8, 8), "FLOAT16"), "timestep": ((2,), "FLOAT16"),
          "input_ids": ((1, 77), "FLOAT32")}
    inputs = example_inputs(io, manifest, np.random.default_rng(0))
    assert inputs["sample"].shape == (2, 4, 8, 8) and inputs["timestep"].tolist() == [999, 999]
    assert inputs["input_ids"].max() < 50 and all(v.dtype == np.float32 for v in inputs.values())


def test_example_inputs_give_a_conditioned_unet_the_scales_features():
    from export.coreml.reference_app import guidance_features

    manifest = {"tokenizer": {"vocab_size": 50}, "schedule": {"timesteps": [999, 500]},
                "guidance_scale": 3.0, "unet": {"guidance_input": "timestep_cond"}}
    io = {"sample": ((1, 4, 8, 8), "FLOAT16"), "timestep_cond": ((1, 16), "FLOAT16")}
    inputs = example_inputs(io, manifest, np.random.default_rng(0))
    np.testing.assert_array_equal(inputs["timestep_cond"], guidance_features(np.array([3.0]), 16))
    # closed form: sin then cos of (w - 1) * 1000 * 10000^(-i / 7), i < 8
    args = 2000.0 * 10000.0 ** (-np.arange(8) / 7)
    np.testing.assert_allclose(inputs["timestep_cond"][0],
                               np.concatenate([np.sin(args), np.cos(args)]), atol=1e-6)
