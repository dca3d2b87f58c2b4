"""Robust training (SnapFusion): every UNet block runs with some probability and is dropped
otherwise, so that the UNet keeps working when evolution later removes blocks.

Legend: B batch, N droppable blocks (``spec.block_names()``, the UNet's ``block_mask`` order).

Dropping is the UNet's ``block_mask`` (a transformer becomes the identity, a ResNet keeps only
its shortcut), so a masked step costs what an unmasked one does, per-example masks included.
The mask is drawn inside the jitted loss from the step's key (itself ``fold_in(rng, step)``):
a resumed run draws the masks the uninterrupted run drew. Evaluation and sampling pass no mask,
so every block runs there.

``config.robust`` (:class:`RobustConfig`) chooses the probabilities; the objective binds
:func:`block_mask_sampler` into its loss before jit, so nothing in the traced code reads it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.models.unet_spec import UNetSpec

# mask_fn(rng, batch_size) -> (B, N) or (N,) float mask; see block_mask_sampler
MaskFn = Callable[[jax.Array, int], jax.Array]

# The loss derives its mask key as fold_in(loss_rng, MASK_STREAM): the loss's other draws
# (split into timesteps, noise, inputs) stay what they are without robust training.
MASK_STREAM = 0x6D61736B  # "mask"


@dataclasses.dataclass(frozen=True)
class RobustConfig:
    """``config.robust``: which blocks run in each training step.

    enabled: off (the default) binds no mask at all: the step is the plain diffusion step.
    keep_prob_attention / keep_prob_resnet: probability that a transformer / a ResNet runs,
      in (0, 1].
    stage_keep_prob_attention / stage_keep_prob_resnet: per-stage overrides, one probability
      per resolution stage (stage 0 = full resolution; the mid block belongs to the deepest
      stage), e.g. ``--config.robust.stage_keep_prob_attention="(1.0, 0.7, 0.7, 0.9)"``; the
      empty tuple uses the global value everywhere.
    per_example: an independent mask per example (free: the UNet scales each example's branch);
      False draws one mask for the whole (micro)batch.
    """

    enabled: bool = False
    keep_prob_attention: float = 1.0
    keep_prob_resnet: float = 1.0
    stage_keep_prob_attention: tuple[float, ...] = ()
    stage_keep_prob_resnet: tuple[float, ...] = ()
    per_example: bool = True

    def __post_init__(self):
        for key in ("keep_prob_attention", "keep_prob_resnet"):
            _check_probability(f"robust.{key}", getattr(self, key))
        for key in ("stage_keep_prob_attention", "stage_keep_prob_resnet"):
            values = getattr(self, key)
            if not isinstance(values, (tuple, list)):
                raise ValueError(f"robust.{key} must be a tuple of probabilities (one per stage) "
                                 f"or (), got {values!r}")
            for s, p in enumerate(values):
                _check_probability(f"robust.{key}[{s}]", p)
            object.__setattr__(self, key, tuple(float(p) for p in values))


def _check_probability(key: str, p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise ValueError(f"{key}={p!r} must be a probability in (0, 1]")


def keep_probabilities(spec: UNetSpec, cfg: RobustConfig) -> np.ndarray:
    """(N,) float32 probability that each block of ``spec.block_names()`` runs (whatever
    ``cfg.enabled`` says)."""
    per_kind = {"attn": (cfg.keep_prob_attention, cfg.stage_keep_prob_attention,
                         "stage_keep_prob_attention"),
                "res": (cfg.keep_prob_resnet, cfg.stage_keep_prob_resnet,
                        "stage_keep_prob_resnet")}
    for _, stages, key in per_kind.values():
        if stages and len(stages) != spec.num_stages:
            raise ValueError(f"robust.{key} has {len(stages)} entries but the UNet has "
                             f"{spec.num_stages} stages (one probability per stage, or ())")
    probs = []
    for block in spec.blocks():
        if block.removed:
            continue  # not in block_names(): nothing left to drop
        default, stages, _ = per_kind[block.kind]
        probs.append(stages[block.stage] if stages else default)
    return np.asarray(probs, np.float32)


def sample_block_mask(rng: jax.Array, keep_probs: jax.Array, batch_size: int,
                      per_example: bool) -> jax.Array:
    """A float32 mask, 1 run / 0 drop, with P(1) = ``keep_probs`` (N,): (B, N) per example,
    else (N,) for the whole batch. Pure and traceable; ``batch_size`` and ``per_example`` are
    static."""
    keep_probs = jnp.asarray(keep_probs, jnp.float32)
    shape = (batch_size, keep_probs.shape[0]) if per_example else keep_probs.shape
    return jax.random.bernoulli(rng, keep_probs, shape).astype(jnp.float32)


def block_mask_sampler(spec: UNetSpec, cfg: RobustConfig) -> MaskFn | None:
    """``mask_fn(rng, batch_size)`` for the diffusion loss (and any UNet loss), or None when
    robust training is off. Bind it before jit; it closes over the (N,) probabilities only."""
    if not cfg.enabled:
        return None
    return functools.partial(_draw, keep_probs=tuple(keep_probabilities(spec, cfg).tolist()),
                             per_example=cfg.per_example)


def _draw(rng: jax.Array, batch_size: int, *, keep_probs: tuple[float, ...],
          per_example: bool) -> jax.Array:
    return sample_block_mask(rng, jnp.asarray(keep_probs, jnp.float32), batch_size, per_example)


def mask_key(loss_rng: jax.Array) -> jax.Array:
    """The key a loss draws its block mask from (see MASK_STREAM)."""
    return jax.random.fold_in(loss_rng, MASK_STREAM)
