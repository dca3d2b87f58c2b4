"""The README's main command, end to end: ``snapjax world`` trains the world VAE and teacher
and scores the teacher's samples (DDIM 50 steps + CFG) with the attribute reader.

The full run is slow (the whole budget of the issue: under 20 minutes on a 2-core CPU), so not in
the default run: ``python -m pytest -m slow tests/train/test_world_training.py``. Its acceptance
bar is at least 80% colour and 80% shape accuracy, against chance (1/6 and 1/4) for an untrained
model. The default run has the same path shortened (a few training steps, 4 sampling steps): it
checks that the scoring runs and its numbers are what they can be, not that they are good.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.train.conftest import REPO


def test_shortened_world_path_scores_the_teachers_samples(tmp_path):
    from snapjax.train.world import run_world
    short = ["--config.train.batch_size=8", "--config.train.log_every=5",
             "--config.train.progress_bar=false", "--config.checkpoint.every_steps=10"]
    summary = run_world(
        tmp_path / "world", vae_overrides=[*short, "--config.train.steps=10"],
        teacher_overrides=[*short, "--config.train.steps=10", "--config.diffusion.sample_steps=4",
                           "--config.diffusion.num_samples=4",
                           "--config.diffusion.eval_samples=16"])
    teacher = summary["teacher"]
    accuracies = {k: v for k, v in teacher.items() if k.startswith("eval/accuracy/")}
    assert {"eval/accuracy/colour", "eval/accuracy/shape", "eval/accuracy/all"} <= set(accuracies)
    assert all(0.0 <= v <= 1.0 for v in accuracies.values()), teacher
    assert teacher["eval/accuracy/all"] <= teacher["eval/accuracy/mean"]
    assert 0.0 < teacher["eval/frechet_distance"] < 1e6, teacher  # finite, positive
    assert (tmp_path / "world" / "teacher" / "model" / "snapjax_pipeline.json").is_file()
    assert json.loads((tmp_path / "world" / "world.json").read_text())["teacher"] == teacher


@pytest.mark.slow
def test_world_command_trains_a_teacher_that_follows_captions(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "snapjax.cli", "world", "--workdir",
                          str(tmp_path / "world")], cwd=REPO, capture_output=True, text=True,
                         timeout=3600)
    minutes = (time.monotonic() - t0) / 60
    assert out.returncode == 0, out.stderr[-4000:]
    summary = json.loads((tmp_path / "world" / "world.json").read_text())
    teacher = summary["teacher"]
    assert teacher["eval/accuracy/colour"] >= 0.8, summary
    assert teacher["eval/accuracy/shape"] >= 0.8, summary
    assert list((tmp_path / "world" / "teacher" / "samples").glob("*.png"))
    print(f"snapjax world: {minutes:.1f} min, {summary}")
