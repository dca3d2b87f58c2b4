"""Import a transformers CLIPTextModel folder (``text_encoder/``: config.json + weights) into snapjax.

Reads config.json itself rather than through ``transformers.CLIPTextConfig``, whose import pulls in
torch (snapjax never imports torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.convert.mapping import params_from_state_dict
from snapjax.convert.state_dict import WeightsError, load_state_dict, read_config_json
from snapjax.models.text_encoder import ACTIVATIONS, TextEncoder, TextEncoderSpec

_ARCHITECTURE = "CLIPTextModel"
_MODEL_TYPE = "clip_text_model"
# config.json key -> TextEncoderSpec field; all are written by every transformers version.
_SPEC_KEYS = {
    "vocab_size": "vocab_size", "max_position_embeddings": "max_length", "hidden_size": "width",
    "num_hidden_layers": "layers", "num_attention_heads": "heads",
    "intermediate_size": "mlp_dim", "hidden_act": "act", "layer_norm_eps": "eps",
}
# Names follow the SD-v1.5 / transformers 4 layout, which every transformers version loads;
# transformers 5 saves without the prefix (it strips it on load).
_PREFIX = "text_model."
# A non-parameter buffer older transformers versions saved (persistent=False since 4.31).
_POSITION_IDS = "text_model.embeddings.position_ids"


def spec_from_transformers_config(config: Mapping[str, Any], where: str = "config"
                                  ) -> TextEncoderSpec:
    """TextEncoderSpec from a CLIPTextModel config dict; errors name the key."""
    model_type = config.get("model_type")
    if model_type != _MODEL_TYPE:
        raise ValueError(f"{where}: model_type={model_type!r}, expected {_MODEL_TYPE!r} "
                         "(a CLIP text encoder config, not a full CLIP or other model)")
    missing = [k for k in _SPEC_KEYS if k not in config]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    if config["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act={config['hidden_act']!r} is not supported "
                         f"(supported: {sorted(ACTIVATIONS)})")
    fields = {field: config[key] for key, field in _SPEC_KEYS.items()}
    eos = config.get("eos_token_id")
    if isinstance(eos, int):  # only pooled_output uses it; a list or None keeps the spec default
        fields["eos_token_id"] = eos
    try:
        return TextEncoderSpec(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def text_encoder_module_map(spec: TextEncoderSpec) -> dict[str, str]:
    """Flax module path -> transformers CLIPTextModel module prefix."""
    m = {
        "token_embedding": "text_model.embeddings.token_embedding",
        "position_embedding": "text_model.embeddings.position_embedding",
        "final_layer_norm": "text_model.final_layer_norm",
    }
    for i in range(spec.layers):
        t = f"text_model.encoder.layers.{i}"
        for ours, theirs in (("layer_norm1", "layer_norm1"), ("layer_norm2", "layer_norm2"),
                             ("self_attn/to_q", "self_attn.q_proj"),
                             ("self_attn/to_k", "self_attn.k_proj"),
                             ("self_attn/to_v", "self_attn.v_proj"),
                             ("self_attn/to_out", "self_attn.out_proj"),
                             ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            m[f"layers_{i}/{ours}"] = f"{t}.{theirs}"
    return m


def _read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    config = read_config_json(folder)
    archs = config.get("architectures")
    if archs is not None and archs != [_ARCHITECTURE]:
        raise WeightsError(f"{cfg_path}: architectures={archs!r}, expected [{_ARCHITECTURE!r}]")
    return config


def _canonical(state_dict: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Add the ``text_model.`` prefix to a transformers-5 layout; drop the position_ids buffer."""
    if not any(name.startswith(_PREFIX) for name in state_dict):
        state_dict = {_PREFIX + name: value for name, value in state_dict.items()}
    state_dict = dict(state_dict)
    position_ids = state_dict.pop(_POSITION_IDS, None)
    if position_ids is not None:
        # The model always uses 0..L-1; a checkpoint holding anything else is not what we compute.
        flat = np.asarray(position_ids).reshape(-1)
        if not np.array_equal(flat, np.arange(flat.size)):
            raise WeightsError(f"{where}: buffer {_POSITION_IDS!r} is not 0, 1, 2, ...")
    return state_dict


def load_text_encoder(path: str | Path) -> tuple[TextEncoder, dict]:
    """``(TextEncoder module, params)`` from a transformers CLIPTextModel folder. Strict: every tensor
    used, every parameter filled, shapes checked; errors name the file, key or tensor."""
    folder = Path(path)  # local: pretrained.load_component copies a bucket's folder first
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder (expected a transformers CLIPTextModel folder "
                           "with config.json and weights)")
    config = _read_config(folder)
    try:
        spec = spec_from_transformers_config(config, where=str(folder / "config.json"))
    except ValueError as e:
        raise WeightsError(str(e)) from e
    state_dict = _canonical(load_state_dict(folder), str(folder))
    module = TextEncoder(spec)
    ids = jnp.zeros((1, spec.max_length), jnp.int32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), ids)["params"]
    params = params_from_state_dict(state_dict, text_encoder_module_map(spec), abstract,
                                    where=str(folder))
    return module, params
