"""The spec-driven UNet: diffusers' UNet2DConditionModel (SD-v1.5 family) in Flax, NHWC.

Legend: B batch, H height, W width, C channels, P pixels as tokens (H*W), L context length,
D context width, T time-embedding width, F sinusoid width (block_channels[0]).

Which blocks exist is data (:class:`~snapjax.models.unet_spec.UNetSpec`); this module only walks
it. Parameter names are a contract with the importer, the exporters and evolution:

  conv_in, time_embedding/linear_{1,2} (and time_embedding/cond_proj with a guidance input),
  down_{s}_{u}_res[_k], down_{s}_{u}_attn[_k], down_{s}_downsample,
  mid_res_{k}, mid_attn[_k],
  up_{s}_{u}_res[_k], up_{s}_{u}_attn[_k], up_{s}_upsample,
  conv_norm_out, conv_out

with ``s`` the resolution stage (0 = full resolution) on both paths, ``u`` the unit and ``k``
the block's count among its kind in the unit (omitted for the first; see
:mod:`snapjax.models.unet_spec`). A transformer holds
``norm, proj_in, block_{k}/{norm1, attn1, norm2, attn2, norm3, ff_proj, ff_out}, proj_out``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax.models.attention import Attention
from snapjax.models.layers import (Downsample, ResnetBlock, Upsample, conv, group_norm,
                                   guidance_embedding, timestep_embedding)
from snapjax.models.unet_spec import UNetSpec, letter_names

# Transformer2DModel's GroupNorm eps is fixed in diffusers, unlike the ResNets' norm_eps.
_TRANSFORMER_NORM_EPS = 1e-6
_LAYER_NORM_EPS = 1e-5
_FF_MULT = 4


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 on the sinusoidal embedding; with a condition (the guidance
    features), ``cond_proj`` of it is added to the sinusoid first (diffusers' cond_proj)."""

    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t_BF: jax.Array, cond_BG: jax.Array | None = None) -> jax.Array:
        if cond_BG is not None:
            # Zero-initialised: a UNet given a guidance input starts as the UNet without it.
            t_BF = t_BF + nn.Dense(t_BF.shape[-1], use_bias=False, dtype=self.dtype,
                                   kernel_init=nn.initializers.zeros, name="cond_proj")(cond_BG)
        h = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(t_BF)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(h))


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward."""

    heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x_BPC: jax.Array, ctx_BLD: jax.Array) -> jax.Array:
        C = x_BPC.shape[-1]

        def norm(name):
            return nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name=name)

        def attention(name):
            return Attention(self.heads, C // self.heads, dtype=self.dtype,
                             implementation=self.attention_impl, name=name)

        x_BPC = x_BPC + attention("attn1")(norm("norm1")(x_BPC))
        x_BPC = x_BPC + attention("attn2")(norm("norm2")(x_BPC), ctx_BLD)
        h, gate = jnp.split(
            nn.Dense(2 * _FF_MULT * C, dtype=self.dtype, name="ff_proj")(norm("norm3")(x_BPC)),
            2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)  # diffusers' GEGLU uses the exact (erf) GELU
        return x_BPC + nn.Dense(C, dtype=self.dtype, name="ff_out")(h)


class Transformer2D(nn.Module):
    """diffusers' Transformer2DModel on continuous inputs; residual, so ``keep=0`` is identity."""

    heads: int
    layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, ctx_BLD: jax.Array,
                 keep: jax.Array | None = None) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        h = group_norm(self.groups, _TRANSFORMER_NORM_EPS, self.dtype, "norm")(x_BHWC)
        # A 1x1 conv and a Dense are the same map; the choice only fixes the weight layout.
        if self.use_linear_projection:
            h_BPC = nn.Dense(C, dtype=self.dtype, name="proj_in")(h.reshape(B, H * W, C))
        else:
            h_BPC = conv(C, 1, padding=0, dtype=self.dtype, name="proj_in")(h).reshape(B, H * W, C)
        for k in range(self.layers):
            h_BPC = TransformerBlock(self.heads, self.dtype, self.attention_impl,
                                     name=f"block_{k}")(h_BPC, ctx_BLD)
        if self.use_linear_projection:
            h = nn.Dense(C, dtype=self.dtype, name="proj_out")(h_BPC).reshape(B, H, W, C)
        else:
            h = conv(C, 1, padding=0, dtype=self.dtype, name="proj_out")(h_BPC.reshape(B, H, W, C))
        if keep is not None:
            h = h * keep.astype(h.dtype)
        return x_BHWC + h


