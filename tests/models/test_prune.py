"""Decoder pruning from the teacher: spec, channel sites, the importance rule, weights, bad input.

The function-level check uses a teacher whose unimportant channels are known: random weights in
which every weight touching a chosen half of each site's groups is scaled by EPS (as weight decay
leaves a trained network's unused channels). The pruned decoder must find those channels and then
compute the teacher's function up to O(EPS); a random initialisation of the same spec cannot.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from snapjax.flops import matmul_flops
from snapjax.models import prune
from snapjax.models import vae as vae_lib
from snapjax.models.prune import (channel_importance, decoder_sites, prune_decoder, prune_spec,
                                  select_channels)
from snapjax.models.vae import VAE, VAEDecoder, VAESpec, decoder_params

# Three stages (a width change with a 1x1 shortcut, two upsamplers), mid attention, 8 groups.
SPEC = VAESpec(encoder_channels=(16, 32, 32), decoder_channels=(16, 32, 32), layers_per_block=2,
               norm_groups=8)
EPS = 0.02


def _random(spec, seed=0, *, whole_vae=False):
    """Fan-in scaled normal kernels, scales near 1, small biases (numpy; no init compile)."""
    module, x = ((VAE(spec), jnp.zeros((1, 8, 8, 3))) if whole_vae
                 else (VAEDecoder(spec), jnp.zeros((1, 1, 1, spec.latent_channels))))
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(a.shape[:-1])
            return (rng.standard_normal(a.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return (1 + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _planted(spec, seed=0):
    """A teacher in which a random half of every site's groups (of every head's channels, for the
    attention) is unimportant; returns the params and site -> the channels that matter."""
    params = _random(spec, seed)
    sites, layers = decoder_sites(spec)
    rng = np.random.default_rng(100 + seed)
    strong = {}
    for name, site in sites.items():
        size = site.width // site.parts
        if site.whole_parts:
            groups = np.sort(rng.permutation(site.parts)[:site.parts // 2])
            strong[name] = (groups[:, None] * size + np.arange(size)).ravel()
        else:
            strong[name] = np.sort(np.concatenate(
                [h * size + rng.permutation(size)[:size // 2] for h in range(site.parts)]))
    flat = traverse_util.flatten_dict(params["decoder"])
    for path, a in flat.items():
        layer = layers["/".join(path[:-1])]
        if a.ndim == 1:
            axes = [(0, layer.y)]
        else:
            axes = [(a.ndim - 2, layer.x), (a.ndim - 1, layer.y)]
        for axis, site in axes:
            if site is not None:
                weak = np.ones(a.shape[axis], bool)
                weak[strong[site]] = False
                shape = [1] * a.ndim
                shape[axis] = -1
                a = a * np.where(weak, EPS, 1.0).reshape(shape).astype(a.dtype)
        flat[path] = a
    return {**params, "decoder": traverse_util.unflatten_dict(flat)}, strong


def _decode(spec, params, z):
    return np.asarray(VAEDecoder(spec).apply({"params": params}, z))


def _rel(a, ref):
    return float(np.sqrt(np.mean((a - ref) ** 2) / np.mean(ref ** 2)))


Z = np.asarray(np.random.default_rng(7).standard_normal((2, 4, 4, 4)), np.float32)


def test_prune_spec_keeps_whole_groups_of_the_teacher_size():
    small = prune_spec(SPEC)
    assert small.decoder_channels == (8, 16, 16) and small.decoder_norm_groups == 4
    assert small.encoder_channels == SPEC.encoder_channels and small.norm_groups == 8
    sd = prune_spec(vae_lib.SD15)
    assert sd.decoder_channels == (64, 128, 256, 256) and sd.decoder_groups == 16
    # Rounded to the nearest whole group: 8 * 0.3 = 2.4 -> 2 of 8 groups.
    assert prune_spec(SPEC, 0.3).decoder_channels == (4, 8, 8)
    assert prune_spec(SPEC, 1.0) is SPEC
    # A pruned spec prunes again in its own (smaller) groups.
    assert prune_spec(small).decoder_channels == (4, 8, 8) and prune_spec(small).decoder_groups == 2


def test_sites_follow_the_residual_streams():
    sites, layers = decoder_sites(SPEC)
    # One stream from conv_in through the mid block and the deepest stage's three ResNets to the
    # first upsampler; the attention reads and writes it.
    stream = {m for m, layer in layers.items() if layer.y == "conv_in"}
    assert stream == {"conv_in", "mid_res_0/conv2", "mid_res_0/norm1", "mid_res_1/conv2",
                      "mid_res_1/norm1", "mid_attn/group_norm", "mid_attn/to_out",
                      "up_0_res_0/conv2", "up_0_res_0/norm1", "up_0_res_1/conv2",
                      "up_0_res_1/norm1", "up_0_res_2/conv2", "up_0_res_2/norm1"}
    assert layers["up_0_upsample/conv"].x == "conv_in"
    assert layers["up_0_upsample/conv"].y == "up_0_upsample"
    # The width change (32 -> 16) starts a new stream at the shortcut, ending at conv_out.
    assert layers["up_2_res_0/conv_shortcut"] == prune.Layer("up_1_upsample", "up_2_res_0")
    assert layers["conv_out"].x == "up_2_res_0" and layers["conv_norm_out"].x == "up_2_res_0"
    assert layers["up_2_res_0/conv2"].y == "up_2_res_0"
    # Inner channels are their own site; q and k share one, v has another.
    assert layers["up_1_res_1/conv1"].y == layers["up_1_res_1/conv2"].x == "up_1_res_1/inner"
    assert layers["mid_attn/to_q"].y == layers["mid_attn/to_k"].y == "mid_attn/qk"
    assert layers["mid_attn/to_v"].y == layers["mid_attn/to_out"].x == "mid_attn/v"
    assert sites["up_2_res_0"] == prune.Site(16, 8, True)
    assert sites["mid_attn/qk"] == prune.Site(32, 1, False)
    # Every decoder module is described.
    params = _random(SPEC)
    modules = {"/".join(p[:-1]) for p in traverse_util.flatten_dict(params["decoder"])}
    assert modules == set(layers)


def test_ratio_one_returns_the_teacher_bit_for_bit():
    params = _random(SPEC, whole_vae=True)
    spec, out = prune_decoder(SPEC, params, 1.0)
    assert spec is SPEC
    a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(out)
    assert a.keys() == b.keys()
    for path in a:
        assert np.asarray(b[path]).dtype == a[path].dtype
        np.testing.assert_array_equal(np.asarray(b[path]), a[path], err_msg=str(path))


def test_kept_channels_are_the_ones_the_rule_ranks_highest():
    params, strong = _planted(SPEC)
    kept = select_channels(SPEC, params)
    for name, channels in strong.items():
        np.testing.assert_array_equal(kept[name], channels, err_msg=name)

    # The rule, computed here by hand for one inner site and one stream: the L1 norm of every
    # weight indexed by the channel; the groups with the largest sums are kept.
    d = {"/".join(p): np.abs(np.asarray(a, np.float64))
         for p, a in traverse_util.flatten_dict(params["decoder"]).items()}
    b = "up_1_res_1"
    inner = (d[f"{b}/conv1/kernel"].sum((0, 1, 2)) + d[f"{b}/conv1/bias"]
             + d[f"{b}/norm2/scale"] + d[f"{b}/norm2/bias"] + d[f"{b}/conv2/kernel"].sum((0, 1, 3)))
    last = "up_2_res_0"  # the stream that starts at the shortcut: its writers and its readers
    stream = (d[f"{last}/conv_shortcut/kernel"].sum((0, 1, 2)) + d[f"{last}/conv_shortcut/bias"]
              + d["conv_out/kernel"].sum((0, 1, 3))
              + d["conv_norm_out/scale"] + d["conv_norm_out/bias"])
    for j in range(3):
        r = f"up_2_res_{j}"
        stream += d[f"{r}/conv2/kernel"].sum((0, 1, 2)) + d[f"{r}/conv2/bias"]
        if j:
            stream += (d[f"{r}/norm1/scale"] + d[f"{r}/norm1/bias"]
                       + d[f"{r}/conv1/kernel"].sum((0, 1, 3)))
    scores = channel_importance(SPEC, params)
    np.testing.assert_allclose(scores[f"{b}/inner"], inner, rtol=1e-12)
    np.testing.assert_allclose(scores[last], stream, rtol=1e-12)
    for name, score in ((f"{b}/inner", inner), (last, stream)):
        size = SPEC.decoder_channels[0 if name == last else 1] // 8
        top = np.sort(np.argsort(-score.reshape(8, size).sum(1))[:4])
        np.testing.assert_array_equal(kept[name], (top[:, None] * size + np.arange(size)).ravel())


def test_pruned_weights_are_the_teachers_kept_slices():
    params = _random(SPEC)
    small, out = prune_decoder(SPEC, params)
    kept = select_channels(SPEC, params)
    teacher, student = params["decoder"], out["decoder"]
    shapes = jax.eval_shape(VAEDecoder(small).init, jax.random.key(0), jnp.zeros((1, 1, 1, 4)))
    assert jax.tree.map(lambda a: a.shape, shapes["params"]) == jax.tree.map(jnp.shape, out)
    w = teacher["up_1_res_1"]["conv2"]["kernel"]
    np.testing.assert_array_equal(
        student["up_1_res_1"]["conv2"]["kernel"],
        w[:, :, kept["up_1_res_1/inner"]][..., kept["up_0_upsample"]])
    # conv2 reads the inner channels through norm2 + SiLU: the dropped channels' mean moved into
    # the bias; raw readers (the shortcut) keep their bias as it was.
    assert not np.array_equal(student["up_1_res_1"]["conv2"]["bias"],
                              teacher["up_1_res_1"]["conv2"]["bias"][kept["up_0_upsample"]])
    shortcut = "up_2_res_0"
    np.testing.assert_array_equal(student[shortcut]["conv_shortcut"]["bias"],
                                  teacher[shortcut]["conv_shortcut"]["bias"][kept[shortcut]])
    # The query keeps the teacher's temperature: scaled by sqrt(16 / 32).
    q = teacher["mid_attn"]["to_q"]["kernel"][kept["conv_in"]][:, kept["mid_attn/qk"]]
    np.testing.assert_allclose(student["mid_attn"]["to_q"]["kernel"], q * np.sqrt(0.5), rtol=1e-6)
    assert out["post_quant_conv"] is params["post_quant_conv"]


def test_pruned_decoder_starts_close_to_the_teacher():
    params, _ = _planted(SPEC)
    ref = _decode(SPEC, params, Z)
    small, pruned = prune_decoder(SPEC, params)
    err = _rel(_decode(small, pruned, Z), ref)
    random_init = VAEDecoder(small).init(jax.random.key(1), jnp.asarray(Z))["params"]
    err_random = _rel(_decode(small, random_init, Z), ref)
    err_random_same_law = _rel(_decode(small, decoder_params(_random(small, seed=3)), Z), ref)
    assert err < EPS < 0.5 < min(err_random, err_random_same_law), (err, err_random,
                                                                    err_random_same_law)


def test_the_selection_is_what_makes_it_close(monkeypatch):
    """The same pruning with the channels chosen at random instead of by the rule is far worse."""
    params, _ = _planted(SPEC)
    ref = _decode(SPEC, params, Z)
    small, pruned = prune_decoder(SPEC, params)
    err = _rel(_decode(small, pruned, Z), ref)
    rng = np.random.default_rng(0)
    monkeypatch.setattr(prune, "channel_importance", lambda spec, params: {
        name: rng.random(site.width) for name, site in decoder_sites(spec)[0].items()})
    _, shuffled = prune_decoder(SPEC, params)
    assert 5 * err < _rel(_decode(small, shuffled, Z), ref)


def test_without_unimportant_channels_it_still_beats_a_random_start():
    """A plain random teacher has no channels to spare, so half its width cannot reproduce it;
    the pruned decoder still starts nearer the teacher than a fresh draw of the same law."""
    params = _random(vae_lib.TINY)
    ref = _decode(vae_lib.TINY, params, Z)
    small, pruned = prune_decoder(vae_lib.TINY, params)
    err = _rel(_decode(small, pruned, Z), ref)
    assert err < 0.9 * _rel(_decode(small, decoder_params(_random(small, seed=1)), Z), ref)


def test_a_whole_vae_keeps_its_encoder():
    params = _random(SPEC, whole_vae=True)
    small, out = prune_decoder(SPEC, params)
    assert set(out) == set(params)
    assert out["encoder"] is params["encoder"] and out["quant_conv"] is params["quant_conv"]
    x = np.asarray(np.random.default_rng(0).standard_normal((1, 16, 16, 3)), np.float32)
    mean, _ = VAE(small).apply({"params": out}, x, method="encode")
    ref, _ = VAE(SPEC).apply({"params": params}, x, method="encode")
    np.testing.assert_array_equal(np.asarray(mean), np.asarray(ref))


def test_heads_keep_the_same_number_of_channels_each():
    spec = dataclasses.replace(SPEC, mid_attention_heads=2)
    params, strong = _planted(spec, seed=1)
    kept = select_channels(spec, params)
    for name in ("mid_attn/qk", "mid_attn/v"):  # a random half of each head's 16 channels
        np.testing.assert_array_equal(kept[name], strong[name])
        assert (kept[name] < 16).sum() == (kept[name] >= 16).sum() == 8
    small, pruned = prune_decoder(spec, params)
    assert _rel(_decode(small, pruned, Z), _decode(spec, params, Z)) < EPS


def _decoder_cost(spec, side):
    z = jax.ShapeDtypeStruct((1, side, side, spec.latent_channels), jnp.float32)
    module = VAEDecoder(spec)
    params = jax.eval_shape(module.init, jax.random.key(0), z)["params"]
    flops = matmul_flops(lambda p, z: module.apply({"params": p}, z), params, z)
    return sum(a.size for a in jax.tree.leaves(params)), flops


def test_half_width_is_about_a_quarter_of_the_cost():
    """Exact ratios (docs/decoder.md): SD-v1.5 at 512x512 and the world decoder at 32x32."""
    world = VAESpec(encoder_channels=(16, 32, 64), decoder_channels=(16, 32, 64),
                    layers_per_block=1, norm_groups=8, mid_attention=False)  # configs/world_vae.py
    for spec, side, params_ratio, flops_ratio in ((vae_lib.SD15, 64, 0.2503, 0.2536),
                                                  (world, 8, 0.2532, 0.2524)):
        (p0, f0), (p1, f1) = _decoder_cost(spec, side), _decoder_cost(prune_spec(spec), side)
        assert abs(p1 / p0 - params_ratio) < 5e-5 and abs(f1 / f0 - flops_ratio) < 5e-5, (
            p1 / p0, f1 / f0)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_ratio_outside_the_unit_interval_is_refused(ratio):
    with pytest.raises(ValueError, match=r"ratio=.* must be a number in \(0, 1\]"):
        prune_spec(SPEC, ratio)


def test_ratio_below_one_group_is_refused():
    with pytest.raises(ValueError, match=r"ratio=0.05 keeps 0.4 of the decoder's 8 GroupNorm "
                                         r"groups, less than one whole group.*ratio >= 0.0625"):
        prune_decoder(SPEC, _random(SPEC), 0.05)
    # A width the mid attention's heads cannot split: said with the ratio that caused it.
    heads = dataclasses.replace(SPEC, mid_attention_heads=16)
    with pytest.raises(ValueError, match=r"ratio=0.25 gives decoder widths \(4, 8, 8\).*"
                                         "mid_attention_heads=16"):
        prune_spec(heads, 0.25)


def test_params_that_do_not_fit_the_spec_are_refused():
    with pytest.raises(ValueError, match=r"decoder/conv_in/bias has shape \(32,\); "
                                         r"the spec's decoder needs \(64,\)"):
        prune_decoder(vae_lib.TINY, _random(SPEC))
    with pytest.raises(ValueError, match="with a 'decoder' subtree"):
        prune_decoder(SPEC, {"encoder": {}})
