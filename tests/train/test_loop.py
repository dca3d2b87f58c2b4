"""The training loop as a user runs it: kill and resume, preemption, NaN, bad batch sizes.

Each run is ``snapjax train`` in a subprocess on the world VAE config shrunk to a toy (see
conftest.TINY_VAE). "Same losses" means the per-step losses in metrics.jsonl agree to
rtol 1e-6: resuming reruns the same compiled program on the same data in the same order with
the same per-step random numbers, so on one machine they are in fact bit-identical.
"""

from __future__ import annotations

import math
import pathlib
import re
import shutil
import signal

import numpy as np
import pytest

from tests.train.conftest import (TINY_VAE, checkpoint_steps, kill, losses, run_train,
                                  start_train, train_env, wait_for_step)

STEPS = 20
EVERY = 5


def _steps(n: int, every: int = EVERY) -> list[str]:
    return [f"--config.train.steps={n}", f"--config.checkpoint.every_steps={every}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jax_cache) -> tuple[pathlib.Path, dict[int, float]]:
    """An uninterrupted run: its workdir and per-step losses."""
    workdir = tmp_path_factory.mktemp("reference")
    run_train(workdir, *TINY_VAE, *_steps(STEPS), env=train_env(jax_cache))
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in got.values())
    assert checkpoint_steps(workdir) == [10, 15, 20]  # keep=3
    assert (workdir / "tensorboard").is_dir() and list((workdir / "samples").glob("*.png"))
    return workdir, got


def _assert_same_losses(got: dict[int, float], reference: dict[int, float], steps) -> None:
    steps = list(steps)
    assert [s for s in steps if s not in got] == [], sorted(got)
    np.testing.assert_allclose([got[s] for s in steps], [reference[s] for s in steps],
                               rtol=1e-6, err_msg=f"steps {steps}")


def test_sigterm_then_sigkill_then_resume_gives_the_same_losses(tmp_path, jax_cache, reference):
    env = train_env(jax_cache)
    # 1. SIGTERM (preemption): finish the step, save it, wait for the write, exit 0. No
    #    periodic checkpoint comes first, so the only one is the preemption save.
    proc = start_train(tmp_path, *TINY_VAE, *_steps(STEPS, 1000), env=env)
    wait_for_step(proc, tmp_path, 3)
    kill(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in err
    saved = checkpoint_steps(tmp_path)
    assert len(saved) == 1 and 3 <= saved[0] < STEPS, saved
    assert max(losses(tmp_path)) == saved[0]  # the saved step's loss was checked and logged

    # 2. Resume, then SIGKILL mid-run (no chance to save).
    proc = start_train(tmp_path, *TINY_VAE, *_steps(STEPS), env=env)
    wait_for_step(proc, tmp_path, max(saved[0], EVERY) + 3)
    kill(proc, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_steps(tmp_path)[-1] < STEPS, "the run was not cut short"

    # 3. Resume to the end: every step's loss is the uninterrupted run's, data order included.
    run_train(tmp_path, *TINY_VAE, *_steps(STEPS), env=env)
    _assert_same_losses(losses(tmp_path), reference[1], range(1, STEPS + 1))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, jax_cache, reference):
    env = train_env(jax_cache)
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    for step in checkpoint_steps(workdir):
        if step > 10:
            shutil.rmtree(workdir / "checkpoints" / str(step))

    # An absurd learning rate: the first update sends the weights to ~1e38 and the next
    # forward pass overflows.
    out = run_train(workdir, *TINY_VAE, *_steps(STEPS), "--config.opt.lr=1e38", env=env,
                    check=False)
    assert out.returncode == 1, out.stderr[-3000:]
    match = re.search(r"loss=(\S+) grad_norm=\S+ at step (\d+): stopping without saving; "
                      r"the last good checkpoint is step (\d+)", out.stdout + out.stderr)
    assert match, (out.stdout + out.stderr)[-3000:]
    assert not math.isfinite(float(match[1]))
    bad_step, last_good = int(match[2]), int(match[3])
    assert bad_step > 10 and checkpoint_steps(workdir)[-1] == last_good < bad_step

    # The last good checkpoint is intact: resuming from it continues as the reference did.
    run_train(workdir, *TINY_VAE, *_steps(last_good + 2), env=env)
    _assert_same_losses(losses(workdir), reference[1], range(1, last_good + 3))


def test_bad_mesh_and_batch_sizes_are_clear_errors(tmp_path, jax_cache):
    env = train_env(jax_cache, devices=8)
    out = run_train(tmp_path, *TINY_VAE, "--config.train.batch_size=12", "--config.mesh.data=2",
                    "--config.mesh.fsdp=4", env=env, check=False)
    assert out.returncode == 2
    assert ("batch size 12 cannot be split over the mesh's batch axes (data=2 x fsdp=4 = 8 ways)"
            in out.stderr), out.stderr[-2000:]
    out = run_train(tmp_path, *TINY_VAE, "--config.mesh.fsdp=3", env=env, check=False)
    assert out.returncode == 2
    assert "8 devices cannot be split as data=-1, fsdp=3" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
