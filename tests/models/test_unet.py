"""The spec-driven UNet on its own: parameter names, dropping = removing, jit, input checks.

Parity with diffusers is in tests/convert/test_unet_import.py; here the reference for a dropped
block is the same network with that block removed from the spec and its parameters pruned.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax.models.unet import UNet, abstract_unet_params, count_params, init_unet
from snapjax.evolve.surgery import remove_block
from snapjax.models.unet_spec import SD15, TINY, UNetSpec

# TINY with a same-width removed ResNet (no parameters at all), a width-changing one
# (conv_shortcut only) and a removed up ResNet (conv_shortcut for the concatenated skip).
PRUNED = dataclasses.replace(
    TINY, down=(("RA", "r"), ("rA", "R")), up=(("RA", "rA", "R"), ("R", "r", "R")),
    num_heads=(2, 4))


@functools.lru_cache(maxsize=None)
def forward(spec: UNetSpec, dtype=jnp.float32):
    """A jitted apply per network: XLA's CPU compile, not the run, is what costs here."""
    model = UNet(spec, dtype)
    return jax.jit(lambda params, x, t, ctx, mask=None:
                   model.apply({"params": params}, x, t, ctx, mask))


def inputs(spec: UNetSpec, B=2, size=8, S=5, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k1, (B, size, size, spec.in_channels)),
            jnp.array([3.0, 870.0][:B]),
            jax.random.normal(k2, (B, S, spec.context_dim)))


def noisy_params(spec: UNetSpec, seed=1) -> dict:
    """Random weights straight from the abstract tree (numpy: no XLA compile of initialisers).

    Kernels ~ N(0, 1/fan_in); norm scales 1 + noise and biases noise, so that no parameter is
    a no-op that could hide a wiring bug.
    """
    rs = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(x.shape[:-1]))
            return jnp.asarray(rs.normal(0, fan_in ** -0.5, x.shape), jnp.float32)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + rs.normal(0, 0.05, x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_unet_params(spec))


def test_parameter_tree_names():
    p = abstract_unet_params(TINY)
    assert set(p) == {
        "conv_in", "time_embedding", "down_0_0_res", "down_0_0_attn", "down_0_downsample",
        "down_1_0_res", "mid_res_0", "mid_attn", "mid_res_1", "up_1_0_res", "up_1_1_res",
        "up_1_upsample", "up_0_0_res", "up_0_0_attn", "up_0_1_res", "up_0_1_attn",
        "conv_norm_out", "conv_out"}
    assert set(p["time_embedding"]) == {"linear_1", "linear_2"}
    assert set(p["down_0_0_res"]) == {"norm1", "conv1", "time_emb_proj", "norm2", "conv2"}
    assert set(p["up_0_0_res"]) == {"norm1", "conv1", "time_emb_proj", "norm2", "conv2",
                                    "conv_shortcut"}
    assert set(p["down_0_downsample"]) == {"conv"}
    assert set(p["mid_attn"]) == {"norm", "proj_in", "block_0", "proj_out"}
    assert set(p["mid_attn"]["block_0"]) == {"norm1", "attn1", "norm2", "attn2", "norm3",
                                             "ff_proj", "ff_out"}
    assert set(p["mid_attn"]["block_0"]["attn2"]) == {"to_q", "to_k", "to_v", "to_out"}
    # GEGLU: one Dense to 2 * 4 * C, then C.
    assert p["mid_attn"]["block_0"]["ff_proj"]["kernel"].shape == (64, 512)
    assert p["mid_attn"]["block_0"]["ff_out"]["kernel"].shape == (256, 64)
    assert p["mid_attn"]["block_0"]["attn2"]["to_k"]["kernel"].shape == (TINY.context_dim, 64)
    assert set(abstract_unet_params(TINY)) == set(p)  # the cached tree is not shared/mutated
    # Every droppable block is a parameter subtree of that name.
    assert set(TINY.block_names()) <= set(p)


def test_removed_resnets_keep_only_their_shortcut():
    p = abstract_unet_params(PRUNED)
    assert "down_0_1_res" not in p                     # 'r' at constant width: nothing left
    assert set(p["down_1_0_res"]) == {"conv_shortcut"}  # 32 -> 64
    assert set(p["up_1_1_res"]) == {"conv_shortcut"}    # concatenated skip
    assert set(p["up_0_1_res"]) == {"conv_shortcut"} and "up_0_1_attn" in p
    assert set(p) >= set(PRUNED.block_names())
    assert not {"down_0_1_res", "down_1_0_res", "up_1_1_res", "up_0_1_res"} & set(
        PRUNED.block_names())


def test_sd15_parameter_count_without_memory():
    # 859,520,964 is diffusers' UNet2DConditionModel count for the SD-v1.5 config.
    assert count_params(abstract_unet_params(SD15)) == 859_520_964


