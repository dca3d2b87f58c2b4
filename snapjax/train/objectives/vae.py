"""``objective = "vae"``: a KL autoencoder on images (the world's VAE), :func:`steps.vae_step`.

Legend: B batch, H W image size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from snapjax import pretrained, sampling
from snapjax.config import ConfigError, from_config
from snapjax.data.pipeline import DataConfig
from snapjax.models.vae import VAE, VAESpec
from snapjax.train import steps
from snapjax.train.objectives import Objective, data_config, register
from snapjax.train.objectives.host import grid, replicated_like, to_host
from snapjax.train.state import TrainState

log = logging.getLogger(__name__)


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


@register("vae")
def build(config, *, optimizer, ema_decay, microbatches, compute_dtype, abstract,
          platform) -> Objective:
    del platform  # no device-specific kernels
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

    images = reference_images(data, loss_cfg.num_samples)
    reconstruct = jax.jit(lambda p, x: vae.apply({"params": p}, x))
    encode_mean = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode")[0])

    def sample(state: TrainState, frozen, step_: int):
        del frozen
        rec = to_host(reconstruct(state.ema_params["vae"], replicated_like(state, images)))
        pixels = np.asarray(sampling.to_uint8(np.concatenate([images, rec])))
        err = float(np.mean(np.abs(rec - images)))
        return grid(pixels, rows=2), [], {"sample/recon_l1": err}

    def export(state: TrainState, folder: pathlib.Path):
        # Diffusion wants unit-variance latents: measure the EMA encoder's latent scale on real
        # images and store 1/std as the spec's scaling factor (as SD did for its VAE).
        params = to_host(state.ema_params["vae"])
        probe = reference_images(data, 256)
        mean = np.concatenate([np.asarray(encode_mean(params, probe[i:i + 64]))
                               for i in range(0, len(probe), 64)])
        scaled = dataclasses.replace(spec, scaling_factor=float(1.0 / (mean.std() + 1e-8)))
        pretrained.save_model(folder, "vae", scaled, params, overwrite=True)
        log.info("VAE saved to %s (latent std %.4f -> scaling_factor %.5f)", folder, mean.std(),
                 scaled.scaling_factor)

    return dataclasses.replace(objective, sample=sample, export=export)


def reference_images(data: DataConfig, n: int) -> np.ndarray:
    """n fixed float [-1, 1] images from the training source (its first items, unshuffled)."""
    from snapjax.data.pipeline import make_train_iterator
    fixed = dataclasses.replace(data, shuffle=False, num_workers=0)
    it = make_train_iterator(fixed, global_batch_size=n, seed=0, process_index=0,
                             process_count=1)
    batch = next(it)
    it.close()
    return np.asarray(steps.model_range(jnp.asarray(batch["image"])))
