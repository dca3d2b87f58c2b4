"""launch/aot_check.py: compile a config's step for a mesh we do not have, from shapes alone."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import pytest

from snapjax.config import ConfigError, load_config
from snapjax.sharding import MeshConfig, make_mesh
from snapjax.train import objectives, optim
from snapjax.train import state as state_lib
from tests.train.conftest import REPO, TINY_VAE, train_env

NO_WEIGHTS = ["--config.diffusion.unet_init=", "--config.diffusion.text_encoder=",
              "--config.diffusion.vae="]


def _sd15_objective(*overrides, compute_dtype=jax.numpy.bfloat16, platform="tpu"):
    """Built for ``platform``'s devices (the pod variant's are TPUs), from shapes alone."""
    config = load_config(str(REPO / "configs" / "sd15_finetune.py"), [*NO_WEIGHTS, *overrides])
    optimizer = optim.make_optimizer(optim.OptimConfig(), 10)
    return objectives.build_objective(config, optimizer=optimizer, ema_decay=0.9999,
                                      microbatches=1, compute_dtype=compute_dtype, abstract=True,
                                      platform=platform)


def test_sd15_pod_config_builds_from_shapes_alone():
    """The pod config's state, without SD-v1.5's weights on the machine: 859.5 M UNet params
    (DESIGN.md section 9) and a batch of 64x64x4 latents with 77x768 contexts."""
    objective = _sd15_objective()
    opt = optim.make_optimizer(optim.OptimConfig(), 10)
    abstract, _ = state_lib.abstract_state(objective.init_params, opt, make_mesh(MeshConfig()),
                                           MeshConfig(), objective.pretrained)
    n = sum(x.size for x in jax.tree.leaves(abstract.params["unet"]))
    assert abs(n / 1e6 - 859.52) < 0.01, n
    assert list(abstract.params) == ["unet"]  # the text encoder stays frozen
    shapes = objective.batch_shapes(2048)
    assert shapes["latent"].shape == (2048, 64, 64, 4)
    assert shapes["context"].shape == (2048, 77, 768)
    assert objective.frozen["empty_context"].shape == (1, 77, 768)


def test_remat_and_attention_reach_the_unet_and_bad_values_are_named():
    # The pod variant targets TPUs, which this CPU host can compile for (launch/aot_check.py).
    unet = _sd15_objective().step.keywords["unet"]
    assert (unet.remat, unet.attention_impl) == (False, "tpu_flash")
    unet = _sd15_objective("--config.diffusion.unet_remat=True",
                           "--config.diffusion.attention=xla").step.keywords["unet"]
    assert (unet.remat, unet.attention_impl) == (True, "xla")
    with pytest.raises(ValueError, match="diffusion.attention='flash': expected one of xla, cudnn, "
                                         "tpu_flash"):
        _sd15_objective("--config.diffusion.attention=flash")
    with pytest.raises(ConfigError, match=r"'cudnn' runs on gpu devices only \(this run: cpu\)"):
        _sd15_objective("--config.diffusion.attention=cudnn", platform="cpu")
    with pytest.raises(ConfigError, match=r"'tpu_flash' runs on tpu devices only \(this run: cpu"):
        _sd15_objective(platform="cpu")
    with pytest.raises(ConfigError, match="'cudnn' needs train.compute_dtype='bfloat16'"):
        _sd15_objective("--config.diffusion.attention=cudnn", platform="gpu",
                        compute_dtype=jax.numpy.float32)


def test_aot_check_reports_per_device_memory(jax_cache):
    out = subprocess.run([sys.executable, str(REPO / "launch" / "aot_check.py"), "--config",
                          str(REPO / "configs" / "world_vae.py"), "--devices", "8", *TINY_VAE,
                          "--config.mesh.fsdp=4"],
                         env=train_env(jax_cache), cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh        {'data': 2, 'fsdp': 4, 'tensor': 1}" in out.stdout, out.stdout
    peak = re.search(r"per-device peak .*: [0-9.]+ GiB \((\d+) bytes\)", out.stdout)
    assert peak and int(peak[1]) > 0, out.stdout
    assert "temp_size_in_bytes" in out.stdout


def test_aot_check_refuses_the_tpu_kernel_on_fake_cpu_devices():
    out = subprocess.run([sys.executable, str(REPO / "launch" / "aot_check.py"), "--config",
                          str(REPO / "configs" / "sd15_finetune.py"), "--devices", "8", *NO_WEIGHTS],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "--config.diffusion.attention=xla" in out.stderr, out.stderr
