"""Per-block Core ML packages for a phone latency table: one per distinct block signature, plus
the UNet's fixed part.

    snapjax export latency-blocks --spec snapfusion --resolution 512 --out DIR

Output folder::

  fixed.mlpackage                      the skeleton (snapjax.evolve.latency.skeleton: every
                                       block removed): conv_in, time embedding, the head
                                       ResNets' 1x1 shortcuts, resamplers, output head;
                                       inputs (sample, timestep)
  NN_<signature>.mlpackage             one block per distinct signature
                                       (snapjax.evolve.signature): a ResNet with inputs
                                       (x, temb), a transformer with inputs (x, context)
  NN_<signature>_shortcut.mlpackage    ResNets whose channels change: the 1x1 shortcut alone
  blocks.json                          what each package is (signature, file, input shapes)

A signature prices a ResNet's residual branch only (its shortcut stays when the block is
removed, so the skeleton holds it): the timing script (export/coreml/time_blocks_macos.py, on a
Mac) subtracts the shortcut package from the block's. Removed head ResNets get their residual
branch's package too, so the table prices re-adding them. Weights are random (PyTorch's default
init): an uncompressed fp16 model's speed does not depend on them. The table's reader is
:mod:`snapjax.evolve.latency` (UNet cost = fixed + the blocks' entries).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable

import numpy as np
import torch
from etils import epath
from torch import nn

from export.coreml.convert import TensorIO, convert_module
from export.torch.layers import ATTENTION_IMPLEMENTATIONS
from export.torch.unet import UNetMirror, block_module
from snapjax.evolve.latency import skeleton
from snapjax.evolve.signature import CONTEXT_LENGTH, block_side, block_signature
from snapjax.models.unet_spec import PRESETS, Block, UNetSpec
from snapjax import storage
from snapjax.pretrained import replace_folder

BLOCKS_FILE = "blocks.json"
FORMAT = "snapjax-latency-blocks-v1"
FIXED_FILE = "fixed.mlpackage"
OUTPUT_NAME = "out"


class _Transformer(nn.Module):
    """(x, context) -> x: a transformer with its attention layout bound, for tracing."""

    def __init__(self, block: nn.Module, attention: str):
        super().__init__()
        self.block, self.attention = block, attention

    def forward(self, x_BCHW: torch.Tensor, ctx_BSD: torch.Tensor) -> torch.Tensor:
        return self.block(x_BCHW, ctx_BSD, self.attention)


class _Skeleton(nn.Module):
    """(sample, timestep) -> (output, time embedding) of the skeleton UNet. No block reads the
    time embedding there, so it is an output: otherwise Core ML would drop its MLP, which the
    fixed part includes."""

    def __init__(self, mirror: UNetMirror):
        super().__init__()
        self.mirror = mirror

    def forward(self, sample_BCHW: torch.Tensor,
                timestep_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec, B = self.mirror.spec, sample_BCHW.shape[0]
        ctx_BSD = torch.zeros(B, 1, spec.context_dim, dtype=sample_BCHW.dtype)
        # A guidance-conditioned UNet needs its (B, G) guidance input: a constant zero here, as
        # the context is. Core ML may fold cond_proj away then; a G x F matmul is next to free.
        cond = ({"timestep_cond_BG": torch.zeros(B, spec.guidance_embed_dim,
                                                 dtype=sample_BCHW.dtype)}
                if spec.guidance_embed_dim else {})
        return (self.mirror(sample_BCHW, timestep_B, ctx_BSD, **cond),
                self.mirror.embed_time(timestep_B, B, **cond))


def _slug(signature: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", signature).strip("_")


def _save(module: nn.Module, inputs: list[TensorIO], path: epath.Path, precision: str,
          metadata: dict[str, str], outputs: tuple[str, ...] = (OUTPUT_NAME,)) -> dict:
    gen = torch.Generator().manual_seed(0)
    examples = tuple(torch.randn(io.shape, generator=gen) for io in inputs)
    model = convert_module(module.eval(), inputs, outputs, examples, precision=precision)
    model.author = "snapjax export latency-blocks"
    for key, value in metadata.items():
        model.user_defined_metadata[f"snapjax.{key}"] = value
    model.save(str(path))
    return {"file": path.name, "inputs": {io.name: list(io.shape) for io in inputs}}


def _block_packages(spec: UNetSpec, block: Block, side: int, context_length: int,
                    attention: str, dtype: type) -> list[tuple[str, nn.Module, list[TensorIO]]]:
    """(role, module, inputs) of a block's packages: ("package", ...) and, for a ResNet whose
    channels change, ("shortcut", ...)."""
    x = TensorIO("x", (1, block.in_channels, side, side), dtype)
    if block.kind == "attn":
        context = TensorIO("context", (1, context_length, spec.context_dim), dtype)
        return [("package", _Transformer(block_module(spec, block), attention), [x, context])]
    full = block_module(spec, dataclasses.replace(block, removed=False))
    packages = [("package", full, [x, TensorIO("temb", (1, spec.time_dim), dtype)])]
    if block.has_shortcut_conv:
        packages.append(("shortcut", block_module(spec, dataclasses.replace(block, removed=True)),
                         [x]))
    return packages


def export_latency_blocks(spec: UNetSpec, latent_side: int, out: str | os.PathLike, *,
                          context_length: int = CONTEXT_LENGTH, attention: str = "split_einsum",
                          precision: str = "float16", overwrite: bool = False,
                          log: Callable[[str], None] = print) -> dict:
    """Write the packages and ``blocks.json`` (returned) for ``spec`` at ``latent_side`` to
    ``out`` (local or ``gs://``)."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={attention!r}: expected one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    dtype = np.float16 if precision == "float16" else np.float32
    by_signature: dict[str, list[Block]] = {}
    for block in spec.blocks():
        by_signature.setdefault(block_signature(spec, block, latent_side, context_length),
                                []).append(block)
    meta: dict = {"format": FORMAT, "latent_side": latent_side, "context_length": context_length,
                  "attention": attention, "precision": precision,
                  "spec": json.loads(spec.to_json())}

    def write(tmp: epath.Path) -> None:  # local: coremltools saves local packages
        fixed_spec = skeleton(spec)
        log(f"fixed: the skeleton UNet at {latent_side}x{latent_side}")
        inputs = [TensorIO("sample", (1, spec.in_channels, latent_side, latent_side), dtype),
                  TensorIO("timestep", (1,), dtype)]
        meta["fixed"] = _save(_Skeleton(UNetMirror(fixed_spec, attention)), inputs,
                              tmp / FIXED_FILE, precision,
                              {"role": "fixed", "spec": fixed_spec.to_json()},
                              outputs=(OUTPUT_NAME, "temb"))
        meta["blocks"] = []
        for i, (signature, blocks) in enumerate(by_signature.items()):
            log(f"[{i + 1}/{len(by_signature)}] {signature}")
            side = block_side(spec, blocks[0], latent_side)
            entry = {"signature": signature, "kind": blocks[0].kind,
                     "names": [b.name for b in blocks],
                     "removed": [b.name for b in blocks if b.removed], "shortcut": None}
            for role, module, inputs in _block_packages(spec, blocks[0], side, context_length,
                                                        attention, dtype):
                stem = f"{i:02d}_{_slug(signature)}" + ("_shortcut" if role == "shortcut" else "")
                saved = _save(module, inputs, tmp / f"{stem}.mlpackage", precision,
                              {"role": role, "signature": signature})
                entry[role] = saved
            meta["blocks"].append(entry)
        (tmp / BLOCKS_FILE).write_text(json.dumps(meta, indent=1))

    replace_folder(out, write, overwrite=overwrite)
    return meta


def resolve_spec(name_or_folder: str) -> tuple[UNetSpec, int]:
    """(UNet spec, VAE factor) of a preset name, a UNet model folder or a pipeline folder (local
    or ``gs://``).

    The VAE factor (image side / latent side) is the pipeline's VAE's where there is one, else
    SD-v1.5's.
    """
    from snapjax.models import vae
    from snapjax.pretrained import read_spec

    if name_or_folder in PRESETS:
        return PRESETS[name_or_folder], vae.SD15.downsample_factor
    path = storage.path(name_or_folder)
    with storage.clear_errors(name_or_folder, "read"):
        found = path.is_dir()
    if not found:
        raise ValueError(f"--spec {name_or_folder!r} is neither a UNet preset "
                         f"({', '.join(sorted(PRESETS))}) nor a folder")
    if (path / "unet").is_dir():
        factor = (read_spec(path / "vae", "vae").downsample_factor if (path / "vae").is_dir()
                  else vae.SD15.downsample_factor)
        return read_spec(path / "unet", "unet"), factor
    return read_spec(path, "unet"), vae.SD15.downsample_factor
