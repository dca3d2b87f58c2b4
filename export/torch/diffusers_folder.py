"""A diffusers StableDiffusionPipeline folder from a snapjax pipeline, where the specs fit.

The weights are written under the shared declarative names (``snapjax.convert``'s module maps),
loaded strictly into diffusers' / transformers' own classes and saved with ``save_pretrained``, so
an exported folder is checked against the real classes before it is written. The scheduler is
``DDIMScheduler`` configured from the snapjax :class:`NoiseSchedule` (spacing, offset, final alpha,
prediction type), so ``StableDiffusionPipeline`` samples the model exactly as snapjax does.

A guidance-conditioned UNet (``guidance_embed_dim > 0``) is written with ``time_cond_proj_dim``
and its ``time_embedding.cond_proj``: the pipeline then skips the unconditional half and feeds
``get_guidance_scale_embedding(guidance_scale - 1)`` as ``timestep_cond``, one UNet call per
step, which is what snapjax's sampler does with such a UNet.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from etils import epath

from export.checkpoint import ExportSource
from export.tokenizer_files import clip_tokenizer, write_clip_tokenizer_files
from export.torch.mirror import export_state_dict
from snapjax import pretrained
from snapjax.convert.mapping import state_dict_from_params
from snapjax.diffusion.schedule import NoiseSchedule

# diffusers' AutoencoderKL fixes these (ResNet/GroupNorm eps; one attention head in the mid block).
_DIFFUSERS_VAE_EPS = 1e-6


def vae_misfit(spec, params) -> str | None:
    """None if diffusers' AutoencoderKL expresses this VAE, else why not."""
    if tuple(spec.encoder_channels) != tuple(spec.decoder_channels):
        return (f"the decoder widths {tuple(spec.decoder_channels)} differ from the encoder's "
                f"{tuple(spec.encoder_channels)} (a pruned decoder); AutoencoderKL has one "
                "block_out_channels for both")
    if spec.decoder_groups != spec.norm_groups:
        return (f"the decoder has {spec.decoder_groups} GroupNorm groups and the encoder "
                f"{spec.norm_groups} (a decoder pruned in whole groups); AutoencoderKL has one "
                "norm_num_groups for both")
    if spec.mid_attention and spec.mid_attention_heads != 1:
        return f"mid_attention_heads={spec.mid_attention_heads}; AutoencoderKL uses one head"
    if spec.norm_eps != _DIFFUSERS_VAE_EPS:
        return f"norm_eps={spec.norm_eps}; AutoencoderKL uses {_DIFFUSERS_VAE_EPS}"
    if "encoder" not in params:
        return "the checkpoint holds only the decoder; AutoencoderKL needs the encoder too"
    return None


def scheduler_config(schedule: NoiseSchedule) -> tuple[dict[str, Any], str | None]:
    """DDIMScheduler config for ``schedule``, and why StableDiffusionPipeline would not honour it.

    The pipeline rewrites ``steps_offset`` to 1 and ``clip_sample`` to False when it loads a
    scheduler. ``steps_offset`` only moves ``leading`` timesteps, so for other spacings we write 1
    (no effect, no rewrite); for ``leading`` with another offset, or with clipping, the pipeline
    would sample differently from snapjax and we refuse.
    """
    config = schedule.to_diffusers_config()
    if schedule.timestep_spacing != "leading":
        config["steps_offset"] = 1
    elif schedule.steps_offset != 1:
        return config, (f"scheduler: leading spacing with steps_offset={schedule.steps_offset}; "
                        "StableDiffusionPipeline forces steps_offset=1")
    if schedule.clip_sample:
        return config, "scheduler: clip_sample=True; StableDiffusionPipeline forces it off"
    return config, None


def diffusers_misfits(source: ExportSource) -> list[str]:
    """Why the source cannot become a diffusers pipeline folder (empty list: it can)."""
    from snapjax.convert.unet import spec_fits_diffusers

    problems = []
    if not source.is_pipeline:
        problems.append("the checkpoint is a single component, not a pipeline "
                        "(unet + vae + text_encoder + tokenizer)")
    if "unet" in source.components:
        reason = spec_fits_diffusers(source.components["unet"].spec)
        if reason:
            problems.append(f"UNet: {reason}")
    if "vae" in source.components:
        vae = source.components["vae"]
        reason = vae_misfit(vae.spec, vae.params)
        if reason:
            problems.append(f"VAE: {reason}")
    if source.schedule is not None:
        reason = scheduler_config(source.schedule)[1]
        if reason:
            problems.append(reason)
        steps = source.num_steps
        if steps and not source.schedule.diffusers_samples_exactly(steps):
            problems.append(f"scheduler: a {steps}-step grid whose steps land on the next grid "
                            f"timestep (ddim_landing='next'); DDIMScheduler lands at t - "
                            f"{source.schedule.num_train_timesteps // steps}")
    elif source.is_pipeline:
        problems.append("the pipeline records no noise schedule")
    return problems


