"""Import diffusers UNet2DConditionModel folders and match diffusers' outputs.

The reference is diffusers itself (PyTorch, float32) with random weights; every parameter gets
extra noise so that zero-initialised convs, unit norm scales and zero biases cannot hide a
mapping bug. Tolerance: max |jax - torch| / max |torch| < 1e-4.
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from snapjax.convert import load_unet  # noqa: E402
from snapjax.convert.state_dict import WeightsError  # noqa: E402
from snapjax.convert.unet import (_torch_prefix, diffusers_config_from_spec,  # noqa: E402
                                  spec_fits_diffusers, spec_from_diffusers_config,
                                  unet_module_map)
from snapjax.models.unet import count_params  # noqa: E402
from snapjax.models.unet_spec import SD15, TINY  # noqa: E402

TOL = 1e-4

SD15_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json, minus the version keys
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}

CONFIGS = {
    # SD-v1.5's shape at toy width: two cross-attention stages, one plain, 2 layers per block.
    "sd15_shaped": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2, attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8),
    # Linear projections, heads per stage, two transformer layers, 16 groups, upcast attention.
    "linear_two_layers": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=2, norm_num_groups=16, cross_attention_dim=16,
        upcast_attention=True),
    # No mid block, per-block layers, plain down / attention up at stage 0, odd channel counts,
    # non-default time embedding; saved as a PyTorch .bin.
    "no_mid_bin": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=(1, 2), mid_block_type=None, norm_num_groups=8, norm_eps=1e-6,
        in_channels=3, out_channels=5, flip_sin_to_cos=False, freq_shift=1,
        time_embedding_dim=40, attention_head_dim=2, cross_attention_dim=12),
    # One stage (no down/upsampler), ResNet-only mid block (UNetMidBlock2D), per-block layers.
    "one_stage_resnet_mid": dict(
        block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), mid_block_type="UNetMidBlock2D",
        layers_per_block=1, attention_head_dim=4, transformer_layers_per_block=(2,),
        cross_attention_dim=8, norm_num_groups=8),
}


def build_diffusers_unet(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def reference(model, size=16, batch=2, ctx_len=7, timesteps=(10.0, 999.5)):
    """Random NHWC inputs and diffusers' output on them (NHWC, float32)."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    ctx = torch.randn(batch, ctx_len, cfg.cross_attention_dim, generator=g)
    t = torch.tensor(timesteps[:batch])
    with torch.no_grad():
        ref = model(x, t, ctx).sample.numpy().transpose(0, 2, 3, 1)
    return (x.numpy().transpose(0, 2, 3, 1), t.numpy(), ctx.numpy()), ref


def snapjax_rel_err(folder, inputs, ref):
    """load_unet(folder) on ``inputs``: (max |out - ref| / max |ref|, module, params)."""
    module, params = load_unet(folder)
    out = jax.jit(module.apply)({"params": params}, *map(jnp.asarray, inputs))
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    return err, module, params


def compare(model, folder, **kw):
    return snapjax_rel_err(folder, *reference(model, **kw))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(name, tmp_path):
    model = build_diffusers_unet(CONFIGS[name])
    model.save_pretrained(tmp_path, safe_serialization=not name.endswith("_bin"))
    weights = {p.name for p in tmp_path.iterdir()}
    assert ("diffusion_pytorch_model.bin" in weights) == name.endswith("_bin")
    err, module, params = compare(model, tmp_path)
    print(f"{name}: max rel err {err:.2e}")
    assert err < TOL
    assert module.spec == spec_from_diffusers_config(dict(model.config))
    assert count_params(params) == sum(p.numel() for p in model.parameters())


def test_tiny_preset_exports_to_a_diffusers_config_and_back(tmp_path):
    config = diffusers_config_from_spec(TINY)
    assert spec_from_diffusers_config(config) == TINY
    model = build_diffusers_unet({k: v for k, v in config.items() if not k.startswith("_")})
    model.save_pretrained(tmp_path)
    err, module, _ = compare(model, tmp_path, size=8)
    assert module.spec == TINY
    assert err < TOL


