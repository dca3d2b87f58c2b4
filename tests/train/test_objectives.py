"""The text-to-image objective through the real loop: raw world images encoded by a frozen VAE
inside the step, a text encoder trained with the UNet, then sampling and export.

A smoke test of the wiring with toy models (the learning itself is checked by the world
teacher run recorded in docs/training.md): the losses are finite, the sample grid is written,
and the exported UNet and text encoder load back equal to the run's EMA weights.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from snapjax import pretrained
from snapjax.pipeline import TextToImage
from snapjax.models.vae import VAE, VAESpec
from tests.train.conftest import checkpoint_steps, losses, run_train, train_env

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


def test_world_teacher_wiring(tmp_path, jax_cache):
    vae = _toy_vae_folder(tmp_path / "vae")
    workdir = tmp_path / "teacher"
    run_train(workdir, *TOY, f"--config.diffusion.vae={vae}", env=train_env(jax_cache),
              config="configs/world_teacher.py")
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
