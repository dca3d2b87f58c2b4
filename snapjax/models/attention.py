"""Multi-head attention shared by the UNet, the VAE and the text encoder.

Legend: B batch, L query length, S key length, D model width, N heads, H head width.
Everything goes through :func:`dot_product_attention`: ``jax.nn.dot_product_attention``
(XLA, or cuDNN's fused kernel) or the Pallas TPU flash-attention kernel.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from snapjax import sharding


# The implementations dot_product_attention takes by name, and the platform each needs.
IMPLEMENTATIONS = ("xla", "cudnn", "tpu_flash")
REQUIRED_PLATFORM = {"cudnn": "gpu", "tpu_flash": "tpu"}
# The Pallas TPU kernel's default tiles are 128 long on both sequence axes.
_TPU_FLASH_BLOCK = 128


def dot_product_attention(q_BLNH: jax.Array, k_BSNH: jax.Array, v_BSNH: jax.Array, *,
                          is_causal: bool = False, implementation: str | None = None) -> jax.Array:
    """Softmax attention with scale 1/sqrt(H); returns B L N H.

    ``implementation``: None or 'xla' (XLA; scores and softmax in float32 whatever the input
    dtype), 'cudnn' (``jax.nn.dot_product_attention``'s fused kernel, NVIDIA GPUs, bf16/fp16), or
    'tpu_flash' (the Pallas TPU flash-attention kernel: the L x S scores are never stored, in the
    forward or the backward pass). 'tpu_flash' runs where the kernel takes the shapes: both
    sequence lengths multiples of 128 (SD's self-attention at 16x16 latents and up) and a head
    width of at most 128 or a multiple of it. The rest goes to XLA: the 77-token cross-attention
    and SD-v1.5's 160-wide heads, which only occur at 16x16 latents where the scores are small.
    """
    if implementation == "tpu_flash":
        kernel = None
        if tpu_flash_fits(q_BLNH.shape[1], k_BSNH.shape[1], q_BLNH.shape[-1]):
            # A Mosaic kernel is not partitioned by XLA: on a mesh it runs per batch shard.
            kernel = sharding.per_batch_shard(
                functools.partial(_tpu_flash_attention, is_causal=is_causal), q_BLNH.shape[0])
        if kernel is not None:
            return kernel(q_BLNH, k_BSNH, v_BSNH)
        implementation = None
    return jax.nn.dot_product_attention(q_BLNH, k_BSNH, v_BSNH, is_causal=is_causal,
                                        implementation=implementation)


def tpu_flash_fits(query_len: int, key_len: int, head_dim: int) -> bool:
    """Whether the Pallas TPU kernel takes these shapes (whole tiles; its head-width rule)."""
    return (query_len % _TPU_FLASH_BLOCK == 0 and key_len % _TPU_FLASH_BLOCK == 0
            and (head_dim <= _TPU_FLASH_BLOCK or head_dim % _TPU_FLASH_BLOCK == 0))


def _tpu_flash_attention(q_BLNH, k_BSNH, v_BSNH, is_causal: bool) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention

    def to_kernel(x):  # the kernel's layout is B N L H
        return jnp.swapaxes(x, 1, 2)

    o_BNLH = flash_attention(to_kernel(q_BLNH), to_kernel(k_BSNH), to_kernel(v_BSNH),
                             causal=is_causal, sm_scale=q_BLNH.shape[-1] ** -0.5)
    return jnp.swapaxes(o_BNLH, 1, 2)


class Attention(nn.Module):
    """Projections to_q/to_k/to_v/to_out around :func:`dot_product_attention`.

    With ``ctx_BSD`` it is cross-attention (keys and values from the context), else self-attention.
    """

    heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = True
    is_causal: bool = False
    dtype: jnp.dtype = jnp.float32
    implementation: str | None = None  # see dot_product_attention

    @nn.compact
    def __call__(self, x_BLD: jax.Array, ctx_BSD: jax.Array | None = None) -> jax.Array:
        ctx_BSD = x_BLD if ctx_BSD is None else ctx_BSD
        inner = self.heads * self.head_dim

        def proj(name, y, bias):
            return nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)(y)

        B, L, D = x_BLD.shape
        S = ctx_BSD.shape[1]
        q = proj("to_q", x_BLD, self.qkv_bias).reshape(B, L, self.heads, self.head_dim)
        k = proj("to_k", ctx_BSD, self.qkv_bias).reshape(B, S, self.heads, self.head_dim)
        v = proj("to_v", ctx_BSD, self.qkv_bias).reshape(B, S, self.heads, self.head_dim)
        o_BLNH = dot_product_attention(q, k, v, is_causal=self.is_causal,
                                       implementation=self.implementation)
        return nn.Dense(D, use_bias=self.out_bias, dtype=self.dtype, name="to_out")(
            o_BLNH.reshape(B, L, inner))