def test_guidance_conditioned_unet_matches_diffusers_time_cond_proj(tmp_path):
    """A UNet with time_cond_proj_dim (LCM's guidance embedding) imports as guidance_embed_dim,
    and w enters as StableDiffusionPipeline feeds it: get_guidance_scale_embedding(w - 1)."""
    from diffusers import StableDiffusionPipeline
    config = {**CONFIGS["sd15_shaped"], "time_cond_proj_dim": 24}
    model = build_diffusers_unet(config)
    model.save_pretrained(tmp_path)
    (x, t, ctx), _ = reference(model)
    w = np.array([1.0, 7.5], np.float32)
    cond = StableDiffusionPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w - 1), embedding_dim=24)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                    torch.from_numpy(ctx), timestep_cond=cond).sample.numpy().transpose(0, 2, 3, 1)
    module, params = load_unet(tmp_path)
    assert module.spec.guidance_embed_dim == 24
    assert params["time_embedding"]["cond_proj"]["kernel"].shape == (24, 32)
    out = jax.jit(module.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t),
                                jnp.asarray(ctx), guidance_B=jnp.asarray(w))
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    assert err < TOL
    assert diffusers_config_from_spec(module.spec)["time_cond_proj_dim"] == 24
    # w matters: the other scale gives another output
    other = module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                         guidance_B=jnp.asarray(w[::-1].copy()))
    assert float(np.abs(np.asarray(other) - ref).max() / np.abs(ref).max()) > 100 * TOL


def test_sd15_config_is_the_sd15_preset():
    assert spec_from_diffusers_config(SD15_CONFIG) == SD15
    assert spec_from_diffusers_config({"_class_name": "UNet2DConditionModel",
                                       "cross_attention_dim": 768}) == SD15  # diffusers defaults
    back = spec_from_diffusers_config(diffusers_config_from_spec(SD15))
    assert back == SD15


def test_attention_head_dim_means_heads_and_num_attention_heads_wins():
    spec = spec_from_diffusers_config({**SD15_CONFIG, "attention_head_dim": [5, 10, 20, 20]})
    assert spec.num_heads == (5, 10, 20, 20)  # so head width 64 everywhere
    spec = spec_from_diffusers_config({**SD15_CONFIG, "num_attention_heads": 4})
    assert spec.num_heads == (4, 4, 4, 4)


def test_spec_fits_diffusers_names_the_reason():
    assert spec_fits_diffusers(SD15) is None and spec_fits_diffusers(TINY) is None
    assert spec_fits_diffusers(dataclasses.replace(TINY, mid="")) is None
    removed = dataclasses.replace(TINY, down=(("rA",), ("R",)))
    assert "down[0]" in spec_fits_diffusers(removed) and "'r'" in spec_fits_diffusers(removed)
    mixed = dataclasses.replace(TINY, up=(("RA", "R"), ("R", "R")))
    assert "up[0]" in spec_fits_diffusers(mixed)
    assert "mid='RR'" in spec_fits_diffusers(dataclasses.replace(TINY, mid="RR"))
    with pytest.raises(ValueError, match="up\\[0\\]"):
        diffusers_config_from_spec(mixed)


@pytest.mark.parametrize("change, where", [
    (dict(down=(("RAA",), ("R",)), up=(("RAA", "RAA"), ("R", "R"))), "'RAA'"),  # uniform, still no
    (dict(up=(("RA", "RA"), ("RR", "RR"))), "'RR'"),
    (dict(mid="rAR"), "mid='rAR'"),
    (dict(mid="RA"), "mid='RA'"),
    (dict(mid="RAAR"), "mid='RAAR'"),
])
def test_spec_fits_diffusers_refuses_the_general_grammar(change, where):
    spec = dataclasses.replace(TINY, **change)
    reason = spec_fits_diffusers(spec)
    assert reason is not None and where in reason
    with pytest.raises(ValueError, match="does not fit diffusers"):
        diffusers_config_from_spec(spec)
    assert spec_fits_diffusers(dataclasses.replace(TINY, mid="R")) is None


def test_module_map_keeps_flax_names_where_diffusers_has_no_slot():
    """A unit's second transformer or ResNet and the mid block's extras are not given the name
    of some other diffusers module: they keep their Flax block name, and no two modules share a
    name."""
    spec = dataclasses.replace(TINY, down=(("RAA",), ("rRA",)), up=(("RA", "rAA"), ("R", "RR")),
                               mid="RAAR")
    m = unet_module_map(spec)
    assert len(set(m.values())) == len(m)
    assert m["down_0_0_attn/proj_in"] == "down_blocks.0.attentions.0.proj_in"
    assert m["down_0_0_attn_1/block_0/attn1/to_out"] == \
        "down_0_0_attn_1.transformer_blocks.0.attn1.to_out.0"
    assert m["down_1_0_res_1/conv1"] == "down_1_0_res_1.conv1"
    assert m["up_1_1_res_1/conv2"] == "up_1_1_res_1.conv2"
    assert m["mid_attn_1/proj_out"] == "mid_attn_1.proj_out"
    assert m["mid_res_1/conv1"] == "mid_block.resnets.1.conv1"
    with pytest.raises(ValueError, match="'down_0_0_conv'"):
        _torch_prefix(("down_0_0_conv", "conv"), 2)


