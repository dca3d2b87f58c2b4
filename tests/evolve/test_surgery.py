"""Block surgery against the mask: removing a block is dropping it, duplicating one (zero init)
changes nothing, and params, EMA and optimizer state stay trees of the new spec.

The UNets run eagerly (no jit): every action makes a new spec, and one XLA compile per spec
would cost more than all these tiny forwards together.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax.evolve.surgery import (duplicate_block, edit_train_state, plan_duplicate,
                                    plan_remove, remove_block)
from snapjax.models.unet import UNet, abstract_unet_params
from snapjax.models.unet_spec import TINY, UNetSpec
from snapjax.train import optim
from snapjax.train.state import state_from_params
from tests.models.test_unet import inputs, noisy_params

# Every letter of the grammar: two attentions after a ResNet, a removed head ResNet followed by
# a ResNet, a second up ResNet, a mid block whose head ResNet is removed.
GRAMMAR = dataclasses.replace(
    TINY, down=(("RAA",), ("rRA",)), up=(("RA", "rAA"), ("R", "RR")), mid="rAAR")
SPECS = {"tiny": TINY, "grammar": GRAMMAR}


def apply(spec: UNetSpec, params, mask=None):
    x, t, ctx = inputs(spec)
    return UNet(spec).apply({"params": params}, x, t, ctx, mask)


def drop_mask(spec: UNetSpec, name: str) -> jax.Array:
    mask = np.ones(spec.num_blocks, np.float32)
    mask[spec.block_names().index(name)] = 0.0
    return jnp.asarray(mask)


def same_structure(tree, spec: UNetSpec) -> bool:
    want = abstract_unet_params(spec)
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), tree)
    return (jax.tree.structure(tree) == jax.tree.structure(want)
            and shapes == jax.tree.map(lambda a: tuple(a.shape), want))


@pytest.mark.parametrize("which", sorted(SPECS))
def test_removing_equals_dropping_for_every_block(which, rel_err):
    spec = SPECS[which]
    params = noisy_params(spec)
    full = apply(spec, params)
    for name in spec.block_names():
        dropped = apply(spec, params, drop_mask(spec, name))
        assert rel_err(dropped, full) > 1e-4, f"{name} did not matter: the test shows nothing"
        small_spec, small_params = remove_block(spec, params, name)
        assert same_structure(small_params, small_spec), name
        assert small_spec.num_blocks == spec.num_blocks - 1
        assert rel_err(apply(small_spec, small_params), dropped) < 1e-6, name


@pytest.mark.parametrize("which", sorted(SPECS))
def test_duplicating_with_zero_init_keeps_the_function(which, rel_err):
    spec = SPECS[which]
    params = noisy_params(spec)
    full = apply(spec, params)
    for name in spec.block_names():
        big_spec, big_params = duplicate_block(spec, params, name)
        assert same_structure(big_params, big_spec), name
        assert big_spec.num_blocks == spec.num_blocks + 1
        assert rel_err(apply(big_spec, big_params), full) < 1e-6, name


def test_duplicate_goes_right_after_and_later_names_shift():
    edit = plan_duplicate(GRAMMAR, "down_0_0_attn")
    assert edit.spec.down[0] == ("RAAA",)
    assert edit.insert == ("down_0_0_attn_1", "down_0_0_attn")
    assert edit.renames == {"down_0_0_attn_1": "down_0_0_attn_2"}
    edit = plan_remove(GRAMMAR, "mid_attn")
    assert edit.spec.mid == "rAR" and edit.renames == {"mid_attn_1": "mid_attn"}
    edit = plan_remove(TINY, "up_1_0_res")
    assert edit.spec.up[1] == ("r", "R") and edit.shortcut_only == "up_1_0_res"


def test_copy_init_keeps_weights_and_refuses_a_width_change(rel_err):
    params = noisy_params(GRAMMAR)
    spec, copied = duplicate_block(GRAMMAR, params, "up_0_1_attn", init="copy")
    new = copied["up_0_1_attn_1"]
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params["up_0_1_attn"])):
        np.testing.assert_array_equal(a, b)
    assert rel_err(apply(spec, copied), apply(GRAMMAR, params)) > 1e-4  # the copy computes
    with pytest.raises(ValueError, match="head ResNet changes width.*init='zero'"):
        duplicate_block(GRAMMAR, params, "up_1_0_res", init="copy")


def test_duplicating_a_width_changing_head_resnet_starts_fresh_but_silent(rel_err):
    params = noisy_params(TINY)
    spec, big = duplicate_block(TINY, params, "up_1_0_res")  # 128 -> 64 channels; copy 64 -> 64
    assert spec.up[1] == ("RR", "R")
    assert big["up_1_0_res_1"]["conv1"]["kernel"].shape == (3, 3, 64, 64)
    assert "conv_shortcut" not in big["up_1_0_res_1"]
    assert float(jnp.abs(big["up_1_0_res_1"]["conv1"]["kernel"]).max()) > 0
    assert float(jnp.abs(big["up_1_0_res_1"]["conv2"]["kernel"]).max()) == 0
    assert rel_err(apply(spec, big), apply(TINY, params)) < 1e-6


def test_train_state_follows_the_surgery():
    opt = optim.make_optimizer(optim.OptimConfig(lr=1e-3, warmup_steps=0), total_steps=10)
    params = {"unet": noisy_params(GRAMMAR), "text_encoder": {"w": jnp.ones((3,))}}
    state = state_from_params(params, opt)
    # One update so that the moments are not zero: the surgery must move them, not rebuild.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = opt.update(grads, state.opt_state, params)
    state = state.replace(opt_state=opt_state)
    for edit in (plan_remove(GRAMMAR, "down_0_0_attn"), plan_duplicate(GRAMMAR, "mid_attn")):
        spec, new = edit_train_state(state, edit)
        fresh = jax.eval_shape(lambda p: state_from_params(p, opt), {
            "unet": abstract_unet_params(spec), "text_encoder": {"w": jnp.ones((3,))}})
        assert jax.tree.structure(new) == jax.tree.structure(fresh)
        assert (jax.tree.map(lambda a: tuple(np.shape(a)), new)
                == jax.tree.map(lambda a: tuple(a.shape), fresh))
        mu = new.opt_state[1][0].mu["unet"]  # clip, then adamw's (scale_by_adam, ...) chain
        if edit.action == "remove":
            # down_0_0_attn_1 became down_0_0_attn: its moments moved with it.
            np.testing.assert_array_equal(
                mu["down_0_0_attn"]["proj_out"]["kernel"],
                state.opt_state[1][0].mu["unet"]["down_0_0_attn_1"]["proj_out"]["kernel"])
        else:
            assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(mu["mid_attn_1"]))
            assert float(jnp.abs(mu["mid_attn_2"]["proj_out"]["kernel"]).max()) > 0
        assert int(new.step) == int(state.step)
        # Every leaf its own buffer: the next step donates the state.
        pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new)
                    if isinstance(x, jax.Array)]
        assert len(pointers) == len(set(pointers)), edit.action


def test_bad_actions_are_refused_clearly():
    with pytest.raises(ValueError, match="no block 'down_9_0_res'.*blocks: down_0_0_res"):
        plan_remove(TINY, "down_9_0_res")
    with pytest.raises(ValueError, match="already removed"):
        plan_remove(GRAMMAR, "down_1_0_res")
    with pytest.raises(ValueError, match="init="):
        plan_duplicate(TINY, "mid_attn", init="random")
    lonely = dataclasses.replace(TINY, down=(("R",), ("r",)))
    with pytest.raises(ValueError, match="down path without any block"):
        plan_remove(lonely, "down_0_0_res")