def vae_config(spec) -> dict[str, Any]:
    n = len(spec.encoder_channels)
    return dict(in_channels=spec.in_channels, out_channels=spec.out_channels,
                down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=list(spec.encoder_channels),
                layers_per_block=spec.layers_per_block, act_fn="silu",
                latent_channels=spec.latent_channels, norm_num_groups=spec.norm_groups,
                scaling_factor=spec.scaling_factor, use_quant_conv=spec.use_quant_conv,
                use_post_quant_conv=spec.use_post_quant_conv,
                mid_block_add_attention=spec.mid_attention)


def text_encoder_config(spec, tokenizer) -> dict[str, Any]:
    return dict(vocab_size=spec.vocab_size, hidden_size=spec.width, intermediate_size=spec.mlp_dim,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                max_position_embeddings=spec.max_length, hidden_act=spec.act,
                layer_norm_eps=spec.eps, eos_token_id=spec.eos_token_id,
                bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)


def _load_strict(module: torch.nn.Module, state_dict: dict, what: str) -> torch.nn.Module:
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}
    result = module.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: the exported names do not match the diffusers class: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return module.eval()


def _clip_text_model(config, state_dict: dict):
    """CLIPTextModel from a state dict under the classic ``text_model.*`` names.

    transformers 5 renames checkpoint keys while loading (and saves without the ``text_model.``
    prefix), so the weights go through ``from_pretrained`` rather than ``load_state_dict``.
    """
    import tempfile

    from safetensors.numpy import save_file
    from transformers import CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        save_file(state_dict, os.path.join(tmp, "model.safetensors"))
        model, info = CLIPTextModel.from_pretrained(tmp, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
        raise ValueError(f"text encoder: the exported names do not match CLIPTextModel: {info}")
    return model.eval()


def build_diffusers_pipeline(source: ExportSource, schedule: NoiseSchedule,
                             sample_size: int | None = None):
    """The torch ``StableDiffusionPipeline`` holding the source's weights (fp32)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig

    from snapjax.convert.unet import diffusers_config_from_spec
    from snapjax.convert.vae import vae_module_map

    problems = diffusers_misfits(source)
    if problems:
        raise ValueError("cannot write a diffusers folder: " + "; ".join(problems))
    unet_c, vae_c, text_c = (source.components[k] for k in ("unet", "vae", "text_encoder"))
    unet_config = diffusers_config_from_spec(unet_c.spec)
    unet_config.pop("_class_name", None)
    unet = UNet2DConditionModel(**unet_config, sample_size=sample_size or source.sample_size or 64)
    _load_strict(unet, export_state_dict("unet", unet_c.spec, unet_c.params), "UNet")

    vae = AutoencoderKL(**vae_config(vae_c.spec))
    _load_strict(vae, state_dict_from_params(vae_c.params, vae_module_map(vae_c.spec),
                                             where="vae params"), "VAE")

    tokenizer = clip_tokenizer(source.tokenizer_dir)
    text_encoder = _clip_text_model(CLIPTextConfig(**text_encoder_config(text_c.spec, tokenizer)),
                                    export_state_dict("text_encoder", text_c.spec, text_c.params))

    scheduler = DDIMScheduler.from_config(scheduler_config(schedule)[0])
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def write_diffusers_pipeline(folder: str | os.PathLike, source: ExportSource,
                             schedule: NoiseSchedule, sample_size: int | None = None) -> epath.Path:
    """Save the pipeline of :func:`build_diffusers_pipeline` to ``folder`` (safetensors; a new
    folder, local or ``gs://``)."""
    from safetensors.numpy import save_file

    pipe = build_diffusers_pipeline(source, schedule, sample_size)
    text_c = source.components["text_encoder"]

    def write(tmp: epath.Path) -> None:  # tmp is local: save_pretrained writes local files
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # Keep the text encoder under the classic text_model.* names SD-v1.5 checkpoints use,
        # which every transformers version loads (transformers 5 would save them without the
        # prefix).
        save_file(export_state_dict("text_encoder", text_c.spec, text_c.params),
                  str(tmp / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
        write_clip_tokenizer_files(source.tokenizer_dir, tmp / "tokenizer", only_vocab=True)

    return pretrained.replace_folder(folder, write)