@pytest.mark.slow  # XLA's CPU compile of a few hundred random initialisers: minutes here
def test_init_matches_abstract_tree():
    spec = dataclasses.replace(TINY, block_channels=(8, 16), num_heads=(2, 2), context_dim=8,
                               norm_groups=4)  # small: XLA's CPU compile of the init is slow
    params = init_unet(spec, jax.random.key(0))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert shapes == jax.tree.map(lambda x: (x.shape, x.dtype), abstract_unet_params(spec))
    assert float(jnp.abs(params["conv_in"]["kernel"]).max()) > 0


def test_bf16_compute_keeps_fp32_params_and_output(rel_err):
    params = noisy_params(TINY)
    x, t, ctx = inputs(TINY)
    ref = forward(TINY)(params, x, t, ctx)
    out = forward(TINY, jnp.bfloat16)(params, x, t, ctx)
    assert out.dtype == jnp.float32 and out.shape == x.shape[:3] + (TINY.out_channels,)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert rel_err(out, ref) < 3e-2  # bf16 has 8 mantissa bits; a wiring bug gives O(1)


def test_all_ones_mask_is_no_mask(rel_err):
    params = noisy_params(PRUNED)
    x, t, ctx = inputs(PRUNED)
    ref = forward(PRUNED)(params, x, t, ctx)
    out = forward(PRUNED)(params, x, t, ctx, jnp.ones(PRUNED.num_blocks))
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("name", ["down_0_0_attn", "down_0_0_res", "mid_attn", "mid_res_1",
                                  "up_1_0_res"])
def test_dropping_a_block_is_removing_it(name, rel_err):
    """Under jit (tests/evolve/test_surgery.py checks every block of two specs eagerly)."""
    spec = PRUNED
    params = noisy_params(spec)
    x, t, ctx = inputs(spec)
    mask = np.ones(spec.num_blocks, np.float32)
    mask[spec.block_names().index(name)] = 0.0
    dropped = forward(spec)(params, x, t, ctx, jnp.asarray(mask))
    full = forward(spec)(params, x, t, ctx, jnp.ones(spec.num_blocks))
    assert rel_err(dropped, full) > 1e-3  # the block mattered
    small_spec, small_params = remove_block(spec, params, name)
    assert jax.tree.structure(small_params) == jax.tree.structure(
        abstract_unet_params(small_spec))
    ref = forward(small_spec)(small_params, x, t, ctx)
    assert rel_err(dropped, ref) < 1e-5


def test_per_example_mask_rows_act_on_their_own_example(rel_err):
    params = noisy_params(PRUNED)
    x, t, ctx = inputs(PRUNED)
    rows = np.ones((2, PRUNED.num_blocks), np.float32)
    rows[0, 1] = rows[1, 4] = 0.0
    both = forward(PRUNED)(params, x, t, ctx, jnp.asarray(rows))
    for b in range(2):
        alone = forward(PRUNED)(params, x, t, ctx, jnp.asarray(rows[b]))
        assert rel_err(both[b], alone[b]) < 1e-6
    assert rel_err(both[0], forward(PRUNED)(params, x, t, ctx)[0]) > 1e-4


def test_masks_under_jit_trace_once(rel_err):
    params = noisy_params(TINY)
    x, t, ctx = inputs(TINY)
    model = UNet(TINY)
    traces = []

    @jax.jit
    def run(params, mask):
        traces.append(1)  # runs only while tracing
        return model.apply({"params": params}, x, t, ctx, mask)

    outs = []
    for seed in range(3):
        mask = jax.random.bernoulli(jax.random.key(seed), 0.5, (TINY.num_blocks,))
        outs.append(run(params, mask.astype(jnp.float32)))
    outs.append(run(params, jnp.ones(TINY.num_blocks)))
    assert len(traces) == 1
    assert rel_err(outs[-1], forward(TINY)(params, x, t, ctx)) < 1e-6
    assert rel_err(outs[0], outs[-1]) > 1e-3


@pytest.mark.parametrize("bad, message", [
    (dict(mask=jnp.ones(3)), f"block_mask must have shape ({TINY.num_blocks},) or (2, "),
    (dict(size=9), "multiples of 2 (2 stages), got 9x9"),
    (dict(ctx_dim=7), f"context must be (2, L, {TINY.context_dim})"),
    (dict(channels=3), f"B H W {TINY.in_channels}"),
    (dict(t=jnp.zeros(3)), "timesteps must be a scalar or shape (2,)"),
])
def test_bad_inputs_name_the_problem(bad, message):
    params = abstract_unet_params(TINY)
    B = 2
    size = bad.get("size", 8)
    x = jnp.zeros((B, size, size, bad.get("channels", TINY.in_channels)))
    ctx = jnp.zeros((B, 4, bad.get("ctx_dim", TINY.context_dim)))
    t = bad.get("t", jnp.zeros(B))
    with pytest.raises(ValueError) as e:
        jax.eval_shape(lambda p: UNet(TINY).apply({"params": p}, x, t, ctx, bad.get("mask")),
                       params)
    assert message in str(e.value)


