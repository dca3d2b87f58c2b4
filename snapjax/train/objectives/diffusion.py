"""``objective = "unet_diffusion"``: a text-conditioned UNet on VAE latents.

eps or v objective (the schedule's prediction type), caption dropout, optional min-SNR weight,
a frozen or trained text encoder, optional robust training (``config.robust``); the step is
:func:`steps.unet_diffusion_step`, on raw images + captions (encoded inside the step by the
frozen VAE) or on prepared latents + contexts. Previews and their scores go through
:mod:`snapjax.sampling`, like ``snapjax sample``.

Legend: B batch, H W image size, h w latent size, C latent channels, L tokens, D width.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from snapjax import pretrained, sampling
from snapjax.config import ConfigError, from_config
from snapjax.data.pipeline import DataConfig
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models import attention as attention_lib
from snapjax.models.text_encoder import TextEncoder, TextEncoderSpec
from snapjax.models.unet import UNet
from snapjax.models.unet_spec import UNetSpec
from snapjax.train import robust, steps
from snapjax.train.objectives import Objective, data_config, register
from snapjax.train.objectives.components import load_component, load_tokenizer
from snapjax.train.objectives.host import grid, replicated_like, to_host
from snapjax.train.state import TrainState

log = logging.getLogger(__name__)

# Previews draw their noise as `snapjax sample` does by default (seed 0, prompt i from index i),
# so `snapjax sample --model WORKDIR/model` on the preview's captions redraws the preview.
PREVIEW_SEED = 0


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """``config.diffusion``: the UNet objective and the models around it.

    Model paths are snapjax model folders (or diffusers/transformers folders).
    vae: the frozen VAE; needed for raw-image data and for sample grids.
    text_encoder: a pretrained text encoder; "" builds a new one from ``config.text_encoder``.
    train_text_encoder: train the text encoder with the UNet (raw-caption data only).
    tokenizer: a CLIP tokenizer folder; "" is the embedded world's vocabulary.
    unet_init: a UNet to fine-tune from; "" initialises ``config.unet`` randomly.
    unet_remat: recompute each UNet block in the backward pass instead of storing its
      activations: about a third more compute for far less memory (larger batches per chip).
    attention: the UNet's attention kernel (:func:`snapjax.models.attention.dot_product_attention`):
      "xla" (any backend), "cudnn" (fused, NVIDIA GPUs with bf16/fp16 compute) or "tpu_flash"
      (Pallas flash attention on TPU; scores never stored, the big saving at 64x64 latents).
    """

    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None
    vae: str = ""
    text_encoder: str = ""
    train_text_encoder: bool = False
    tokenizer: str = ""
    unet_init: str = ""
    sample_steps: int = 50
    guidance_scale: float = 5.0
    num_samples: int = 16  # prompts in each sample grid
    eval_samples: int = 64  # generated images scored by the world's attribute reader
    unet_remat: bool = False
    attention: str = "xla"

    def __post_init__(self):
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(f"diffusion.attention={self.attention!r}: expected one of "
                             f"{', '.join(attention_lib.IMPLEMENTATIONS)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError("diffusion.caption_dropout must be in [0, 1), "
                             f"got {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError("diffusion.min_snr_gamma must be > 0 or None, "
                             f"got {self.min_snr_gamma}")
        if self.sample_steps < 1:
            raise ValueError(f"diffusion.sample_steps must be >= 1, got {self.sample_steps}")


@dataclasses.dataclass(frozen=True)
class Models:
    """The modules and weights around a UNet objective. ``*_params`` are None for a model that
    is created by ``init_params`` (a new UNet or text encoder), and ShapeDtypeStructs in
    abstract mode; ``vae`` is None when no VAE is needed or given."""

    unet: UNet
    unet_params: Any
    text_encoder: TextEncoder
    text_params: Any
    vae: nn.Module | None
    vae_params: Any

    @property
    def spec(self) -> UNetSpec:
        return self.unet.spec


@register("unet_diffusion")
def build(config: ml_collections.ConfigDict, *, optimizer, ema_decay, microbatches,
          compute_dtype, abstract, platform) -> Objective:
    dcfg = from_config(DiffusionConfig, config.diffusion, "diffusion")
    schedule = from_config(NoiseSchedule, config.schedule, "schedule")
    data = data_config(config)
    prepared = data.source == "prepared"
    if dcfg.train_text_encoder and prepared:
        raise ConfigError("diffusion.train_text_encoder needs captions, but prepared data holds "
                          "fixed contexts")
    models = load_models(config, dcfg, prepared, compute_dtype, abstract, platform)
    block_mask = robust_mask_sampler(config, models.spec)
    tokenizer, empty_ids = load_text_tokenizer(dcfg, models.text_encoder.spec, abstract)

    loaded: dict[str, Any] = {}
    if models.unet_params is not None:
        loaded["unet"] = models.unet_params
    if dcfg.train_text_encoder and models.text_params is not None:
        loaded["text_encoder"] = models.text_params

    def init_params(rng, pretrained_params):
        r_unet, r_text = jax.random.split(rng)
        params = dict(pretrained_params)
        if "unet" not in params:
            z = jnp.zeros((1, 8, 8, models.spec.in_channels), jnp.float32)
            params["unet"] = models.unet.init(r_unet, z, jnp.zeros((1,), jnp.int32),
                                              jnp.zeros((1, 1, models.spec.context_dim)))["params"]
        if dcfg.train_text_encoder and "text_encoder" not in params:
            params["text_encoder"] = models.text_encoder.init(
                r_text, jnp.asarray(empty_ids))["params"]
        return params

    make_inputs = prepared_inputs if prepared else raw_inputs
    inputs, frozen, batch_shapes = make_inputs(dcfg, data, models, empty_ids, abstract)
    step = functools.partial(steps.unet_diffusion_step, unet=models.unet, schedule=schedule,
                             inputs=inputs, optimizer=optimizer, ema_decay=ema_decay,
                             min_snr_gamma=dcfg.min_snr_gamma, block_mask=block_mask,
                             microbatches=microbatches)

    sample = None
    if abstract:
        pass
    elif models.vae is not None and data.source == "world":
        sample = world_preview(data, dcfg, schedule, models, tokenizer, empty_ids)
    else:
        log.info("sample grids are off (they need diffusion.vae and the world's captions)")
    export = functools.partial(export_pipeline, dcfg=dcfg, schedule=schedule, models=models,
                               tokenizer=tokenizer, data=data)
    return Objective(init_params=init_params, pretrained=loaded, step=step, frozen=frozen,
                     batch_shapes=batch_shapes, tokenizer=tokenizer, sample=sample,
                     export=export)


def load_models(config: ml_collections.ConfigDict, dcfg: DiffusionConfig, prepared: bool,
                compute_dtype, abstract: bool, platform: str) -> Models:
    """The UNet (``diffusion.unet_init`` or a new ``config.unet``), the text encoder
    (``diffusion.text_encoder`` or a new ``config.text_encoder``) and the VAE, checked against
    each other and against the target platform's kernels."""
    if dcfg.text_encoder:
        text_module, text_params = load_component(dcfg.text_encoder, "text_encoder",
                                                  compute_dtype, abstract)
    else:
        text_spec = from_config(TextEncoderSpec, config.text_encoder, "text_encoder")
        text_module, text_params = TextEncoder(text_spec, compute_dtype), None
        if not (dcfg.train_text_encoder or abstract):
            raise ConfigError("diffusion.text_encoder is empty, so a new text encoder is built: "
                              "set diffusion.train_text_encoder=True, or give a pretrained one")

    vae = vae_params = None
    if dcfg.vae and not (abstract and prepared):  # prepared data: the VAE only draws samples
        vae, vae_params = load_component(dcfg.vae, "vae", compute_dtype, abstract)
    elif not prepared:
        raise ConfigError("raw-image data needs diffusion.vae (a VAE model folder) to encode "
                          "images; train one with configs/world_vae.py or import SD-v1.5's")

    if dcfg.unet_init:
        unet, unet_params = load_component(dcfg.unet_init, "unet", compute_dtype, abstract)
    else:
        unet, unet_params = UNet(from_config(UNetSpec, config.unet, "unet"), compute_dtype), None
    needs = attention_lib.REQUIRED_PLATFORM.get(dcfg.attention)
    if needs and platform != needs:
        raise ConfigError(f"diffusion.attention={dcfg.attention!r} runs on {needs} devices only "
                          f"(this run: {platform}); use --config.diffusion.attention=xla")
    if dcfg.attention == "cudnn" and jnp.dtype(compute_dtype) == jnp.float32:
        raise ConfigError("diffusion.attention='cudnn' needs train.compute_dtype='bfloat16'")
    # How the UNet runs, not what it is: neither changes a parameter or a forward value.
    unet = unet.clone(remat=dcfg.unet_remat, attention_impl=dcfg.attention)
    if unet.spec.context_dim != text_module.spec.width:
        raise ConfigError(f"unet.context_dim={unet.spec.context_dim} but the text encoder's "
                          f"width is {text_module.spec.width}")
    if vae is not None and vae.spec.latent_channels != unet.spec.in_channels:
        raise ConfigError(f"the VAE has {vae.spec.latent_channels} latent channels but "
                          f"unet.in_channels={unet.spec.in_channels}")
    return Models(unet, unet_params, text_module, text_params, vae, vae_params)


