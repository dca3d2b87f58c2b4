"""The train state (step, params, optimizer state, EMA params), created already sharded.

``params`` is a dict of the *trained* components (``{"unet": ...}``, or ``{"vae": ...}``, plus
``"text_encoder"`` when it is trained too). Frozen models (a teacher, the VAE that encodes
images for the UNet) are never part of the state: they are separate, non-donated step
arguments, outside the optimizer and outside the checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from snapjax import sharding
from snapjax.sharding import MeshConfig


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    opt_state: Any
    ema_params: Any


def init_state(init_params: Callable[..., Any], optimizer: optax.GradientTransformation,
               rng: jax.Array, *args: Any) -> TrainState:
    """``init_params(rng, *args)`` wrapped into a fresh state (traceable)."""
    return state_from_params(init_params(rng, *args), optimizer)


def state_from_params(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state around existing params; the EMA starts as a copy of them."""
    # A copy, not the same buffers: the step donates the state, and a buffer cannot be donated
    # twice.
    ema = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), ema_params=ema)


def state_shardings(abstract_state: TrainState, mesh: Mesh, cfg: MeshConfig) -> TrainState:
    return sharding.tree_shardings(abstract_state, mesh, cfg)


def abstract_state(init_params: Callable[..., Any], optimizer: optax.GradientTransformation,
                   mesh: Mesh, cfg: MeshConfig, *args: Any) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStructs carrying the target shardings, the shardings): what a restore or an
    ahead-of-time compile needs, without memory."""
    abstract = jax.eval_shape(functools.partial(init_state, init_params, optimizer),
                              jax.random.key(0), *args)
    shardings = state_shardings(abstract, mesh, cfg)
    return sharding.abstract_with_shardings(abstract, shardings), shardings


def create_sharded_state(init_params: Callable[..., Any],
                         optimizer: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                         cfg: MeshConfig, *args: Any) -> tuple[TrainState, TrainState]:
    """(state, its shardings), each array materialised directly in its shards.

    ``eval_shape`` gives the tree without memory; ``jit(..., out_shardings=...)`` then makes
    every device compute only its own shard, so a model larger than one device's memory can
    still be created. ``args`` (pretrained weights to start from) go in as jit arguments,
    placed under the same rules first; they are donated, their buffers becoming the params.
    """
    _, shardings = abstract_state(init_params, optimizer, mesh, cfg, *args)
    args = tuple(sharding.shard_params(a, mesh, cfg) for a in args)
    init = jax.jit(functools.partial(init_state, init_params, optimizer),
                   out_shardings=shardings, donate_argnums=tuple(range(1, 1 + len(args))))
    return init(rng, *args), shardings
