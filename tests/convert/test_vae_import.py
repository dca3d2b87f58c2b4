"""diffusers AutoencoderKL folder -> snapjax VAE: parity with diffusers and clear errors.

Reference: diffusers' own AutoencoderKL (random weights, perturbed so that no zero/one init hides a
mapping mistake), run in PyTorch fp32. Tolerance: max abs error / max abs reference < 1e-4.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from snapjax.convert import load_vae
from snapjax.convert.state_dict import WeightsError
from snapjax.convert.vae import load_vae_decoder, spec_from_diffusers_config, vae_module_map
from snapjax.models import vae as vae_lib
from snapjax.models.vae import VAE, VAEDecoder, decoder_params

RTOL = 1e-4
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _config(channels=(32, 64), layers=1, groups=8, latent=4, **extra):
    return dict(block_out_channels=channels, layers_per_block=layers, norm_num_groups=groups,
                latent_channels=latent, down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels), **extra)


def _make_vae(folder, seed=0, safe=True, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**_config(**config)).eval()
    with torch.no_grad():
        for p in vae.parameters():  # GroupNorm starts at (1, 0): perturb so a swap would show
            p.add_(0.1 * torch.randn_like(p))
    vae.save_pretrained(folder, safe_serialization=safe)
    return vae


def _nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def _rel(ours, ref: torch.Tensor) -> float:
    ref = ref.permute(0, 2, 3, 1).numpy()
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _apply(module, params, *args, method=None):
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method))(params, *args)


def _check_parity(vae: AutoencoderKL, module, params, size=16):
    spec = module.spec
    torch.manual_seed(1)
    x = torch.randn(2, spec.in_channels, size, size)
    z = torch.randn(2, spec.latent_channels, size // spec.downsample_factor,
                    size // spec.downsample_factor)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        ref_dec = vae.decode(z).sample
    mean, logvar = _apply(module, params, _nhwc(x), method="encode")
    dec = _apply(module, params, _nhwc(z), method="decode")
    errs = _rel(mean, dist.mean), _rel(logvar, dist.logvar), _rel(dec, ref_dec)
    assert max(errs) < RTOL, f"mean/logvar/decode relative errors {errs}"
    print(f"relative errors mean/logvar/decode: {errs}")
    return errs


@pytest.mark.parametrize("config", [
    dict(),
    dict(channels=(16, 32, 32), layers=2, groups=4, latent=3),
    dict(channels=(32, 64), layers=2, groups=16, latent=8, mid_block_add_attention=False),
    dict(channels=(16, 32), use_quant_conv=False, use_post_quant_conv=False, in_channels=1,
         out_channels=2, safe=False),
], ids=["tiny", "three_stages", "no_mid_attn", "no_quant_convs_bin"])
def test_load_vae_matches_diffusers(tmp_path, config):
    vae = _make_vae(tmp_path / "vae", **config)
    module, params = load_vae(tmp_path / "vae")
    assert isinstance(module, VAE)
    _check_parity(vae, module, params)


def test_legacy_attention_names_load(tmp_path):
    """Checkpoints from before diffusers 0.14 name the attention query/key/value/proj_attn."""
    vae = _make_vae(tmp_path / "vae")
    sd = load_file(tmp_path / "vae" / WEIGHTS)
    legacy = {}
    for name, value in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        if ".attentions.0.query." in name and name.endswith("weight"):
            value = value[:, :, None, None]  # some converters stored them as 1x1 convs
        legacy[name] = value
    assert any(".proj_attn." in n for n in legacy)
    save_file(legacy, tmp_path / "vae" / WEIGHTS)
    module, params = load_vae(tmp_path / "vae")
    _check_parity(vae, module, params)


def test_pruned_decoder_loads_into_decoder(tmp_path):
    """SnapFusion's decoder: an AutoencoderKL with halved widths is vae_lib.pruned(full spec)."""
    full = _make_vae(tmp_path / "full", channels=(32, 64), groups=8)
    half = _make_vae(tmp_path / "half", seed=3, channels=(16, 32), groups=8)
    full_module, full_params = load_vae(tmp_path / "full")
    spec = vae_lib.pruned(full_module.spec)
    assert spec.decoder_channels == (16, 32) and spec.encoder_channels == (32, 64)

    dec_module, dec_params = load_vae_decoder(tmp_path / "half")
    assert isinstance(dec_module, VAEDecoder) and set(dec_params) == {"post_quant_conv", "decoder"}
    torch.manual_seed(2)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = half.decode(z).sample
    out = _apply(VAEDecoder(spec), dec_params, _nhwc(z))
    assert _rel(out, ref) < RTOL

    # Full encoder + pruned decoder in one VAE: each half matches its own diffusers model.
    mixed = {**full_params, **decoder_params(dec_params)}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref_mean = full.encode(x).latent_dist.mean
    mean, _ = _apply(VAE(spec), mixed, _nhwc(x), method="encode")
    assert _rel(mean, ref_mean) < RTOL
    assert _rel(_apply(VAE(spec), mixed, _nhwc(z), method="decode"), ref) < RTOL


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def test_sd15_structure_matches_diffusers():
    """The sd15 preset has exactly diffusers' SD-v1.5 VAE tensors (names and sizes), built on the
    meta device so no memory is spent."""
    config = _config(channels=(128, 256, 512, 512), layers=2, groups=32, sample_size=512)
    assert spec_from_diffusers_config(config) == vae_lib.SD15
    with torch.device("meta"):
        ref = AutoencoderKL(**config)
    ref_sizes = {k: v.numel() for k, v in ref.state_dict().items()}
    abstract = jax.eval_shape(VAE(vae_lib.SD15).init, jax.random.key(0),
                              jnp.zeros((1, 8, 8, 3)))["params"]
    module_map = vae_module_map(vae_lib.SD15)
    leaf = {"kernel": "weight", "scale": "weight"}
    ours = {f"{module_map['/'.join(p[:-1])]}.{leaf.get(p[-1], p[-1])}": int(np.prod(a.shape))
            for p, a in traverse_util.flatten_dict(abstract).items()}
    assert ours == ref_sizes
    decoder = sum(v for k, v in ref_sizes.items() if k.startswith(("decoder.", "post_quant")))
    assert abs(decoder / 1e6 - 49.5) < 0.1  # DESIGN.md reference number
    pruned = jax.eval_shape(VAEDecoder(vae_lib.pruned(vae_lib.SD15)).init, jax.random.key(0),
                            jnp.zeros((1, 8, 8, 4)))["params"]
    assert 3.5 < decoder / _count(pruned) < 4.5  # about 4x fewer parameters (paper)


