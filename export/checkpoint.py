"""What the exporters read: a pipeline folder or a single model folder, as Flax specs and params.

Accepted ``--checkpoint`` folders:

* a pipeline folder (``snapjax_pipeline.json`` or a diffusers ``model_index.json``) with
  ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``; each component folder may be a snapjax
  model folder or a diffusers/transformers one (:func:`snapjax.pretrained.load_component`);
* a folder with those four subfolders but no pipeline file;
* a single snapjax model folder (``snapjax_model.json``) or a diffusers/transformers component
  folder: only that component is exported.

Anything else (a training checkpoint, another pipeline class, another model kind) is refused
with a message saying what was found and what is expected. Folders may be local or ``gs://``
(:mod:`snapjax.storage`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath

from snapjax import pretrained, storage
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.pipeline import PIPELINE_FILE, read_pipeline_file

COMPONENT_FOLDERS = ("unet", "vae", "text_encoder")
# diffusers / transformers class names of component folders, and the snapjax kind they hold.
_CLASS_KINDS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae",
                "CLIPTextModel": "text_encoder"}


@dataclasses.dataclass
class Component:
    kind: str          # "unet" | "vae" | "text_encoder" (snapjax model kinds)
    spec: Any
    params: Any        # the Flax param tree (a full VAE's for "vae")
    source: epath.Path


@dataclasses.dataclass
class ExportSource:
    path: epath.Path
    components: dict[str, Component]
    tokenizer_dir: epath.Path | None = None
    schedule: NoiseSchedule | None = None
    sample_size: int | None = None          # latent side the pipeline samples at by default
    num_steps: int | None = None            # sampling defaults, where the pipeline records them
    guidance_scale: float | None = None

    @property
    def is_pipeline(self) -> bool:
        return set(COMPONENT_FOLDERS) <= set(self.components) and self.tokenizer_dir is not None


def _component_kind(folder: epath.Path) -> str | None:
    """The kind a component folder holds, or None if it is no model folder we know."""
    if pretrained.is_snapjax_model(folder):
        kind, _ = pretrained.read_model_spec(folder)
        return kind
    config = folder / "config.json"
    if config.is_file():
        try:
            meta = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config}: not valid JSON ({e})") from e
        name = meta.get("_class_name") or (meta.get("architectures") or [None])[0]
        if name in _CLASS_KINDS:
            return _CLASS_KINDS[name]
        found = name or meta.get("model_type")
        raise ValueError(f"{folder}: holds a {found!r} model; the exporter "
                         f"knows {', '.join(_CLASS_KINDS)} (diffusers/transformers) and snapjax "
                         f"model folders of kind {', '.join(pretrained.KINDS)}")
    return None


def _load_component(folder: epath.Path, kind: str) -> Component:
    found = _component_kind(folder)
    if found is None:
        raise FileNotFoundError(f"{folder}: not a model folder (no {pretrained.MODEL_FILE} and "
                                "no config.json)")
    if found != kind:
        raise ValueError(f"{folder} holds a {found!r} model, expected {kind!r}")
    module, params = pretrained.load_component(folder, kind)
    return Component(kind, module.spec, params, folder)


def _describe_unknown(path: epath.Path) -> str:
    steps = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()] if path.is_dir() else []
    if steps and any((p / "state").is_dir() for p in steps):
        return (f"{path} is a training checkpoint (Orbax step folders); export a model or "
                "pipeline folder saved from it instead")
    return (f"{path}: not a pipeline folder ({PIPELINE_FILE} or model_index.json with unet/, "
            f"vae/, text_encoder/, tokenizer/) nor a model folder ({pretrained.MODEL_FILE} or a "
            "diffusers/transformers config.json)")


def load_source(path: str | os.PathLike,
                components: tuple[str, ...] | None = None) -> ExportSource:
    """Read ``path`` (see module docstring); ``components`` restricts which are loaded."""
    given, path = path, storage.path(path)
    with storage.clear_errors(given, "read"):  # a missing bucket or no permission: one line
        if not path.is_dir():
            raise FileNotFoundError(f"{given}: no such folder (expected a snapjax pipeline or "
                                    "model folder)")
    wanted = tuple(components or COMPONENT_FOLDERS)
    for kind in wanted:
        if kind not in COMPONENT_FOLDERS:
            raise ValueError(f"unknown component {kind!r}; expected some of {COMPONENT_FOLDERS}")

    single = _component_kind(path)
    if single is not None:
        if components and single not in components:
            raise ValueError(f"{path} holds a {single!r} model, but components "
                             f"{', '.join(components)} were asked for")
        comp = _load_component(path, single)
        return ExportSource(path, {single: comp})

    index = path / "model_index.json"
    if index.is_file():
        cls = json.loads(index.read_text()).get("_class_name")
        if cls != "StableDiffusionPipeline":
            raise ValueError(f"{index}: a {cls!r}; the exporter reads StableDiffusionPipeline "
                             "folders (SD-v1.5 family) and snapjax pipeline folders")
    present = [k for k in COMPONENT_FOLDERS if (path / k).is_dir()]
    if not present:
        raise ValueError(_describe_unknown(path))
    missing = [k for k in wanted if k not in present]
    if missing:
        raise FileNotFoundError(f"{path}: pipeline folder without "
                                f"{', '.join(m + '/' for m in missing)}")
    source = ExportSource(path, {k: _load_component(path / k, k) for k in wanted})
    if (path / "tokenizer").is_dir():
        source.tokenizer_dir = path / "tokenizer"
    _read_sampling(path, source)
    return source


def peek_unet_spec(path: str | os.PathLike):
    """The UNet spec of a pipeline folder or UNet model folder from its metadata alone (no
    weights), for checks that should fail before a large checkpoint is read; None where there is
    none to read (:func:`load_source` then says what is wrong)."""
    path = storage.path(path)
    for folder in (path / "unet", path):
        with storage.clear_errors(folder, "read"):
            found = folder.is_dir()
        if found:
            try:
                return pretrained.read_spec(folder, "unet")
            except (ValueError, KeyError, TypeError):
                continue
    return None


def _read_sampling(path: epath.Path, source: ExportSource) -> None:
    if (path / PIPELINE_FILE).is_file():
        meta = read_pipeline_file(path)
        source.schedule, source.sample_size = meta.schedule, meta.sample_size
        source.num_steps, source.guidance_scale = meta.num_steps, meta.guidance_scale
        return
    config = path / "scheduler" / "scheduler_config.json"
    if config.is_file():
        source.schedule = NoiseSchedule.from_diffusers_config(config)
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file():
        source.sample_size = json.loads(unet_config.read_text()).get("sample_size")
