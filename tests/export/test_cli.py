"""``snapjax export torch|coreml`` end to end through the snapjax CLI (entry point plugin)."""

from __future__ import annotations

import json

from snapjax.cli import main as snapjax_main


def test_export_torch_cli_prints_a_summary_table(removed_pipeline, tmp_path, capsys):
    out = tmp_path / "torch"
    assert snapjax_main(["export", "torch", "--checkpoint", str(removed_pipeline),
                         "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:2] == ["component", "params"] and "parity" in lines[0]
    assert {line.split()[0] for line in lines[2:5]} == {"unet", "vae_decoder", "text_encoder"}
    assert "no diffusers folder" in captured.out and "removed ResNet" in captured.out
    assert "[1/3] unet" in captured.err  # progress goes to stderr
    assert json.loads((out / "export_report.json").read_text())["diffusers"] is None


def test_export_coreml_cli_text_encoder_8bit(student_pipeline, tmp_path, capsys):
    out = tmp_path / "coreml"
    rc = snapjax_main(["export", "coreml", "--checkpoint", str(student_pipeline), "--out", str(out),
                       "--components", "text_encoder", "--quantize-bits", "8",
                       "--compress-min-elements", "256"])
    assert rc == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0]
    for column in ("component", "params", "precision", "size", "before compression", "parity"):
        assert column in header
    assert "TextEncoder" in captured.out and "8-bit" in captured.out
    manifest = json.loads((out / "snapjax_coreml_manifest.json").read_text())
    row = manifest["components"][0]
    assert row["size_bytes"] < row["size_before_bytes"]
    assert (out / "TextEncoder.mlpackage").is_dir() and (out / "vocab.json").is_file()
