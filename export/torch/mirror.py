"""Flax params -> PyTorch mirrors, and mirror folders on disk.

The weight names on disk are those of the shared declarative maps in ``snapjax.convert``
(``unet_module_map``, ``vae_module_map``, ``text_encoder_module_map``): the maps the importer reads
diffusers/transformers checkpoints with are the maps the exporter writes them with. A mirror file
for an SD-v1.5-shaped UNet is therefore a diffusers UNet state dict. Inside the mirror, modules
carry the Flax names; :func:`mirror_names` translates between the two.

A mirror folder holds ``snapjax_mirror.json`` (component kind and snapjax spec) and
``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from etils import epath

from snapjax import pretrained, storage
from snapjax.convert.mapping import state_dict_from_params
from snapjax.convert.state_dict import WeightsError

# Components a mirror exists for. "vae_decoder" is built from a snapjax "vae" model folder.
KINDS = ("unet", "vae_decoder", "text_encoder")
MIRROR_FILE = "snapjax_mirror.json"
WEIGHTS_FILE = "model.safetensors"


def spec_class(kind: str):
    """The spec dataclass of a mirror kind (a decoder mirror is built from a VAE spec)."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
    return pretrained.spec_class("vae" if kind == "vae_decoder" else kind)


def build_mirror(kind: str, spec: Any, *, attention: str = "original") -> nn.Module:
    """An uninitialised mirror (eval mode) of the component ``kind`` with ``spec``."""
    if kind == "unet":
        from export.torch.unet import UNetMirror
        module = UNetMirror(spec, attention=attention)
    elif kind == "vae_decoder":
        from export.torch.vae import VAEDecoderMirror
        module = VAEDecoderMirror(spec)
    elif kind == "text_encoder":
        from export.torch.text_encoder import TextEncoderMirror
        module = TextEncoderMirror(spec)
    else:
        raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")
    return module.eval()


def shared_module_map(kind: str, spec: Any) -> dict[str, str]:
    """The declarative Flax-module -> diffusers/transformers name map of ``snapjax.convert``."""
    if kind == "unet":
        from snapjax.convert.unet import unet_module_map
        return unet_module_map(spec)
    if kind == "vae_decoder":
        from snapjax.convert.vae import vae_module_map
        return vae_module_map(spec)
    if kind == "text_encoder":
        from snapjax.convert.text_encoder import text_encoder_module_map
        return text_encoder_module_map(spec)
    raise ValueError(f"unknown component kind {kind!r}; expected one of {KINDS}")


def component_params(kind: str, params: Mapping) -> dict:
    """The part of a snapjax param tree a mirror uses (the decoder half of a full VAE)."""
    if kind == "vae_decoder" and "encoder" in params:
        from snapjax.models.vae import decoder_params
        return decoder_params(dict(params))
    return dict(params)


def export_state_dict(kind: str, spec: Any, params: Mapping) -> dict[str, np.ndarray]:
    """Flax params -> float32 numpy state dict under the shared (diffusers/transformers) names."""
    return state_dict_from_params(component_params(kind, params), shared_module_map(kind, spec),
                                  where=f"{kind} params")


def mirror_names(kind: str, spec: Any) -> dict[str, str]:
    """Shared-map module prefix -> mirror module prefix (the Flax path with dots)."""
    return {torch_prefix: flax_path.replace("/", ".")
            for flax_path, torch_prefix in shared_module_map(kind, spec).items()}


def load_into_mirror(mirror: nn.Module, kind: str, spec: Any,
                     state_dict: Mapping[str, np.ndarray], where: str) -> nn.Module:
    """Load a shared-name state dict into ``mirror``; strict, errors name the tensor."""
    rename = mirror_names(kind, spec)
    renamed, problems = {}, []
    for name, value in state_dict.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in rename:
            problems.append(f"unexpected tensor {name!r}")
            continue
        renamed[f"{rename[prefix]}.{leaf}"] = torch.from_numpy(np.array(value, dtype=np.float32))
    expected = mirror.state_dict()
    problems += [f"missing tensor for mirror parameter {k!r}" for k in expected if k not in renamed]
    problems += [f"tensor for {k!r} has shape {tuple(v.shape)}, the mirror expects "
                 f"{tuple(expected[k].shape)}"
                 for k, v in renamed.items() if k in expected and v.shape != expected[k].shape]
    problems += [f"no mirror parameter {k!r}" for k in renamed if k not in expected]
    if problems:
        raise WeightsError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems[:6])
                           + (" ..." if len(problems) > 6 else ""))
    mirror.load_state_dict(renamed, strict=True)
    return mirror


def mirror_from_params(kind: str, spec: Any, params: Mapping, *,
                       attention: str = "original") -> nn.Module:
    """A float32 mirror holding ``params`` (a snapjax param tree for ``kind``)."""
    mirror = build_mirror(kind, spec, attention=attention)
    return load_into_mirror(mirror, kind, spec, export_state_dict(kind, spec, params),
                            where=f"{kind} params")


def save_mirror(folder: str | os.PathLike, kind: str, spec: Any, params: Mapping) -> epath.Path:
    """Write ``snapjax_mirror.json`` + ``model.safetensors`` (shared names) to a new folder
    (local or ``gs://``; refuses an existing one)."""
    from safetensors.numpy import save_file

    state_dict = export_state_dict(kind, spec, params)

    def write(tmp: epath.Path) -> None:  # tmp is local: safetensors writes local files
        (tmp / MIRROR_FILE).write_text(json.dumps(
            {"kind": kind, "spec": json.loads(spec.to_json()),
             "weight_names": "diffusers" if kind != "text_encoder" else "transformers"},
            indent=1))
        save_file(state_dict, str(tmp / WEIGHTS_FILE))

    return pretrained.replace_folder(folder, write)


def load_mirror(folder: str | os.PathLike, *, attention: str = "original") -> nn.Module:
    """A mirror from a folder written by :func:`save_mirror` (local or ``gs://``); ``.spec`` and
    ``.kind`` are set."""
    from safetensors.numpy import load_file

    given, folder = folder, storage.path(folder)
    meta_path = folder / MIRROR_FILE
    with storage.clear_errors(given, "read"):
        if not meta_path.is_file():
            raise FileNotFoundError(f"{given}: not a mirror folder (no {MIRROR_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        kind = meta["kind"]
        spec = spec_class(kind).from_dict(meta["spec"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path}: malformed mirror file ({e})") from e
    mirror = build_mirror(kind, spec, attention=attention)
    with storage.local_folder(folder) as local:  # safetensors reads local files only
        weights = load_file(str(local / WEIGHTS_FILE))
    load_into_mirror(mirror, kind, spec, weights, where=str(folder / WEIGHTS_FILE))
    mirror.kind = kind
    return mirror


