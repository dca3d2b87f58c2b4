"""Robust training: block-mask probabilities, determinism, per-example masks, sharding,
sampling without masks, config errors.

Statistical tolerances are 4 binomial standard deviations (a false alarm about once in 15,000
checks per block); the draws are seeded, so a pass is reproducible.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from snapjax import sampling
from snapjax.config import ConfigError, load_config
from snapjax.diffusion import ddim
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models.text_encoder import TextEncoder, TextEncoderSpec
from snapjax.models.unet import UNet, abstract_unet_params
from snapjax.models.unet_spec import TINY, UNetSpec
from snapjax.train import robust, steps
from snapjax.train.objectives.diffusion import robust_mask_sampler
from snapjax.train.robust import RobustConfig
from snapjax.train.state import init_state
from tests.conftest import max_rel_err
from tests.train.conftest import REPO
from tests.train.test_sharded_step import assert_sharded_matches_single_device, run_sharded

# Two stages, a removed head ResNet ('r': not droppable), two attentions after one ResNet, and
# a mid block (stage 1): every case keep_probabilities has to place.
SPEC = UNetSpec(block_channels=(16, 32), down=(("RA",), ("rA",)), up=(("RAA", "R"), ("R", "RA")),
                mid="RAR", num_heads=(2, 2), context_dim=16, transformer_layers=(1, 1),
                norm_groups=8)


def _blocks(spec):
    return [b for b in spec.blocks() if not b.removed]


def _random_params(spec, seed=0):
    # Straight from the shapes: compiling Flax's init costs more than the whole test.
    gen = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(gen.normal(size=s.shape) * 0.1, jnp.float32),
                        abstract_unet_params(spec))


# ----------------------------------------------------------------------------- probabilities

def test_keep_probabilities_follow_kind_and_stage_overrides():
    names = SPEC.block_names()
    assert "down_1_0_res" not in names and len(names) == len(_blocks(SPEC))
    flat = robust.keep_probabilities(SPEC, RobustConfig(keep_prob_attention=0.7,
                                                        keep_prob_resnet=0.9))
    want = [0.7 if b.kind == "attn" else 0.9 for b in _blocks(SPEC)]
    np.testing.assert_allclose(flat, want, rtol=1e-6)

    cfg = RobustConfig(keep_prob_attention=0.7, keep_prob_resnet=0.9,
                       stage_keep_prob_attention=(1.0, 0.5), stage_keep_prob_resnet=(0.25, 1))
    probs = dict(zip(names, robust.keep_probabilities(SPEC, cfg)))
    for b in _blocks(SPEC):
        stage_probs = (1.0, 0.5) if b.kind == "attn" else (0.25, 1.0)
        assert probs[b.name] == stage_probs[b.stage], (b.name, b.kind, b.stage)
    # The mid block belongs to the deepest stage; up_0 is stage 0 although it runs last.
    assert probs["mid_attn"] == 0.5 and probs["mid_res_1"] == 1.0
    assert probs["up_0_0_attn_1"] == 1.0 and probs["up_0_0_res"] == 0.25
    assert probs["down_1_0_attn"] == 0.5

    with pytest.raises(ValueError, match=r"robust.stage_keep_prob_resnet has 3 entries but the "
                                         r"UNet has 2 stages"):
        robust.keep_probabilities(SPEC, RobustConfig(stage_keep_prob_resnet=(1, 1, 1)))


@pytest.mark.parametrize("per_example", [True, False])
def test_mask_frequencies_match_the_probabilities(per_example):
    probs = robust.keep_probabilities(SPEC, RobustConfig(
        keep_prob_attention=0.6, keep_prob_resnet=0.85, stage_keep_prob_attention=(0.3, 0.95)))
    n = 4000
    if per_example:
        masks = robust.sample_block_mask(jax.random.key(0), probs, n, True)
        assert masks.shape == (n, len(probs))
    else:
        keys = jax.random.split(jax.random.key(0), n)
        masks = jax.vmap(lambda k: robust.sample_block_mask(k, probs, 8, False))(keys)
        assert masks.shape == (n, len(probs))  # one (N,) mask per draw, whatever the batch
    masks = np.asarray(masks)
    assert set(np.unique(masks)) <= {0.0, 1.0} and masks.dtype == np.float32
    sigma = np.sqrt(probs * (1 - probs) / n)
    np.testing.assert_array_less(np.abs(masks.mean(0) - probs), 4 * sigma + 1e-9)
    # Blocks are drawn independently: the correlation of two blocks' draws is ~0.
    corr = np.corrcoef(masks[:, 0], masks[:, 1])[0, 1]
    assert abs(corr) < 4 / np.sqrt(n), corr


def test_keep_probability_one_never_drops():
    probs = robust.keep_probabilities(SPEC, RobustConfig(keep_prob_attention=1.0,
                                                         keep_prob_resnet=1.0))
    mask = robust.sample_block_mask(jax.random.key(3), probs, 500, True)
    assert float(jnp.min(mask)) == 1.0


def test_disabled_robust_training_binds_no_mask():
    assert robust.block_mask_sampler(SPEC, RobustConfig(keep_prob_attention=0.5)) is None
    mask_fn = robust.block_mask_sampler(SPEC, RobustConfig(enabled=True, keep_prob_resnet=0.5))
    assert mask_fn(jax.random.key(0), 3).shape == (3, SPEC.num_blocks)
    one_mask = robust.block_mask_sampler(SPEC, RobustConfig(enabled=True, per_example=False))
    assert one_mask(jax.random.key(0), 3).shape == (SPEC.num_blocks,)


# ----------------------------------------------------------------------------- in the step

class _MaskedPixelLinear(nn.Module):
    """A UNet stand-in whose output depends on the mask: per-pixel linear map scaled by
    1 + (the example's fraction of kept blocks)."""

    @nn.compact
    def __call__(self, z, t, ctx, block_mask=None):
        gain = 1.0 + jnp.mean(block_mask, axis=-1)
        return nn.Dense(z.shape[-1])(z) * jnp.reshape(gain, (-1, 1, 1, 1))


def _robust_step(per_example=True):
    unet = _MaskedPixelLinear()
    tx = optax.sgd(1e-2)
    mask_fn = robust.block_mask_sampler(TINY, RobustConfig(
        enabled=True, keep_prob_attention=0.5, keep_prob_resnet=0.7, per_example=per_example))
    step = jax.jit(functools.partial(
        steps.unet_diffusion_step, unet=unet, schedule=NoiseSchedule(),
        inputs=functools.partial(steps.cached_inputs, caption_dropout=0.0), optimizer=tx,
        ema_decay=0.9, block_mask=mask_fn))
    x = jax.random.normal(jax.random.key(1), (6, 4, 4, 4))
    mask = jnp.ones((6, TINY.num_blocks))
    init = lambda k: {"unet": unet.init(k, x, None, None, mask)["params"]}  # noqa: E731
    state = init_state(init, tx, jax.random.key(0))
    batch = {"latent": x, "context": jnp.ones((6, 2, 8))}
    frozen = {"empty_context": jnp.zeros((1, 2, 8))}
    return step, state, batch, frozen, mask_fn


def test_the_step_rng_fixes_the_mask_so_a_resumed_run_draws_the_same_masks():
    step, state, batch, frozen, mask_fn = _robust_step()
    rng = jax.random.key(11)
    at = lambda s: state.replace(step=jnp.asarray(s, jnp.int32))  # noqa: E731
    _, m5 = step(at(5), batch, rng, frozen)
    _, m5_again = step(at(5), batch, rng, frozen)  # a resumed run at step 5
    _, m6 = step(at(6), batch, rng, frozen)
    assert float(m5["loss"]) == float(m5_again["loss"])
    assert float(m5["robust/keep_fraction"]) == float(m5_again["robust/keep_fraction"])
    # The mask is the one drawn from fold_in(rng, step), through robust.mask_key.
    for s, metrics in ((5, m5), (6, m6)):
        want = mask_fn(robust.mask_key(jax.random.fold_in(rng, s)), 6)
        assert float(metrics["robust/keep_fraction"]) == pytest.approx(float(jnp.mean(want)))
    masks = [np.asarray(mask_fn(robust.mask_key(jax.random.fold_in(rng, s)), 6))
             for s in range(5, 10)]
    assert all(not np.array_equal(masks[0], m) for m in masks[1:])  # each step draws anew


def test_keep_fraction_metric_over_steps_matches_the_probabilities():
    step, state, batch, frozen, _ = _robust_step(per_example=False)
    probs = robust.keep_probabilities(TINY, RobustConfig(keep_prob_attention=0.5,
                                                         keep_prob_resnet=0.7))
    fractions = []
    for _ in range(200):
        state, metrics = step(state, batch, jax.random.key(2), frozen)
        fractions.append(float(metrics["robust/keep_fraction"]))
    # 200 steps x N blocks, one mask per step: mean within 4 sigma of the mean probability.
    sigma = np.sqrt(np.sum(probs * (1 - probs))) / len(probs) / np.sqrt(200)
    assert abs(np.mean(fractions) - probs.mean()) < 4 * sigma, (np.mean(fractions), probs.mean())


def test_per_example_mask_rows_equal_each_example_masked_alone():
    spec = SPEC
    unet, params = UNet(spec), _random_params(spec)
    apply = jax.jit(lambda p, z, t, c, m: unet.apply({"params": p}, z, t, c, block_mask=m))
    gen = np.random.default_rng(0)
    z = jnp.asarray(gen.normal(size=(3, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10, 500, 990], jnp.int32)
    ctx = jnp.asarray(gen.normal(size=(3, 5, 16)), jnp.float32)
    rows = np.ones((3, spec.num_blocks), np.float32)
    rows[0, ::2] = 0.0   # every other block dropped
    rows[1, 1::3] = 0.0  # others
    # rows[2]: all ones, the unmasked UNet
    together = np.asarray(apply(params, z, t, ctx, jnp.asarray(rows)))
    for i in range(3):
        alone = np.asarray(apply(params, z[i:i + 1], t[i:i + 1], ctx[i:i + 1],
                                 jnp.asarray(rows[i])))
        # A batch of 1 runs other XLA kernels than a batch of 3: float32 rounding only.
        assert max_rel_err(together[i:i + 1], alone) < 1e-5, i
    unmasked = np.asarray(jax.jit(lambda p, z, t, c: unet.apply({"params": p}, z, t, c))(
        params, z, t, ctx))
    assert max_rel_err(together[2], unmasked[2]) < 1e-6
    assert max_rel_err(together[0], unmasked[0]) > 1e-2  # the mask really drops blocks


def test_robust_step_sharded_over_data_and_fsdp_equals_one_device():
    report = run_sharded("""
        from snapjax.train import robust
        BLOCK_MASK = robust.block_mask_sampler(spec, robust.RobustConfig(
            enabled=True, keep_prob_attention=0.6, keep_prob_resnet=0.7, per_example=True))
    """)
    assert_sharded_matches_single_device(report)
    one = [m["robust/keep_fraction"] for m in report["one_metrics"]]
    many = [m["robust/keep_fraction"] for m in report["many_metrics"]]
    assert one == many  # the same masks on 8 devices as on one
    assert all(0.0 < f < 1.0 for f in one), one  # blocks were dropped, not all of them


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def sampler_models():
    text_spec = TextEncoderSpec(vocab_size=20, max_length=5, width=16, layers=1, heads=2,
                                mlp_dim=32)
    text = TextEncoder(text_spec)
    ids = jnp.zeros((1, 5), jnp.int32)
    gen = np.random.default_rng(1)
    text_params = jax.tree.map(lambda s: jnp.asarray(gen.normal(size=s.shape) * 0.1, jnp.float32),
                               jax.eval_shape(text.init, jax.random.key(0), ids)["params"])
    return UNet(SPEC), _random_params(SPEC), text, text_params


def test_sampling_runs_every_block_and_one_sampler_serves_every_mask(sampler_models):
    unet, params, text, text_params = sampler_models
    ids = np.asarray([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]], np.int32)
    empty = np.zeros((1, 5), np.int32)
    noise = sampling.initial_noise(0, 2, (8, 8), 4)
    run = functools.partial(sampling.sample_latents, unet, params, text, text_params, ids, empty,
                            noise, schedule=NoiseSchedule(), num_steps=3, guidance_scale=4.0)
    plain = np.asarray(run())
    ones = np.asarray(run(block_mask=jnp.ones((SPEC.num_blocks,))))
    np.testing.assert_array_equal(ones, plain)  # an all-ones mask is no mask

    compiled = ddim._ddim_loop_jit._cache_size()
    drop = np.ones((SPEC.num_blocks,), np.float32)
    drop[SPEC.block_names().index("mid_attn")] = 0.0
    dropped = np.asarray(run(block_mask=jnp.asarray(drop)))
    assert ddim._ddim_loop_jit._cache_size() == compiled  # the mask is traced, not compiled in
    assert max_rel_err(dropped, plain) > 1e-3

    # Per-example rows under guidance (the UNet sees [uncond; cond]): row i goes with example i.
    rows = np.stack([drop, np.ones_like(drop)])
    both = np.asarray(run(block_mask=jnp.asarray(rows)))
    assert max_rel_err(both[0], dropped[0]) < 1e-5
    assert max_rel_err(both[1], plain[1]) < 1e-5


# ----------------------------------------------------------------------------- config

def _robust_config(*overrides):
    return load_config(str(REPO / "configs" / "world_robust.py"), list(overrides))


@pytest.mark.parametrize("override, key", [
    ("--config.robust.keep_prob_attention=0", "robust.keep_prob_attention=0.0"),
    ("--config.robust.keep_prob_resnet=1.2", "robust.keep_prob_resnet=1.2"),
    ("--config.robust.stage_keep_prob_attention=(0.5, -1)",
     r"robust.stage_keep_prob_attention\[1\]=-1"),
    ("--config.robust.stage_keep_prob_resnet=(0.5, 0.5, 0.5)",
     "robust.stage_keep_prob_resnet has 3 entries but the UNet has 2 stages"),
])
def test_bad_probabilities_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        robust_mask_sampler(_robust_config(override), SPEC)


def test_world_robust_config_turns_robust_training_on_and_the_teacher_config_leaves_it_off():
    mask_fn = robust_mask_sampler(_robust_config(), SPEC)
    assert mask_fn is not None and mask_fn.keywords["per_example"]
    np.testing.assert_allclose(mask_fn.keywords["keep_probs"], 0.8, rtol=1e-6)
    teacher = load_config(str(REPO / "configs" / "world_teacher.py"))
    assert robust_mask_sampler(teacher, SPEC) is None
    moved = _robust_config("--config.teacher_pipeline=elsewhere/model")
    assert moved.diffusion.unet_init == "elsewhere/model/unet"
    assert moved.diffusion.vae == "elsewhere/model/vae"
