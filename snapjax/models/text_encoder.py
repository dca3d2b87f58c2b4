"""The CLIP text transformer (transformers' CLIPTextModel) in Flax.

Legend: B batch, L tokens, D width, F MLP width.

Parameter tree: ``token_embedding``, ``position_embedding``, ``layers_{i}`` (``layer_norm1``,
``self_attn`` with ``to_q``/``to_k``/``to_v``/``to_out``, ``layer_norm2``, ``fc1``, ``fc2``),
``final_layer_norm``. Stable Diffusion conditions on the last hidden state (after the final layer
norm); :func:`pooled_output` gives the EOS-token feature as transformers' ``pooler_output``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax.models.attention import Attention


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names for the activations CLIP checkpoints use.
ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    """A CLIP text transformer described by data."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    act: str = "quick_gelu"
    eps: float = 1e-5
    # Only for pooled_output. 2 is the legacy value SD-v1.5's config carries: transformers then pools
    # at argmax(ids) (the EOS id is the largest); otherwise at the first eos_token_id.
    eos_token_id: int = 2

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"TextEncoderSpec.width={self.width} is not divisible by "
                             f"heads={self.heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"TextEncoderSpec.act={self.act!r}; supported: {sorted(ACTIVATIONS)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextEncoderSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TextEncoderSpec: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


SD15 = TextEncoderSpec()

# A tiny CLIP text encoder for tests (vocab large enough for a byte-level BPE plus a few merges).
TINY = TextEncoderSpec(vocab_size=1000, max_length=77, width=32, layers=2, heads=4, mlp_dim=64)

PRESETS: dict[str, TextEncoderSpec] = {"sd15": SD15, "tiny": TINY}


def preset(name: str) -> TextEncoderSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown text encoder preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)) (causal), then x + fc2(act(fc1(ln2(x))))."""

    spec: TextEncoderSpec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        s = self.spec
        h = nn.LayerNorm(epsilon=s.eps, dtype=self.dtype, name="layer_norm1")(x_BLD)
        x_BLD = x_BLD + Attention(heads=s.heads, head_dim=s.width // s.heads, qkv_bias=True,
                                  is_causal=True, dtype=self.dtype, name="self_attn")(h)
        h = nn.LayerNorm(epsilon=s.eps, dtype=self.dtype, name="layer_norm2")(x_BLD)
        h_BLF = ACTIVATIONS[s.act](nn.Dense(s.mlp_dim, dtype=self.dtype, name="fc1")(h))
        return x_BLD + nn.Dense(s.width, dtype=self.dtype, name="fc2")(h_BLF)


class TextEncoder(nn.Module):
    """``__call__(input_ids_BL) -> hidden_BLD``: transformers' ``last_hidden_state``, float32.

    No padding mask, as Stable Diffusion runs it: padding tokens come after EOS and the causal mask
    keeps them from changing any earlier token.
    """

    spec: TextEncoderSpec
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids_BL: jax.Array) -> jax.Array:
        s = self.spec
        L = input_ids_BL.shape[1]
        if L > s.max_length:
            raise ValueError(f"TextEncoder: {L} tokens but max_length={s.max_length}")
        tok_BLD = nn.Embed(s.vocab_size, s.width, name="token_embedding")(input_ids_BL)
        pos_LD = nn.Embed(s.max_length, s.width, name="position_embedding")(jnp.arange(L))
        x_BLD = (tok_BLD + pos_LD[None]).astype(self.dtype)
        for i in range(s.layers):
            x_BLD = EncoderLayer(s, self.dtype, name=f"layers_{i}")(x_BLD)
        x_BLD = nn.LayerNorm(epsilon=s.eps, dtype=self.dtype, name="final_layer_norm")(x_BLD)
        return x_BLD.astype(jnp.float32)


def pooled_output(hidden_BLD: jax.Array, input_ids_BL: jax.Array, eos_token_id: int) -> jax.Array:
    """The hidden state at the EOS token, as transformers' CLIPTextModel ``pooler_output``."""
    if eos_token_id == 2:  # legacy configs: the EOS id is the largest id in the sequence
        idx_B = jnp.argmax(input_ids_BL, axis=-1)
    else:  # first EOS (padding may repeat the EOS id)
        idx_B = jnp.argmax(input_ids_BL == eos_token_id, axis=-1)
    return jnp.take_along_axis(hidden_BLD, idx_B[:, None, None], axis=1)[:, 0]
