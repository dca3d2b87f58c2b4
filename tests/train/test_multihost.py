"""A pod on one machine: two processes x 4 fake CPU devices against one process x 8.

The two processes find each other through ``jax.distributed.initialize`` on localhost (gloo
CPU collectives), each reads only its own half of every global batch, and together they must
log the losses the single 8-device process logs (rtol 1e-5: the all-reduce crosses processes
through gloo instead of staying in one, so float sums may associate differently). A
checkpoint they write must restore in a single process on a differently shaped mesh, and the
run writes its model folder itself (process 0, while the other waits).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from jax.tree_util import tree_leaves as jax_leaves

from tests.train.conftest import (TINY_VAE, checkpoint_steps, free_port, losses, run_train,
                                  train_command, train_env)

STEPS = 6
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]


def _two_process_run(workdir, jax_cache, *overrides: str) -> list[str]:
    port = free_port()
    procs = []
    for pid in range(2):
        env = train_env(jax_cache, devices=4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                        JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(train_command(workdir, *overrides), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        errs.append(err)
    for proc, err in zip(procs, errs):
        assert proc.returncode == 0, err[-4000:]
    return errs


def test_two_processes_match_one_and_their_checkpoint_restores(tmp_path, jax_cache):
    common = [*TINY_VAE, *MESH, "--config.checkpoint.every_steps=3"]
    one, two = tmp_path / "one_process", tmp_path / "two_processes"

    run_train(one, *common, f"--config.train.steps={STEPS + 2}", env=train_env(jax_cache, 8))
    reference = losses(one)

    errs = _two_process_run(two, jax_cache, *common, f"--config.train.steps={STEPS}",
                            "--config.train.export=true")
    for pid, err in enumerate(errs):
        assert f"process {pid}/2 feeds 4 of the 8 rows of each global batch" in err, err[-3000:]
    got = losses(two)  # process 0 writes the metrics
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in got], [reference[s] for s in got], rtol=1e-5)
    assert checkpoint_steps(two) == [3, 6]
    assert (two / "checkpoints" / "6" / "data" / "process_1-of-2.json").is_file()
    # The model folder is written by the run itself (process 0; the other waits for it).
    from snapjax import pretrained
    module, params = pretrained.load_model(two / "model", expect_kind="vae")
    assert module.spec.scaling_factor > 0
    assert all(np.isfinite(leaf).all() for leaf in jax_leaves(params))
    assert not list(two.glob(".model.tmp-*"))                      # no temporary left behind

    # One process, 8 devices, another mesh shape (data=8): restores step 6, carries on as the
    # single-process run did.
    out = run_train(two, *TINY_VAE, "--config.mesh.data=8", "--config.mesh.fsdp=1",
                    "--config.checkpoint.every_steps=3", f"--config.train.steps={STEPS + 2}",
                    env=train_env(jax_cache, 8))
    assert "resumed from step 6" in out.stderr
    got = losses(two)
    np.testing.assert_allclose([got[s] for s in (7, 8)], [reference[s] for s in (7, 8)],
                               rtol=1e-5)


def test_gloo_is_chosen_only_for_cpu_hosts(monkeypatch):
    import importlib.util

    from snapjax.train import loop
    assert loop.cpu_only_host({"JAX_PLATFORMS": "cpu"})
    assert not loop.cpu_only_host({"JAX_PLATFORMS": "tpu"})
    assert not loop.cpu_only_host({"JAX_PLATFORMS": "cuda,cpu"})
    monkeypatch.setenv("JAX_PLATFORMS", "")
    if loop.jax.config.jax_platforms:
        pytest.skip("this run sets jax_platforms in the config; the plugin fallback is unused")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    assert not loop.cpu_only_host({})  # a TPU VM: libtpu installed, JAX_PLATFORMS unset
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert loop.cpu_only_host({})
