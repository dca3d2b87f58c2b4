"""diffusers UNet2DConditionModel <-> snapjax UNet: config to spec, weight names, folder loader.

Every config value the Flax UNet does not implement is refused with an error naming the key,
so a checkpoint is either imported exactly or not at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from snapjax.convert.mapping import params_from_state_dict
from snapjax.convert.state_dict import (WeightsError, find_weights_file, load_state_dict,
                                       read_config_json)
from snapjax.models.unet import UNet, abstract_unet_params
from snapjax.models.unet_spec import UNetSpec

CLASS_NAME = "UNet2DConditionModel"

_DOWN_TYPES = {"CrossAttnDownBlock2D": "RA", "DownBlock2D": "R"}
_UP_TYPES = {"CrossAttnUpBlock2D": "RA", "UpBlock2D": "R"}
_MID_TYPES = {"UNetMidBlock2DCrossAttn": "RAR", "UNetMidBlock2D": "R", None: ""}
_LAYER_UNITS = ("R", "RA")  # what one layer of a diffusers down or up block is

# diffusers' defaults (UNet2DConditionModel.__init__) for the keys the spec is built from.
_DEFAULTS: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "attention_head_dim": 8, "num_attention_heads": None,
    "use_linear_projection": False, "time_embedding_dim": None, "time_cond_proj_dim": None,
}

# Keys whose other values change the network in ways the Flax UNet does not implement.
_REQUIRED: dict[str, tuple[Any, ...]] = {
    "center_input_sample": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1,),
    "dropout": (0,),  # no dropout layers: training would silently differ
    "act_fn": ("silu",),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}

# Keys with no effect on the network we build. upcast_attention computes attention scores and
# softmax in float32; snapjax's attention (jax.nn.dot_product_attention, XLA) always does, so
# both settings import exactly. addition_embed_type_num_heads only matters with an addition
# embedding, which is refused above.
_IGNORED = frozenset({"sample_size", "upcast_attention", "addition_embed_type_num_heads"})


def _per_stage(config: Mapping[str, Any], key: str, n: int) -> tuple:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config {key}={value!r} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n


def spec_from_diffusers_config(config: Mapping[str, Any]) -> UNetSpec:
    """The :class:`UNetSpec` of a diffusers UNet2DConditionModel ``config.json`` dict.

    Raises ValueError naming the key and value of anything the Flax UNet does not implement.
    """
    class_name = config.get("_class_name", CLASS_NAME)
    if class_name != CLASS_NAME:
        raise ValueError(f"config _class_name={class_name!r}: expected {CLASS_NAME!r}")
    known = {*_DEFAULTS, *_REQUIRED, *_IGNORED, "only_cross_attention"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"config key(s) {unknown} are unknown to the snapjax importer "
                         f"(written by a newer diffusers?); refusing to guess what they do")
    for key, allowed in _REQUIRED.items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise ValueError(f"config {key}={value!r} is not supported by the snapjax UNet "
                             f"(supported: {' or '.join(repr(a) for a in allowed)})")
    only_cross = config.get("only_cross_attention", False)  # a bool or one per block
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        raise ValueError(f"config only_cross_attention={only_cross!r} is not supported by the "
                         "snapjax UNet (supported: False)")
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}

    channels = tuple(c["block_out_channels"])
    n = len(channels)
    down_types, up_types = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down_types) != n or len(up_types) != n:
        raise ValueError(f"config has {n} block_out_channels, {len(down_types)} down_block_types "
                         f"and {len(up_types)} up_block_types; they must match")
    for key, types, known in (("down_block_types", down_types, _DOWN_TYPES),
                              ("up_block_types", up_types, _UP_TYPES)):
        for t in types:
            if t not in known:
                raise ValueError(f"config {key} contains {t!r}; supported: {sorted(known)}")
    if c["mid_block_type"] not in _MID_TYPES:
        raise ValueError(f"config mid_block_type={c['mid_block_type']!r}; supported: "
                         f"{sorted(k for k in _MID_TYPES if k)} or None")
    if c["norm_num_groups"] is None:
        raise ValueError("config norm_num_groups=None (no output norm) is not supported by the "
                         "snapjax UNet")

    layers = _per_stage(c, "layers_per_block", n)
    # The diffusers quirk: attention_head_dim has always meant the number of heads for this
    # model (issue diffusers#2011); num_attention_heads, where set, is the same thing.
    heads = _per_stage(c, "attention_head_dim" if c["num_attention_heads"] is None
                       else "num_attention_heads", n)
    cross = set(_per_stage(c, "cross_attention_dim", n))
    if len(cross) != 1:
        raise ValueError(f"config cross_attention_dim={c['cross_attention_dim']!r}: per-block "
                         "context widths are not supported (one context for the whole UNet)")
    tlayers = _per_stage(c, "transformer_layers_per_block", n)
    for t in tlayers:
        if not isinstance(t, int):
            raise ValueError("config transformer_layers_per_block="
                             f"{c['transformer_layers_per_block']!r}: only one int per block is "
                             "supported")

    # up_block_types[i] is stage n-1-i: the up path runs deepest first.
    return UNetSpec(
        block_channels=channels,
        down=tuple((_DOWN_TYPES[down_types[s]],) * layers[s] for s in range(n)),
        up=tuple((_UP_TYPES[up_types[n - 1 - s]],) * (layers[s] + 1) for s in range(n)),
        mid=_MID_TYPES[c["mid_block_type"]],
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        num_heads=tuple(heads),
        context_dim=cross.pop(),
        transformer_layers=tuple(tlayers),
        use_linear_projection=bool(c["use_linear_projection"]),
        norm_groups=c["norm_num_groups"],
        norm_eps=float(c["norm_eps"]),
        time_embed_dim=c["time_embedding_dim"],
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=c["freq_shift"],
        guidance_embed_dim=int(c["time_cond_proj_dim"] or 0),
    )


def spec_fits_diffusers(spec: UNetSpec) -> str | None:
    """None if ``UNet2DConditionModel`` can express ``spec``, else the reason it cannot.

    diffusers' layer is one full ResNet, optionally followed by one transformer, the same in
    every layer of a block; its mid blocks are ``RAR``, ``R`` or none.
    """
    for path, units in (("down", spec.down), ("up", spec.up)):
        for s, stage in enumerate(units):
            if not stage:
                return f"{path}[{s}] has no units; diffusers blocks have at least one layer"
            if any("r" in u for u in stage):
                return (f"{path}[{s}]={stage}: a removed ResNet ('r') has no diffusers "
                        "equivalent (every diffusers layer has a full ResNet)")
            odd = [u for u in stage if u not in _LAYER_UNITS]
            if odd:
                return (f"{path}[{s}]={stage}: unit {odd[0]!r} has no diffusers equivalent (a "
                        "diffusers layer is one ResNet, optionally followed by one transformer: "
                        f"{' or '.join(map(repr, _LAYER_UNITS))})")
            if len(set(stage)) > 1:
                return (f"{path}[{s}]={stage}: a diffusers block has attention after every "
                        "ResNet or after none")
    if spec.mid not in _MID_TYPES.values():
        if "r" in spec.mid:
            return (f"mid={spec.mid!r}: a removed ResNet ('r') has no diffusers equivalent "
                    "(every diffusers layer has a full ResNet)")
        return (f"mid={spec.mid!r}: diffusers' mid blocks are "
                + ", ".join(f"{unit!r} ({name})" for name, unit in _MID_TYPES.items() if name)
                + " or none ('')")
    return None


def diffusers_config_from_spec(spec: UNetSpec) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config for ``spec``; ValueError where it does not fit."""
    reason = spec_fits_diffusers(spec)
    if reason:
        raise ValueError(f"spec does not fit diffusers' UNet2DConditionModel: {reason}")
    n = spec.num_stages
    down = {v: k for k, v in _DOWN_TYPES.items()}
    up = {v: k for k, v in _UP_TYPES.items()}
    mid = {v: k for k, v in _MID_TYPES.items()}
    return {
        "_class_name": CLASS_NAME,
        "in_channels": spec.in_channels,
        "out_channels": spec.out_channels,
        "flip_sin_to_cos": spec.flip_sin_to_cos,
        "freq_shift": spec.freq_shift,
        "down_block_types": [down[spec.down[s][0]] for s in range(n)],
        "up_block_types": [up[spec.up[s][0]] for s in reversed(range(n))],
        "mid_block_type": mid[spec.mid],
        "block_out_channels": list(spec.block_channels),
        "layers_per_block": [len(spec.down[s]) for s in range(n)],
        "norm_num_groups": spec.norm_groups,
        "norm_eps": spec.norm_eps,
        "cross_attention_dim": spec.context_dim,
        "transformer_layers_per_block": list(spec.transformer_layers),
        "attention_head_dim": list(spec.num_heads),  # means heads: see spec_from_diffusers_config
        "use_linear_projection": spec.use_linear_projection,
        "time_embedding_dim": spec.time_embed_dim,
        "time_cond_proj_dim": spec.guidance_embed_dim or None,
    }


