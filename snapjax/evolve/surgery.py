"""Block surgery: remove or duplicate one UNet block, in the spec and in every tree that follows
the parameters (params, EMA, optimizer moments), so training continues without a reset.

    spec, params = remove_block(spec, params, "up_1_0_attn")
    spec, params = duplicate_block(spec, params, "down_1_0_attn")            # zero-initialised
    spec, state = edit_train_state(state, plan_duplicate(spec, "mid_attn"))  # a whole TrainState

Removal is exactly dropping the block with a mask (:mod:`snapjax.models.unet`): a transformer
or a later ResNet disappears with its parameters, a head ResNet becomes ``r`` and keeps only
its 1x1 ``conv_shortcut`` (if it had one). Duplication inserts a copy right after the block;
with ``init="zero"`` (the default) the copy's last layer (a ResNet's ``conv2``, a transformer's
``proj_out``) starts at zero, so the network computes the same function at the moment of the
action; ``init="copy"`` keeps every weight as it is. Names of later blocks of the same kind in
that unit shift by one (the naming rule of :mod:`snapjax.models.unet_spec`); their subtrees
move with them.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from snapjax.models.unet import abstract_unet_params
from snapjax.models.unet_spec import Block, UNetSpec, letter_names

INITS = ("zero", "copy")
# The layer whose zeroing makes a block's residual branch output exactly zero.
_LAST_LAYER = {"res": "conv2", "attn": "proj_out"}


@dataclasses.dataclass(frozen=True)
class Edit:
    """One action, planned on the spec: what happens to the top-level UNet modules.

    ``renames``: old module name -> new (later blocks of the unit, shifted); ``drop``: a module
    that disappears; ``shortcut_only``: a head ResNet reduced to its conv_shortcut;
    ``insert``: (new name, source name) of a duplicate; ``init``: how the duplicate starts.
    """

    action: str
    block: str
    before: UNetSpec
    spec: UNetSpec
    renames: dict[str, str] = dataclasses.field(default_factory=dict)
    drop: str | None = None
    shortcut_only: str | None = None
    insert: tuple[str, str] | None = None
    init: str = "zero"


def _unit_string(spec: UNetSpec, block: Block) -> str:
    if block.path == "mid":
        return spec.mid
    return getattr(spec, block.path)[block.stage][block.unit]


def _with_unit(spec: UNetSpec, block: Block, unit: str) -> UNetSpec:
    if block.path == "mid":
        return dataclasses.replace(spec, mid=unit)
    stages = [list(stage) for stage in getattr(spec, block.path)]
    stages[block.stage][block.unit] = unit
    return dataclasses.replace(spec, **{block.path: tuple(tuple(st) for st in stages)})


def _live_block(spec: UNetSpec, name: str) -> Block:
    if name not in spec.block_names():
        removed = [b.name for b in spec.blocks() if b.removed]
        hint = f" ({name} is already removed)" if name in removed else ""
        raise ValueError(f"no block {name!r} to act on{hint}; blocks: "
                         f"{', '.join(spec.block_names())}")
    return spec.block(name)


def _renames(block: Block, old: str, new: str, shift: int) -> dict[str, str]:
    """Names of the letters after ``block.position`` in ``old`` -> their names in ``new``."""
    old_names = letter_names(block.path, block.stage, block.unit, old)
    new_names = letter_names(block.path, block.stage, block.unit, new)
    out = {}
    for i in range(block.position + 1, len(old)):
        a, b = old_names[i][0], new_names[i + shift][0]
        if a != b:
            out[a] = b
    return out


def plan_remove(spec: UNetSpec, name: str) -> Edit:
    """The :class:`Edit` that removes block ``name`` (one of ``spec.block_names()``)."""
    block = _live_block(spec, name)
    unit = _unit_string(spec, block)
    if block.position == 0:
        new_unit = "r" + unit[1:]
        edit = dict(shortcut_only=name)
    else:
        new_unit = unit[:block.position] + unit[block.position + 1:]
        edit = dict(drop=name, renames=_renames(block, unit, new_unit, -1))
    new_spec = _with_unit(spec, block, new_unit)
    if block.path != "mid" and not any(b.path == block.path for b in new_spec.blocks()
                                       if not b.removed):
        raise ValueError(f"removing {name!r} would leave the {block.path} path without any "
                         "block (only shortcuts and resamplers); a UNet needs at least one")
    return Edit("remove", name, spec, new_spec, **edit)


def plan_duplicate(spec: UNetSpec, name: str, init: str = "zero") -> Edit:
    """The :class:`Edit` that inserts a copy of block ``name`` right after it."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: expected one of {INITS}")
    block = _live_block(spec, name)
    unit = _unit_string(spec, block)
    letter = "A" if block.kind == "attn" else "R"
    new_unit = unit[:block.position + 1] + letter + unit[block.position + 1:]
    new_spec = _with_unit(spec, block, new_unit)
    new_name = letter_names(block.path, block.stage, block.unit, new_unit)[block.position + 1][0]
    return Edit("duplicate", name, spec, new_spec, renames=_renames(block, unit, new_unit, 1),
                insert=(new_name, name), init=init)


