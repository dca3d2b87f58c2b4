"""Parameters and GFLOPs per component, for a model folder or a preset.

FLOPs are 2 per multiply-add of every matmul and convolution of the forward pass at batch 1
(:mod:`snapjax.flops`), traced from shapes only: no weights are allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from snapjax import pretrained, storage
from snapjax.flops import matmul_flops


@dataclasses.dataclass(frozen=True)
class ComponentSummary:
    name: str
    params: int
    gflops: float
    input_shape: tuple[int, ...]


def _count(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _shape(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def summarize(components: dict[str, tuple[str, Any]], resolution: int = 512
              ) -> list[ComponentSummary]:
    """``components``: name -> (kind, spec). ``resolution``: image side in pixels."""
    vae_spec = next((spec for kind, spec in components.values() if kind == "vae"), None)
    factor = vae_spec.downsample_factor if vae_spec is not None else 8
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    latent = resolution // factor
    rows = []
    for name, (kind, spec) in components.items():
        module = pretrained.build_module(kind, spec)
        params = pretrained.abstract_params(kind, spec)
        if kind == "unet":
            x = _shape((1, latent, latent, spec.in_channels))
            args = (x, _shape((1,), jnp.int32), _shape((1, 77, spec.context_dim)))
            if spec.guidance_embed_dim:  # one call gives the guided output: w is an input
                args += (None, _shape((1,), jnp.float32))
            rows.append(ComponentSummary(
                "unet", _count(params),
                matmul_flops(lambda p, *a: module.apply({"params": p}, *a), params, *args) / 1e9,
                x.shape))
        elif kind == "vae":
            z = _shape((1, latent, latent, spec.latent_channels))
            dec = {k: v for k, v in params.items() if k in ("decoder", "post_quant_conv")}
            rows.append(ComponentSummary(
                "vae_decoder", _count(dec),
                matmul_flops(lambda p, z: module.apply({"params": p}, z, method="decode"), params, z) / 1e9,
                z.shape))
            x = _shape((1, resolution, resolution, spec.in_channels))
            enc = {k: v for k, v in params.items() if k in ("encoder", "quant_conv")}
            rows.append(ComponentSummary(
                "vae_encoder", _count(enc),
                matmul_flops(lambda p, x: module.apply({"params": p}, x, method="encode"), params, x) / 1e9,
                x.shape))
        elif kind == "text_encoder":
            ids = _shape((1, spec.max_length), jnp.int32)
            rows.append(ComponentSummary(
                "text_encoder", _count(params),
                matmul_flops(lambda p, i: module.apply({"params": p}, i), params, ids) / 1e9, ids.shape))
    return rows


PRESETS = ("sd15", "snapfusion", "tiny")


def preset_components(name: str) -> dict[str, tuple[str, Any]]:
    """A built-in model's specs. ``snapfusion``: the paper's efficient UNet (Table 3) and the
    50%-channel decoder, with SD-v1.5's encoder and text encoder."""
    from snapjax.models import text_encoder, unet_spec, vae
    if name == "snapfusion":
        return {"unet": ("unet", unet_spec.preset(name)),
                "vae": ("vae", vae.pruned(vae.preset("sd15"), 0.5)),
                "text_encoder": ("text_encoder", text_encoder.preset("sd15"))}
    return {"unet": ("unet", unet_spec.preset(name)), "vae": ("vae", vae.preset(name)),
            "text_encoder": ("text_encoder", text_encoder.preset(name))}


def folder_components(path: str | os.PathLike) -> dict[str, tuple[str, Any]]:
    """Specs of a pipeline root (its unet/, vae/, text_encoder/) or of one model folder, local
    or ``gs://``."""
    path = storage.path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder")
    found = {}
    for kind in pretrained.KINDS:
        sub = path / kind
        if sub.is_dir():
            found[kind] = (kind, pretrained.read_spec(sub, kind))
    if not found:
        for kind in pretrained.KINDS:
            try:
                found[kind] = (kind, pretrained.read_spec(path, kind))
                break
            except ValueError:
                continue
    if not found:
        raise ValueError(f"{path}: neither a pipeline folder (unet/, vae/, text_encoder/) nor a "
                         "model folder snapjax can read")
    return found


def format_table(rows: list[ComponentSummary], resolution: int) -> str:
    lines = [f"{'component':<14}{'params (M)':>12}{'GFLOP':>12}  input (at {resolution}px)"]
    for r in rows:
        lines.append(f"{r.name:<14}{r.params / 1e6:>12.1f}{r.gflops:>12.1f}  {r.input_shape}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="pipeline folder or one model folder (snapjax or diffusers)")
    src.add_argument("--preset", choices=PRESETS, help="a built-in spec, no weights")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    components = (preset_components(args.preset) if args.preset
                  else folder_components(args.model))
    rows = summarize(components, args.resolution)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    else:
        print(format_table(rows, args.resolution))
    return 0