def robust_mask_sampler(config: ml_collections.ConfigDict, spec: UNetSpec
                        ) -> robust.MaskFn | None:
    """``config.robust`` as the mask sampler a UNet loss binds (None: robust training off)."""
    if "robust" not in config:
        raise ConfigError("config.robust is missing: a UNet config needs the section "
                          "(config.robust = as_config(RobustConfig), off by default)")
    cfg = from_config(robust.RobustConfig, config.robust, "robust")
    try:
        return robust.block_mask_sampler(spec, cfg)
    except ValueError as e:
        raise ConfigError(f"config.robust: {e}") from None


def load_text_tokenizer(dcfg: DiffusionConfig, text_spec: TextEncoderSpec, abstract: bool):
    """(tokenizer or None in abstract mode, the empty prompt's ids (1, L))."""
    if abstract:
        return None, np.zeros((1, text_spec.max_length), np.int32)
    tokenizer = load_tokenizer(dcfg.tokenizer, text_spec.max_length)
    if tokenizer.vocab_size > text_spec.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                          f"text_encoder.vocab_size={text_spec.vocab_size}")
    return tokenizer, np.asarray(tokenizer([""]), np.int32)


def prepared_inputs(dcfg: DiffusionConfig, data: DataConfig, models: Models,
                     empty_ids: np.ndarray, abstract: bool):
    """Cached latents + contexts: the step only needs the empty prompt's context."""
    text_spec = models.text_encoder.spec
    context_shape = (text_spec.max_length, text_spec.width)
    inputs = functools.partial(steps.cached_inputs, caption_dropout=dcfg.caption_dropout)
    encode_empty = functools.partial(sampling.encode_text, models.text_encoder)
    if models.text_params is None:  # abstract mode without a text encoder folder
        empty = jax.ShapeDtypeStruct((1, *context_shape), jnp.float32)
    elif abstract:
        empty = jax.eval_shape(encode_empty, models.text_params, empty_ids)
    else:
        empty = np.asarray(encode_empty(models.text_params, empty_ids))
    factor = models.vae.spec.downsample_factor if models.vae is not None else 8  # SD's VAE: 8
    in_channels = models.spec.in_channels

    def batch_shapes(batch: int):
        hw = data.resolution // factor
        return {"latent": jax.ShapeDtypeStruct((batch, hw, hw, in_channels), jnp.float32),
                "context": jax.ShapeDtypeStruct((batch, *context_shape), jnp.float32)}

    return inputs, {"empty_context": empty}, batch_shapes