def test_module_map_names():
    m = unet_module_map(SD15)
    assert m["down_0_0_attn/block_0/attn1/to_out"] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert m["down_1_0_attn/block_0/ff_proj"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"
    assert m["up_2_2_attn/block_0/ff_out"] == \
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2"
    assert "up_3_0_attn/proj_in" not in m  # SD-v1.5's deepest stage has no attention
    assert m["up_0_1_res/conv_shortcut"] == "up_blocks.3.resnets.1.conv_shortcut"
    assert m["up_3_upsample/conv"] == "up_blocks.0.upsamplers.0.conv"
    assert m["down_2_downsample/conv"] == "down_blocks.2.downsamplers.0.conv"
    assert m["mid_attn/proj_in"] == "mid_block.attentions.0.proj_in"
    assert m["mid_res_1/time_emb_proj"] == "mid_block.resnets.1.time_emb_proj"
    assert m["time_embedding/linear_2"] == "time_embedding.linear_2"
    assert "up_0_upsample/conv" not in m and "down_3_downsample/conv" not in m


# ---- bad inputs: each error names the culprit ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_unet")
    config = {k: v for k, v in diffusers_config_from_spec(TINY).items() if k[0] != "_"}
    build_diffusers_unet(config).save_pretrained(folder)
    return folder


@pytest.fixture
def folder(tiny_folder, tmp_path):
    dst = tmp_path / "unet"
    shutil.copytree(tiny_folder, dst)
    return dst


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_unet(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder") as e:
        load_unet(tmp_path / "file")
    assert str(tmp_path / "file") in str(e.value)


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json") as e:
        load_unet(folder)
    assert str(folder) in str(e.value)
    with pytest.raises(FileNotFoundError, match="pass .*unet"):
        load_unet(folder.parent)


def test_wrong_class_name(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="_class_name='AutoencoderKL'") as e:
        load_unet(folder)
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize("key, value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"),
    ("time_embedding_type", "fourier"), ("act_fn", "gelu"),
    ("resnet_time_scale_shift", "scale_shift"), ("only_cross_attention", True),
    ("dual_cross_attention", True), ("center_input_sample", True),
    ("mid_block_only_cross_attention", True), ("conv_in_kernel", 7),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("dropout", 0.1),
    ("cross_attention_dim", [32, 64]), ("some_future_key", 1),
])
def test_unsupported_config_value_is_named(folder, key, value):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ValueError) as e:
        load_unet(folder)
    assert key in str(e.value) and str(folder / "config.json") in str(e.value)
    if key != "some_future_key":
        assert repr(value) in str(e.value) or str(value) in str(e.value)


WEIGHTS = "diffusion_pytorch_model.safetensors"


def test_truncated_weights(folder):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read weights") as e:
        load_unet(folder)
    assert str(folder / WEIGHTS) in str(e.value)


def edit_weights(folder, edit):
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def test_wrong_shape_tensor(folder):
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

    def edit(t):
        t[name] = np.zeros((t[name].shape[0], t[name].shape[1] + 1), np.float32)

    edit_weights(folder, edit)
    with pytest.raises(WeightsError, match="has shape") as e:
        load_unet(folder)
    assert name in str(e.value) and "(32, 33)" in str(e.value)


def test_extra_tensor(folder):
    edit_weights(folder, lambda t: t.update({"mid_block.attentions.0.extra.weight": np.ones(3)}))
    with pytest.raises(WeightsError, match="unexpected") as e:
        load_unet(folder)
    assert "mid_block.attentions.0.extra.weight" in str(e.value)


def test_missing_tensor(folder):
    edit_weights(folder, lambda t: t.pop("up_blocks.1.resnets.1.conv_shortcut.bias"))
    with pytest.raises(WeightsError, match="missing") as e:
        load_unet(folder)
    assert "up_blocks.1.resnets.1.conv_shortcut.bias" in str(e.value)


def test_no_weights_file(folder):
    (folder / WEIGHTS).unlink()
    with pytest.raises(WeightsError, match="no weights file"):
        load_unet(folder)


# ---- full size -------------------------------------------------------------------------------

@pytest.mark.slow
def test_sd15_full_size_matches_diffusers(tmp_path):
    # About 10 GB of RAM at peak: the torch model is freed before snapjax loads the folder.
    config = {k: v for k, v in SD15_CONFIG.items() if k[0] != "_"}
    model = build_diffusers_unet(config)
    n_torch = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    inputs, ref = reference(model, size=32, batch=1, ctx_len=77, timesteps=(500.0,))
    del model
    err, module, params = snapjax_rel_err(tmp_path, inputs, ref)
    print(f"SD-v1.5 at 32x32 latents: max abs ref {np.abs(ref).max():.3g}, max rel err {err:.2e}")
    assert n_torch == count_params(params) == 859_520_964
    assert module.spec == SD15
    assert err < TOL
