"""VAE module: spec, parameter layout, decoder-alone use, and a numpy reference for the attention.

Parity of the whole model with diffusers' AutoencoderKL is in tests/convert/test_vae_import.py.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from snapjax.models import vae as vae_lib
from snapjax.models.vae import (LOGVAR_RANGE, VAE, MidAttention, VAEDecoder, VAESpec,
                                decoder_params, sample_latent)

SPEC = dataclasses.replace(vae_lib.TINY, encoder_channels=(16, 32, 32), decoder_channels=(8, 16, 16),
                           layers_per_block=2, norm_groups=4)


def _init(module, *args, seed=0):
    """Random params shaped by eval_shape. (module.init compiles Flax's initialisers, which takes
    tens of CPU-seconds for a conv net; the tests only need some weights.)"""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, a):
        if path[-1].key == "scale":
            return jnp.asarray(1 + 0.1 * rng.standard_normal(a.shape), a.dtype)
        fan_in = int(np.prod(a.shape[:-1])) if path[-1].key == "kernel" else 10
        return jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(fan_in), a.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _apply(module, params, *args, method=None):
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method))(params, *args)


@pytest.fixture(scope="module")
def vae_params():
    return _init(VAE(SPEC), jnp.zeros((1, 16, 16, 3)))


def _modules(params) -> set[str]:
    return {"/".join(p[:-1]) for p in traverse_util.flatten_dict(params)}


def test_parameter_names_follow_the_documented_layout(vae_params):
    mods = _modules(vae_params)
    for name in ["encoder/conv_in", "encoder/down_0_res_0/conv1", "encoder/down_0_res_1/conv2",
                 "encoder/down_1_res_0/conv_shortcut", "encoder/down_0_downsample/conv",
                 "encoder/down_1_downsample/conv", "encoder/mid_res_0/norm1",
                 "encoder/mid_attn/group_norm", "encoder/mid_attn/to_q", "encoder/mid_attn/to_out",
                 "encoder/mid_res_1/conv2", "encoder/conv_norm_out", "encoder/conv_out",
                 "quant_conv", "post_quant_conv", "decoder/conv_in", "decoder/mid_attn/to_v",
                 "decoder/up_0_res_2/conv1", "decoder/up_0_upsample/conv",
                 "decoder/up_2_res_0/conv_shortcut", "decoder/conv_out"]:
        assert name in mods, name
    assert "encoder/down_2_downsample/conv" not in mods  # no downsampler after the last stage
    assert "decoder/up_2_upsample/conv" not in mods
    flat = traverse_util.flatten_dict(vae_params)
    # up_{i}: i = execution order, deepest first, width decoder_channels[-1 - i].
    assert flat[("decoder", "up_0_res_0", "conv1", "kernel")].shape == (3, 3, 16, 16)
    assert flat[("decoder", "up_2_res_0", "conv1", "kernel")].shape == (3, 3, 16, 8)
    assert flat[("encoder", "conv_out", "kernel")].shape == (3, 3, 32, 2 * SPEC.latent_channels)
    assert flat[("decoder", "conv_in", "kernel")].shape == (3, 3, 4, 16)


def test_shapes_and_decoder_alone(vae_params):
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    mean, logvar = _apply(VAE(SPEC), vae_params, x, method="encode")
    assert mean.shape == logvar.shape == (2, 4, 4, 4)  # two downsamplers: 16 -> 4
    z = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
    out = _apply(VAE(SPEC), vae_params, z, method="decode")
    assert out.shape == (2, 16, 16, 3)

    # VAEDecoder owns exactly the decoder part of the VAE tree and computes the same thing.
    dec = VAEDecoder(SPEC)
    own = jax.eval_shape(dec.init, jax.random.key(3), z)["params"]
    sub = decoder_params(vae_params)
    assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(lambda a: a.shape, sub)
    np.testing.assert_allclose(_apply(dec, sub, z), out, rtol=0, atol=1e-6)


def test_bf16_compute_gives_fp32_outputs_close_to_fp32():
    spec = vae_lib.TINY
    params = _init(VAEDecoder(spec), jnp.zeros((1, 4, 4, 4)))
    z = jax.random.normal(jax.random.key(1), (1, 4, 4, 4))
    ref = _apply(VAEDecoder(spec), params, z)
    out = _apply(VAEDecoder(spec, dtype=jnp.bfloat16), params, z)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 5e-2


def test_logvar_is_clamped_like_diffusers(vae_params):
    params = jax.tree.map(lambda a: a, vae_params)
    bias = params["quant_conv"]["bias"]
    params["quant_conv"]["bias"] = bias.at[4:].set(1e4).at[5].set(-1e4)
    _, logvar = _apply(VAE(SPEC), params, jnp.zeros((1, 16, 16, 3)), method="encode")
    assert float(logvar[..., 0].min()) == LOGVAR_RANGE[1]
    assert float(logvar[..., 1].max()) == LOGVAR_RANGE[0]


def test_quant_convs_can_be_absent():
    spec = dataclasses.replace(vae_lib.TINY, use_quant_conv=False, use_post_quant_conv=False,
                               mid_attention=False)
    params = jax.eval_shape(VAE(spec).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    mods = _modules(params)
    assert not {"quant_conv", "post_quant_conv", "encoder/mid_attn/to_q"} & mods
    assert set(decoder_params(params)) == {"decoder"}


def test_mid_attention_matches_numpy_reference():
    """GroupNorm, softmax(q k^T / sqrt(C_head)) v per head, out projection, residual."""
    B, H, W, C, heads, groups, eps = 2, 3, 4, 8, 2, 4, 1e-6
    x = np.asarray(jax.random.normal(jax.random.key(0), (B, H, W, C)))
    module = MidAttention(C, heads, groups, eps)
    params = _init(module, x)
    p = jax.tree.map(np.asarray, params)

    g = x.reshape(B, H * W, groups, C // groups)
    g = (g - g.mean(axis=(1, 3), keepdims=True)) / np.sqrt(g.var(axis=(1, 3), keepdims=True) + eps)
    h = g.reshape(B, H * W, C) * p["group_norm"]["scale"] + p["group_norm"]["bias"]
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in ("to_q", "to_k", "to_v"))
    split = lambda a: a.reshape(B, H * W, heads, C // heads).transpose(0, 2, 1, 3)
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(C // heads)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ split(v)).transpose(0, 2, 1, 3).reshape(B, H * W, C)
    ref = x + (o @ p["to_out"]["kernel"] + p["to_out"]["bias"]).reshape(B, H, W, C)

    out = np.asarray(_apply(module, params, x))
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-5


def test_sample_latent_has_the_encoded_statistics():
    mean = jnp.full((4096,), 1.5)
    logvar = jnp.full((4096,), np.log(4.0))
    z = sample_latent(mean, logvar, jax.random.key(0))
    assert abs(float(z.mean()) - 1.5) < 0.1 and abs(float(z.std()) - 2.0) < 0.1


def test_pruned_halves_the_decoder_only():
    sd = vae_lib.pruned(vae_lib.SD15)
    assert sd.decoder_channels == (64, 128, 256, 256)
    assert sd.encoder_channels == vae_lib.SD15.encoder_channels
    # Rounded to the nearest multiple of norm_groups, never below one group.
    assert vae_lib.pruned(vae_lib.TINY, 0.3).decoder_channels == (8, 16)
    assert vae_lib.pruned(vae_lib.TINY, 0.01).decoder_channels == (8, 8)
    with pytest.raises(ValueError, match="ratio"):
        vae_lib.pruned(vae_lib.TINY, 0.0)


def test_spec_json_round_trip_and_errors():
    spec = vae_lib.pruned(vae_lib.SD15)
    assert VAESpec.from_dict(json.loads(spec.to_json())) == spec
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['decoder_width'\]"):
        VAESpec.from_dict({"decoder_width": 3})
    with pytest.raises(ValueError, match="decoder_channels has 3"):
        VAESpec(encoder_channels=(32, 64), decoder_channels=(32, 64, 64))
    with pytest.raises(ValueError, match=r"decoder_channels\[1\]=60 is not divisible"):
        VAESpec(encoder_channels=(32, 64), decoder_channels=(32, 60), norm_groups=8)
    with pytest.raises(ValueError, match="mid_attention_heads=3"):
        VAESpec(encoder_channels=(32, 64), decoder_channels=(32, 64), norm_groups=8,
                mid_attention_heads=3)
    with pytest.raises(ValueError, match="unknown VAE preset 'sd21'"):
        vae_lib.preset("sd21")
    assert vae_lib.preset("sd15").scaling_factor == 0.18215


def test_decoder_norm_groups_is_the_decoders_own():
    # Spec files written before the field load as before: the decoder uses norm_groups.
    old = json.loads(vae_lib.TINY.to_json())
    del old["decoder_norm_groups"]
    assert VAESpec.from_dict(old) == vae_lib.TINY and vae_lib.TINY.decoder_groups == 8
    spec = dataclasses.replace(vae_lib.TINY, decoder_norm_groups=4)
    assert VAESpec.from_dict(json.loads(spec.to_json())) == spec and spec.decoder_groups == 4

    # The decoder normalises in its own groups, the encoder in norm_groups.
    same_as_decoder = dataclasses.replace(vae_lib.TINY, norm_groups=4)
    params = _init(VAE(vae_lib.TINY), jnp.zeros((1, 8, 8, 3)))
    z = jax.random.normal(jax.random.key(1), (1, 4, 4, 4))
    x = jax.random.normal(jax.random.key(2), (1, 8, 8, 3))
    decode = lambda s: _apply(VAE(s), params, z, method="decode")
    encode = lambda s: _apply(VAE(s), params, x, method="encode")[0]
    np.testing.assert_array_equal(decode(spec), decode(same_as_decoder))
    assert float(jnp.abs(decode(spec) - decode(vae_lib.TINY)).max()) > 1e-3
    np.testing.assert_array_equal(encode(spec), encode(vae_lib.TINY))

    with pytest.raises(ValueError, match=r"decoder_channels\[0\]=32 is not divisible by "
                                         r"decoder_norm_groups=3"):
        dataclasses.replace(vae_lib.TINY, decoder_norm_groups=3)
    with pytest.raises(ValueError, match="decoder_norm_groups=0: need >= 1"):
        dataclasses.replace(vae_lib.TINY, decoder_norm_groups=0)
