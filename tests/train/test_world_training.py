"""The README's main command, end to end: ``snapjax world`` trains the world VAE and teacher
and scores the teacher's samples (DDIM 50 steps + CFG) with the attribute reader.

Slow (the whole budget of the issue: under 20 minutes on a 2-core CPU), so not in the default
run: ``python -m pytest -m slow tests/train/test_world_training.py``. The acceptance bar is at least
80% colour and 80% shape accuracy, against chance (1/6 and 1/4) for an untrained model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.train.conftest import REPO


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
