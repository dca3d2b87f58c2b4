"""PyTorch mirror of :class:`snapjax.models.unet.UNet` for any :class:`UNetSpec`.

Legend: B batch, C channels, H height, W width, L tokens (H*W), S context tokens, D context
width, T time-embedding width, F sinusoid width, G guidance-feature width.

The module tree carries the Flax names (``down_0_0_res.conv1``, ``mid_attn.block_0.attn2.to_q``),
so removed blocks (``r``, a missing ``A``) simply have no parameters, exactly as in the Flax tree.
``attention`` picks the layout of the transformers' attention (see :mod:`export.torch.layers`);
both compute the same function with the same weights. A guidance-conditioned spec
(``guidance_embed_dim > 0``) has ``time_embedding.cond_proj`` and takes the guidance scale too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.torch.layers import (ATTENTION_IMPLEMENTATIONS, Attention, Downsample, ResnetBlock,
                                 Upsample, channel_layer_norm, conv1x1, guidance_embedding,
                                 timestep_embedding)
from snapjax.models.unet_spec import Block, UNetSpec, letter_names

# Fixed by diffusers (and snapjax.models.unet): Transformer2D's GroupNorm eps, LayerNorm eps, GEGLU.
_TRANSFORMER_NORM_EPS = 1e-6
_LAYER_NORM_EPS = 1e-5
_FF_MULT = 4


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2; with ``cond_dim`` > 0, the bias-free ``cond_proj`` of the
    guidance features is added to the sinusoid first (diffusers' ``cond_proj_dim``)."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int = 0):
        super().__init__()
        if cond_dim:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_BF: torch.Tensor, cond_BG: torch.Tensor | None = None) -> torch.Tensor:
        if cond_BG is not None:
            t_BF = t_BF + self.cond_proj(cond_BG)
        return self.linear_2(F.silu(self.linear_1(t_BF)))


class TransformerBlock(nn.Module):
    """BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, channels: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, eps=_LAYER_NORM_EPS)
        self.attn1 = Attention(channels, heads)
        self.norm2 = nn.LayerNorm(channels, eps=_LAYER_NORM_EPS)
        self.attn2 = Attention(channels, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(channels, eps=_LAYER_NORM_EPS)
        self.ff_proj = nn.Linear(channels, 2 * _FF_MULT * channels)
        self.ff_out = nn.Linear(_FF_MULT * channels, channels)

    def forward(self, x_BLC: torch.Tensor, ctx_BSD: torch.Tensor) -> torch.Tensor:
        x_BLC = x_BLC + self.attn1(self.norm1(x_BLC))
        x_BLC = x_BLC + self.attn2(self.norm2(x_BLC), ctx_BSD)
        h, gate = self.ff_proj(self.norm3(x_BLC)).chunk(2, dim=-1)
        return x_BLC + self.ff_out(h * F.gelu(gate))

    def forward_split_einsum(self, x_BC1L: torch.Tensor, ctx_BD1S: torch.Tensor) -> torch.Tensor:
        x_BC1L = x_BC1L + self.attn1.forward_split_einsum(channel_layer_norm(x_BC1L, self.norm1))
        x_BC1L = x_BC1L + self.attn2.forward_split_einsum(channel_layer_norm(x_BC1L, self.norm2),
                                                          ctx_BD1S)
        h, gate = conv1x1(channel_layer_norm(x_BC1L, self.norm3), self.ff_proj).chunk(2, dim=1)
        return x_BC1L + conv1x1(h * F.gelu(gate), self.ff_out)


class Transformer2D(nn.Module):
    """Transformer2DModel on continuous inputs (residual)."""

    def __init__(self, channels: int, heads: int, layers: int, groups: int, context_dim: int,
                 use_linear_projection: bool):
        super().__init__()
        self.linear = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=_TRANSFORMER_NORM_EPS)
        proj = (lambda: nn.Linear(channels, channels)) if self.linear else (
            lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.layers = layers
        for k in range(layers):
            self.add_module(f"block_{k}", TransformerBlock(channels, heads, context_dim))
        self.proj_out = proj()

    def _proj(self, layer: nn.Module, x_BCHW: torch.Tensor) -> torch.Tensor:
        if self.linear:  # a Linear on channels == a 1x1 conv with the same weights
            return F.conv2d(x_BCHW, layer.weight[:, :, None, None], layer.bias)
        return layer(x_BCHW)

    def forward(self, x_BCHW: torch.Tensor, ctx_BSD: torch.Tensor, attention: str) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        h = self._proj(self.proj_in, self.norm(x_BCHW))
        if attention == "split_einsum":
            h_BC1L = h.reshape(B, C, 1, H * W)
            ctx_BD1S = ctx_BSD.transpose(1, 2).unsqueeze(2)
            for k in range(self.layers):
                h_BC1L = getattr(self, f"block_{k}").forward_split_einsum(h_BC1L, ctx_BD1S)
            h = h_BC1L.reshape(B, C, H, W)
        else:
            h_BLC = h.reshape(B, C, H * W).transpose(1, 2)
            for k in range(self.layers):
                h_BLC = getattr(self, f"block_{k}")(h_BLC, ctx_BSD)
            h = h_BLC.transpose(1, 2).reshape(B, C, H, W)
        return x_BCHW + self._proj(self.proj_out, h)


def block_module(spec: UNetSpec, block: Block) -> nn.Module:
    """The mirror module of one of ``spec.blocks()``: a ResNet (shortcut only if removed) or a
    transformer, as the UNet holds it (also what the per-block latency packages time)."""
    if block.kind == "res":
        return ResnetBlock(block.in_channels, block.out_channels, groups=spec.norm_groups,
                           eps=spec.norm_eps, temb_channels=spec.time_dim,
                           residual=not block.removed)
    s = block.stage
    return Transformer2D(spec.block_channels[s], spec.num_heads[s], spec.transformer_layers[s],
                         spec.norm_groups, spec.context_dim, spec.use_linear_projection)


class UNetMirror(nn.Module):
    """``forward(sample_BCHW, timesteps_B, context_BSD[, guidance_B]) -> output_BCHW``, as
    snapjax's UNet. ``guidance_B`` (the scale w, scalar or (B,)) is required exactly when the spec
    is guidance-conditioned; ``timestep_cond_BG`` gives its (B, G) features instead (what the
    Core ML Unet takes, see :mod:`export.coreml.wrappers`).

    The blocks are ``spec.blocks()`` and the forward walks ``spec.units()`` with
    ``letter_names``, as the Flax UNet does, so every spec of the grammar mirrors with its names.
    """

    def __init__(self, spec: UNetSpec, attention: str = "original"):
        super().__init__()
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={attention!r}: expected one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        self.spec = spec
        self.attention = attention
        self.sinusoid_table: torch.Tensor | None = None
        ch, n = spec.block_channels, spec.num_stages
        self.conv_in = nn.Conv2d(spec.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], spec.time_dim, spec.guidance_embed_dim)
        for block in spec.blocks():
            self.add_module(block.name, block_module(spec, block))
        for s in range(n - 1):
            self.add_module(f"down_{s}_downsample", Downsample(ch[s]))
        for s in range(1, n):
            self.add_module(f"up_{s}_upsample", Upsample(ch[s]))
        self.conv_norm_out = nn.GroupNorm(spec.norm_groups, ch[0], eps=spec.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], spec.out_channels, 3, padding=1)

    def use_sinusoid_table(self, num_train_timesteps: int) -> None:
        """Look the sinusoidal features of integer timesteps up in a table computed in float64.

        For fp16 deployment: sin(t f) with t up to 999 loses its phase when t f is rounded to
        fp16, a table of the exact values does not. Timesteps are rounded to integers.
        """
        t = np.arange(num_train_timesteps, dtype=np.float64)
        half = self.spec.block_channels[0] // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - self.spec.freq_shift))
        args = t[:, None] * freqs[None, :]
        cos, sin = np.cos(args), np.sin(args)
        table = np.concatenate([cos, sin] if self.spec.flip_sin_to_cos else [sin, cos], axis=-1)
        if self.spec.block_channels[0] % 2:
            table = np.pad(table, ((0, 0), (0, 1)))
        self.sinusoid_table = torch.tensor(table, dtype=torch.float32)

    def _time_features(self, t_B: torch.Tensor) -> torch.Tensor:
        if self.sinusoid_table is not None:
            table = self.sinusoid_table.to(self.conv_in.weight.dtype)
            return table[torch.round(t_B.float()).long()]
        spec = self.spec
        return timestep_embedding(t_B, spec.block_channels[0], flip_sin_to_cos=spec.flip_sin_to_cos,
                                  freq_shift=spec.freq_shift).to(self.conv_in.weight.dtype)

    def _guidance_features(self, guidance_B, timestep_cond_BG, batch: int) -> torch.Tensor | None:
        G = self.spec.guidance_embed_dim
        if not G:
            if guidance_B is not None or timestep_cond_BG is not None:
                raise ValueError("UNet mirror: guidance input given, but this UNet has none "
                                 "(spec.guidance_embed_dim=0); apply guidance with two calls")
            return None
        if (guidance_B is None) == (timestep_cond_BG is None):
            raise ValueError(f"UNet mirror: this UNet is guidance-conditioned (guidance_embed_dim="
                             f"{G}): pass exactly one of guidance_B (the guidance scale) and "
                             "timestep_cond_BG (its features)")
        if timestep_cond_BG is None:
            w = torch.as_tensor(guidance_B)
            if w.dim() > 1 or (w.dim() == 1 and w.shape[0] not in (1, batch)):
                raise ValueError(f"UNet mirror: guidance_B must be a scalar or shape ({batch},), "
                                 f"got shape {tuple(w.shape)}")
            timestep_cond_BG = guidance_embedding(w.reshape(-1).expand(batch), G)
        elif not torch.jit.is_tracing() and tuple(timestep_cond_BG.shape) not in ((batch, G),
                                                                                   (1, G)):
            raise ValueError(f"UNet mirror: timestep_cond_BG must have shape ({batch}, {G}), got "
                             f"{tuple(timestep_cond_BG.shape)}")
        return timestep_cond_BG.expand(batch, G).to(self.conv_in.weight.dtype)

    def embed_time(self, timesteps_B: torch.Tensor, batch: int, guidance_B=None, *,
                   timestep_cond_BG: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, T) time embedding the ResNets read, for a scalar or one timestep per example
        (and, for a guidance-conditioned UNet, the guidance scale or its features)."""
        if not isinstance(timesteps_B, torch.Tensor):
            timesteps_B = torch.as_tensor(timesteps_B)
        t_B = timesteps_B.reshape(-1).expand(batch)
        cond_BG = self._guidance_features(guidance_B, timestep_cond_BG, batch)
        return self.time_embedding(self._time_features(t_B), cond_BG)

    def forward(self, sample_BCHW: torch.Tensor, timesteps_B: torch.Tensor,
                context_BSD: torch.Tensor, guidance_B=None, *,
                timestep_cond_BG: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec
        temb_BT = self.embed_time(timesteps_B, sample_BCHW.shape[0], guidance_B,
                                  timestep_cond_BG=timestep_cond_BG)
        x = self.conv_in(sample_BCHW)
        skips = [x]
        for path, s, u, unit in spec.units():
            if path == "up":
                x = torch.cat([x, skips.pop()], dim=1)
            for name, kind in letter_names(path, s, u, unit):
                block = getattr(self, name)
                x = block(x, temb_BT) if kind == "res" else block(x, context_BSD, self.attention)
            last_unit = path != "mid" and u == len(getattr(spec, path)[s]) - 1
            if path == "down":
                skips.append(x)
                if last_unit and s < spec.num_stages - 1:
                    x = getattr(self, f"down_{s}_downsample")(x)
                    skips.append(x)
            elif path == "up" and last_unit and s > 0:
                x = getattr(self, f"up_{s}_upsample")(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
