"""What is trained: from a config, the models, the bound step, the frozen inputs and the hooks.

The loop knows nothing about UNets or VAEs; it asks :func:`build_objective` for an
:class:`Objective` and calls its parts. ``config.objective`` names one; each lives in its own
module and registers its builder with :func:`register`:

  ``vae``             :mod:`.vae`: a KL autoencoder on images (the world's VAE)
  ``unet_diffusion``  :mod:`.diffusion`: a text-conditioned UNet on VAE latents (eps or v,
                      caption dropout, min-SNR, robust training), on raw images + captions or
                      on prepared latents + contexts

A builder is ``build(config, *, optimizer, ema_decay, microbatches, compute_dtype, abstract,
platform) -> Objective``; a new objective is a new module plus one import line at the bottom.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from snapjax.config import ConfigError
from snapjax.data.pipeline import DataConfig
from snapjax.train.state import TrainState


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


Builder = Callable[..., Objective]
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register("unet_diffusion") def build(config, **options) -> Objective``."""
    def add(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"objective {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder
    return add


def names() -> tuple[str, ...]:
    """The registered objectives, in registration order."""
    return tuple(_BUILDERS)


def build_objective(config: ml_collections.ConfigDict, *, optimizer: optax.GradientTransformation,
                    ema_decay: float, microbatches: int, compute_dtype: Any,
                    abstract: bool = False, platform: str | None = None) -> Objective:
    """The objective ``config.objective`` names, built from the rest of the config.

    ``abstract``: shapes only, nothing loaded or computed (for ahead-of-time compilation);
    model folders are read for their specs, the tokenizer and sampler are left out.
    ``platform``: the target devices' ("cpu", "gpu", "tpu"; default: this process's backend),
    which device-specific kernels are checked against."""
    name = config.objective
    if name not in _BUILDERS:
        raise ConfigError(f"config.objective={name!r}: expected one of {list(_BUILDERS)}")
    return _BUILDERS[name](config, optimizer=optimizer, ema_decay=ema_decay,
                           microbatches=microbatches, compute_dtype=compute_dtype,
                           abstract=abstract, platform=platform or jax.default_backend())


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
    try:
        return DataConfig.from_config(config.data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.data: {e}") from None


# The built-in objectives register themselves on import; their config sections stay importable
# from here, where configs found them before objectives became a package.
from snapjax.train.objectives import decoder, diffusion, step_distill, vae  # noqa: E402,F401
from snapjax.train.objectives.decoder import DecoderDistillConfig  # noqa: E402,F401
from snapjax.train.objectives.step_distill import StepDistillConfig  # noqa: E402,F401
from snapjax.train.objectives.diffusion import DiffusionConfig  # noqa: E402,F401
from snapjax.train.objectives.vae import VAELossConfig  # noqa: E402,F401
