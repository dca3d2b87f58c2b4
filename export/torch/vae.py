"""PyTorch mirror of :class:`snapjax.models.vae.VAEDecoder` (the decoder alone, any width).

Legend: B batch, Z latent channels, C channels, h w latent size, H W image size.

Module names follow the Flax tree (``post_quant_conv``, ``decoder.up_0_res_1.conv1``,
``decoder.mid_attn.to_q``), so a pruned decoder is the same class with another
:class:`VAESpec`. Input: the raw latent (divide the diffusion latent by ``spec.scaling_factor``
first); output: the image in [-1, 1] (not clamped), as ``VAE.decode``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.torch.layers import Attention, ResnetBlock, Upsample
from snapjax.models.vae import VAESpec


class MidAttention(Attention):
    """GroupNorm then single-scale self-attention over h*w positions, residual."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__(channels, heads, qkv_bias=True, out_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, C, H, W = x_BCHW.shape
        h_BLC = self.group_norm(x_BCHW).reshape(B, C, H * W).transpose(1, 2)
        h_BLC = super().forward(h_BLC)
        return x_BCHW + h_BLC.transpose(1, 2).reshape(B, C, H, W)


class Decoder(nn.Module):
    def __init__(self, spec: VAESpec):
        super().__init__()
        self.spec = spec
        ch, g, eps = spec.decoder_channels, spec.decoder_groups, spec.norm_eps

        def resnet(i, o):
            return ResnetBlock(i, o, groups=g, eps=eps, temb_channels=None)

        self.conv_in = nn.Conv2d(spec.latent_channels, ch[-1], 3, padding=1)
        self.mid_res_0 = resnet(ch[-1], ch[-1])
        if spec.mid_attention:
            self.mid_attn = MidAttention(ch[-1], spec.mid_attention_heads, g, eps)
        self.mid_res_1 = resnet(ch[-1], ch[-1])
        x_ch = ch[-1]
        for i, c in enumerate(reversed(ch)):
            for j in range(spec.layers_per_block + 1):
                self.add_module(f"up_{i}_res_{j}", resnet(x_ch, c))
                x_ch = c
            if i < len(ch) - 1:
                self.add_module(f"up_{i}_upsample", Upsample(c))
        self.conv_norm_out = nn.GroupNorm(g, x_ch, eps=eps)
        self.conv_out = nn.Conv2d(x_ch, spec.out_channels, 3, padding=1)

    def forward(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        spec, n = self.spec, len(self.spec.decoder_channels)
        h = self.mid_res_0(self.conv_in(z_BZhw))
        if spec.mid_attention:
            h = self.mid_attn(h)
        h = self.mid_res_1(h)
        for i in range(n):
            for j in range(spec.layers_per_block + 1):
                h = getattr(self, f"up_{i}_res_{j}")(h)
            if i < n - 1:
                h = getattr(self, f"up_{i}_upsample")(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAEDecoderMirror(nn.Module):
    """``forward(z_BZhw) -> image_BCHW``: post_quant_conv (if any), then the decoder."""

    def __init__(self, spec: VAESpec):
        super().__init__()
        self.spec = spec
        if spec.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(spec.latent_channels, spec.latent_channels, 1)
        self.decoder = Decoder(spec)

    def forward(self, z_BZhw: torch.Tensor) -> torch.Tensor:
        if self.spec.use_post_quant_conv:
            z_BZhw = self.post_quant_conv(z_BZhw)
        return self.decoder(z_BZhw)
