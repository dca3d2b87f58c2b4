"""Latency tables: what each UNet block costs, from one of three sources.

    table = latency_table(spec, resolution=512, source="macs")      # GFLOP, from shapes only
    table = latency_table(spec, resolution=512, source="measured")  # ms on this backend
    table = latency_table(spec, resolution=512, source="phone.json")  # ms measured elsewhere
    table["up_1_0_attn"], table.fixed, table.total

A table maps every droppable block of ``spec`` to its cost; ``fixed`` is what no block action
changes (conv_in, time embedding, resamplers, the 1x1 shortcuts a removed head ResNet keeps,
the output head), so the UNet costs ``fixed + sum(table.values())`` and removing a block lowers
that by exactly its entry. Costs are looked up by block signature
(:mod:`snapjax.evolve.signature`), so duplicates are priced too. At batch 1, like the paper's
phone numbers and ``snapjax summary``.

JSON tables (``export/coreml/time_blocks_macos.py`` writes them from per-block Core ML packages)::

  {"format": "snapjax-latency-v1", "unit": "ms", "device": "iPhone 14 Pro",
   "latent_side": 64, "blocks": {"res:320->320@64x64": 3.1, ...}, "fixed": 12.0}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from snapjax import storage
from snapjax.evolve.signature import CONTEXT_LENGTH, block_side, block_signature
from snapjax.flops import matmul_flops
from snapjax.models.layers import ResnetBlock
from snapjax.models.unet import Transformer2D, UNet
from snapjax.models.unet_spec import Block, UNetSpec

JSON_FORMAT = "snapjax-latency-v1"
BUILTIN_SOURCES = ("macs", "measured")


@dataclasses.dataclass(frozen=True)
class LatencyTable(Mapping):
    """Block name -> cost (a read-only mapping), plus the fixed part and the unit."""

    blocks: dict[str, float]
    fixed: float
    unit: str  # "GFLOP" or "ms"
    source: str
    latent_side: int

    def __getitem__(self, name: str) -> float:
        if name not in self.blocks:
            raise KeyError(f"no block {name!r} in this latency table ({self.source}); "
                           f"blocks: {', '.join(self.blocks)}")
        return self.blocks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def total(self) -> float:
        return self.fixed + sum(self.blocks.values())


def skeleton(spec: UNetSpec) -> UNetSpec:
    """``spec`` with every block removed: what is left is the fixed part of any spec evolution
    reaches from it (unit counts, and so skips, resamplers and shortcuts, never change)."""
    def strip(stage):
        return tuple("r" for _ in stage)
    return dataclasses.replace(spec, down=tuple(strip(st) for st in spec.down),
                               up=tuple(strip(st) for st in spec.up),
                               mid="r" if spec.mid else "")


def latent_side_of(resolution: int, downsample_factor: int) -> int:
    if resolution <= 0 or resolution % downsample_factor:
        raise ValueError(f"resolution {resolution} is not a positive multiple of the VAE's "
                         f"downsample factor {downsample_factor}")
    return resolution // downsample_factor


def latency_table(spec: UNetSpec, resolution: int, source: str, *, downsample_factor: int = 8,
                  context_length: int = CONTEXT_LENGTH, repeats: int = 20,
                  prices: dict[str, float] | None = None) -> LatencyTable:
    """The cost of each block of ``spec`` at ``resolution`` pixels (``resolution /
    downsample_factor`` latents). ``source``: "macs", "measured" or a JSON file's path.

    ``prices``: signature -> cost, filled here and reused by later calls for specs evolved from
    the same UNet (evolution prices each new signature once, not each new spec); the fixed part
    is stored under the key "fixed"."""
    side = latent_side_of(resolution, downsample_factor)
    live = [b for b in spec.blocks() if not b.removed]
    by_signature = {} if prices is None else prices
    if source == "macs":
        cost = functools.partial(_block_gflop, spec, side, context_length)
        fixed_cost, unit = functools.partial(_unet_gflop, skeleton(spec), side,
                                             context_length), "GFLOP"
    elif source == "measured":
        cost = functools.partial(_block_ms, spec, side, context_length, repeats)
        fixed_cost, unit = functools.partial(_unet_ms, skeleton(spec), side, context_length,
                                             repeats), "ms"
    else:
        return _json_table(spec, live, side, context_length, source)
    if "fixed" not in by_signature:
        by_signature["fixed"] = fixed_cost()
    fixed = by_signature["fixed"]
    blocks = {}
    for b in live:
        sig = block_signature(spec, b, side, context_length)
        if sig not in by_signature:
            by_signature[sig] = cost(b)
        blocks[b.name] = by_signature[sig]
    return LatencyTable(blocks, fixed, unit, source, side)


def unet_cost(spec: UNetSpec, table: LatencyTable) -> float:
    """``spec``'s cost by ``table``'s prices: fixed + its blocks (names must be in the table)."""
    return table.fixed + sum(table[name] for name in spec.block_names())


# ----------------------------------------------------------------------------- one block alone

def _block_module_and_inputs(spec: UNetSpec, block: Block, side: int, context_length: int,
                             residual: bool = True):
    """The block as a module of its own, with its batch-1 input shapes at UNet latent side
    ``side``: a ResNet (x, temb), a transformer (x, context)."""
    side = block_side(spec, block, side)
    x = jax.ShapeDtypeStruct((1, side, side, block.in_channels), jnp.float32)
    if block.kind == "res":
        module = ResnetBlock(block.out_channels, spec.norm_groups, spec.norm_eps,
                             residual=residual)
        other = jax.ShapeDtypeStruct((1, spec.time_dim), jnp.float32)
    else:
        module = Transformer2D(spec.num_heads[block.stage], spec.transformer_layers[block.stage],
                               spec.norm_groups, spec.use_linear_projection)
        other = jax.ShapeDtypeStruct((1, context_length, spec.context_dim), jnp.float32)
    return module, (x, other)


def _module_gflop(module, inputs) -> float:
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    return matmul_flops(lambda p, *a: module.apply({"params": p}, *a), params, *inputs) / 1e9


def _block_gflop(spec: UNetSpec, side: int, context_length: int, block: Block) -> float:
    full = _module_gflop(*_block_module_and_inputs(spec, block, side, context_length))
    if block.kind == "res" and block.has_shortcut_conv:
        full -= _module_gflop(*_block_module_and_inputs(spec, block, side, context_length,
                                                        residual=False))
    return full


def _unet_inputs(spec: UNetSpec, side: int, context_length: int):
    inputs = (jax.ShapeDtypeStruct((1, side, side, spec.in_channels), jnp.float32),
              jax.ShapeDtypeStruct((1,), jnp.int32),
              jax.ShapeDtypeStruct((1, context_length, spec.context_dim), jnp.float32))
    if spec.guidance_embed_dim:  # no block mask; the guidance scale
        inputs += (None, jax.ShapeDtypeStruct((1,), jnp.float32))
    return inputs


def _unet_gflop(spec: UNetSpec, side: int, context_length: int) -> float:
    """The UNet's GFLOP at batch 1, counted as ``snapjax summary`` counts it."""
    from snapjax.models.unet import abstract_unet_params
    module = UNet(spec)
    return matmul_flops(lambda p, *a: module.apply({"params": p}, *a),
                        abstract_unet_params(spec), *_unet_inputs(spec, side, context_length)) / 1e9