def test_remat_keeps_values_and_gradients_and_saves_less(rel_err):
    """remat=True: same forward, same gradients, far fewer activations kept for the backward."""
    params, (x, t, ctx) = noisy_params(PRUNED), inputs(PRUNED, size=16)
    mask = jnp.ones(PRUNED.num_blocks).at[1].set(0.0)  # a dropped block under remat too
    cotangent = jax.random.normal(jax.random.key(3), x.shape)

    def forward_of(remat):
        model = UNet(PRUNED, remat=remat)
        return lambda p: model.apply({"params": p}, x, t, ctx, mask)

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(remat, p):
        out, pullback = jax.vjp(forward_of(remat), p)
        return out, pullback(cotangent)[0]

    (out, grads), (out_r, grads_r) = output_and_grads(False, params), output_and_grads(True, params)
    np.testing.assert_array_equal(out_r, out)
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        # Recomputed activations fuse differently: float32 rounding, not a different gradient.
        assert rel_err(g_r, g) < 1e-5
    # What a VJP closes over is what training keeps between forward and backward: the
    # parameters plus the residuals, which remat cuts to the blocks' inputs (shapes only here).
    def kept_bytes(remat):
        pullback = jax.eval_shape(lambda p: jax.vjp(forward_of(remat), p)[1], params)
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(pullback))

    param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    kept, kept_r = kept_bytes(False) - param_bytes, kept_bytes(True) - param_bytes
    assert kept_r < 0.25 * kept, (kept, kept_r)


def test_guidance_input_starts_at_zero_and_then_conditions_on_w():
    """with_guidance_input adds a zero projection: the same output at every w; with weights in
    it the output depends on w, and the features are diffusers' guidance embedding of w - 1."""
    from snapjax.models.layers import guidance_embedding
    from snapjax.models.unet import with_guidance_input
    params = init_unet(TINY, jax.random.key(0))
    spec, guided = with_guidance_input(TINY, params, 16)
    assert "cond_proj" not in params["time_embedding"]  # the input tree is not modified
    z = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t, ctx = jnp.array([10, 700]), jax.random.normal(jax.random.key(2), (2, 3, TINY.context_dim))
    plain = UNet(TINY).apply({"params": params}, z, t, ctx)
    for w in (1.0, 7.5):
        np.testing.assert_array_equal(
            UNet(spec).apply({"params": guided}, z, t, ctx, guidance_B=jnp.full((2,), w)), plain)
    guided["time_embedding"]["cond_proj"]["kernel"] = jax.random.normal(jax.random.key(3),
                                                                         (16, 32))
    a = UNet(spec).apply({"params": guided}, z, t, ctx, guidance_B=2.0)
    b = UNet(spec).apply({"params": guided}, z, t, ctx, guidance_B=jnp.array([2.0, 9.0]))
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(a[1] - b[1]).max()) > 1e-3
    # closed form: sin then cos of (w - 1) * 1000 * 10000^(-i / (half - 1))
    w = np.array([1.0, 3.5])
    freqs = np.exp(-np.log(10000.0) * np.arange(8) / 7)
    args = (w[:, None] - 1) * 1000 * freqs[None]
    np.testing.assert_allclose(guidance_embedding(jnp.asarray(w), 16),
                               np.concatenate([np.sin(args), np.cos(args)], 1), atol=1e-4)
    with pytest.raises(ValueError, match="pass guidance_B"):
        UNet(spec).apply({"params": guided}, z, t, ctx)
    with pytest.raises(ValueError, match="no guidance input"):
        UNet(TINY).apply({"params": params}, z, t, ctx, guidance_B=3.0)
    with pytest.raises(ValueError, match="already has a guidance input"):
        with_guidance_input(spec, guided, 16)
    with pytest.raises(ValueError, match="guidance_embed_dim=-2 must be an integer >= 0"):
        dataclasses.replace(TINY, guidance_embed_dim=-2)


def test_costs_of_a_guidance_conditioned_unet_are_one_call():
    """summary and the latency table trace a guidance-conditioned UNet (w an input) and count
    what the plain UNet costs per call, plus its projection's (dim x F) multiply-adds."""
    from snapjax.evolve.latency import latency_table
    from snapjax.summary import summarize
    spec = dataclasses.replace(TINY, guidance_embed_dim=16)
    plain, guided = (summarize({"unet": ("unet", s)}, resolution=64)[0] for s in (TINY, spec))
    assert guided.params == plain.params + 16 * 32
    assert guided.gflops == pytest.approx(plain.gflops + 2 * 16 * 32 / 1e9, rel=1e-6)
    assert dict(latency_table(spec, 64, "macs")) == dict(latency_table(TINY, 64, "macs"))
