"""PyTorch (NCHW) mirrors of snapjax's building blocks: same maths, same parameter names.

Legend: B batch, C channels, H height, W width, L query tokens, S key tokens, D width,
N heads, T time-embedding width.

Submodules carry the Flax module names (``conv1``, ``to_q``, ...) so that a Flax parameter path
``a/b/kernel`` is the mirror's ``a.b.weight``; the layouts follow
:mod:`snapjax.convert.mapping` (HWIO -> OIHW, (I, O) -> (O, I)).

Attention comes in two layouts, chosen per call and sharing the parameters:

* ``original``: tokens as (B, L, D), the usual matmul-softmax-matmul;
* ``split_einsum``: tokens as (B, D, 1, L), projections as 1x1 convolutions and one einsum pair
  per head, the layout Apple's ml-stable-diffusion uses for the Neural Engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLEMENTATIONS = ("original", "split_einsum")

# Additive mask value for a causal mask: finite, so fp16 (Core ML) never sees inf - inf.
MASK_VALUE = -1e4


def timestep_embedding(t_B: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, as snapjax.models.layers.timestep_embedding (float32)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - freq_shift)
    args = t_B.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos
                    else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_embedding(w_B: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the guidance scale, as snapjax.models.layers.guidance_embedding
    (diffusers' ``get_guidance_scale_embedding(w - 1, dim)``), float32."""
    return timestep_embedding((w_B.float() - 1.0) * 1000.0, dim, flip_sin_to_cos=False,
                              freq_shift=1)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D; ``residual=False`` is a removed block (shortcut only)."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, eps: float,
                 temb_channels: int | None, residual: bool = True):
        super().__init__()
        self.residual = residual
        if residual:
            self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
            self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            if temb_channels is not None:
                self.time_emb_proj = nn.Linear(temb_channels, out_channels)
            self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
            self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x_BCHW: torch.Tensor, temb_BT: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = self.conv_shortcut(x_BCHW) if hasattr(self, "conv_shortcut") else x_BCHW
        if not self.residual:
            return shortcut
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        if temb_BT is not None and hasattr(self, "time_emb_proj"):
            h = h + self.time_emb_proj(F.silu(temb_BT))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return shortcut + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv, symmetric padding 1 (the UNet's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(x_BCHW)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


def channel_layer_norm(x_BD1L: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm`` applied over the channel axis of a (B, D, 1, L) tensor (Apple's LayerNormANE)."""
    mean = x_BD1L.mean(dim=1, keepdim=True)
    centered = x_BD1L - mean
    var = (centered * centered).mean(dim=1, keepdim=True)
    y = centered * torch.rsqrt(var + norm.eps)
    return y * norm.weight[None, :, None, None] + norm.bias[None, :, None, None]


def conv1x1(x_BD1L: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """A Linear layer applied as a 1x1 convolution on (B, D, 1, L) (same weights)."""
    return F.conv2d(x_BD1L, linear.weight[:, :, None, None], linear.bias)


class Attention(nn.Module):
    """to_q/to_k/to_v/to_out around softmax(q k^T / sqrt(H)) v, in either layout."""

    def __init__(self, query_dim: int, heads: int, *, context_dim: int | None = None,
                 qkv_bias: bool = False, out_bias: bool = True):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.head_dim = query_dim // heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, query_dim, bias=qkv_bias)
        self.to_out = nn.Linear(query_dim, query_dim, bias=out_bias)

    def forward(self, x_BLD: torch.Tensor, ctx_BSD: torch.Tensor | None = None,
                mask_LS: torch.Tensor | None = None) -> torch.Tensor:
        """``original`` layout; ``mask_LS`` is added to the scores (0 or MASK_VALUE)."""
        ctx_BSD = x_BLD if ctx_BSD is None else ctx_BSD
        B, L, _ = x_BLD.shape
        S = ctx_BSD.shape[1]
        N, Hd = self.heads, self.head_dim
        q = self.to_q(x_BLD).view(B, L, N, Hd).transpose(1, 2)
        k = self.to_k(ctx_BSD).view(B, S, N, Hd).transpose(1, 2)
        v = self.to_v(ctx_BSD).view(B, S, N, Hd).transpose(1, 2)
        scores_BNLS = torch.matmul(q, k.transpose(-1, -2)) * (Hd ** -0.5)
        if mask_LS is not None:
            scores_BNLS = scores_BNLS + mask_LS
        o_BNLH = torch.matmul(scores_BNLS.softmax(dim=-1), v)
        return self.to_out(o_BNLH.transpose(1, 2).reshape(B, L, N * Hd))

    def forward_split_einsum(self, x_BD1L: torch.Tensor,
                             ctx_BD1S: torch.Tensor | None = None) -> torch.Tensor:
        """``split_einsum`` layout: (B, D, 1, L) in and out, one einsum pair per head."""
        ctx_BD1S = x_BD1L if ctx_BD1S is None else ctx_BD1S
        Hd = self.head_dim
        q = conv1x1(x_BD1L, self.to_q)
        k = conv1x1(ctx_BD1S, self.to_k)
        v = conv1x1(ctx_BD1S, self.to_v)
        heads_out = []
        for n in range(self.heads):
            sl = slice(n * Hd, (n + 1) * Hd)
            # w[b, s, 0, l] = sum_c q[b, c, 0, l] k[b, c, 0, s]: keys on axis 1, softmax there.
            w_BS1L = torch.einsum("bchq,bchk->bkhq", q[:, sl], k[:, sl]) * (Hd ** -0.5)
            w_BS1L = w_BS1L.softmax(dim=1)
            heads_out.append(torch.einsum("bkhq,bchk->bchq", w_BS1L, v[:, sl]))
        return conv1x1(torch.cat(heads_out, dim=1), self.to_out)
