"""Running ``snapjax train`` in subprocesses with fake CPU devices, for the engine tests.

Every run is a fresh process (fake devices must be set before JAX starts, and a kill must kill
a whole run). The runs share a persistent JAX compilation cache, so only the first run of a
program pays the compile (a minute on a busy 2-core CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# The world VAE config shrunk to a few thousand parameters on 8x8 world images: the engine is
# under test here, not the model.
TINY_VAE = [
    "--config.data.resolution=8", "--config.data.num_threads=1",
    "--config.vae.encoder_channels=(8,)", "--config.vae.decoder_channels=(8,)",
    "--config.vae.norm_groups=4", "--config.vae_loss.num_samples=2",
    "--config.train.batch_size=8", "--config.train.log_every=1",
    "--config.train.progress_bar=false", "--config.train.export=false",
    # A constant schedule: runs of different lengths then take identical steps.
    "--config.opt.warmup_steps=0", "--config.opt.lr=1e-2", "--config.opt.schedule=constant",
    "--config.mesh.min_shard_size=256",
]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> str:
    return os.environ.get("SNAPJAX_TEST_JAX_CACHE") or str(tmp_path_factory.mktemp("jax_cache"))


def train_env(jax_cache: str, devices: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=jax_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def train_command(workdir, *overrides: str, config: str = "configs/world_vae.py") -> list[str]:
    return [sys.executable, "-m", "snapjax.cli", "train", "--config", str(REPO / config),
            "--workdir", str(workdir), *overrides]


def run_train(workdir, *overrides: str, env: dict[str, str], timeout: float = 600,
              check: bool = True, config: str = "configs/world_vae.py"
              ) -> subprocess.CompletedProcess:
    out = subprocess.run(train_command(workdir, *overrides, config=config), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr[-4000:]
    return out


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (the last line of a step wins)."""
    out = {}
    path = pathlib.Path(workdir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def checkpoint_steps(workdir) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir()) if folder.is_dir() else []


def start_train(workdir, *overrides: str, env: dict[str, str],
                config: str = "configs/world_vae.py") -> subprocess.Popen:
    return subprocess.Popen(train_command(workdir, *overrides, config=config), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, workdir, step: int, timeout: float = 600) -> int:
    """Polls metrics.jsonl until ``step`` is logged; returns the latest logged step."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before step {step}:\n"
                                 + proc.stderr.read()[-4000:])
        if path.exists():
            logged = [json.loads(line)["step"] for line in path.read_text().splitlines()
                      if line.endswith("}")]
            if logged and max(logged) >= step:
                return max(logged)
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not logged within {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    proc.send_signal(sig)


@dataclasses.dataclass
class PreemptedRun:
    """An uninterrupted run and one SIGTERM'd, then resumed, of the same command."""
    returncode: int            # of the SIGTERM'd process
    preempted_log: str         # its stderr
    saved: list[int]           # the checkpoints it left
    resume_log: str            # the resumed run's stderr
    straight: dict[int, float]  # step -> loss, uninterrupted
    resumed: dict[int, float]   # step -> loss, preempted then resumed


def preempt_and_resume(tmp_path, overrides, env, config: str, at_step: int = 3) -> PreemptedRun:
    """Runs the command uninterrupted, then again with a SIGTERM once ``at_step`` is logged
    (pass a large checkpoint.every_steps, so the preemption's save is the only one), then once
    more to resume; the tests assert on what it returns."""
    run_train(tmp_path / "straight", *overrides, env=env, config=config)
    proc = start_train(tmp_path / "preempted", *overrides, env=env, config=config)
    wait_for_step(proc, tmp_path / "preempted", at_step)
    kill(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    saved = checkpoint_steps(tmp_path / "preempted")
    out = run_train(tmp_path / "preempted", *overrides, env=env, config=config)
    return PreemptedRun(proc.returncode, err, saved, out.stderr, losses(tmp_path / "straight"),
                        losses(tmp_path / "preempted"))
