"""Tiny random snapjax models and pipeline folders for the export tests (no downloads, no jit init).

Random parameters are drawn in numpy from the abstract param tree (``jax.eval_shape``), so building
a model costs a trace, not an XLA compile; every weight is non-zero so no wrong mapping hides.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from snapjax import pretrained
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models import text_encoder as te
from snapjax.models import unet_spec, vae
from snapjax.models.tokenizer import write_clip_vocab
from snapjax.pipeline import PIPELINE_FILE, PipelineFile

WORDS = ("a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right")

# SD-v1.5's structure at test size (cross-attention stage, plain deepest stage, mid RAR).
UNET_SD = unet_spec.TINY
# Evolution's leftovers: removed ResNets ('r', 'rA'), a stage-0 unit without attention,
# a mid block without attention. Not expressible as a diffusers UNet2DConditionModel.
UNET_REMOVED = dataclasses.replace(
    unet_spec.TINY, down=(("RA", "r"), ("R",)), up=(("rA", "R", "RA"), ("r", "R")), mid="RR")
# The general grammar: a second transformer after the first ('RAA', 'rAA'), a ResNet after a
# removed head ('rRA', 'RR'), a mid unit with two transformers and its head ResNet removed.
UNET_GRAMMAR = dataclasses.replace(
    unet_spec.TINY, down=(("RAA",), ("rRA",)), up=(("RA", "rAA"), ("R", "RR")), mid="rAAR")
# diffusers' UNetMidBlock2D: a single mid ResNet.
UNET_MID_R = dataclasses.replace(unet_spec.TINY, mid="R")
# A guidance-conditioned student (diffusers' time_cond_proj_dim): the scale is an input, one call
# per step. random_params draws its cond_proj like any kernel (non-zero, so w changes the output).
UNET_GUIDED = dataclasses.replace(unet_spec.TINY, guidance_embed_dim=16)
VAE_FULL = vae.TINY
VAE_HALF = vae.pruned(vae.TINY)


def random_params(kind: str, spec, seed: int = 0) -> dict:
    """Parameters shaped like ``kind``'s tree, with fan-in-scaled normal values."""
    abstract = pretrained.abstract_params(kind, spec)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif name == "scale":
            value = 1 + 0.1 * rng.standard_normal(shape)
        elif name == "embedding":
            value = 0.5 * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        return value.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def write_pipeline(folder: Path, *, unet=UNET_SD, vae_spec=VAE_FULL,
                   schedule: NoiseSchedule | None = None, sample_size: int = 8,
                   seed: int = 0, sampling: dict | None = None) -> Path:
    """A snapjax pipeline folder (snapjax_pipeline.json + model folders + tokenizer); a
    guidance-conditioned ``unet`` is recorded as such in the pipeline file."""
    folder.mkdir(parents=True)
    write_clip_vocab(folder / "tokenizer", WORDS)
    vocab = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    text = dataclasses.replace(te.TINY, vocab_size=vocab, max_length=77)
    for i, (kind, spec) in enumerate((("unet", unet), ("vae", vae_spec), ("text_encoder", text))):
        pretrained.save_model(folder / kind, kind, spec, random_params(kind, spec, seed + i))
    meta = PipelineFile(schedule or NoiseSchedule(), sample_size, **(sampling or {}),
                        guidance_conditioned=bool(unet.guidance_embed_dim))
    (folder / PIPELINE_FILE).write_text(meta.to_json())
    return folder


# A distilled student's sampling conventions: v-prediction, trailing spacing, 8 steps.
STUDENT_SCHEDULE = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing",
                                 steps_offset=0)


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))
