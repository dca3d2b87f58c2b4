"""What is trained: from a config, the models, the bound step, the frozen inputs and the hooks.

The loop knows nothing about UNets or VAEs; it asks :func:`build_objective` for an
:class:`Objective` and calls its parts. ``config.objective`` picks one:

  ``vae``             a KL autoencoder on images (the world's VAE): :func:`steps.vae_step`
  ``unet_diffusion``  a text-conditioned UNet on VAE latents (eps or v objective, caption
                      dropout, optional min-SNR, frozen or trained text encoder):
                      :func:`steps.unet_diffusion_step`, on raw images + captions (encoded
                      inside the step by the frozen VAE) or on prepared latents + contexts.

Legend: B batch, H W image size, h w latent size, C latent channels, L tokens, D width.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from snapjax import pretrained, sharding
from snapjax.config import ConfigError, from_config
from snapjax.data.pipeline import DataConfig
from snapjax.diffusion import ddim
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models import attention as attention_lib
from snapjax.models.text_encoder import TextEncoder, TextEncoderSpec
from snapjax.models.unet import UNet
from snapjax.models.unet_spec import UNetSpec
from snapjax.models.vae import VAE, VAESpec
from snapjax.train import steps
from snapjax.train.state import TrainState

log = logging.getLogger(__name__)

OBJECTIVES = ("vae", "unet_diffusion")


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
    """``config.vae_loss``: L1 or L2 reconstruction plus a small KL weight (no GAN)."""

    recon: str = "l1"
    kl_weight: float = 1e-4
    num_samples: int = 8  # images in the reconstruction grid

    def __post_init__(self):
        if self.recon not in ("l1", "l2"):
            raise ValueError(f"vae_loss.recon={self.recon!r}: expected 'l1' or 'l2'")
        if self.kl_weight < 0:
            raise ValueError(f"vae_loss.kl_weight must be >= 0, got {self.kl_weight}")


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


@dataclasses.dataclass
class Objective:
    """Everything the loop needs to train one kind of model.

    init_params(rng, pretrained) -> the trained params dict; traceable (the loop jits it with
      out_shardings). ``pretrained`` holds loaded weights to start from, passed as a jit
      argument (never closed over: SD-v1.5's 3.4 GB must not become a program constant).
    pretrained: host arrays (or ShapeDtypeStructs in abstract mode), placed by the loop.
    step(state, batch, rng, frozen) -> (state, metrics), options bound, not yet jitted.
    frozen: host arrays of the untrained inputs (placed on the mesh by the loop).
    batch_shapes(global_batch) -> {key: ShapeDtypeStruct} of the batch entries the step reads
      (the loop moves only these to the devices).
    tokenizer: passed to the data pipeline (None: no captions needed).
    sample(state, frozen, step) -> (uint8 grid HxWx3, captions, metrics), or None.
    export(state, folder): writes the trained model(s) for later stages.
    """

    init_params: Callable[[jax.Array, Any], Any]
    pretrained: Any
    step: Callable
    frozen: Any
    batch_shapes: Callable[[int], dict[str, jax.ShapeDtypeStruct]]
    tokenizer: Callable | None
    sample: Callable | None
    export: Callable[[TrainState, pathlib.Path], None]

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(self.batch_shapes(1))


def build_objective(config: ml_collections.ConfigDict, *, optimizer: optax.GradientTransformation,
                    ema_decay: float, microbatches: int, compute_dtype: Any,
                    abstract: bool = False, platform: str | None = None) -> Objective:
    """``abstract``: shapes only, nothing loaded or computed (for ahead-of-time compilation);
    model folders are read for their specs, the tokenizer and sampler are left out.
    ``platform``: the target devices' ("cpu", "gpu", "tpu"; default: this process's backend),
    which device-specific kernels are checked against."""
    name = config.objective
    kwargs = dict(optimizer=optimizer, ema_decay=ema_decay, microbatches=microbatches,
                  compute_dtype=compute_dtype, abstract=abstract)
    if name == "vae":
        return _vae_objective(config, **kwargs)
    if name == "unet_diffusion":
        return _diffusion_objective(config, platform=platform or jax.default_backend(), **kwargs)
    raise ConfigError(f"config.objective={name!r}: expected one of {list(OBJECTIVES)}")


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
    try:
        return DataConfig.from_config(config.data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.data: {e}") from None


# ----------------------------------------------------------------------------- VAE

def _vae_objective(config, *, optimizer, ema_decay, microbatches, compute_dtype,
                   abstract) -> Objective:
    spec = from_config(VAESpec, config.vae, "vae")
    loss_cfg = from_config(VAELossConfig, config.vae_loss, "vae_loss")
    data = data_config(config)
    if data.source == "prepared":
        raise ConfigError("objective 'vae' trains on images; data.source='prepared' holds latents")
    vae = VAE(spec, compute_dtype)
    size = data.resolution

    def init_params(rng, pretrained_params):
        del pretrained_params
        x = jnp.zeros((1, size, size, spec.in_channels), jnp.float32)
        return {"vae": vae.init(rng, x)["params"]}

    def batch_shapes(batch: int):
        dtype = jnp.uint8 if data.image_dtype == "uint8" else jnp.float32
        return {"image": jax.ShapeDtypeStruct((batch, size, size, spec.in_channels), dtype)}

    step = functools.partial(steps.vae_step, vae=vae, kl_weight=loss_cfg.kl_weight,
                             recon=loss_cfg.recon, optimizer=optimizer, ema_decay=ema_decay,
                             microbatches=microbatches)
    objective = Objective(init_params=init_params, pretrained={}, step=step, frozen={},
                          batch_shapes=batch_shapes, tokenizer=None, sample=None,
                          export=lambda state, folder: None)
    if abstract:
        return objective

    images = _reference_images(data, loss_cfg.num_samples)
    reconstruct = jax.jit(lambda p, x: vae.apply({"params": p}, x))
    encode_mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode")[0])

    def sample(state: TrainState, frozen, step_: int):
        del frozen
        rec = to_host(reconstruct(state.ema_params["vae"], _replicated_like(state, images)))
        grid = _grid(np.concatenate([images, rec]), rows=2)
        err = float(np.mean(np.abs(rec - images)))
        return grid, [], {"sample/recon_l1": err}

    def export(state: TrainState, folder: pathlib.Path):
        # Diffusion wants unit-variance latents: measure the EMA encoder's latent scale on real
        # images and store 1/std as the spec's scaling factor (as SD did for its VAE).
        params = to_host(state.ema_params["vae"])
        probe = _reference_images(data, 256)
        mean = np.concatenate([np.asarray(encode_mean(params, probe[i:i + 64]))
                               for i in range(0, len(probe), 64)])
        scaled = dataclasses.replace(spec, scaling_factor=float(1.0 / (mean.std() + 1e-8)))
        pretrained.save_model(folder, "vae", scaled, params, overwrite=True)
        log.info("VAE saved to %s (latent std %.4f -> scaling_factor %.5f)", folder, mean.std(),
                 scaled.scaling_factor)

    return dataclasses.replace(objective, sample=sample, export=export)


# ----------------------------------------------------------------------------- UNet diffusion

def _tokenizer(path: str, max_length: int):
    from snapjax.data.world import world_tokenizer_folder
    from snapjax.models.tokenizer import Tokenizer
    return Tokenizer.from_folder(path or world_tokenizer_folder(), max_length=max_length)


def _component(path: str, kind: str, dtype, abstract: bool):
    """(module, params) of a model folder; params as ShapeDtypeStructs in abstract mode."""
    if abstract:
        spec = pretrained.read_spec(path, kind)
        return pretrained.build_module(kind, spec, dtype), pretrained.abstract_params(kind, spec)
    return pretrained.load_component(path, kind, dtype=dtype)


def _diffusion_objective(config, *, optimizer, ema_decay, microbatches, compute_dtype,
                         abstract, platform) -> Objective:
    dcfg = from_config(DiffusionConfig, config.diffusion, "diffusion")
    schedule = from_config(NoiseSchedule, config.schedule, "schedule")
    data = data_config(config)
    prepared = data.source == "prepared"
    if dcfg.train_text_encoder and prepared:
        raise ConfigError("diffusion.train_text_encoder needs captions, but prepared data holds "
                          "fixed contexts")

    # Text encoder: pretrained (frozen unless told) or new from config.text_encoder (trained).
    if dcfg.text_encoder:
        text_module, text_params = _component(dcfg.text_encoder, "text_encoder", compute_dtype,
                                              abstract)
        text_spec = text_module.spec
    else:
        text_spec = from_config(TextEncoderSpec, config.text_encoder, "text_encoder")
        text_module, text_params = TextEncoder(text_spec, compute_dtype), None
        if not (dcfg.train_text_encoder or abstract):
            raise ConfigError("diffusion.text_encoder is empty, so a new text encoder is built: "
                              "set diffusion.train_text_encoder=True, or give a pretrained one")

    vae = vae_params = None
    if dcfg.vae and not (abstract and prepared):  # prepared data: the VAE only draws samples
        vae, vae_params = _component(dcfg.vae, "vae", compute_dtype, abstract)
    elif not prepared:
        raise ConfigError("raw-image data needs diffusion.vae (a VAE model folder) to encode "
                          "images; train one with configs/world_vae.py or import SD-v1.5's")

    if dcfg.unet_init:
        unet, unet_params = _component(dcfg.unet_init, "unet", compute_dtype, abstract)
        spec = unet.spec
    else:
        spec = from_config(UNetSpec, config.unet, "unet")
        unet, unet_params = UNet(spec, compute_dtype), None
    needs = attention_lib.REQUIRED_PLATFORM.get(dcfg.attention)
    if needs and platform != needs:
        raise ConfigError(f"diffusion.attention={dcfg.attention!r} runs on {needs} devices only "
                          f"(this run: {platform}); use --config.diffusion.attention=xla")
    if dcfg.attention == "cudnn" and jnp.dtype(compute_dtype) == jnp.float32:
        raise ConfigError("diffusion.attention='cudnn' needs train.compute_dtype='bfloat16'")
    # How the UNet runs, not what it is: neither changes a parameter or a forward value.
    unet = unet.clone(remat=dcfg.unet_remat, attention_impl=dcfg.attention)
    if spec.context_dim != text_spec.width:
        raise ConfigError(f"unet.context_dim={spec.context_dim} but the text encoder's width is "
                          f"{text_spec.width}")
    if vae is not None and vae.spec.latent_channels != spec.in_channels:
        raise ConfigError(f"the VAE has {vae.spec.latent_channels} latent channels but "
                          f"unet.in_channels={spec.in_channels}")

    tokenizer = None
    if abstract:
        empty_ids = np.zeros((1, text_spec.max_length), np.int32)
    else:
        tokenizer = _tokenizer(dcfg.tokenizer, text_spec.max_length)
        if tokenizer.vocab_size > text_spec.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but "
                              f"text_encoder.vocab_size={text_spec.vocab_size}")
        empty_ids = np.asarray(tokenizer([""]), np.int32)

    loaded: dict[str, Any] = {}
    if unet_params is not None:
        loaded["unet"] = unet_params
    if dcfg.train_text_encoder and text_params is not None:
        loaded["text_encoder"] = text_params

    def init_params(rng, pretrained_params):
        r_unet, r_text = jax.random.split(rng)
        params = dict(pretrained_params)
        if "unet" not in params:
            z = jnp.zeros((1, 8, 8, spec.in_channels), jnp.float32)
            params["unet"] = unet.init(r_unet, z, jnp.zeros((1,), jnp.int32),
                                       jnp.zeros((1, 1, spec.context_dim)))["params"]
        if dcfg.train_text_encoder and "text_encoder" not in params:
            params["text_encoder"] = text_module.init(r_text, jnp.asarray(empty_ids))["params"]
        return params

    frozen: dict[str, Any] = {}
    context_shape = (text_spec.max_length, text_spec.width)
    if prepared:
        inputs = functools.partial(steps.cached_inputs, caption_dropout=dcfg.caption_dropout)
        encode_empty = text_module.apply
        if text_params is None:  # abstract mode without a text encoder folder
            frozen["empty_context"] = jax.ShapeDtypeStruct((1, *context_shape), jnp.float32)
        elif abstract:
            frozen["empty_context"] = jax.eval_shape(
                lambda p: encode_empty({"params": p}, empty_ids), text_params)
        else:
            frozen["empty_context"] = np.asarray(
                jax.jit(lambda p: encode_empty({"params": p}, empty_ids))(text_params))
        factor = vae.spec.downsample_factor if vae is not None else 8  # SD-v1.5's VAE: 8

        def batch_shapes(batch: int):
            hw = data.resolution // factor
            return {"latent": jax.ShapeDtypeStruct((batch, hw, hw, spec.in_channels), jnp.float32),
                    "context": jax.ShapeDtypeStruct((batch, *context_shape), jnp.float32)}
    else:
        inputs = functools.partial(steps.encoded_inputs, vae=vae, text_encoder=text_module,
                                   text_trainable=dcfg.train_text_encoder,
                                   caption_dropout=dcfg.caption_dropout)
        frozen["vae"] = vae_params
        frozen["empty_ids"] = empty_ids
        if not dcfg.train_text_encoder:
            frozen["text_encoder"] = text_params

        def batch_shapes(batch: int):
            r = data.resolution
            dtype = jnp.uint8 if data.image_dtype == "uint8" else jnp.float32
            return {"image": jax.ShapeDtypeStruct((batch, r, r, vae.spec.in_channels), dtype),
                    "input_ids": jax.ShapeDtypeStruct((batch, text_spec.max_length), jnp.int32)}

    step = functools.partial(steps.unet_diffusion_step, unet=unet, schedule=schedule,
                             inputs=inputs, optimizer=optimizer, ema_decay=ema_decay,
                             min_snr_gamma=dcfg.min_snr_gamma, microbatches=microbatches)

    sample = None
    if abstract:
        pass
    elif vae is not None and data.source == "world":
        sample = _world_sampler(data, dcfg, schedule, unet, text_module, vae, tokenizer,
                                empty_ids)
    else:
        log.info("sample grids are off (they need diffusion.vae and the world's captions)")

    def export(state: TrainState, folder: pathlib.Path):
        ema = to_host(state.ema_params)
        trained_text = ema["text_encoder"] if dcfg.train_text_encoder else None
        if vae is not None:
            # A whole pipeline folder, so `snapjax sample` and `snapjax export` take it as is.
            from snapjax.pipeline import TextToImage
            text = trained_text if trained_text is not None else to_host(text_params)
            pipe = TextToImage(unet=unet, unet_params=ema["unet"], vae=vae,
                               vae_params=to_host(vae_params), text_encoder=text_module,
                               text_encoder_params=text, tokenizer=tokenizer, schedule=schedule,
                               sample_size=data.resolution // vae.spec.downsample_factor,
                               num_steps=dcfg.sample_steps, guidance_scale=dcfg.guidance_scale)
            pipe.save_pretrained(folder, overwrite=True)
            log.info("pipeline (UNet, VAE, text encoder, tokenizer, schedule) saved to %s", folder)
            return
        # Prepared latents and no diffusion.vae: only the trained parts are saved.
        folder.mkdir(parents=True, exist_ok=True)
        pretrained.save_model(folder / "unet", "unet", spec, ema["unet"], overwrite=True)
        if trained_text is not None:
            pretrained.save_model(folder / "text_encoder", "text_encoder", text_spec,
                                  trained_text, overwrite=True)
        log.info("UNet%s saved to %s", " and text encoder" if trained_text else "", folder)

    return Objective(init_params=init_params, pretrained=loaded, step=step, frozen=frozen,
                     batch_shapes=batch_shapes, tokenizer=tokenizer, sample=sample,
                     export=export)


def generate(unet: UNet, unet_params, text_module: TextEncoder, text_params, vae: VAE,
             vae_params, ids_BL: np.ndarray, empty_ids_1L: np.ndarray, seed: int, *,
             schedule: NoiseSchedule, num_steps: int, guidance_scale: float,
             latent_hw: int, put: Callable = lambda x: x) -> np.ndarray:
    """Prompts (token ids) -> float images [-1, 1] (B, H, W, 3): DDIM with classifier-free
    guidance, decoded by the VAE. ``put`` places host arrays next to the params (replicated on
    their mesh, so that this also runs with params spread over several processes)."""
    encode_text = jax.jit(lambda p, ids: text_module.apply({"params": p}, ids))
    ctx_BLD = encode_text(text_params, put(ids_BL))
    uncond_1LD = encode_text(text_params, put(empty_ids_1L))
    shape = (ids_BL.shape[0], latent_hw, latent_hw, unet.spec.in_channels)
    z_BhwC = put(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))
    latents = ddim.sample(functools.partial(unet.apply, {"params": unet_params}), z_BhwC,
                          ctx_BLD, uncond_1LD, schedule=schedule, num_steps=num_steps,
                          guidance_scale=guidance_scale)
    decode = jax.jit(lambda p, z: vae.apply({"params": p}, z / vae.spec.scaling_factor,
                                            method="decode"))
    return np.clip(to_host(decode(vae_params, latents)), -1.0, 1.0)


def _world_sampler(data: DataConfig, dcfg: DiffusionConfig, schedule, unet, text_module, vae,
                   tokenizer, empty_ids):
    """Sample grid + the world's attribute accuracy of generated images (reader from
    :mod:`snapjax.eval.reader`, trained once on a held-out world seed and cached)."""
    from snapjax.data.world import render_batch
    from snapjax.eval import reader as reader_lib

    eval_world = dataclasses.replace(data.world, seed=reader_lib.EVAL_WORLD_SEED)
    n = max(dcfg.num_samples, dcfg.eval_samples)
    real_NHWC, captions, labels = render_batch(np.arange(n), eval_world)
    ids = np.asarray(tokenizer(captions), np.int32)
    latent_hw = data.resolution // vae.spec.downsample_factor

    def sample(state: TrainState, frozen, step_: int):
        text_params = (state.ema_params["text_encoder"] if "text_encoder" in state.ema_params
                       else frozen["text_encoder"])
        imgs = generate(unet, state.ema_params["unet"], text_module, text_params, vae,
                        frozen["vae"], ids, empty_ids, 1234, schedule=schedule,
                        num_steps=dcfg.sample_steps, guidance_scale=dcfg.guidance_scale,
                        latent_hw=latent_hw, put=functools.partial(_replicated_like, state))
        metrics = {}
        if dcfg.eval_samples:
            reader = reader_lib.get_reader(data.world, log=log.info)
            k = dcfg.eval_samples
            scores = reader_lib.score(reader, imgs[:k], {a: v[:k] for a, v in labels.items()},
                                      reference_images=real_NHWC[:k])
            metrics = {f"eval/{name}": v for name, v in scores.items()}
        grid = _grid(imgs[:dcfg.num_samples], rows=int(np.ceil(np.sqrt(dcfg.num_samples))))
        return grid, list(captions[:dcfg.num_samples]), metrics

    return sample


# ----------------------------------------------------------------------------- helpers

def _reference_images(data: DataConfig, n: int) -> np.ndarray:
    """n fixed float [-1, 1] images from the training source (its first items, unshuffled)."""
    from snapjax.data.pipeline import make_train_iterator
    fixed = dataclasses.replace(data, shuffle=False, num_workers=0)
    it = make_train_iterator(fixed, global_batch_size=n, seed=0, process_index=0,
                             process_count=1)
    batch = next(it)
    it.close()
    return np.asarray(steps.model_range(jnp.asarray(batch["image"])))


def to_host(tree):
    """Device arrays -> numpy, also for arrays spread over several processes."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(get, tree)


def _replicated_like(state: TrainState, x: np.ndarray):
    """A host array replicated on the mesh the state lives on (works across processes)."""
    leaf = jax.tree.leaves(state.params)[0]
    mesh = getattr(leaf.sharding, "mesh", None)
    if isinstance(mesh, Mesh):
        return jax.device_put(x, sharding.replicated(mesh))
    return x


def _grid(images_NHWC: np.ndarray, rows: int) -> np.ndarray:
    """float [-1, 1] images -> one uint8 grid image, row-major, 2-pixel gaps."""
    n, h, w, c = images_NHWC.shape
    cols = int(np.ceil(n / rows))
    pad = 2
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    pix = np.clip((images_NHWC + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + col * (w + pad):pad + col * (w + pad) + w] = pix[i]
    return out
