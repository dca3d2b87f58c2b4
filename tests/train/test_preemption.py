"""Preemption of SnapFusion's training stages: a SIGTERM during robust training or decoder
distillation saves and exits 0, and the resumed run logs the losses an uninterrupted run logs
(rtol 1e-6: the same compiled step on the same data with the same per-step random numbers,
block-drop masks included). Step distillation's and evolution's are in their own test files
(test_step_distill.py, tests/evolve/test_evolution.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.train.conftest import preempt_and_resume, train_env

STEPS = 16


COMMON = ["--config.train.batch_size=4", f"--config.train.steps={STEPS}",
          "--config.train.log_every=1", "--config.train.progress_bar=false",
          "--config.train.export=false", "--config.checkpoint.every_steps=1000",
          "--config.opt.warmup_steps=0", "--config.data.num_threads=1"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from tests.evolve.tiny_world import tiny_world_pipeline
    folder = tmp_path_factory.mktemp("teacher") / "model"
    tiny_world_pipeline().save_pretrained(folder)
    return folder


def test_robust_training_preempted_and_resumed(tiny_teacher, tmp_path, jax_cache):
    overrides = [*COMMON, f"--config.teacher_pipeline={tiny_teacher}",
                 "--config.data.resolution=8", "--config.diffusion.num_samples=1",
                 "--config.diffusion.eval_samples=0", "--config.diffusion.sample_steps=1",
                 # every block dropped often: a mask drawn differently would change the loss
                 "--config.robust.keep_prob_resnet=0.5", "--config.robust.keep_prob_attention=0.5"]
    run = preempt_and_resume(tmp_path, overrides, train_env(jax_cache), "configs/world_robust.py")
    assert run.returncode == 0 and "SIGTERM" in run.preempted_log, run.preempted_log[-3000:]
    assert len(run.saved) == 1 and 3 <= run.saved[0] < STEPS, run.saved  # the preemption's save
    assert f"resumed from step {run.saved[0]}" in run.resume_log
    assert sorted(run.resumed) == sorted(run.straight) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([run.resumed[s] for s in range(1, STEPS + 1)],
                               [run.straight[s] for s in range(1, STEPS + 1)], rtol=1e-6)


def test_decoder_distillation_preempted_and_resumed(tiny_teacher, tmp_path, jax_cache):
    from snapjax.data import generated
    from snapjax.pipeline import TextToImage
    pipe = TextToImage.from_pretrained(tiny_teacher)
    for name, count in (("train", 16), ("heldout", 4)):
        generated.generate_latents(pipe, ["a red circle", "a blue square"], tmp_path / name,
                                   count=count, num_steps=1, batch_size=8, progress=False)
    overrides = [*COMMON, "--config.data.resolution=8", f"--config.data.path={tmp_path / 'train'}",
                 f"--config.decoder.teacher={tiny_teacher}",
                 f"--config.decoder.eval_latents={tmp_path / 'heldout'}",
                 "--config.decoder.eval_count=4", "--config.decoder.num_samples=2"]
    run = preempt_and_resume(tmp_path, overrides, train_env(jax_cache),
                             "configs/world_decoder.py")
    assert run.returncode == 0 and "SIGTERM" in run.preempted_log, run.preempted_log[-3000:]
    assert len(run.saved) == 1 and 3 <= run.saved[0] < STEPS, run.saved  # the preemption's save
    assert f"resumed from step {run.saved[0]}" in run.resume_log
    assert sorted(run.resumed) == sorted(run.straight) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([run.resumed[s] for s in range(1, STEPS + 1)],
                               [run.straight[s] for s in range(1, STEPS + 1)], rtol=1e-6)
