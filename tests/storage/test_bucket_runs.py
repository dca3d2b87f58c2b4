"""The commands with their folders in a bucket (the test's GCS emulator, tests/gcs_emulator.py).

Training into ``gs://``: preempted, resumed and exported there, with the losses an
uninterrupted local run logs; two processes checkpointing, resuming and exporting into the
bucket, process 0 alone writing the model folder and both reading it back; a pipeline folder
in the bucket sampled (the same images as from its local copy) and exported; prepared shards
read from it; and the bad inputs: a half-written folder in the bucket.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from jax.tree_util import tree_leaves

from snapjax import pretrained, storage
from tests.train.conftest import jax_cache  # noqa: F401 (the session's compile cache)
from tests.train.conftest import REPO, TINY_VAE, run_train, start_train, train_env

STEPS = 12


def _bucket_losses(url: str) -> dict[int, float]:
    out = {}
    for line in (storage.path(url) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _wait_for_bucket_step(proc, url: str, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    path = storage.path(url) / "metrics.jsonl"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) before step {step}:\n"
                                 + proc.stderr.read()[-4000:])
        storage.refresh(url)
        if path.exists() and max(_bucket_losses(url), default=0) >= step:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not logged in {url} within {timeout}s")


def _steps(n: int, every: int) -> list[str]:
    return [f"--config.train.steps={n}", f"--config.checkpoint.every_steps={every}"]


def test_train_preempted_resumed_and_exported_in_bucket(bucket, tmp_path, jax_cache):
    env = train_env(jax_cache, **bucket.env())
    local = tmp_path / "local"
    run_train(local, *TINY_VAE, *_steps(STEPS, 1000), env=env)
    reference = {}
    for line in (local / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            reference[record["step"]] = record["loss"]

    url = bucket.url("vae")
    proc = start_train(url, *TINY_VAE, *_steps(STEPS, 1000), env=env)
    _wait_for_bucket_step(proc, url, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM" in err, err[-3000:]
    storage.refresh(url)
    saved = sorted(int(p.name) for p in (storage.path(url) / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved

    out = run_train(url, *TINY_VAE, *_steps(STEPS, 1000), "--config.train.export=true", env=env)
    assert f"resumed from step {saved[0]} ({url}/checkpoints)" in out.stderr
    got = _bucket_losses(url)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)],
                               [reference[s] for s in sorted(got)], rtol=1e-6)
    assert f"process 0/1 reads back {url}/model" in out.stderr
    module, params = pretrained.load_model(url + "/model", expect_kind="vae")
    assert all(np.isfinite(leaf).all() for leaf in tree_leaves(params))
    assert (storage.path(url) / "tensorboard").is_dir()


def test_two_processes_checkpoint_resume_and_export_into_bucket(bucket, tmp_path, jax_cache):
    url = bucket.url("vae_2proc")
    env = train_env(jax_cache, **bucket.env(), NUM_PROCESSES="2", CPU_DEVICES="4")
    env.pop("XLA_FLAGS")  # launch/local.sh sets the fake devices
    common = [*TINY_VAE, "--config.mesh.data=2", "--config.mesh.fsdp=4"]

    def run(*overrides, logs):
        command = ["bash", str(REPO / "launch" / "local.sh"), "python", "-m", "snapjax.cli",
                   "train", "--config", str(REPO / "configs" / "world_vae.py"),
                   "--workdir", url, *common, *overrides]
        out = subprocess.run(command, env=dict(env, LOG_DIR=str(logs)), cwd=REPO,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        return [(logs / f"process_{i}.log").read_text() for i in range(2)]

    run(*_steps(3, 3), logs=tmp_path / "first")
    logs = run(*_steps(6, 3), "--config.train.export=true", logs=tmp_path / "second")
    for pid, log in enumerate(logs):
        assert f"resumed from step 3 ({url}/checkpoints)" in log, log[-3000:]
        assert f"process {pid}/2 reads back {url}/model: " in log, log[-3000:]
    assert f"process 0/2 writes {url}/model" in logs[0]
    assert f"process 1/2 writes {url}/model" not in logs[1]
    assert f"process 1/2 waits for process 0, which writes {url}/model" in logs[1]
    assert sorted(_bucket_losses(url)) == list(range(1, 7))
    module, params = pretrained.load_model(url + "/model", expect_kind="vae")
    assert all(np.isfinite(leaf).all() for leaf in tree_leaves(params))


def test_pipeline_in_bucket_samples_exports_and_refuses_half_written(bucket, tmp_path, capsys):
    from PIL import Image

    from snapjax.cli import main
    from snapjax.pipeline import TextToImage
    from tests.export.tiny_models import STUDENT_SCHEDULE, write_pipeline

    local = write_pipeline(tmp_path / "pipe", schedule=STUDENT_SCHEDULE,
                           sampling={"num_steps": 2, "guidance_scale": 2.0})
    url = bucket.url("pipe")
    TextToImage.from_pretrained(local).save_pretrained(url)

    args = ["sample", "--prompt", "a red circle", "--prompt", "a blue square", "--seed", "3"]
    assert main([*args, "--model", str(local), "--out", str(tmp_path / "samples")]) == 0
    assert main([*args, "--model", url, "--out", bucket.url("samples")]) == 0
    for name in ("grid.png", "0000_a_red_circle.png"):
        with (storage.path(bucket.url("samples")) / name).open("rb") as f:
            from_bucket = np.asarray(Image.open(f))
        np.testing.assert_array_equal(from_bucket, np.asarray(Image.open(tmp_path / "samples" / name)))
    prompts = json.loads((storage.path(bucket.url("samples")) / "prompts.json").read_text())
    assert prompts["model"] == url and prompts["steps"] == 2

    out = bucket.url("torch")
    assert main(["export", "torch", "--checkpoint", url, "--out", out, "--no-diffusers"]) == 0
    report = json.loads((storage.path(out) / "export_report.json").read_text())
    assert report["components"]
    capsys.readouterr()
    assert main(["export", "torch", "--checkpoint", url, "--out", out, "--no-diffusers"]) == 2
    assert f"{out} exists" in capsys.readouterr().err

    # A half-written folder (an upload cut before its JSON): refused, and named.
    half = storage.path(bucket.url("half"))
    storage.upload(storage.path(local), half)
    (half / "snapjax_pipeline.json").unlink()
    (half / "unet" / "snapjax_model.json").unlink()
    storage.refresh(half)
    assert main([*args, "--model", str(half), "--out", bucket.url("x")]) == 2
    assert f"{half}: not a pipeline folder" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=f"{half}/unet: not a snapjax model folder .*"
                                                f"killed"):
        pretrained.load_model(half / "unet")
    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        TextToImage.from_pretrained("gs://no-such-bucket/pipe")
    with pytest.raises(PermissionError, match="gs://locked/pipe: no permission to read"):
        TextToImage.from_pretrained("gs://locked/pipe")


def test_prepared_shards_in_bucket(bucket):
    from snapjax.data import sources
    from snapjax.data.pipeline import DataConfig, make_train_iterator
    from snapjax.data.prepare import prepare
    from snapjax.data.world import WorldSpec
    from tests.data.test_prepare import R, SCALE, STAND_IN, _reference

    world = sources.WorldSource(WorldSpec(resolution=R), size=10)
    url = bucket.url("prepared")
    prepare(world, url, STAND_IN, batch_size=4, shard_size=3, dtype="float32", limit=7,
            resolution=R, progress=False)
    assert (storage.path(url) / "index.json").is_file()
    prepared = sources.PreparedSource(url)
    assert len(prepared) == 7
    for i in range(7):
        mean, _, context = _reference(world[i])
        np.testing.assert_array_equal(prepared[i]["latent_mean"], mean)
        np.testing.assert_array_equal(prepared[i]["context"], context)
    cfg = DataConfig(source="prepared", path=url, resolution=R, shuffle=False)
    batch = next(make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                     process_count=1))
    np.testing.assert_allclose(batch["latent"],
                               SCALE * np.stack([prepared[i]["latent_mean"] for i in range(4)]))
    with pytest.raises(FileExistsError, match="not empty; pass --overwrite"):
        prepare(world, url, STAND_IN, limit=2, resolution=R, progress=False)
    assert os.environ["STORAGE_EMULATOR_HOST"] == bucket.endpoint