def raw_inputs(dcfg: DiffusionConfig, data: DataConfig, models: Models,
                empty_ids: np.ndarray, abstract: bool):
    """Images + token ids, encoded inside the step by the frozen VAE and the text encoder."""
    del abstract
    inputs = functools.partial(steps.encoded_inputs, vae=models.vae,
                               text_encoder=models.text_encoder,
                               text_trainable=dcfg.train_text_encoder,
                               caption_dropout=dcfg.caption_dropout)
    frozen = {"vae": models.vae_params, "empty_ids": empty_ids}
    if not dcfg.train_text_encoder:
        frozen["text_encoder"] = models.text_params
    max_length, image_channels = models.text_encoder.spec.max_length, models.vae.spec.in_channels

    def batch_shapes(batch: int):
        r = data.resolution
        dtype = jnp.uint8 if data.image_dtype == "uint8" else jnp.float32
        return {"image": jax.ShapeDtypeStruct((batch, r, r, image_channels), dtype),
                "input_ids": jax.ShapeDtypeStruct((batch, max_length), jnp.int32)}

    return inputs, frozen, batch_shapes


def world_preview(data: DataConfig, dcfg: DiffusionConfig, schedule: NoiseSchedule,
                  models: Models, tokenizer, empty_ids: np.ndarray):
    """sample(state, frozen, step): a grid of the EMA model's images for held-out world
    captions, and their attribute accuracy and Frechet distance as read by the world's reader
    (:mod:`snapjax.eval.reader`, trained once on a held-out world seed and cached).

    Exactly what ``TextToImage`` makes of the exported folder: the same functions
    (:func:`sampling.generate`), noise from ``(PREVIEW_SEED, caption index)``, the empty prompt
    per example as the unconditional context, every block running (no mask)."""
    from snapjax.data.world import render_batch
    from snapjax.eval import reader as reader_lib

    eval_world = dataclasses.replace(data.world, seed=reader_lib.EVAL_WORLD_SEED)
    n = max(dcfg.num_samples, dcfg.eval_samples)
    real_NHWC, captions, labels = render_batch(np.arange(n), eval_world)
    ids = np.asarray(tokenizer(captions), np.int32)
    uncond_ids = np.repeat(empty_ids, n, axis=0)
    latent_hw = data.resolution // models.vae.spec.downsample_factor
    noise = np.asarray(sampling.initial_noise(PREVIEW_SEED, n, (latent_hw, latent_hw),
                                              models.spec.in_channels))

    def sample(state: TrainState, frozen, step_: int):
        text_params = (state.ema_params["text_encoder"] if "text_encoder" in state.ema_params
                       else frozen["text_encoder"])
        imgs = sampling.generate(
            models.unet, state.ema_params["unet"], models.text_encoder, text_params,
            models.vae, frozen["vae"], ids, uncond_ids, noise, schedule=schedule,
            num_steps=dcfg.sample_steps, guidance_scale=dcfg.guidance_scale,
            put=functools.partial(replicated_like, state))
        metrics = {}
        if dcfg.eval_samples:
            reader = reader_lib.get_reader(data.world, log=log.info)
            k = dcfg.eval_samples
            scores = reader_lib.score(reader, imgs[:k], {a: v[:k] for a, v in labels.items()},
                                      reference_images=real_NHWC[:k])
            metrics = {f"eval/{name}": v for name, v in scores.items()}
        rows = int(np.ceil(np.sqrt(dcfg.num_samples)))
        return grid(imgs[:dcfg.num_samples], rows=rows), list(captions[:dcfg.num_samples]), metrics

    return sample