def _fresh_leaf(path: tuple[str, ...], shape, seed_name: str) -> jax.Array:
    """A new parameter where the source block's shape differs (the duplicate of a head ResNet
    takes the stage width, the head took the concatenated skip): Flax's default initialisers,
    seeded by the block's name so params and EMA get the same values."""
    leaf = path[-1]
    if leaf == "scale":
        return jnp.ones(shape, jnp.float32)
    if leaf == "bias":
        return jnp.zeros(shape, jnp.float32)
    rng = jax.random.key(zlib.crc32("/".join((seed_name, *path)).encode()))
    return nn.initializers.lecun_normal()(rng, shape, jnp.float32)  # Dense and Conv's default


def _duplicate_subtree(edit: Edit, source: dict, zeros: bool) -> dict:
    new_name, source_name = edit.insert
    kind = edit.before.block(source_name).kind
    target = traverse_util.flatten_dict(abstract_unet_params(edit.spec)[new_name])
    src = traverse_util.flatten_dict(source)
    out = {}
    for path, want in target.items():
        have = src.get(path)
        same = have is not None and tuple(np.shape(have)) == tuple(want.shape)
        if not same and edit.init == "copy":
            raise ValueError(
                f"duplicate {source_name!r} with init='copy': its {'/'.join(path)} is "
                f"{tuple(np.shape(have)) if have is not None else 'absent'} but the copy needs "
                f"{tuple(want.shape)} (a head ResNet changes width; the copy does not): use "
                "init='zero'")
        if zeros:
            value = jnp.zeros(want.shape, want.dtype)
        elif same:
            # A copy, not the source's buffer: a train state holding one buffer twice cannot
            # be donated to the next step.
            value = jnp.array(have, copy=True)
            if edit.init == "zero" and path[0] == _LAST_LAYER[kind]:
                value = jnp.zeros_like(value)
        else:
            value = _fresh_leaf(path, want.shape, new_name)
            if edit.init == "zero" and path[0] == _LAST_LAYER[kind]:
                value = jnp.zeros_like(value)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def apply_edit(edit: Edit, unet_tree: dict, *, zeros: bool = False) -> dict:
    """The UNet parameter tree (or a tree shaped like it: EMA, optimizer moments) after
    ``edit``. ``zeros``: a duplicate starts at zero (for optimizer moments) instead of from its
    source block."""
    out = {}
    for key, value in unet_tree.items():
        if key == edit.drop:
            continue
        if key == edit.shortcut_only:
            if isinstance(value, dict) and "conv_shortcut" in value:
                out[key] = {"conv_shortcut": value["conv_shortcut"]}
            continue
        out[edit.renames.get(key, key)] = value
    if edit.insert is not None:
        out[edit.insert[0]] = _duplicate_subtree(edit, unet_tree[edit.insert[1]], zeros)
    return out


def remove_block(spec: UNetSpec, params: dict, name: str) -> tuple[UNetSpec, dict]:
    """(spec, UNet params) without block ``name``: the function of dropping it with a mask."""
    edit = plan_remove(spec, name)
    return edit.spec, apply_edit(edit, params)


def duplicate_block(spec: UNetSpec, params: dict, name: str, *,
                    init: str = "zero") -> tuple[UNetSpec, dict]:
    """(spec, UNet params) with a copy of block ``name`` inserted right after it."""
    edit = plan_duplicate(spec, name, init)
    return edit.spec, apply_edit(edit, params)


def _edit_param_like(node: Any, edit: Edit, params_keys: frozenset, *, zeros: bool) -> Any:
    """Walk an optimizer state: every dict holding the trained components (a params-shaped
    tree: Adam's mu and nu) gets its ``unet`` entry edited; counts and empty states pass."""
    if isinstance(node, dict):
        if frozenset(node) == params_keys:
            return {**node, "unet": apply_edit(edit, node["unet"], zeros=zeros)}
        return {k: _edit_param_like(v, edit, params_keys, zeros=zeros) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax's NamedTuple states
        return type(node)(*(_edit_param_like(v, edit, params_keys, zeros=zeros) for v in node))
    if isinstance(node, (tuple, list)):
        return type(node)(_edit_param_like(v, edit, params_keys, zeros=zeros) for v in node)
    return node


def edit_train_state(state, edit: Edit):
    """(spec, state) after ``edit``: params and EMA edited alike (a duplicate copies each from
    its own source), optimizer moments edited with zeros for a duplicate, step unchanged."""
    keys = frozenset(state.params)
    if "unet" not in keys:
        raise ValueError(f"the train state trains {sorted(keys)}; block surgery needs 'unet'")
    params = {**state.params, "unet": apply_edit(edit, state.params["unet"])}
    ema = {**state.ema_params, "unet": apply_edit(edit, state.ema_params["unet"])}
    opt_state = _edit_param_like(state.opt_state, edit, keys, zeros=True)
    return edit.spec, state.replace(params=params, ema_params=ema, opt_state=opt_state)
