"""``objective = "decoder_distill"`` (configs/world_decoder.py) on a tiny random teacher pipeline.

Through the real loop: the teacher's generated latents train a half-width decoder pruned from
the teacher's; the exported folder is the teacher's pipeline with that decoder, and the PSNR the
run logged is what the exported decoder gives against the teacher's on the held-out latents.
In process: the loss of a ratio-1.0 student is exactly zero (it is the teacher), and bad inputs
are named. Whether distillation reaches the paper's quality is measured on the world
(docs/decoder.md), not here.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from snapjax.config import ConfigError, load_config
from snapjax.data import generated
from snapjax.models import prune
from snapjax.models.vae import VAEDecoder, decoder_params
from snapjax.pipeline import TextToImage
from snapjax.train import objectives, optim, steps
from snapjax.train.objectives.decoder import psnr_per_image
from tests.tiny_pipeline import build_pipeline
from tests.train.conftest import REPO, losses, run_train, train_env

PROMPTS = ["a red circle", "a blue square on the left", "a green circle on the right"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(tmp folder, teacher pipeline folder, its TextToImage, train latents, held-out latents)."""
    tmp = tmp_path_factory.mktemp("decoder")
    build_pipeline(tmp / "sd")
    pipe = TextToImage.from_pretrained(tmp / "sd")
    for name, count, seed in (("train", 32, 0), ("heldout", 8, 1)):
        generated.generate_latents(pipe, PROMPTS, tmp / name, count=count, num_steps=2,
                                   seed=seed, batch_size=8, progress=False)
    return tmp, tmp / "sd", pipe


def _overrides(tmp, teacher_folder, *extra):
    return ["--config.data.resolution=16", "--config.data.num_threads=1",
            f"--config.data.path={tmp / 'train'}", f"--config.decoder.teacher={teacher_folder}",
            f"--config.decoder.eval_latents={tmp / 'heldout'}", "--config.decoder.eval_count=8",
            "--config.decoder.num_samples=4", "--config.train.batch_size=8",
            "--config.train.steps=20", "--config.train.log_every=1",
            "--config.train.progress_bar=false", "--config.checkpoint.every_steps=20",
            "--config.opt.warmup_steps=0", *extra]


def _objective(tmp, teacher_folder, *extra, abstract=False, config="world_decoder.py"):
    cfg = load_config(str(REPO / "configs" / config), _overrides(tmp, teacher_folder, *extra)
                      if config == "world_decoder.py" else list(extra))
    optimizer = optim.make_optimizer(optim.OptimConfig(), 10)
    return objectives.build_objective(cfg, optimizer=optimizer, ema_decay=0.99, microbatches=1,
                                      compute_dtype=np.float32, abstract=abstract)


def test_distills_into_a_pipeline_folder_with_the_pruned_decoder(teacher, jax_cache):
    tmp, folder, pipe = teacher
    workdir = tmp / "run"
    run_train(workdir, *_overrides(tmp, folder), env=train_env(jax_cache),
              config="configs/world_decoder.py")
    loss = losses(workdir)
    assert all(np.isfinite(v) for v in loss.values())
    assert np.mean([loss[s] for s in range(16, 21)]) < loss[1]

    student = TextToImage.from_pretrained(workdir / "model")
    spec = student.vae.spec
    assert spec.decoder_channels == (8, 16) and spec.decoder_groups == 4
    assert spec.encoder_channels == pipe.vae.spec.encoder_channels
    assert spec.scaling_factor == pipe.vae.spec.scaling_factor
    same = jax.tree.map(np.array_equal, student.vae_params["encoder"], pipe.vae_params["encoder"])
    assert all(jax.tree.leaves(same))
    same = jax.tree.map(np.array_equal, student.unet_params, pipe.unet_params)
    assert all(jax.tree.leaves(same))
    assert (student.num_steps, student.guidance_scale) == (pipe.num_steps, pipe.guidance_scale)

    # The logged PSNR is the exported decoder's against the teacher's on the held-out latents.
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    psnr = [r["eval/psnr"] for r in logged if "eval/psnr" in r][-1]
    from snapjax.data.sources import PreparedSource
    source = PreparedSource(tmp / "heldout")
    z = np.stack([source[i]["latent_mean"] for i in range(8)])
    teacher_images = VAEDecoder(pipe.vae.spec).apply(
        {"params": decoder_params(pipe.vae_params)}, z)
    student_images = VAEDecoder(spec).apply({"params": decoder_params(student.vae_params)}, z)
    assert abs(psnr_per_image(student_images, teacher_images).mean() - psnr) < 1e-3
    assert student("a red circle", num_steps=2).shape == (1, 16, 16, 3)

    # `snapjax summary` and `snapjax export torch` take the folder as is; diffusers cannot hold
    # a decoder whose group count differs from the encoder's, so only the mirrors are written.
    from export.checkpoint import load_source
    from export.torch.export import export_torch
    from snapjax.cli import main
    assert main(["summary", "--model", str(workdir / "model")]) == 0
    report = export_torch(load_source(workdir / "model"), tmp / "torch", log=lambda _: None)
    assert {r["component"] for r in report["components"]} >= {"vae_decoder", "unet"}
    assert all(r["parity"] < 1e-4 for r in report["components"])
    assert report["diffusers"] is None


