"""transformers CLIPTextModel folder -> snapjax TextEncoder: parity with transformers, clear errors.

Reference: transformers' own CLIPTextModel (random weights, LayerNorms perturbed away from (1, 0)),
run in PyTorch fp32. Tolerance: max abs error / max abs reference < 1e-4.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from snapjax.convert import load_text_encoder
from snapjax.convert.state_dict import WeightsError
from snapjax.convert.text_encoder import spec_from_transformers_config, text_encoder_module_map
from snapjax.models import text_encoder as te
from snapjax.models.text_encoder import TextEncoder, pooled_output

RTOL = 1e-4
WEIGHTS = "model.safetensors"
VOCAB = 99


def _make_model(folder, seed=0, safe=True, **overrides) -> CLIPTextModel:
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                  bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    config.update(overrides)
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=safe)
    return model


def _ids(batch: int, length: int, eos: int, seed: int = 1) -> np.ndarray:
    """Random tokens with an EOS at a different place per row, padded with EOS afterwards."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB - 2, size=(batch, length))
    for b in range(batch):
        end = 2 + b * 3 % (length - 2)
        ids[b, end:] = eos
    return ids


def _rel(ours, ref) -> float:
    ref = np.asarray(ref)
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("overrides, length", [
    (dict(), 16),
    (dict(num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu"), 16),
    (dict(num_attention_heads=8, layer_norm_eps=1e-6, eos_token_id=2), 10),
    (dict(hidden_size=48, num_attention_heads=3, safe=False), 16),
], ids=["quick_gelu", "gelu_3layers", "8heads_legacy_eos_short", "bin_3heads"])
def test_load_text_encoder_matches_transformers(tmp_path, overrides, length):
    model = _make_model(tmp_path / "te", **overrides)
    module, params = load_text_encoder(tmp_path / "te")
    assert isinstance(module, TextEncoder)
    ids = _ids(3, length, eos=VOCAB - 1)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids))
    hidden = jax.jit(lambda p, i: module.apply({"params": p}, i))(params, jnp.asarray(ids))
    assert hidden.dtype == jnp.float32 and hidden.shape == (3, length, module.spec.width)
    err = _rel(hidden, ref.last_hidden_state.numpy())
    pooled = pooled_output(hidden, jnp.asarray(ids), module.spec.eos_token_id)
    pooled_err = _rel(pooled, ref.pooler_output.numpy())
    print(f"relative errors last_hidden_state/pooled: {err:.2e}/{pooled_err:.2e}")
    assert err < RTOL and pooled_err < RTOL, (err, pooled_err)


def test_legacy_layout_with_position_ids_buffer(tmp_path):
    """SD-v1.5's files (transformers 4) name tensors text_model.* (transformers 5 drops the prefix),
    and transformers < 4.31 also saved the text_model.embeddings.position_ids buffer: it must load,
    and anything other than 0..L-1 there must be refused rather than silently dropped."""
    model = _make_model(tmp_path / "te")
    sd = {f"text_model.{k}": v for k, v in load_file(tmp_path / "te" / WEIGHTS).items()}
    sd["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    save_file(sd, tmp_path / "te" / WEIGHTS)
    module, params = load_text_encoder(tmp_path / "te")
    ids = _ids(2, 16, eos=VOCAB - 1)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    assert _rel(module.apply({"params": params}, jnp.asarray(ids)), ref) < RTOL

    sd["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None][:, ::-1].copy()
    save_file(sd, tmp_path / "te" / WEIGHTS)
    with pytest.raises(WeightsError, match="text_model.embeddings.position_ids"):
        load_text_encoder(tmp_path / "te")


def test_sd15_structure_matches_transformers():
    """The sd15 preset has exactly the tensors of SD-v1.5's CLIPTextModel (meta device: no memory)."""
    config = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2,
                  model_type="clip_text_model")
    assert spec_from_transformers_config(config) == te.SD15
    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig(**config))
    # transformers 5 names them without the text_model. prefix that SD-v1.5's files use.
    ref_sizes = {f"text_model.{k}": v.numel() for k, v in ref.state_dict().items()}
    abstract = jax.eval_shape(TextEncoder(te.SD15).init, jax.random.key(0),
                              jnp.zeros((1, 77), jnp.int32))["params"]
    module_map = text_encoder_module_map(te.SD15)
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
    ours = {f"{module_map['/'.join(p[:-1])]}.{leaf.get(p[-1], p[-1])}": int(np.prod(a.shape))
            for p, a in traverse_util.flatten_dict(abstract).items()}
    assert ours == ref_sizes
    assert abs(sum(ours.values()) / 1e6 - 123.06) < 0.01


# ---- bad input -------------------------------------------------------------------------------

def test_not_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="not a folder"):
        load_text_encoder(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    _make_model(tmp_path / "te")
    (tmp_path / "te" / "config.json").unlink()
    with pytest.raises(WeightsError, match="missing config.json"):
        load_text_encoder(tmp_path / "te")


def _edit_config(folder, drop=(), **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in drop:
        del config[key]
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, drop, culprit", [
    (dict(architectures=["CLIPVisionModel"]), (), "architectures=.*CLIPVisionModel"),
    (dict(model_type="clip"), (), "model_type='clip'"),
    (dict(hidden_act="relu"), (), "hidden_act='relu'"),
    (dict(num_attention_heads=5), (), "heads=5"),
    (dict(), ("num_hidden_layers",), "num_hidden_layers"),
])
def test_bad_config_names_the_key(tmp_path, changes, drop, culprit):
    _make_model(tmp_path / "te")
    _edit_config(tmp_path / "te", drop=drop, **changes)
    with pytest.raises(WeightsError, match=culprit) as e:
        load_text_encoder(tmp_path / "te")
    assert "config.json" in str(e.value)


def test_corrupt_weights(tmp_path):
    _make_model(tmp_path / "te")
    (tmp_path / "te" / WEIGHTS).write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=WEIGHTS):
        load_text_encoder(tmp_path / "te")


def test_wrong_shape_and_missing_tensor_are_named(tmp_path):
    _make_model(tmp_path / "te")
    sd = load_file(tmp_path / "te" / WEIGHTS)
    sd["encoder.layers.1.mlp.fc1.weight"] = np.zeros((36, 32), np.float32)
    del sd["final_layer_norm.bias"]
    save_file(sd, tmp_path / "te" / WEIGHTS)
    with pytest.raises(WeightsError) as e:
        load_text_encoder(tmp_path / "te")
    msg = str(e.value)
    assert "'text_model.encoder.layers.1.mlp.fc1.weight' has shape (36, 32)" in msg
    assert "expects (37, 32)" in msg
    assert "missing tensor 'text_model.final_layer_norm.bias'" in msg
