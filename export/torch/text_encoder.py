"""PyTorch mirror of :class:`snapjax.models.text_encoder.TextEncoder` (CLIP's text transformer).

Legend: B batch, L tokens, D width, F MLP width.

Module names follow the Flax tree (``token_embedding``, ``layers_3.self_attn.to_q``, ...).
``forward(input_ids) -> (last_hidden_state, pooled_output)``; ``input_ids`` may be float (Apple's
Core ML text encoder takes float32 ids) and is cast to integers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.torch.layers import MASK_VALUE, Attention
from snapjax.models.text_encoder import TextEncoderSpec

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class EncoderLayer(nn.Module):
    def __init__(self, spec: TextEncoderSpec):
        super().__init__()
        self.act = ACTIVATIONS[spec.act]
        self.layer_norm1 = nn.LayerNorm(spec.width, eps=spec.eps)
        self.self_attn = Attention(spec.width, spec.heads, qkv_bias=True, out_bias=True)
        self.layer_norm2 = nn.LayerNorm(spec.width, eps=spec.eps)
        self.fc1 = nn.Linear(spec.width, spec.mlp_dim)
        self.fc2 = nn.Linear(spec.mlp_dim, spec.width)

    def forward(self, x_BLD: torch.Tensor, mask_LL: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + self.self_attn(self.layer_norm1(x_BLD), mask_LS=mask_LL)
        return x_BLD + self.fc2(self.act(self.fc1(self.layer_norm2(x_BLD))))


class TextEncoderMirror(nn.Module):
    def __init__(self, spec: TextEncoderSpec):
        super().__init__()
        self.spec = spec
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.position_embedding = nn.Embedding(spec.max_length, spec.width)
        for i in range(spec.layers):
            self.add_module(f"layers_{i}", EncoderLayer(spec))
        self.final_layer_norm = nn.LayerNorm(spec.width, eps=spec.eps)

    def forward(self, input_ids_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids_BL = input_ids_BL.long()
        B, L = ids_BL.shape
        x_BLD = self.token_embedding(ids_BL) + self.position_embedding.weight[:L][None]
        mask_LL = torch.full((L, L), MASK_VALUE, dtype=x_BLD.dtype).triu(1)
        for i in range(self.spec.layers):
            x_BLD = getattr(self, f"layers_{i}")(x_BLD, mask_LL)
        hidden_BLD = self.final_layer_norm(x_BLD)
        if self.spec.eos_token_id == 2:  # legacy CLIP configs: EOS is the largest id
            idx_B = ids_BL.argmax(dim=-1)
        else:
            idx_B = (ids_BL == self.spec.eos_token_id).int().argmax(dim=-1)
        pooled_BD = hidden_BLD[torch.arange(B), idx_B]
        return hidden_BLD, pooled_BD
