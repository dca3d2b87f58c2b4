"""Import a diffusers AutoencoderKL folder (``vae/``: config.json + weights) into snapjax.

The name map follows the parameter layout documented in :mod:`snapjax.models.vae`; export uses
the same map through :func:`snapjax.convert.mapping.state_dict_from_params`.
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
from snapjax.models.vae import DECODER_PARAM_KEYS, VAE, VAEDecoder, VAESpec

# AutoencoderKL.__init__'s arguments and defaults (diffusers fills a config's missing keys with
# them); config.json also carries "_"-prefixed metadata. sample_size (tiling) and force_upcast
# (an fp16 hint) do not change the network and are ignored.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

_RESNET_CHILDREN = ("norm1", "conv1", "norm2", "conv2", "conv_shortcut")
# Names in checkpoints saved before diffusers 0.14 (its AttentionBlock) -> current names.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def spec_from_diffusers_config(config: Mapping[str, Any], where: str = "config") -> VAESpec:
    """VAESpec from an AutoencoderKL config dict; unsupported settings raise naming the key."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"{where}: unknown AutoencoderKL key(s) {unknown}")
    cfg = {**_DIFFUSERS_DEFAULTS, **config}
    channels = tuple(int(c) for c in cfg["block_out_channels"])
    n = len(channels)

    def expect(key, allowed):
        value = cfg[key]
        if value not in allowed:
            raise ValueError(f"{where}: {key}={value!r} is not supported (expected "
                             f"{' or '.join(repr(a) for a in allowed)})")
        return value

    for key, block in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
        types = list(cfg[key])
        if len(types) != n:
            raise ValueError(f"{where}: {key} has {len(types)} entries but block_out_channels "
                             f"has {n}")
        for i, t in enumerate(types):
            if t != block:
                raise ValueError(f"{where}: {key}[{i}]={t!r} is not supported (only {block!r})")
    expect("act_fn", ("silu",))
    for key in ("shift_factor", "latents_mean", "latents_std"):  # latent normalisations of later VAEs
        expect(key, (None,))
    try:
        return VAESpec(
            in_channels=int(cfg["in_channels"]),
            out_channels=int(cfg["out_channels"]),
            latent_channels=int(cfg["latent_channels"]),
            encoder_channels=channels,
            decoder_channels=channels,
            layers_per_block=int(cfg["layers_per_block"]),
            norm_groups=int(cfg["norm_num_groups"]),
            mid_attention=bool(expect("mid_block_add_attention", (True, False))),
            use_quant_conv=bool(expect("use_quant_conv", (True, False))),
            use_post_quant_conv=bool(expect("use_post_quant_conv", (True, False))),
            scaling_factor=float(cfg["scaling_factor"]),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _mid_map(flax_prefix: str, torch_prefix: str) -> dict[str, str]:
    m = {}
    for r in (0, 1):
        for child in _RESNET_CHILDREN:
            m[f"{flax_prefix}/mid_res_{r}/{child}"] = f"{torch_prefix}.mid_block.resnets.{r}.{child}"
    attn = f"{torch_prefix}.mid_block.attentions.0"
    for child, torch_child in (("group_norm", "group_norm"), ("to_q", "to_q"), ("to_k", "to_k"),
                               ("to_v", "to_v"), ("to_out", "to_out.0")):
        m[f"{flax_prefix}/mid_attn/{child}"] = f"{attn}.{torch_child}"
    return m


def vae_module_map(spec: VAESpec) -> dict[str, str]:
    """Flax module path -> diffusers AutoencoderKL module prefix (covers VAE and VAEDecoder)."""
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        for leaf in ("conv_in", "conv_norm_out", "conv_out"):
            m[f"{part}/{leaf}"] = f"{part}.{leaf}"
        m.update(_mid_map(part, part))
    n = len(spec.encoder_channels)
    for i in range(n):
        for j in range(spec.layers_per_block):
            for child in _RESNET_CHILDREN:
                m[f"encoder/down_{i}_res_{j}/{child}"] = f"encoder.down_blocks.{i}.resnets.{j}.{child}"
        m[f"encoder/down_{i}_downsample/conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        for j in range(spec.layers_per_block + 1):
            for child in _RESNET_CHILDREN:
                m[f"decoder/up_{i}_res_{j}/{child}"] = f"decoder.up_blocks.{i}.resnets.{j}.{child}"
        m[f"decoder/up_{i}_upsample/conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return m


def _read_folder(path: str | Path) -> tuple[Path, dict]:
    folder = Path(path)  # local: pretrained.load_component copies a bucket's folder first
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder (expected a diffusers AutoencoderKL folder "
                           "with config.json and weights)")
    cfg_path = folder / "config.json"
    config = read_config_json(folder)
    cls = config.get("_class_name")
    if cls != "AutoencoderKL":
        raise WeightsError(f"{cfg_path}: _class_name={cls!r}, expected 'AutoencoderKL'")
    return folder, config


def _modernise(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename pre-0.14 attention tensors (query/key/value/proj_attn) as diffusers does on load;
    such checkpoints may also hold the projections as 1x1 convs."""
    out = {}
    for name, value in state_dict.items():
        parts = name.split(".")
        if ".mid_block.attentions." in name and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
            name = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
        if (".mid_block.attentions." in name and ".group_norm." not in name
                and value.ndim == 4 and value.shape[2:] == (1, 1)):
            value = value[:, :, 0, 0]
        out[name] = value
    return out


def _load(path: str | Path, decoder_only: bool):
    folder, config = _read_folder(path)
    try:
        spec = spec_from_diffusers_config(config, where=str(folder / "config.json"))
    except ValueError as e:
        raise WeightsError(str(e)) from e
    state_dict = _modernise(load_state_dict(folder))
    if decoder_only:
        module = VAEDecoder(spec)
        state_dict = {k: v for k, v in state_dict.items()
                      if k.split(".")[0] in DECODER_PARAM_KEYS}
    else:
        module = VAE(spec)
    latent = jnp.zeros((1, 1, 1, spec.latent_channels), jnp.float32)
    if decoder_only:
        abstract = jax.eval_shape(module.init, jax.random.key(0), latent)["params"]
    else:
        image = jnp.zeros((1, spec.downsample_factor, spec.downsample_factor, spec.in_channels))
        abstract = jax.eval_shape(module.init, jax.random.key(0), image)["params"]
    params = params_from_state_dict(state_dict, vae_module_map(spec), abstract, where=str(folder))
    return module, params


def load_vae(path: str | Path) -> tuple[VAE, dict]:
    """``(VAE module, params)`` from a diffusers AutoencoderKL folder. Strict: every tensor used,
    every parameter filled, shapes checked; errors name the file, key or tensor."""
    return _load(path, decoder_only=False)


def load_vae_decoder(path: str | Path) -> tuple[VAEDecoder, dict]:
    """``(VAEDecoder module, params)``: only ``post_quant_conv`` and ``decoder`` of the folder
    (the encoder tensors are skipped), e.g. to start the efficient decoder from a checkpoint."""
    return _load(path, decoder_only=True)