# ---- bad input -------------------------------------------------------------------------------

def test_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WeightsError, match="not a folder"):
        load_vae(tmp_path / "file")


def test_missing_config(tmp_path):
    _make_vae(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(WeightsError, match="missing config.json"):
        load_vae(tmp_path / "vae")


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, culprit", [
    (dict(_class_name="UNet2DConditionModel"), "_class_name='UNet2DConditionModel'"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
     r"down_block_types\[1\]='AttnDownEncoderBlock2D'"),
    (dict(up_block_types=["UpDecoderBlock2D"]), "up_block_types has 1 entries"),
    (dict(act_fn="relu"), "act_fn='relu'"),
    (dict(shift_factor=0.1159), "shift_factor=0.1159"),
    (dict(mystery_option=3), "mystery_option"),
    (dict(norm_num_groups=5), "norm_groups=5"),
])
def test_bad_config_names_the_key(tmp_path, changes, culprit):
    _make_vae(tmp_path / "vae")
    _edit_config(tmp_path / "vae", **changes)
    with pytest.raises(WeightsError, match=culprit) as e:
        load_vae(tmp_path / "vae")
    assert "config.json" in str(e.value)


def test_corrupt_weights(tmp_path):
    _make_vae(tmp_path / "vae")
    (tmp_path / "vae" / WEIGHTS).write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match=WEIGHTS):
        load_vae(tmp_path / "vae")


def test_missing_weights(tmp_path):
    _make_vae(tmp_path / "vae")
    (tmp_path / "vae" / WEIGHTS).unlink()
    with pytest.raises(WeightsError, match="no weights file"):
        load_vae(tmp_path / "vae")


def test_wrong_shape_and_missing_tensor_are_named(tmp_path):
    _make_vae(tmp_path / "vae")
    sd = load_file(tmp_path / "vae" / WEIGHTS)
    sd["decoder.conv_out.weight"] = np.zeros((3, 32, 3, 1), np.float32)
    del sd["encoder.mid_block.attentions.0.to_k.bias"]
    save_file(sd, tmp_path / "vae" / WEIGHTS)
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path / "vae")
    msg = str(e.value)
    assert "'decoder.conv_out.weight' has shape (3, 32, 3, 1)" in msg
    assert "missing tensor 'encoder.mid_block.attentions.0.to_k.bias'" in msg


def test_extra_tensor_is_named(tmp_path):
    _make_vae(tmp_path / "vae")
    sd = load_file(tmp_path / "vae" / WEIGHTS)
    sd["encoder.surprise.weight"] = np.zeros((2,), np.float32)
    save_file(sd, tmp_path / "vae" / WEIGHTS)
    with pytest.raises(WeightsError, match="encoder.surprise.weight"):
        load_vae(tmp_path / "vae")