def test_a_full_width_student_is_the_teacher(teacher):
    tmp, folder, pipe = teacher
    objective = _objective(tmp, folder, "--config.decoder.ratio=1.0")
    params = objective.init_params(jax.random.key(0), objective.pretrained)
    batch = {"latent": np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)}
    step = objective.step
    loss, metrics = steps.decoder_distill_loss(
        params, objective.frozen, batch, jax.random.key(0), student=step.keywords["student"],
        teacher=step.keywords["teacher"], loss="mse")
    assert float(loss) == 0.0 and float(metrics["l1"]) == 0.0


def test_teacher_init_starts_closer_than_random_init(teacher):
    tmp, folder, _ = teacher
    rng = np.random.default_rng(0)
    batch = {"latent": rng.normal(size=(4, 8, 8, 4)).astype(np.float32)}
    mse = {}
    for init in ("teacher", "random"):
        objective = _objective(tmp, folder, f"--config.decoder.init={init}")
        params = objective.init_params(jax.random.key(0), objective.pretrained)
        keywords = objective.step.keywords
        mse[init] = float(steps.decoder_distill_loss(
            params, objective.frozen, batch, jax.random.key(0), student=keywords["student"],
            teacher=keywords["teacher"], loss="mse")[0])
    assert mse["teacher"] < mse["random"]


def test_bad_inputs_are_named(teacher, tmp_path):
    tmp, folder, _ = teacher
    no_vae = tmp_path / "no_vae"
    no_vae.mkdir()
    (no_vae / "model_index.json").write_text("{}")
    with pytest.raises(ConfigError, match="pipeline folder without vae/"):
        _objective(tmp, no_vae)
    with pytest.raises(ConfigError, match="not a folder"):
        _objective(tmp, tmp_path / "missing")
    with pytest.raises(ConfigError, match="neither a pipeline folder"):
        _objective(tmp, tmp_path)
    with pytest.raises(ConfigError, match=r"decoder\.ratio.*\(0, 1\]"):
        _objective(tmp, folder, "--config.decoder.ratio=1.5")
    with pytest.raises(ConfigError, match="less than one whole group"):
        _objective(tmp, folder, "--config.decoder.ratio=0.05")
    with pytest.raises(ConfigError, match="decoder.teacher is empty"):
        _objective(tmp, "")
    with pytest.raises(ConfigError, match="generate-latents"):
        _objective(tmp, folder, "--config.data.source=world")
    with pytest.raises(ConfigError, match="holds 8 latents"):
        _objective(tmp, folder, "--config.decoder.eval_count=9", "--config.decoder.num_samples=2")
    with pytest.raises(ConfigError, match="decoder.init"):
        _objective(tmp, folder, "--config.decoder.init=imagenet")


def test_sd15_config_builds_from_shapes_alone():
    """Without SD-v1.5's files (decoder.teacher=""): the student is the 0.25x decoder."""
    objective = _objective(None, None, "--config.decoder.teacher=", abstract=True,
                           config="sd15_decoder.py")
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(objective.pretrained["decoder"]) == 12_387_479
    assert count(objective.frozen["teacher"]) == 49_490_199
    spec = objective.step.keywords["student"].spec
    assert spec.decoder_channels == (64, 128, 256, 256) and spec.decoder_groups == 16
    assert objective.batch_shapes(2)["latent"].shape == (2, 64, 64, 4)
    assert prune.prune_spec(objective.step.keywords["teacher"].spec) == spec
