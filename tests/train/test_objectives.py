"""The text-to-image objective through the real loop: raw world images encoded by a frozen VAE
inside the step, a text encoder trained with the UNet, then sampling and export; then robust
training (configs/world_robust.py) fine-tuning that teacher's pipeline folder.

A smoke test of the wiring with toy models (the learning itself is checked by the world
teacher run recorded in docs/training.md): the losses are finite, the sample grid is written,
the exported UNet and text encoder load back equal to the run's EMA weights, and the preview
images are exactly what ``TextToImage`` (``snapjax sample``) makes of the exported folder.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from snapjax import pretrained
from snapjax.config import ConfigError, load_config
from snapjax.pipeline import TextToImage
from snapjax.models.vae import VAE, VAESpec
from snapjax.train import objectives, optim
from tests.train.conftest import REPO, checkpoint_steps, losses, run_train, train_env

TOY = [
    "--config.data.resolution=8", "--config.data.num_threads=1",
    "--config.unet.block_channels=(16,)", "--config.unet.down=(('RA',),)",
    "--config.unet.up=(('RA','RA'),)", "--config.unet.mid=", "--config.unet.num_heads=(2,)",
    "--config.unet.transformer_layers=(1,)", "--config.unet.context_dim=16",
    "--config.text_encoder.width=16", "--config.text_encoder.heads=2",
    "--config.text_encoder.mlp_dim=32", "--config.text_encoder.layers=1",
    "--config.train.batch_size=4", "--config.train.steps=3", "--config.train.log_every=1",
    "--config.train.progress_bar=false", "--config.checkpoint.every_steps=3",
    "--config.diffusion.sample_steps=2", "--config.diffusion.num_samples=4",
    "--config.diffusion.eval_samples=0",
]


def _toy_vae_folder(path):
    spec = VAESpec(encoder_channels=(8,), decoder_channels=(8,), layers_per_block=1,
                   norm_groups=4, mid_attention=False)
    shapes = jax.eval_shape(VAE(spec).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    gen = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (gen.normal(size=s.shape) * 0.1).astype(np.float32), shapes)
    pretrained.save_model(path, "vae", spec, params)
    return path


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, jax_cache):
    """The toy world teacher, trained once for the tests below: its workdir."""
    tmp_path = tmp_path_factory.mktemp("objectives")
    vae = _toy_vae_folder(tmp_path / "vae")
    workdir = tmp_path / "teacher"
    run_train(workdir, *TOY, f"--config.diffusion.vae={vae}", env=train_env(jax_cache),
              config="configs/world_teacher.py")
    return workdir


def _preview(workdir, step):
    """(the preview images, their captions) from the grid PNG the run wrote at ``step``."""
    path = workdir / "samples" / f"samples_{step:07d}.png"
    captions = json.loads(path.with_suffix(".json").read_text())
    grid = np.asarray(Image.open(path))
    n, rows, pad = len(captions), int(np.ceil(np.sqrt(len(captions)))), 2
    cols = -(-n // rows)
    h = (grid.shape[0] - pad) // rows - pad
    w = (grid.shape[1] - pad) // cols - pad
    cells = [grid[pad + r * (h + pad):pad + r * (h + pad) + h,
                  pad + c * (w + pad):pad + c * (w + pad) + w]
             for r, c in (divmod(i, cols) for i in range(n))]
    return np.stack(cells), captions


def _assert_preview_is_what_sample_makes(workdir, step):
    # `snapjax sample --model WORKDIR/model` on the preview's captions, default seed, one batch.
    images, captions = _preview(workdir, step)
    assert len(captions) == 4 and len(np.unique(images)) > 16  # real images, not a blank grid
    pipe = TextToImage.from_pretrained(workdir / "model")
    np.testing.assert_array_equal(pipe(captions, seed=0), images)


def test_world_teacher_wiring(teacher_run):
    workdir = teacher_run
    got = losses(workdir)
    assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values())
    assert checkpoint_steps(workdir) == [3]
    grid = list((workdir / "samples").glob("samples_*.png"))
    assert grid and json.loads(grid[0].with_suffix(".json").read_text())  # captions beside it

    model = workdir / "model"  # a whole pipeline folder, loadable for sampling and export
    pipe = TextToImage.from_pretrained(model)
    assert pipe.schedule.prediction_type == "v_prediction"
    # It samples as the run scored it: the config's steps and guidance are the folder's defaults.
    assert (pipe.num_steps, pipe.guidance_scale) == (2, 4.0)
    assert pipe.tokenizer([""]).shape == (1, pipe.text_encoder.spec.max_length)
    unet, unet_params = pretrained.load_model(model / "unet", expect_kind="unet")
    assert unet.spec.block_channels == (16,) and unet.spec.context_dim == 16
    _, text_params = pretrained.load_model(model / "text_encoder", expect_kind="text_encoder")
    # The exported weights are the EMA weights of the last checkpoint.
    import orbax.checkpoint as ocp
    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "3" / "state")
    for exported, ema in ((unet_params, saved["ema_params"]["unet"]),
                          (text_params, saved["ema_params"]["text_encoder"])):
        for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(ema)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The training-time preview is the image `snapjax sample` makes from the exported folder.
    _assert_preview_is_what_sample_makes(workdir, 3)


def test_robust_training_fine_tunes_the_teacher_and_samples_with_every_block(teacher_run,
                                                                             jax_cache):
    workdir = teacher_run.parent / "robust"
    run_train(workdir, *TOY, f"--config.teacher_pipeline={teacher_run / 'model'}",
              "--config.opt.warmup_steps=0", env=train_env(jax_cache),
              config="configs/world_robust.py")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    fractions = [r["robust/keep_fraction"] for r in records if "robust/keep_fraction" in r]
    assert len(fractions) == 3 and all(math.isfinite(v) for v in losses(workdir).values())
    # 3 steps x 4 examples x 6 blocks drawn at p = 0.8: mean within 4 sigma (0.19).
    assert abs(np.mean(fractions) - 0.8) < 0.19, fractions
    # Only the UNet is trained; the text encoder and VAE are the teacher's.
    teacher, tuned = (TextToImage.from_pretrained(w / "model") for w in (teacher_run, workdir))
    for a, b in zip(jax.tree.leaves(teacher.text_encoder_params),
                    jax.tree.leaves(tuned.text_encoder_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Sampling runs every block: a masked preview would not equal the unmasked pipeline's image.
    _assert_preview_is_what_sample_makes(workdir, 3)


def test_unknown_objective_lists_the_registered_ones():
    config = load_config(str(REPO / "configs" / "world_teacher.py"), ["--config.objective=gan"])
    with pytest.raises(ConfigError, match=r"config.objective='gan': expected one of") as e:
        objectives.build_objective(config, optimizer=optim.make_optimizer(optim.OptimConfig(), 1),
                                   ema_decay=0.9, microbatches=1, compute_dtype=jnp.float32)
    for name in ("vae", "unet_diffusion", "decoder_distill", "step_distill"):
        assert repr(name) in str(e.value)