# Flax block -> diffusers prefix, for the blocks diffusers has a slot for (the k = 0 names).
_BLOCK_PATTERNS = [
    (re.compile(r"down_(\d+)_(\d+)_res"), lambda s, u, n: f"down_blocks.{s}.resnets.{u}"),
    (re.compile(r"down_(\d+)_(\d+)_attn"), lambda s, u, n: f"down_blocks.{s}.attentions.{u}"),
    (re.compile(r"down_(\d+)_downsample"), lambda s, n: f"down_blocks.{s}.downsamplers.0"),
    (re.compile(r"up_(\d+)_(\d+)_res"), lambda s, u, n: f"up_blocks.{n - 1 - s}.resnets.{u}"),
    (re.compile(r"up_(\d+)_(\d+)_attn"), lambda s, u, n: f"up_blocks.{n - 1 - s}.attentions.{u}"),
    (re.compile(r"up_(\d+)_upsample"), lambda s, n: f"up_blocks.{n - 1 - s}.upsamplers.0"),
]
_TOP_LEVEL = {"mid_res_0": "mid_block.resnets.0", "mid_attn": "mid_block.attentions.0",
              "mid_res_1": "mid_block.resnets.1"}
_SAME_NAME = frozenset({"conv_in", "time_embedding", "conv_norm_out", "conv_out"})
# Blocks diffusers has no slot for: a unit's second and later ResNets and transformers
# (down_0_0_attn_1), the mid block's beyond RAR (mid_attn_1, mid_res_2). Only specs that do not
# fit diffusers have them (spec_fits_diffusers says why); they keep their Flax name as prefix.
_NO_DIFFUSERS_SLOT = re.compile(
    r"(down|up)_\d+_\d+_(res|attn)_\d+|mid_attn_\d+|mid_res_([2-9]|\d\d+)")
