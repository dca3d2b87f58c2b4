"""snapjax's own model folders: a spec JSON beside Orbax-saved params.

A model folder holds ``snapjax_model.json`` (``{"kind": "unet"|"vae"|"text_encoder", "spec": {...}}``)
and ``params/`` (an Orbax StandardCheckpointer tree). Later stages read these and never need
PyTorch; :func:`load_component` also accepts a diffusers/transformers folder of the same kind.
Folders may be local or ``gs://`` (:mod:`snapjax.storage`). Writes go to a temporary folder put
into place at the end, so a crash never leaves a half-written model that loads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from snapjax import storage

log = logging.getLogger(__name__)

MODEL_FILE = "snapjax_model.json"
KINDS = ("unet", "vae", "text_encoder")


def spec_class(kind: str):
    """The spec dataclass of a model kind."""
    if kind == "unet":
        from snapjax.models.unet_spec import UNetSpec
        return UNetSpec
    if kind == "vae":
        from snapjax.models.vae import VAESpec
        return VAESpec
    if kind == "text_encoder":
        from snapjax.models.text_encoder import TextEncoderSpec
        return TextEncoderSpec
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def build_module(kind: str, spec: Any, dtype=jnp.float32):
    """The Flax module for a kind and spec, with the given compute dtype."""
    if kind == "unet":
        from snapjax.models.unet import UNet
        return UNet(spec=spec, dtype=dtype)
    if kind == "vae":
        from snapjax.models.vae import VAE
        return VAE(spec=spec, dtype=dtype)
    if kind == "text_encoder":
        from snapjax.models.text_encoder import TextEncoder
        return TextEncoder(spec=spec, dtype=dtype)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def is_snapjax_model(folder: str | os.PathLike) -> bool:
    return (storage.path(folder) / MODEL_FILE).is_file()


# Depth of replace_folder calls on this process: only the outermost one of a multi-process run
# synchronises the processes (the nested ones run on process 0 alone, inside its write).
_WRITING = [0]


def replace_folder(folder: str | os.PathLike, write: Callable[[epath.Path], None], *,
                   overwrite: bool = False) -> epath.Path:
    """Run ``write(tmp)`` into a local temporary folder, then put it at ``folder`` (local or
    ``gs://``) through :func:`snapjax.storage.write_folder`.

    Refuses an existing ``folder`` unless ``overwrite``. A failure (or Ctrl-C) part-way leaves
    neither a half-written folder that loads nor the temporary one behind. In a multi-process
    run every process calls it with the same ``folder`` (its contents already on the host:
    ``write`` must not run collectives); process 0 writes, and every process returns once it
    has, with the folder readable to it.
    """
    if jax.process_count() > 1 and _WRITING[0] == 0:
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            log.info("process 0/%d writes %s", jax.process_count(), folder)
            try:
                _WRITING[0] += 1
                storage.write_folder(folder, write, overwrite=overwrite)
            finally:
                _WRITING[0] -= 1
        else:
            log.info("process %d/%d waits for process 0, which writes %s", jax.process_index(),
                     jax.process_count(), folder)
        # If process 0 failed, it raises and the others time out here with the barrier's error.
        multihost_utils.sync_global_devices(f"snapjax replace_folder {folder}")
        storage.refresh(folder)
        return storage.path(folder)
    _WRITING[0] += 1
    try:
        return storage.write_folder(folder, write, overwrite=overwrite)
    finally:
        _WRITING[0] -= 1


def save_model(folder: str | os.PathLike, kind: str, spec: Any, params: Any, *,
               overwrite: bool = False) -> epath.Path:
    """Write a model folder atomically; refuses an existing folder unless ``overwrite``."""
    import orbax.checkpoint as ocp

    spec_class(kind)  # validates kind

    def write(tmp: epath.Path) -> None:
        (tmp / MODEL_FILE).write_text(json.dumps(
            {"kind": kind, "spec": json.loads(spec.to_json())}, indent=1))
        # In a multi-process run only process 0 gets here (replace_folder): Orbax must not
        # wait for the others.
        options = (ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
                   if jax.process_count() > 1 else ocp.options.MultiprocessingOptions())
        checkpointer = ocp.StandardCheckpointer(multiprocessing_options=options)
        checkpointer.save(tmp / "params", jax.device_get(params))
        checkpointer.wait_until_finished()

    return replace_folder(folder, write, overwrite=overwrite)


def read_model_spec(folder: str | os.PathLike) -> tuple[str, Any]:
    path = storage.path(folder) / MODEL_FILE
    try:
        meta = json.loads(path.read_text())
        kind, spec = meta["kind"], meta["spec"]
    except FileNotFoundError:
        storage.check_readable(folder, "model folder")
        raise FileNotFoundError(
            f"{folder}: not a snapjax model folder (no {MODEL_FILE}; a folder whose write was "
            f"killed has none: write it again with --overwrite)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: malformed model file ({e})") from e
    return kind, spec_class(kind).from_dict(spec)


def load_model(folder: str | os.PathLike, *, dtype=jnp.float32, expect_kind: str | None = None):
    """(module, params) from a snapjax model folder."""
    import orbax.checkpoint as ocp

    folder = storage.path(folder)
    kind, spec = read_model_spec(folder)
    if expect_kind is not None and kind != expect_kind:
        raise ValueError(f"{folder} holds a {kind!r} model, expected {expect_kind!r}")
    module = build_module(kind, spec, dtype)
    abstract = abstract_params(kind, spec)
    try:
        params = ocp.StandardCheckpointer().restore(folder / "params", abstract)
    except Exception as e:  # Orbax raises several types for a damaged or mismatched tree
        raise ValueError(f"{folder / 'params'}: cannot restore parameters for this "
                         f"{kind} spec ({type(e).__name__}: {e})") from e
    return module, params


def read_back(folder: str | os.PathLike) -> dict[str, int]:
    """Check that the model folders at ``folder`` (itself, or a pipeline's components) are
    complete as this process sees them: each spec and its parameters' Orbax metadata read,
    and every parameter of the spec present. Returns {folder: number of arrays}. Cheap (no
    array is read), so every process of a run calls it on the folder process 0 wrote."""
    import orbax.checkpoint as ocp

    root = storage.path(folder)
    storage.refresh(root)
    found = [root] if is_snapjax_model(root) else [
        root / k for k in KINDS if is_snapjax_model(root / k)]
    if not found:
        raise FileNotFoundError(f"{root}: no snapjax model folder there (no {MODEL_FILE} in it "
                                f"or in {', '.join(k + '/' for k in KINDS)})")
    counts = {}
    for sub in found:
        kind, spec = read_model_spec(sub)
        expected = jax.tree_util.tree_structure(abstract_params(kind, spec))
        try:
            meta = ocp.StandardCheckpointer().metadata(sub / "params")
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            got = jax.tree_util.tree_structure(dict(tree))
        except Exception as e:  # Orbax raises several types for a missing or damaged tree
            raise ValueError(f"{sub / 'params'}: cannot read the parameters' metadata "
                             f"({type(e).__name__}: {e})") from e
        if got != expected:
            raise ValueError(f"{sub / 'params'}: its parameter tree differs from the {kind} "
                             f"spec's in {MODEL_FILE}")
        counts[str(sub)] = expected.num_leaves
    return counts


def abstract_params(kind: str, spec: Any):
    """Parameter shapes without allocating them."""
    module = build_module(kind, spec)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs(kind, spec)))["params"]


def example_inputs(kind: str, spec: Any, *, batch: int = 1, size: int | None = None):
    """Smallest valid inputs for init/tracing (``size``: latent or image side)."""
    if kind == "unet":
        s = size or 2 ** (spec.num_stages - 1)
        inputs = (jnp.zeros((batch, s, s, spec.in_channels)), jnp.zeros((batch,), jnp.int32),
                  jnp.zeros((batch, 1, spec.context_dim)))
        if spec.guidance_embed_dim:  # no block mask, a guidance scale
            inputs += (None, jnp.ones((batch,), jnp.float32))
        return inputs
    if kind == "vae":
        s = size or 2 ** (len(spec.encoder_channels) - 1)
        return (jnp.zeros((batch, s, s, spec.in_channels)),)
    if kind == "text_encoder":
        return (jnp.zeros((batch, size or spec.max_length), jnp.int32),)
    raise ValueError(f"unknown model kind {kind!r}")


def read_spec(path: str | os.PathLike, kind: str) -> Any:
    """The spec of a snapjax model folder or of a diffusers/transformers folder, without weights."""
    path = storage.path(path)
    if is_snapjax_model(path):
        found, spec = read_model_spec(path)
        if found != kind:
            raise ValueError(f"{path} holds a {found!r} model, expected {kind!r}")
        return spec
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no {MODEL_FILE} or config.json, so not a {kind} model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    if kind == "unet":
        from snapjax.convert.unet import spec_from_diffusers_config
        return spec_from_diffusers_config(config)
    if kind == "vae":
        from snapjax.convert.vae import spec_from_diffusers_config
        return spec_from_diffusers_config(config, str(config_file))
    from snapjax.convert.text_encoder import spec_from_transformers_config
    return spec_from_transformers_config(config)


def load_component(path: str | os.PathLike, kind: str, *, dtype=jnp.float32):
    """(module, params) from a snapjax model folder or a diffusers/transformers folder."""
    path = storage.check_readable(path, f"{kind} model folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (expected a {kind} model folder)")
    if is_snapjax_model(path):
        module, params = load_model(path, dtype=dtype, expect_kind=kind)
        return module, params
    from snapjax import convert
    loader = {"unet": convert.load_unet, "vae": convert.load_vae,
              "text_encoder": convert.load_text_encoder}[kind]
    # The converters read PyTorch files with local-file libraries: a bucket's folder is copied.
    with storage.local_folder(path) as local:
        module, params = loader(local)
    return module.clone(dtype=dtype), params