class UNet(nn.Module):
    """UNet2DConditionModel semantics for any :class:`UNetSpec`.

    ``dtype`` is the compute dtype; parameters stay float32 and the output is float32.
    ``attention_impl``: :func:`snapjax.models.attention.dot_product_attention`'s implementation
    (None = XLA, 'cudnn' or 'tpu_flash').
    ``remat=True`` recomputes each ResNet and transformer block in the backward pass instead of
    keeping its activations (only block inputs are saved): about one more forward of compute for
    a large cut in training memory (SD-v1.5's 64x64 attention scores alone are ~0.5 GB per image
    and layer). It changes no parameter name and no forward value.
    """

    spec: UNetSpec
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False

    @nn.compact
    def __call__(self, sample_BHWC: jax.Array, timesteps_B: jax.Array, context_BLD: jax.Array,
                 block_mask: jax.Array | None = None,
                 guidance_B: jax.Array | None = None) -> jax.Array:
        """``block_mask``: optional floats in ``spec.block_names()`` order, 1 run / 0 drop: one
        vector for the whole batch (N,) or one row per example (B, N), at the same cost.
        ``guidance_B``: the guidance scale w (scalar or (B,)), required exactly when
        ``spec.guidance_embed_dim > 0``; such a UNet's output is the guided one."""
        spec, dt = self.spec, self.dtype
        _check_inputs(spec, sample_BHWC, timesteps_B, context_BLD, block_mask, guidance_B)
        B = sample_BHWC.shape[0]
        keep = _keep_lookup(spec, block_mask)
        ctx_BLD = context_BLD.astype(dt)

        t_B = jnp.broadcast_to(jnp.asarray(timesteps_B), (B,))
        t_BF = timestep_embedding(t_B, spec.block_channels[0], flip_sin_to_cos=spec.flip_sin_to_cos,
                                  freq_shift=spec.freq_shift)
        cond_BG = None
        if spec.guidance_embed_dim:
            w_B = jnp.broadcast_to(jnp.asarray(guidance_B, jnp.float32), (B,))
            cond_BG = guidance_embedding(w_B, spec.guidance_embed_dim).astype(dt)
        temb_BT = TimestepEmbedding(spec.time_dim, dt, name="time_embedding")(t_BF.astype(dt),
                                                                               cond_BG)

        resnet_cls, transformer_cls = ResnetBlock, Transformer2D
        if self.remat:
            resnet_cls, transformer_cls = nn.remat(ResnetBlock), nn.remat(Transformer2D)

        def resnet(name, letter, channels, x):
            return resnet_cls(channels, spec.norm_groups, spec.norm_eps, residual=letter == "R",
                              dtype=dt, name=name)(x, temb_BT, keep(name))

        def transformer(name, s, x):
            return transformer_cls(spec.num_heads[s], spec.transformer_layers[s],
                                   spec.norm_groups, spec.use_linear_projection, dt,
                                   self.attention_impl, name=name)(x, ctx_BLD, keep(name))

        def unit_forward(path, s, u, unit, x):
            for letter, (name, kind) in zip(unit, letter_names(path, s, u, unit)):
                if kind == "attn":
                    x = transformer(name, s, x)
                else:
                    x = resnet(name, letter, spec.block_channels[s], x)
            return x

        x = conv(spec.block_channels[0], 3, dtype=dt, name="conv_in")(sample_BHWC.astype(dt))
        skips = [x]
        for path, s, u, unit in spec.units():
            if path == "up":
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = unit_forward(path, s, u, unit, x)
            last_unit = path != "mid" and u == len(getattr(spec, path)[s]) - 1
            if path == "down":
                skips.append(x)
                if last_unit and s < spec.num_stages - 1:
                    x = Downsample(spec.block_channels[s], dtype=dt, name=f"down_{s}_downsample")(x)
                    skips.append(x)
            elif path == "up" and last_unit and s > 0:
                x = Upsample(spec.block_channels[s], dtype=dt, name=f"up_{s}_upsample")(x)

        x = nn.silu(group_norm(spec.norm_groups, spec.norm_eps, dt, "conv_norm_out")(x))
        x = conv(spec.out_channels, 3, dtype=dt, name="conv_out")(x)
        return x.astype(jnp.float32)