_INNER = {"to_out": "to_out.0", "ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2"}


def _top_prefix(top: str, num_stages: int) -> str:
    if top in _SAME_NAME or _NO_DIFFUSERS_SLOT.fullmatch(top):
        return top
    if top in _TOP_LEVEL:
        return _TOP_LEVEL[top]
    for pattern, fmt in _BLOCK_PATTERNS:
        m = pattern.fullmatch(top)
        if m:
            return fmt(*map(int, m.groups()), num_stages)
    raise ValueError(f"UNet module {top!r} has no diffusers name and is not a block name of "
                     "the spec grammar (snapjax.models.unet_spec); the weight-name map needs a "
                     "rule for it")


def _torch_prefix(flax_module: tuple[str, ...], num_stages: int) -> str:
    top, inner = flax_module[0], flax_module[1:]
    parts = [_top_prefix(top, num_stages)]
    for name in inner:
        m = re.fullmatch(r"block_(\d+)", name)
        parts.append(f"transformer_blocks.{m.group(1)}" if m else _INNER.get(name, name))
    return ".".join(parts)


def unet_module_map(spec: UNetSpec) -> dict[str, str]:
    """Flax module path -> diffusers module prefix, for exactly the modules ``spec`` has.

    For a spec that fits diffusers these are diffusers' names. Otherwise blocks diffusers has no
    slot for keep their Flax block name (``down_0_0_attn_1.transformer_blocks.0.attn1.to_q``):
    the file is a mirror file, not a diffusers checkpoint.
    """
    flat = traverse_util.flatten_dict(abstract_unet_params(spec))
    modules = sorted({path[:-1] for path in flat})
    return {"/".join(m): _torch_prefix(m, spec.num_stages) for m in modules}


def load_unet(path: str | Path, *, dtype: Any = jnp.float32) -> tuple[UNet, dict]:
    """A diffusers ``unet/`` folder (config.json + weights) -> (UNet module, float32 params).

    Strict: every tensor is used once and every parameter filled, or WeightsError names the
    tensor. ``dtype`` is the module's compute dtype.
    """
    folder = Path(path)  # local: pretrained.load_component copies a bucket's folder first
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder (expected a diffusers unet folder "
                                "with config.json and weights)")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (expected a diffusers unet folder with "
                         "config.json and weights)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = f" (for a pipeline folder pass {folder / 'unet'})" if (folder / "unet").is_dir() \
            else ""
        raise FileNotFoundError(f"{folder}: no config.json{hint}")
    config = read_config_json(folder)
    if config.get("_class_name") != CLASS_NAME:
        raise ValueError(f"{config_path}: _class_name={config.get('_class_name')!r}, expected "
                         f"{CLASS_NAME!r} (is this the unet/ folder of the pipeline?)")
    try:
        spec = spec_from_diffusers_config(config)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e

    weights_file = find_weights_file(folder)
    state_dict = load_state_dict(weights_file)
    params = params_from_state_dict(state_dict, unet_module_map(spec), abstract_unet_params(spec),
                                    where=str(weights_file))
    del state_dict
    return UNet(spec, dtype), jax.device_put(params)


__all__ = ["load_unet", "spec_from_diffusers_config", "spec_fits_diffusers",
           "diffusers_config_from_spec", "unet_module_map", "WeightsError"]
