"""Torch wrappers giving the mirrors the inputs and outputs of Apple's ml-stable-diffusion models.

Apple's converter (python_coreml_stable_diffusion/torch2coreml.py) and its Swift pipeline fix:

  TextEncoder  input_ids (1, L) float32 -> last_hidden_state (1, L, D), pooled_outputs (1, D)
  Unet         sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, D, 1, L)
               -> noise_pred (B, C, h, w), an epsilon prediction
               (+ timestep_cond (1, G) for a guidance-conditioned UNet, with B = 1; ours)
  VAEDecoder   z (1, C, h, w) = latent / 0.18215 -> image (1, 3, H, W) in [-1, 1]

Where our models differ from what the Swift pipeline assumes, the difference is solved here, in
the exported graph:

* a v-prediction (or x-prediction) UNet outputs epsilon: eps = sigma_t z_t + alpha_t v
  (resp. (z_t - alpha_t x) / sigma_t) with alpha_t, sigma_t looked up from the timestep input;
* a VAE whose latent scale factor is not SD's 0.18215 rescales z, since Swift divides by 0.18215;
* the sinusoidal timestep features come from a float64-computed table (fp16 loses sin's phase);
* a guidance-conditioned UNet (one call per step, the scale as an input, which Apple's converter
  and Swift pipeline do not know) takes the guidance scale's sinusoidal features, not the scale:
  see :data:`export.coreml.manifest.GUIDANCE_INPUT`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from export.coreml.manifest import GUIDANCE_INPUT
from snapjax.diffusion.schedule import NoiseSchedule, alphas_cumprod

# The latent scale Apple's Swift Decoder divides by before calling the VAEDecoder model.
SWIFT_LATENT_SCALE = 0.18215


class TextEncoderWrapper(nn.Module):
    def __init__(self, mirror: nn.Module):
        super().__init__()
        self.mirror = mirror

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mirror(input_ids)


class UnetWrapper(nn.Module):
    """Apple's Unet I/O; outputs epsilon whatever the model's prediction type. A guidance-
    conditioned UNet also takes ``timestep_cond`` (the manifest's ``unet.guidance_input``) and
    outputs the guided epsilon."""

    def __init__(self, mirror: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.mirror = mirror
        self.prediction_type = schedule.prediction_type
        mirror.use_sinusoid_table(schedule.num_train_timesteps)
        abar = alphas_cumprod(schedule).astype(np.float64)
        self.register_buffer("alpha_T", torch.tensor(np.sqrt(abar), dtype=torch.float32))
        self.register_buffer("sigma_T", torch.tensor(np.sqrt(1 - abar), dtype=torch.float32))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        G = self.mirror.spec.guidance_embed_dim
        if G and timestep_cond is None:
            raise ValueError(f"Unet: this UNet is guidance-conditioned (guidance_embed_dim={G}): "
                             f"pass {GUIDANCE_INPUT}, the (1, {G}) features of the guidance "
                             "scale (the manifest's unet.guidance_features)")
        if not G and timestep_cond is not None:
            raise ValueError(f"Unet: {GUIDANCE_INPUT} given, but this UNet has no guidance "
                             "input; guidance runs as two Unet evaluations per step")
        ctx_BSD = encoder_hidden_states.squeeze(2).transpose(1, 2)
        out = self.mirror(sample, timestep, ctx_BSD, timestep_cond_BG=timestep_cond)
        if self.prediction_type == "epsilon":
            return out
        idx = torch.round(timestep.float()).long()
        alpha = self.alpha_T.to(out.dtype)[idx][:, None, None, None]
        sigma = self.sigma_T.to(out.dtype)[idx][:, None, None, None]
        if self.prediction_type == "v_prediction":
            return sigma * sample + alpha * out
        return (sample - alpha * out) / sigma  # "sample": an x prediction


class VAEDecoderWrapper(nn.Module):
    """Apple's VAEDecoder I/O: z = latent / 0.18215 in, image in [-1, 1] out."""

    def __init__(self, mirror: nn.Module):
        super().__init__()
        self.mirror = mirror
        self.rescale = SWIFT_LATENT_SCALE / mirror.spec.scaling_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if abs(self.rescale - 1.0) > 1e-9:
            z = z * self.rescale
        return self.mirror(z)