def export_pipeline(state: TrainState, folder: pathlib.Path, *, dcfg: DiffusionConfig,
            schedule: NoiseSchedule, models: Models, tokenizer, data: DataConfig) -> None:
    """The EMA weights as a pipeline folder (with a VAE), else the trained models alone."""
    ema = to_host(state.ema_params)
    trained_text = ema["text_encoder"] if dcfg.train_text_encoder else None
    if models.vae is not None:
        # A whole pipeline folder, so `snapjax sample` and `snapjax export` take it as is.
        from snapjax.pipeline import TextToImage
        text = trained_text if trained_text is not None else to_host(models.text_params)
        pipe = TextToImage(unet=models.unet, unet_params=ema["unet"], vae=models.vae,
                           vae_params=to_host(models.vae_params), text_encoder=models.text_encoder,
                           text_encoder_params=text, tokenizer=tokenizer, schedule=schedule,
                           sample_size=data.resolution // models.vae.spec.downsample_factor,
                           num_steps=dcfg.sample_steps, guidance_scale=dcfg.guidance_scale)
        pipe.save_pretrained(folder, overwrite=True)
        log.info("pipeline (UNet, VAE, text encoder, tokenizer, schedule) saved to %s", folder)
        return
    # Prepared latents and no diffusion.vae: only the trained parts are saved.
    folder.mkdir(parents=True, exist_ok=True)
    pretrained.save_model(folder / "unet", "unet", models.spec, ema["unet"], overwrite=True)
    if trained_text is not None:
        pretrained.save_model(folder / "text_encoder", "text_encoder", models.text_encoder.spec,
                              trained_text, overwrite=True)
    log.info("UNet%s saved to %s", " and text encoder" if trained_text else "", folder)
