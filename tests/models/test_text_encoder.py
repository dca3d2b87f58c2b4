"""CLIP text encoder: a numpy reference forward, causality, pooling, spec validation.

Parity with transformers' CLIPTextModel is in tests/convert/test_text_encoder_import.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax.models import text_encoder as te
from snapjax.models.text_encoder import TextEncoder, TextEncoderSpec, pooled_output, quick_gelu

SPEC = dataclasses.replace(te.TINY, vocab_size=50, max_length=12, width=16, layers=2, heads=4,
                           mlp_dim=24)


def _params(spec: TextEncoderSpec, seed: int = 0) -> dict:
    """Random params shaped by eval_shape (LayerNorm scales near 1, not exactly)."""
    abstract = jax.eval_shape(TextEncoder(spec).init, jax.random.key(0),
                              jnp.zeros((1, spec.max_length), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, a):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.3 * rng.standard_normal(a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _forward(spec: TextEncoderSpec, params, ids: np.ndarray) -> jax.Array:
    return jax.jit(lambda p, i: TextEncoder(spec).apply({"params": p}, i))(params, ids)


def _numpy_reference(spec: TextEncoderSpec, params, ids: np.ndarray) -> np.ndarray:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    act = {"quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
           "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))}[spec.act]

    def ln(x, q):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + spec.eps) * q["scale"] + q["bias"]

    def dense(x, q):
        return x @ q["kernel"] + q["bias"]

    B, L = ids.shape
    N, Hd = spec.heads, spec.width // spec.heads
    x = p["token_embedding"]["embedding"][ids] + p["position_embedding"]["embedding"][:L]
    causal = np.triu(np.full((L, L), -np.inf), k=1)
    for i in range(spec.layers):
        q_ = p[f"layers_{i}"]
        h = ln(x, q_["layer_norm1"])
        heads = [dense(h, q_["self_attn"][n]).reshape(B, L, N, Hd).transpose(0, 2, 1, 3)
                 for n in ("to_q", "to_k", "to_v")]
        s = heads[0] @ heads[1].transpose(0, 1, 3, 2) / np.sqrt(Hd) + causal
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ heads[2]).transpose(0, 2, 1, 3).reshape(B, L, spec.width)
        x = x + dense(o, q_["self_attn"]["to_out"])
        x = x + dense(act(dense(ln(x, q_["layer_norm2"]), q_["fc1"])), q_["fc2"])
    return ln(x, p["final_layer_norm"])


@pytest.mark.parametrize("act, length", [("quick_gelu", 12), ("gelu", 7)])
def test_matches_numpy_reference(act, length):
    spec = dataclasses.replace(SPEC, act=act)
    params = _params(spec)
    ids = np.random.default_rng(1).integers(0, spec.vocab_size, (3, length)).astype(np.int32)
    out = _forward(spec, params, ids)
    ref = _numpy_reference(spec, params, ids)
    assert out.dtype == jnp.float32 and out.shape == (3, length, spec.width)
    assert np.abs(np.asarray(out) - ref).max() / np.abs(ref).max() < 1e-5


def test_causal_mask_hides_later_tokens():
    params = _params(SPEC)
    ids = np.random.default_rng(2).integers(0, SPEC.vocab_size, (1, SPEC.max_length))
    changed = ids.copy()
    changed[0, 7] = (changed[0, 7] + 1) % SPEC.vocab_size
    a, b = np.asarray(_forward(SPEC, params, ids)), np.asarray(_forward(SPEC, params, changed))
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).min(axis=-1).max() > 0


def test_bf16_compute_gives_fp32_outputs_close_to_fp32():
    params = _params(SPEC)
    ids = np.random.default_rng(3).integers(0, SPEC.vocab_size, (2, SPEC.max_length))
    ref = _forward(SPEC, params, ids)
    out = jax.jit(lambda p, i: TextEncoder(SPEC, dtype=jnp.bfloat16).apply({"params": p}, i))(
        params, ids)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 5e-2


def test_pooled_output_rules():
    hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    ids = jnp.array([[49406, 320, 49407, 49407, 49407],   # EOS at 2, padded with EOS
                     [49406, 320, 530, 49407, 0]])         # EOS at 3, padded with 0
    # Legacy eos_token_id=2 (SD-v1.5's config): argmax of the ids.
    np.testing.assert_array_equal(pooled_output(hidden, ids, 2), hidden[[0, 1], [2, 3]])
    # Otherwise the first EOS.
    np.testing.assert_array_equal(pooled_output(hidden, ids, 49407), hidden[[0, 1], [2, 3]])
    ids_eos_small = jnp.array([[5, 7, 3, 3, 3], [5, 9, 8, 3, 3]])  # EOS id 3 is not the largest
    np.testing.assert_array_equal(pooled_output(hidden, ids_eos_small, 3), hidden[[0, 1], [2, 3]])


def test_quick_gelu_closed_form():
    x = jnp.linspace(-5, 5, 11)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6)


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="13 tokens but max_length=12"):
        TextEncoder(SPEC).init(jax.random.key(0), jnp.zeros((1, 13), jnp.int32))


def test_spec_validation_and_presets():
    assert te.preset("sd15") == TextEncoderSpec()
    assert (te.SD15.width, te.SD15.layers, te.SD15.heads, te.SD15.mlp_dim, te.SD15.max_length,
            te.SD15.vocab_size, te.SD15.act) == (768, 12, 12, 3072, 77, 49408, "quick_gelu")
    assert TextEncoderSpec.from_dict(json.loads(SPEC.to_json())) == SPEC
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depth'\]"):
        TextEncoderSpec.from_dict({"depth": 3})
    with pytest.raises(ValueError, match="width=30 is not divisible by heads=4"):
        TextEncoderSpec(width=30, heads=4)
    with pytest.raises(ValueError, match="act='relu'"):
        TextEncoderSpec(act="relu")
    with pytest.raises(ValueError, match="unknown text encoder preset"):
        te.preset("sdxl")