# ----------------------------------------------------------------------------- measured

def _median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _random_like(tree, seed: int = 0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([0.02 * jax.random.normal(k, a.shape, a.dtype)
                              for k, a in zip(keys, leaves)])


def _time_module(module, inputs, repeats: int) -> float:
    params = _random_like(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    args = _random_like(inputs, seed=1)
    fn = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    return _median_ms(fn, (params, *args), repeats)


def _block_ms(spec: UNetSpec, side: int, context_length: int, repeats: int,
              block: Block) -> float:
    full = _time_module(*_block_module_and_inputs(spec, block, side, context_length), repeats)
    if block.kind == "res" and block.has_shortcut_conv:
        shortcut = _time_module(*_block_module_and_inputs(spec, block, side, context_length,
                                                          residual=False), repeats)
        full = max(full - shortcut, 0.0)
    return full


def _unet_ms(spec: UNetSpec, side: int, context_length: int, repeats: int) -> float:
    from snapjax.models.unet import abstract_unet_params
    module = UNet(spec)
    params = _random_like(abstract_unet_params(spec))
    x, t, ctx = _unet_inputs(spec, side, context_length)[:3]
    args = (_random_like(x, 1), jnp.full((1,), 500, jnp.int32), _random_like(ctx, 2))
    if spec.guidance_embed_dim:
        args += (None, jnp.full((1,), 4.0, jnp.float32))
    fn = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
    return _median_ms(fn, (params, *args), repeats)


# ----------------------------------------------------------------------------- JSON

def _cost_value(value, path: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: {key} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{path}: {key} is negative ({value}); a latency is >= 0")
    return float(value)


def read_latency_json(path: str | os.PathLike) -> dict:
    """The checked contents of a latency JSON file; errors name the file and the key."""
    path = storage.path(path)
    if not path.is_file():
        raise ValueError(f"latency source {str(path)!r} is neither {' nor '.join(BUILTIN_SOURCES)}"
                         " nor an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON latency table ({e})") from None
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
        raise ValueError(f"{path}: expected an object with \"format\": \"{JSON_FORMAT}\"")
    for key in ("blocks", "fixed", "latent_side"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    if not isinstance(data["blocks"], dict):
        raise ValueError(f"{path}: 'blocks' must map block signatures to costs")
    blocks = {sig: _cost_value(v, str(path), f"blocks[{sig!r}]")
              for sig, v in data["blocks"].items()}
    return {"blocks": blocks, "fixed": _cost_value(data["fixed"], str(path), "fixed"),
            "latent_side": data["latent_side"], "unit": data.get("unit", "ms"),
            "device": data.get("device", "unknown")}


def _json_table(spec: UNetSpec, live: list[Block], side: int, context_length: int,
                path: str) -> LatencyTable:
    data = read_latency_json(path)
    if data["latent_side"] != side:
        raise ValueError(f"{path}: measured at latent side {data['latent_side']}, but this "
                         f"table is for {side} (resolution / downsample factor)")
    blocks, missing = {}, []
    for b in live:
        sig = block_signature(spec, b, side, context_length)
        if sig not in data["blocks"]:
            missing.append(f"{b.name} ({sig})")
        else:
            blocks[b.name] = data["blocks"][sig]
    if missing:
        raise ValueError(f"{path}: no cost for block(s) {', '.join(missing)}; measure their "
                         "signatures (export/coreml/time_blocks_macos.py) and add them")
    return LatencyTable(blocks, data["fixed"], data["unit"], str(path), side)