def _check_inputs(spec: UNetSpec, sample_BHWC, timesteps_B, context_BLD, block_mask,
                  guidance_B) -> None:
    # Shapes are static under jit, so these checks cost nothing at run time.
    if sample_BHWC.ndim != 4 or sample_BHWC.shape[-1] != spec.in_channels:
        raise ValueError(f"UNet: sample must be B H W {spec.in_channels} (NHWC), "
                         f"got shape {tuple(sample_BHWC.shape)}")
    B, H, W, _ = sample_BHWC.shape
    factor = 2 ** (spec.num_stages - 1)
    if H % factor or W % factor:
        raise ValueError(f"UNet: sample height and width must be multiples of {factor} "
                         f"({spec.num_stages} stages), got {H}x{W}")
    if jnp.ndim(timesteps_B) not in (0, 1) or (jnp.ndim(timesteps_B) == 1
                                               and jnp.shape(timesteps_B)[0] not in (1, B)):
        raise ValueError(f"UNet: timesteps must be a scalar or shape ({B},), "
                         f"got shape {tuple(jnp.shape(timesteps_B))}")
    if (context_BLD.ndim != 3 or context_BLD.shape[0] != B
            or context_BLD.shape[-1] != spec.context_dim):
        raise ValueError(f"UNet: context must be ({B}, L, {spec.context_dim}), "
                         f"got shape {tuple(context_BLD.shape)}")
    if block_mask is not None and tuple(jnp.shape(block_mask)) not in ((spec.num_blocks,),
                                                                        (B, spec.num_blocks)):
        raise ValueError(f"UNet: block_mask must have shape ({spec.num_blocks},) or "
                         f"({B}, {spec.num_blocks}) (one entry per spec.block_names()), got "
                         f"{tuple(jnp.shape(block_mask))}")
    if spec.guidance_embed_dim and guidance_B is None:
        raise ValueError("UNet: this UNet is guidance-conditioned (spec.guidance_embed_dim="
                         f"{spec.guidance_embed_dim}): pass guidance_B, the guidance scale")
    if not spec.guidance_embed_dim and guidance_B is not None:
        raise ValueError("UNet: guidance_B given, but this UNet has no guidance input "
                         "(spec.guidance_embed_dim=0); apply guidance with two calls instead")
    if guidance_B is not None and (jnp.ndim(guidance_B) not in (0, 1) or (
            jnp.ndim(guidance_B) == 1 and jnp.shape(guidance_B)[0] not in (1, B))):
        raise ValueError(f"UNet: guidance_B must be a scalar or shape ({B},), "
                         f"got shape {tuple(jnp.shape(guidance_B))}")


def _keep_lookup(spec: UNetSpec, block_mask):
    """name -> traced keep value (a scalar, or (B, 1, 1, 1) for per-example masks); None without
    a mask or for a block that cannot be dropped."""
    if block_mask is None:
        return lambda name: None
    index = {name: i for i, name in enumerate(spec.block_names())}
    mask = jnp.asarray(block_mask, jnp.float32)
    if mask.ndim == 2:
        mask = mask.T[:, :, None, None, None]  # (N, B, 1, 1, 1): broadcasts against B H W C
    return lambda name: mask[index[name]] if name in index else None


def _dummy_inputs(spec: UNetSpec, sample_size: int):
    size = max(sample_size, 2 ** (spec.num_stages - 1))
    size -= size % 2 ** (spec.num_stages - 1)
    return (jnp.zeros((1, size, size, spec.in_channels), jnp.float32),
            jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 1, spec.context_dim), jnp.float32),
            None,
            jnp.ones((1,), jnp.float32) if spec.guidance_embed_dim else None)


def init_unet(spec: UNetSpec, rng: jax.Array, *, sample_size: int = 8,
              dtype: Any = jnp.float32) -> dict:
    """Random float32 parameters (Flax default initialisers); the tree does not depend on size.

    Compiled once per (spec, sample_size, dtype) and process: XLA's CPU compile of a few hundred
    random initialisers takes tens of seconds, so repeated calls must not pay it again.
    """
    return _init_jit(spec, sample_size, dtype, rng)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_jit(spec: UNetSpec, sample_size: int, dtype: Any, rng: jax.Array) -> dict:
    return UNet(spec, dtype).init(rng, *_dummy_inputs(spec, sample_size))["params"]


def abstract_unet_params(spec: UNetSpec) -> dict:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``: no memory)."""
    return jax.tree.map(lambda leaf: leaf, _abstract_params_cached(spec))  # a copy callers may edit


@functools.lru_cache(maxsize=16)
def _abstract_params_cached(spec: UNetSpec) -> dict:
    # Tracing SD-v1.5's init takes seconds; import, export and evolution ask for it repeatedly.
    return jax.eval_shape(lambda: init_unet(spec, jax.random.key(0)))


def with_guidance_input(spec: UNetSpec, params: dict, dim: int) -> tuple[UNetSpec, dict]:
    """``spec`` and ``params`` given a guidance input of ``dim`` features whose projection is
    zero, so the new UNet computes what the old one did at any w (a guidance-conditioned student
    starts as its teacher). The input dict is not modified."""
    if spec.guidance_embed_dim:
        raise ValueError(f"the UNet already has a guidance input (guidance_embed_dim="
                         f"{spec.guidance_embed_dim})")
    if dim <= 0:
        raise ValueError(f"guidance input width must be > 0, got {dim}")
    new_spec = dataclasses.replace(spec, guidance_embed_dim=dim)
    time_embedding = dict(params["time_embedding"])
    time_embedding["cond_proj"] = {
        "kernel": jnp.zeros((dim, spec.block_channels[0]), jnp.float32)}
    return new_spec, {**params, "time_embedding": time_embedding}


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
