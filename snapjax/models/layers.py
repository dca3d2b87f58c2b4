"""Building blocks shared by the UNet and the VAE (diffusers' semantics, NHWC).

Legend: B batch, H height, W width, C channels, T time-embedding width.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv(features: int, kernel: int, *, stride: int = 1, padding=None, dtype=jnp.float32,
         name: str | None = None) -> nn.Conv:
    """A square conv with PyTorch's symmetric 'same'-style padding unless told otherwise."""
    pad = kernel // 2 if padding is None else padding
    if isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad,
                   dtype=dtype, name=name)


def group_norm(groups: int, eps: float, dtype, name: str | None = None) -> nn.GroupNorm:
    # Flax computes the statistics in float32 whatever the compute dtype, as PyTorch autocast does.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def timestep_embedding(t_B: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t_B.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_embedding(w_B: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of the guidance scale w, as StableDiffusionPipeline feeds a UNet with
    ``time_cond_proj_dim``: sin then cos of (w - 1) * 1000 at frequencies 10000^(-i / (dim/2 - 1)).
    The (w - 1) is diffusers' convention, so an exported diffusers folder samples the same."""
    return timestep_embedding((jnp.asarray(w_B, jnp.float32) - 1.0) * 1000.0, dim,
                              flip_sin_to_cos=False, freq_shift=1)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D (pre-norm, SiLU, optional time embedding).

    ``residual=False`` is a block whose residual branch was removed: only the shortcut is left.
    ``keep`` (a traced scalar or per-example (B, 1, 1, 1) values, 1 run / 0 drop) drops the
    residual branch at call time with static shapes; a dropped block is exactly a removed one.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    residual: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, temb_BT: jax.Array | None = None,
                 keep: jax.Array | None = None) -> jax.Array:
        shortcut = x_BHWC
        if x_BHWC.shape[-1] != self.out_channels:
            shortcut = conv(self.out_channels, 1, padding=0, dtype=self.dtype,
                            name="conv_shortcut")(x_BHWC)
        if not self.residual:
            return shortcut
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x_BHWC))
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
        if temb_BT is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb_BT))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if keep is not None:
            h = h * keep.astype(h.dtype)
        return shortcut + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. ``asymmetric`` pads (0, 1) as the VAE encoder does; else (1, 1)."""

    channels: int
    asymmetric: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.asymmetric else 1
        return conv(self.channels, 3, stride=2, padding=pad, dtype=self.dtype, name="conv")(x_BHWC)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x_BHWC = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, dtype=self.dtype, name="conv")(x_BHWC)
