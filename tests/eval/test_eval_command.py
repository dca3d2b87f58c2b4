"""``snapjax eval`` end to end on tiny random world pipelines: every setting scored with its
intervals and cost, the plot and the side-by-side grids written; bad inputs named."""

import json

import numpy as np
import pytest
from PIL import Image

from snapjax import cli
from snapjax.eval import reader as R
from tests.evolve.tiny_world import tiny_world_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    a, b = root / "a" / "model", root / "b"
    tiny_world_pipeline(0).save_pretrained(a)
    pipe = tiny_world_pipeline(1)
    pipe.num_steps, pipe.guidance_scale = 2, 1.0
    pipe.save_pretrained(b)
    return a, b


@pytest.fixture
def fast_reader(monkeypatch, tmp_path_factory):
    # The 8-pixel world's reader, trained briefly (the command's plumbing is under test here;
    # the default reader's quality is tested in test_reader and test_world_scores).
    cache = tmp_path_factory.getbasetemp() / "reader-cache"
    real = R.get_reader
    monkeypatch.setattr(R, "get_reader", lambda spec, *a, **k: real(spec, cache, steps=30, batch=16))


def test_eval_scores_every_setting_and_writes_plot_and_grids(folders, fast_reader, tmp_path, capsys):
    a, b = folders
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", str(a), "--model", f"other={b}", "--steps", "2",
                     "--guidance", "1", "3", "--num-prompts", "6", "--seeds", "0", "1",
                     "--no-latency", "--out", str(out)]) == 0
    doc = json.loads((out / "eval.json").read_text())
    assert doc["kind"] == "world" and doc["samples_per_setting"] == 12
    assert set(doc["models"]) == {"a", "other"}
    for name, res in doc["models"].items():
        rows = res["settings"]
        assert [(r["steps"], r["guidance"]) for r in rows] == [(2, 1), (2, 3)]
        gflop = res["gflop_per_call"]
        for r in rows:
            calls = r["steps"] * (1 if r["guidance"] == 1 else 2)
            assert r["unet_calls"] == calls
            assert r["gflop"] == pytest.approx(gflop["text_encoder"] + calls * gflop["unet"]
                                               + gflop["vae_decoder"])
            acc = r["metrics"]["accuracy/all"]
            assert acc["n"] == 12 and acc["low"] <= acc["value"] <= acc["high"]
            fd = r["metrics"]["frechet_distance"]
            assert fd["seeds"] == 2 and fd["n"] == 6
            assert fd["value"] == pytest.approx(np.mean(r["per_seed"]["frechet_distance"]))
    # the same prompts and noise for both models, one row each
    grid = np.asarray(Image.open(out / "grid_s2_g3.png"))
    assert grid.shape == (2 * 8, 6 * 8, 3)
    assert (out / "curves.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "other: 2 steps, guidance 3, 4 UNet calls" in printed and "2 seeds x n=6" in printed


def test_settings_cross_steps_and_guidance(folders):
    from snapjax.eval.run import settings_for
    pipe = tiny_world_pipeline(0)
    pipe.num_steps, pipe.guidance_scale = 7, 2.5
    assert [(s.steps, s.guidance) for s in settings_for(pipe, [1, 2], [1, 3])] == [
        (1, 1), (1, 3), (2, 1), (2, 3)]
    assert [(s.steps, s.guidance) for s in settings_for(pipe, None, None)] == [(7, 2.5)]
    assert [(s.steps, s.guidance) for s in settings_for(pipe, [4], None)] == [(4, 2.5)]


def test_eval_defaults_to_each_folders_steps_and_guidance(folders, fast_reader, tmp_path):
    a, b = folders
    assert cli.main(["eval", "--model", f"b={b}", "--num-prompts", "4", "--seeds", "0",
                     "--batch-size", "3", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "eval.json").read_text())["models"]["b"]["settings"]
    assert (row["steps"], row["guidance"], row["unet_calls"]) == (2, 1.0, 2)
    assert row["latency_s"] > 0 and row["metrics"]["frechet_distance"]["seeds"] == 1


def test_eval_bad_inputs(folders, tmp_path, capsys):
    a, b = folders
    other = tiny_world_pipeline(2)
    other.sample_size = 8                              # 16-pixel images: another latent shape
    other.save_pretrained(tmp_path / "big")
    cases = [
        (["--model", str(a), "--model", f"big={tmp_path / 'big'}"], "different latent shapes"),
        (["--model", str(a), "--model", f"a={b}"], "two models named 'a'"),
        (["--model", str(a), "--steps", "0"], "steps=0"),
        (["--model", str(a), "--guidance", "0.5"], "guidance=0.5"),
        (["--model", str(a), "--prompts", str(tmp_path / "p.txt")], "does not exist"),
        (["--model", str(a), "--num-prompts", "1"], "at least 2"),
    ]
    for extra, message in cases:
        assert cli.main(["eval", *extra, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err, message
    (tmp_path / "p.txt").write_text("a red circle\n")
    assert cli.main(["eval", "--model", str(a), "--prompts", str(tmp_path / "p.txt"),
                     "--out", str(tmp_path / "o")]) == 2
    assert "give --clip-model" in capsys.readouterr().err
    assert not (tmp_path / "o" / "eval.json").exists()
