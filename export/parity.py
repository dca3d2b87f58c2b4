"""Numerical checks of an export: snapjax vs the PyTorch mirror (fp32), and the mirror in fp16.

Both take the same deterministic example inputs per component, in PyTorch layout (NCHW):

  unet          sample (B, C, h, w), timesteps (B,) at both ends of the schedule, context (B, S, D)
                and, for a guidance-conditioned UNet, guidance scales (B,) from 1 to 8
  vae_decoder   z (B, Z, h, w), a raw latent (diffusion latent / scaling_factor)
  text_encoder  input_ids (B, L): BOS, random tokens, EOS, EOS padding

The error measure is max |a - ref| / max |ref| (what the tests state tolerances in).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

# fp16's largest finite value; an fp32 activation beyond half of it leaves no headroom.
FP16_MAX = 65504.0
FP16_HEADROOM = 0.5
# fp16 mirror vs fp32 mirror: above this relative error the fp16 model is not the same model.
FP16_REL_TOL = 0.05


def rel_err(actual, ref) -> float:
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(actual - ref).max() / max(np.abs(ref).max(), 1e-30))


def example_inputs(kind: str, spec: Any, *, batch: int = 2, latent_size: int | None = None,
                   context_length: int = 77, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Deterministic float32/int inputs for ``kind`` in PyTorch layout."""
    rng = np.random.default_rng(seed)
    if kind == "unet":
        side = latent_size or 2 * 2 ** (spec.num_stages - 1)
        sample = rng.standard_normal((batch, spec.in_channels, side, side)).astype(np.float32)
        t = np.linspace(999, 1, batch).round().astype(np.int64)
        ctx = rng.standard_normal((batch, context_length, spec.context_dim)).astype(np.float32)
        if spec.guidance_embed_dim:
            return sample, t, ctx, np.linspace(1.0, 8.0, batch).astype(np.float32)
        return sample, t, ctx
    if kind == "vae_decoder":
        side = latent_size or 4
        z = rng.standard_normal((batch, spec.latent_channels, side, side)) / spec.scaling_factor
        return (z.astype(np.float32),)
    if kind == "text_encoder":
        L = spec.max_length
        ids = rng.integers(1, spec.vocab_size - 2, (batch, L))
        ids[:, 0] = spec.vocab_size - 2  # BOS
        for b in range(batch):  # prompt lengths differ per example; EOS then EOS padding
            ids[b, 3 + 2 * b:] = spec.vocab_size - 1
        return (ids.astype(np.int64),)
    raise ValueError(f"unknown component kind {kind!r}")


def snapjax_forward(kind: str, spec: Any, params: Any,
                    inputs: tuple[np.ndarray, ...]) -> np.ndarray:
    """snapjax's output for ``inputs`` (PyTorch layout in and out), float32."""
    import jax.numpy as jnp

    if kind == "unet":
        from snapjax.models.unet import UNet
        sample, t, ctx, *guidance = inputs
        out = UNet(spec).apply({"params": params}, jnp.asarray(sample.transpose(0, 2, 3, 1)),
                               jnp.asarray(t), jnp.asarray(ctx),
                               guidance_B=jnp.asarray(guidance[0]) if guidance else None)
        return np.asarray(out).transpose(0, 3, 1, 2)
    if kind == "vae_decoder":
        from snapjax.models.vae import VAEDecoder, decoder_params
        params = decoder_params(dict(params)) if "encoder" in params else params
        z = jnp.asarray(inputs[0].transpose(0, 2, 3, 1))
        out = VAEDecoder(spec).apply({"params": params}, z)
        return np.asarray(out).transpose(0, 3, 1, 2)
    if kind == "text_encoder":
        from snapjax.models.text_encoder import TextEncoder
        return np.asarray(TextEncoder(spec).apply({"params": params}, jnp.asarray(inputs[0])))
    raise ValueError(f"unknown component kind {kind!r}")


def mirror_forward(mirror: nn.Module, kind: str, inputs: tuple[np.ndarray, ...],
                   dtype: torch.dtype = torch.float32) -> np.ndarray:
    """The mirror's main output (last hidden state for the text encoder), as float32 numpy."""
    tensors = [torch.from_numpy(x) if x.dtype.kind == "i" else torch.from_numpy(x).to(dtype)
               for x in inputs]
    with torch.no_grad():
        out = mirror(*tensors)
    if kind == "text_encoder":
        out = out[0]
    return out.float().numpy()


def parity_error(kind: str, spec: Any, params: Any, mirror: nn.Module, **input_kwargs) -> float:
    """max rel err of the fp32 mirror against snapjax on :func:`example_inputs`."""
    inputs = example_inputs(kind, spec, **input_kwargs)
    return rel_err(mirror_forward(mirror, kind, inputs),
                   snapjax_forward(kind, spec, params, inputs))


@dataclasses.dataclass(frozen=True)
class Fp16Report:
    ok: bool
    rel_err: float          # fp16 mirror vs fp32 mirror
    max_activation: float   # largest |value| any module outputs in fp32
    reason: str = ""


def fp16_check(mirror: nn.Module, kind: str, spec: Any, **input_kwargs) -> Fp16Report:
    """Run the mirror in half precision against fp32: finite, close, and with fp16 headroom."""
    inputs = example_inputs(kind, spec, **input_kwargs)
    peaks: list[float] = []

    def record(_module, _inputs, output):
        for o in output if isinstance(output, tuple) else (output,):
            if isinstance(o, torch.Tensor) and o.is_floating_point():
                peaks.append(float(o.detach().abs().max()))

    handles = [m.register_forward_hook(record) for m in mirror.modules()]
    try:
        ref = mirror_forward(mirror, kind, inputs)
    finally:
        for h in handles:
            h.remove()
    half = copy.deepcopy(mirror).half()
    out = mirror_forward(half, kind, inputs, dtype=torch.float16)
    peak = max(peaks, default=0.0)
    if not np.isfinite(out).all():
        return Fp16Report(False, float("inf"), peak, "non-finite values in fp16")
    err = rel_err(out, ref)
    if peak > FP16_HEADROOM * FP16_MAX:
        return Fp16Report(False, err, peak, f"an fp32 activation reaches {peak:.3g}, beyond "
                          f"{FP16_HEADROOM:g} x fp16's max {FP16_MAX:g}")
    if err > FP16_REL_TOL:
        return Fp16Report(False, err, peak,
                          f"fp16 output differs by {err:.3g} (relative) from fp32")
    return Fp16Report(True, err, peak)
