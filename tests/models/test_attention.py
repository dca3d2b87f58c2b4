"""Attention kernels against XLA's reference attention (closed-form softmax(QK^T/sqrt(H))V).

The Pallas TPU flash kernel runs here in Pallas' TPU interpret mode (the kernel's own program,
executed on the CPU), so its numerics and its custom backward pass are checked without a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from snapjax.models.attention import dot_product_attention
from snapjax.models.unet import UNet, abstract_unet_params
from snapjax.models.unet_spec import TINY


def _value_and_grads(implementation, q, k, v, cotangent, is_causal):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, is_causal=is_causal, implementation=implementation)
        return jnp.sum(out * cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("is_causal", [False, True])
def test_tpu_flash_matches_xla_forward_and_backward(is_causal, rel_err):
    # SD-v1.5's narrowest head width (40) and two 128-token tiles on each sequence axis.
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q, k, v, cotangent = (jax.random.normal(key, (1, 256, 2, 40)) for key in (kq, kk, kv, kc))
    want = _value_and_grads(None, q, k, v, cotangent, is_causal)
    with pltpu.force_tpu_interpret_mode():
        got = _value_and_grads("tpu_flash", q, k, v, cotangent, is_causal)
    assert rel_err(got[0], want[0]) < 1e-5
    for g, w in zip(got[1], want[1]):
        assert rel_err(g, w) < 1e-5


def test_tpu_flash_leaves_short_sequences_to_xla():
    """77 context tokens are not a whole tile: cross-attention takes XLA's path, bit for bit."""
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 128, 2, 8))
    k, v = (jax.random.normal(key, (2, 77, 2, 8)) for key in (kk, kv))
    np.testing.assert_array_equal(dot_product_attention(q, k, v, implementation="tpu_flash"),
                                  dot_product_attention(q, k, v))


def _unet_inputs(size):
    kx, kc = jax.random.split(jax.random.key(2))
    return (jax.random.normal(kx, (1, size, size, TINY.in_channels)), jnp.array([500]),
            jax.random.normal(kc, (1, 5, TINY.context_dim)))


def test_unet_sends_whole_tile_self_attention_to_the_kernel():
    """Traced only (no compile): at 16x16 latents every stage-0 self-attention is a kernel call."""
    params = abstract_unet_params(TINY)
    jaxpr = str(jax.make_jaxpr(
        lambda p, *xs: UNet(TINY, attention_impl="tpu_flash").apply({"params": p}, *xs))(
            params, *_unet_inputs(16)))
    stage0_transformers = sum(u.endswith("A") for u in TINY.down[0] + TINY.up[0])
    assert stage0_transformers > 0
    # One call of the kernel's jitted wrapper per stage-0 self-attention (the jaxpr prints the
    # shared body, and its single pallas_call, once).
    assert jaxpr.count("name=flash_attention") == stage0_transformers * TINY.transformer_layers[0]
    assert "pallas_call" in jaxpr


@pytest.mark.slow  # interpret mode runs the kernel op by op: ~2 minutes on 2 cores
def test_unet_with_tpu_flash_attention(rel_err):
    params = jax.jit(lambda: UNet(TINY).init(jax.random.key(0), *_unet_inputs(8))["params"])()
    inputs = _unet_inputs(16)
    want = UNet(TINY).apply({"params": params}, *inputs)
    with pltpu.force_tpu_interpret_mode():
        got = UNet(TINY, attention_impl="tpu_flash").apply({"params": params}, *inputs)
    assert rel_err(got, want) < 1e-5
