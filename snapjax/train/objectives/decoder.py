"""``objective = "decoder_distill"``: SnapFusion's efficient image decoder (section 3.2).

A decoder pruned from the teacher's (:func:`snapjax.models.prune.prune_decoder`, every width
times ``decoder.ratio``) learns to reproduce the teacher decoder's images of the same latents;
only the student decoder trains, the teacher decoder is a frozen input of the step
(:func:`steps.decoder_distill_step`). The latents are prepared shards: the teacher pipeline's
own samples (``snapjax generate-latents``, the paper's data distillation) or, as the ablation,
the VAE encoder's latents of real images (``snapjax prepare``). At the end ``<workdir>/model`` is
the teacher's pipeline folder with the student in place of its VAE decoder (the encoder is the
teacher's), which ``snapjax sample``, ``summary`` and ``export`` take as is.

Legend: B batch, H W image size, h w latent size, C latent channels.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from snapjax import storage
from snapjax import pretrained, sampling
from snapjax.config import ConfigError, from_config
from snapjax.models import prune
from snapjax.models.vae import VAE, VAEDecoder, VAESpec, decoder_params
from snapjax.train import steps
from snapjax.train.objectives import Objective, data_config, register
from snapjax.train.objectives.components import load_component
from snapjax.train.objectives.host import grid, replicated_like, to_host
from snapjax.train.state import TrainState

log = logging.getLogger(__name__)

INITS = ("teacher", "random")


@dataclasses.dataclass(frozen=True)
class DecoderDistillConfig:
    """``config.decoder``: which decoder to distill and how.

    teacher: a pipeline folder (its ``vae/``; the output is then a whole pipeline folder) or a
      VAE model folder (snapjax or diffusers; the output is a VAE model folder). "" only for
      ahead-of-time compiles: the teacher's shape is then ``config.vae``.
    ratio: the student's width ratio, in (0, 1]; 0.5 is SnapFusion's.
    init: "teacher" (the teacher's most important channels, ``prune_decoder``) or "random"
      (Flax's initialisation of the pruned architecture: the ablation).
    loss: "mse" on pixels (SnapFusion) or "l1".
    eval_latents: prepared shards held out from training, decoded by both decoders for the
      preview and its PSNR; "" takes the first records of the training data.
    eval_count: latents the PSNR is measured on; num_samples: of them, in the preview grid.
    """

    teacher: str = ""
    ratio: float = 0.5
    init: str = "teacher"
    loss: str = "mse"
    eval_latents: str = ""
    eval_count: int = 256
    num_samples: int = 8

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"decoder.init={self.init!r}: expected one of {INITS}")
        if self.loss not in steps.DECODER_LOSSES:
            raise ValueError(f"decoder.loss={self.loss!r}: expected one of "
                             f"{steps.DECODER_LOSSES}")
        if self.eval_count < 1 or not 0 <= self.num_samples <= self.eval_count:
            raise ValueError(f"decoder.eval_count={self.eval_count} must be >= 1 and "
                             f"decoder.num_samples={self.num_samples} in [0, eval_count]")


def teacher_vae_folder(path: str) -> tuple[pathlib.Path, bool]:
    """(the teacher's VAE folder, whether ``path`` is a whole pipeline folder)."""
    from snapjax.pipeline import PIPELINE_FILE
    folder = storage.path(path)
    if not folder.is_dir():
        raise ConfigError(f"decoder.teacher={path}: not a folder (expected the teacher's "
                          "pipeline folder or its VAE folder)")
    if (folder / PIPELINE_FILE).is_file() or (folder / "model_index.json").is_file():
        if not (folder / "vae").is_dir():
            raise ConfigError(f"decoder.teacher={path}: a pipeline folder without vae/, so "
                              "there is no decoder to distill")
        return folder / "vae", True
    if pretrained.is_snapjax_model(folder) or (folder / "config.json").is_file():
        return folder, False
    raise ConfigError(f"decoder.teacher={path}: neither a pipeline folder (with vae/) nor a VAE "
                      "model folder (snapjax_model.json or a diffusers config.json)")


@register("decoder_distill")
def build(config, *, optimizer, ema_decay, microbatches, compute_dtype, abstract,
          platform) -> Objective:
    del platform  # no device-specific kernels
    cfg = from_config(DecoderDistillConfig, config.decoder, "decoder")
    data = data_config(config)
    if data.source != "prepared":
        raise ConfigError(f"objective 'decoder_distill' trains on latents, but data.source="
                          f"{data.source!r}: make them with `snapjax generate-latents` (the "
                          "teacher's samples) or `snapjax prepare` (real images), then set "
                          "data.source='prepared' and data.path")
    if not cfg.teacher and abstract and "vae" in config:
        spec = from_config(VAESpec, config.vae, "vae")
        teacher_params, is_pipeline = pretrained.abstract_params("vae", spec), False
    elif not cfg.teacher:
        raise ConfigError("decoder.teacher is empty: give the teacher's pipeline folder (or its "
                          "VAE folder)")
    else:
        vae_folder, is_pipeline = teacher_vae_folder(cfg.teacher)
        try:
            teacher_vae, teacher_params = load_component(str(vae_folder), "vae", compute_dtype,
                                                         abstract)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"decoder.teacher={cfg.teacher}: {e}") from None
        spec = teacher_vae.spec
    try:
        small = prune.prune_spec(spec, cfg.ratio)
    except ValueError as e:
        raise ConfigError(f"decoder.ratio: {e}") from None
    teacher = VAEDecoder(spec, compute_dtype)
    student = VAEDecoder(small, compute_dtype)
    latent_hw = data.resolution // spec.downsample_factor
    z_shape = (latent_hw, latent_hw, spec.latent_channels)

    loaded = {}
    if cfg.init == "teacher":
        if abstract:
            loaded["decoder"] = jax.eval_shape(
                lambda: student.init(jax.random.key(0), jnp.zeros((1, *z_shape))))["params"]
        else:
            small, pruned_params = prune.prune_decoder(spec, decoder_params(teacher_params),
                                                       cfg.ratio)
            loaded["decoder"] = pruned_params

    def init_params(rng, pretrained_params):
        if "decoder" in pretrained_params:
            return dict(pretrained_params)
        return {"decoder": student.init(rng, jnp.zeros((1, *z_shape), jnp.float32))["params"]}

    def batch_shapes(batch: int):
        return {"latent": jax.ShapeDtypeStruct((batch, *z_shape), jnp.float32)}

    step = functools.partial(steps.decoder_distill_step, student=student, teacher=teacher,
                             loss=cfg.loss, optimizer=optimizer, ema_decay=ema_decay,
                             microbatches=microbatches)
    frozen = {"teacher": decoder_params(teacher_params)}
    objective = Objective(init_params=init_params, pretrained=loaded, step=step, frozen=frozen,
                          batch_shapes=batch_shapes, tokenizer=None, sample=None,
                          export=lambda state, folder: None)
    if abstract:
        return objective
    sample = _preview(cfg, data.path, teacher, student, z_shape)
    export = functools.partial(_export, cfg=cfg, small=small, is_pipeline=is_pipeline,
                               teacher_params=to_host(teacher_params))
    return dataclasses.replace(objective, sample=sample, export=export)


def eval_latents(folder: str, count: int, z_shape: tuple[int, ...]) -> np.ndarray:
    """The first ``count`` latents (scaled) of a prepared folder, in record order."""
    from snapjax.data.sources import PreparedSource
    source = PreparedSource(folder)
    if len(source) < count:
        raise ConfigError(f"decoder.eval_count={count} but {folder} holds {len(source)} latents")
    z = np.stack([source[i]["latent_mean"] for i in range(count)]) * source.scaling_factor
    if z.shape[1:] != z_shape:
        raise ConfigError(f"{folder}: latents of shape {list(z.shape[1:])}, but the teacher "
                          f"decodes {list(z_shape)} at data.resolution")
    return z.astype(np.float32)


def psnr_per_image(a_BHWC: np.ndarray, b_BHWC: np.ndarray) -> np.ndarray:
    """PSNR (dB) of each pair of [-1, 1] images, clipped (peak-to-peak 2)."""
    a = np.clip(np.asarray(a_BHWC, np.float64), -1, 1)
    b = np.clip(np.asarray(b_BHWC, np.float64), -1, 1)
    mse = np.mean(np.square(a - b), axis=tuple(range(1, a.ndim)))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


def bootstrap_ci95(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> float:
    """Half the width of the bootstrap 95% interval of the mean."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float((hi - lo) / 2)


def _preview(cfg: DecoderDistillConfig, train_path: str, teacher: VAEDecoder,
             student: VAEDecoder, z_shape):
    """sample(state, frozen, step): teacher (top row) and student (bottom row) images of the
    same held-out latents, and the student's PSNR against the teacher over ``eval_count``."""
    latents = eval_latents(cfg.eval_latents or train_path, cfg.eval_count, z_shape)
    if not cfg.eval_latents:
        log.warning("decoder.eval_latents is empty: the PSNR is measured on training latents")
    decode = jax.jit(lambda module, p, z: module.apply({"params": p}, z / module.spec.scaling_factor),
                     static_argnums=0)
    targets: list[np.ndarray] = []

    def images(module, params, put):
        return np.concatenate([to_host(decode(module, params, put(latents[i:i + 64])))
                               for i in range(0, len(latents), 64)])

    def sample(state: TrainState, frozen, step_: int):
        put = functools.partial(replicated_like, state)
        if not targets:
            targets.append(images(teacher, frozen["teacher"], put))
        target = targets[0]
        image = images(student, state.ema_params["decoder"], put)
        psnr = psnr_per_image(image, target)
        metrics = {"eval/psnr": float(psnr.mean()), "eval/psnr_ci95": bootstrap_ci95(psnr),
                   "eval/psnr_min": float(psnr.min())}
        n = cfg.num_samples
        shown = np.asarray(sampling.to_uint8(np.concatenate([target[:n], image[:n]])))
        return grid(shown, rows=2), [], metrics

    return sample


def _export(state: TrainState, folder: pathlib.Path, *, cfg: DecoderDistillConfig, small,
            is_pipeline: bool, teacher_params) -> None:
    """The teacher's VAE with the EMA student decoder: a pipeline folder (the teacher's, VAE
    decoder replaced) or a VAE model folder."""
    params = {**teacher_params, **to_host(state.ema_params["decoder"])}
    if not is_pipeline:
        pretrained.save_model(folder, "vae", small, params, overwrite=True)
        log.info("VAE with the %.2fx decoder saved to %s", cfg.ratio, folder)
        return
    from snapjax.pipeline import TextToImage
    pipe = TextToImage.from_pretrained(cfg.teacher)
    pipe.vae, pipe.vae_params = VAE(small), params
    pipe.save_pretrained(folder, overwrite=True)
    log.info("pipeline with the %.2fx decoder saved to %s", cfg.ratio, folder)
