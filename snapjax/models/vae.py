"""The Stable Diffusion VAE (diffusers' AutoencoderKL), NHWC, with separately sized encoder and decoder.

Legend: B batch, H W image height/width, h w latent height/width (H / 2**(stages-1)),
C channels, Z latent channels.

The encoder and the decoder have their own channel tuples and GroupNorm group counts, so
SnapFusion's efficient decoder (every decoder width halved) is this module with another
:class:`VAESpec`, and :class:`VAEDecoder` runs the decoder alone (parameters ``post_quant_conv`` +
``decoder``, the same names as inside :class:`VAE`). :mod:`snapjax.models.prune` makes such a
decoder from a teacher's weights.

Parameter tree (names mirror diffusers; ``i`` and ``j`` as in diffusers' module lists):

  encoder/conv_in
  encoder/down_{i}_res_{j}          i = stage, 0 = full resolution (``encoder.down_blocks.{i}``)
  encoder/down_{i}_downsample       every stage but the last (asymmetric (0, 1) padding, stride 2)
  encoder/mid_res_0, encoder/mid_attn, encoder/mid_res_1
  encoder/conv_norm_out, encoder/conv_out      (conv_out gives 2 Z channels: mean and log-variance)
  quant_conv, post_quant_conv                  (1x1 convs; absent when the spec turns them off)
  decoder/conv_in
  decoder/mid_res_0, decoder/mid_attn, decoder/mid_res_1
  decoder/up_{i}_res_{j}            i = position in execution order, 0 = the deepest (lowest
                                    resolution) stage, exactly ``decoder.up_blocks.{i}``; its width
                                    is ``decoder_channels[-1 - i]``; layers_per_block + 1 resnets
  decoder/up_{i}_upsample           every up stage but the last
  decoder/conv_norm_out, decoder/conv_out

``mid_attn`` holds ``group_norm`` and ``to_q``/``to_k``/``to_v``/``to_out`` (all with biases):
single-scale self-attention over the h*w positions, residual.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax.models.attention import Attention
from snapjax.models.layers import Downsample, ResnetBlock, Upsample, conv, group_norm

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAESpec:
    """An AutoencoderKL described by data. Channel tuples run full resolution first (diffusers'
    ``block_out_channels`` order) for the encoder and the decoder alike."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    # The decoder's GroupNorm groups; None: norm_groups. A decoder pruned in whole groups
    # (snapjax.models.prune) has fewer groups of the teacher's size.
    decoder_norm_groups: int | None = None
    norm_eps: float = 1e-6
    mid_attention: bool = True
    # diffusers' VAE attention has heads = channels // attention_head_dim with attention_head_dim =
    # channels: one head whatever the width. Kept as a count so pruning the width keeps it.
    mid_attention_heads: int = 1
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # Diffusion works on latent * scaling_factor; the VAE itself never applies it.
    scaling_factor: float = 0.18215

    def __post_init__(self):
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError(
                f"VAESpec: encoder_channels has {len(self.encoder_channels)} stages but "
                f"decoder_channels has {len(self.decoder_channels)}; both must change the "
                "resolution by the same factor")
        if not self.encoder_channels:
            raise ValueError("VAESpec: encoder_channels is empty")
        if self.layers_per_block < 1:
            raise ValueError(f"VAESpec.layers_per_block={self.layers_per_block}: need >= 1")
        if self.decoder_norm_groups is not None and self.decoder_norm_groups < 1:
            raise ValueError(f"VAESpec.decoder_norm_groups={self.decoder_norm_groups}: need >= 1 "
                             "(or None: norm_groups)")
        for field, groups, name in (
                ("encoder_channels", self.norm_groups, "norm_groups"),
                ("decoder_channels", self.decoder_groups,
                 "norm_groups" if self.decoder_norm_groups is None else "decoder_norm_groups")):
            for s, c in enumerate(getattr(self, field)):
                if c % groups:
                    raise ValueError(f"VAESpec.{field}[{s}]={c} is not divisible by "
                                     f"{name}={groups}")
            c = getattr(self, field)[-1]
            if self.mid_attention and c % self.mid_attention_heads:
                raise ValueError(f"VAESpec.{field}[-1]={c} (the mid attention width) is not "
                                 f"divisible by mid_attention_heads={self.mid_attention_heads}")

    @property
    def decoder_groups(self) -> int:
        """GroupNorm groups in the decoder."""
        return self.norm_groups if self.decoder_norm_groups is None else self.decoder_norm_groups

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder_channels) - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VAESpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VAESpec: unknown key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("encoder_channels", "decoder_channels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


SD15 = VAESpec()

# A sub-MB VAE with SD-v1.5's structure (two stages: 2x downsampling), for tests.
TINY = VAESpec(encoder_channels=(32, 64), decoder_channels=(32, 64), layers_per_block=1,
               norm_groups=8)

PRESETS: dict[str, VAESpec] = {"sd15": SD15, "tiny": TINY}


def preset(name: str) -> VAESpec:
    if name not in PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def pruned(spec: VAESpec, ratio: float = 0.5) -> VAESpec:
    """The spec with every decoder width scaled by ``ratio`` (SnapFusion: 0.5), rounded to the nearest
    multiple of the decoder's groups (at least one group's worth), which stay as many: an
    architecture diffusers' AutoencoderKL can hold. The encoder is unchanged. To start from the
    teacher's weights use :func:`snapjax.models.prune.prune_decoder` (whole groups kept)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"pruned: ratio={ratio} must be in (0, 1]")
    g = spec.decoder_groups
    channels = tuple(max(g, round(c * ratio / g) * g) for c in spec.decoder_channels)
    return dataclasses.replace(spec, decoder_channels=channels)


class MidAttention(nn.Module):
    """GroupNorm, then single-scale self-attention over all h*w positions, residual (diffusers'
    VAE Attention with ``residual_connection=True``). Parameters sit directly under this module."""

    channels: int
    heads: int
    groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.group_norm = group_norm(self.groups, self.eps, self.dtype)
        self.attn = Attention(heads=self.heads, head_dim=self.channels // self.heads,
                              qkv_bias=True, out_bias=True, dtype=self.dtype)
        nn.share_scope(self, self.attn)  # to_q/... next to group_norm, as in diffusers

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        B, H, W, C = x_BHWC.shape
        h_BLC = self.group_norm(x_BHWC).reshape(B, H * W, C)
        return x_BHWC + self.attn(h_BLC).reshape(B, H, W, C)


def _mid_block(h: jax.Array, channels: int, groups: int, spec: VAESpec, dtype) -> jax.Array:
    """resnet, (attention), resnet; call inside a compact method (modules attach to the caller)."""
    h = ResnetBlock(channels, groups, spec.norm_eps, dtype=dtype, name="mid_res_0")(h)
    if spec.mid_attention:
        h = MidAttention(channels, spec.mid_attention_heads, groups, spec.norm_eps,
                         dtype=dtype, name="mid_attn")(h)
    return ResnetBlock(channels, groups, spec.norm_eps, dtype=dtype, name="mid_res_1")(h)


class Encoder(nn.Module):
    """Image to ``2 Z`` moment channels (before ``quant_conv``)."""

    spec: VAESpec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        s, ch = self.spec, self.spec.encoder_channels
        h = conv(ch[0], 3, dtype=self.dtype, name="conv_in")(x_BHWC.astype(self.dtype))
        for i, c in enumerate(ch):
            for j in range(s.layers_per_block):
                h = ResnetBlock(c, s.norm_groups, s.norm_eps, dtype=self.dtype,
                                name=f"down_{i}_res_{j}")(h)
            if i < len(ch) - 1:
                h = Downsample(c, asymmetric=True, dtype=self.dtype, name=f"down_{i}_downsample")(h)
        h = _mid_block(h, ch[-1], s.norm_groups, s, self.dtype)
        h = nn.silu(group_norm(s.norm_groups, s.norm_eps, self.dtype, "conv_norm_out")(h))
        return conv(2 * s.latent_channels, 3, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
    """Latent (after ``post_quant_conv``) to image."""

    spec: VAESpec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BhwZ: jax.Array) -> jax.Array:
        s, ch, g = self.spec, self.spec.decoder_channels, self.spec.decoder_groups
        h = conv(ch[-1], 3, dtype=self.dtype, name="conv_in")(z_BhwZ.astype(self.dtype))
        h = _mid_block(h, ch[-1], g, s, self.dtype)
        for i, c in enumerate(reversed(ch)):
            for j in range(s.layers_per_block + 1):
                h = ResnetBlock(c, g, s.norm_eps, dtype=self.dtype, name=f"up_{i}_res_{j}")(h)
            if i < len(ch) - 1:
                h = Upsample(c, dtype=self.dtype, name=f"up_{i}_upsample")(h)
        h = nn.silu(group_norm(g, s.norm_eps, self.dtype, "conv_norm_out")(h))
        return conv(s.out_channels, 3, dtype=self.dtype, name="conv_out")(h)


def _post_quant_and_decode(post_quant_conv, decoder, z_BhwZ: jax.Array) -> jax.Array:
    if post_quant_conv is not None:
        z_BhwZ = post_quant_conv(z_BhwZ)
    return decoder(z_BhwZ).astype(jnp.float32)


class VAE(nn.Module):
    """AutoencoderKL. Images are in [-1, 1]; latents are raw (unscaled), as diffusers' VAE works.

    ``encode(x)`` returns ``(mean, logvar)`` of the latent Gaussian (logvar clamped to
    :data:`LOGVAR_RANGE`, as diffusers' ``latent_dist``); diffusion uses
    ``mean * spec.scaling_factor`` (or a sample, :func:`sample_latent`).
    ``decode(z)`` takes the raw latent: divide the diffusion latent by ``spec.scaling_factor`` first.
    ``__call__(x)`` = ``decode(encode(x)[0])``, which also initialises every parameter.
    Outputs are float32 whatever the compute dtype.
    """

    spec: VAESpec
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        s = self.spec
        self.encoder = Encoder(s, self.dtype)
        self.quant_conv = (conv(2 * s.latent_channels, 1, padding=0, dtype=self.dtype)
                           if s.use_quant_conv else None)
        self.post_quant_conv = (conv(s.latent_channels, 1, padding=0, dtype=self.dtype)
                                if s.use_post_quant_conv else None)
        self.decoder = Decoder(s, self.dtype)

    def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.encoder(x_BHWC)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z_BhwZ: jax.Array) -> jax.Array:
        return _post_quant_and_decode(self.post_quant_conv, self.decoder, z_BhwZ)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.decode(self.encode(x_BHWC)[0])


class VAEDecoder(nn.Module):
    """The decoder alone (``post_quant_conv`` + ``decoder``: the names :class:`VAE` uses), for the
    efficient decoder that trains by itself. ``__call__(z)`` = ``VAE.decode(z)`` (raw latent)."""

    spec: VAESpec
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        s = self.spec
        self.post_quant_conv = (conv(s.latent_channels, 1, padding=0, dtype=self.dtype)
                                if s.use_post_quant_conv else None)
        self.decoder = Decoder(s, self.dtype)

    def __call__(self, z_BhwZ: jax.Array) -> jax.Array:
        return _post_quant_and_decode(self.post_quant_conv, self.decoder, z_BhwZ)


DECODER_PARAM_KEYS = ("post_quant_conv", "decoder")


def decoder_params(vae_params: dict) -> dict:
    """The subtree of a :class:`VAE` param tree that :class:`VAEDecoder` uses."""
    return {k: vae_params[k] for k in DECODER_PARAM_KEYS if k in vae_params}


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the latent Gaussian ``encode`` returns (diffusers' ``latent_dist.sample()``)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
