"""What an app does with an exported Core ML folder, written in numpy against model callables.

``predict[name](inputs: dict) -> outputs: dict`` runs one package (TextEncoder, Unet, VAEDecoder)
under Apple's input/output names. On a Mac the callables are Core ML models; anywhere, the
mirror-backed callables of :func:`mirror_predictors` run the same graphs in PyTorch. The loop is
the manifest's (see :mod:`export.coreml.manifest`), so running it against the mirrors checks the
recipe an app follows, and running it against Core ML checks the packages.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Predict = Callable[[dict], dict]
SWIFT_LATENT_SCALE = 0.18215


def encode(predict: dict[str, Predict], ids_1L: np.ndarray) -> np.ndarray:
    """TextEncoder on float32 ids -> last_hidden_state (1, L, D)."""
    out = predict["TextEncoder"]({"input_ids": ids_1L.astype(np.float32)})
    return np.asarray(out["last_hidden_state"], np.float32)


def unet_eps(predict: dict[str, Predict], batch: int, z: np.ndarray, t: np.ndarray,
             hidden_BLD: np.ndarray) -> np.ndarray:
    """Epsilon for a batch, in calls of the Unet's fixed batch size."""
    states = hidden_BLD.transpose(0, 2, 1)[:, :, None, :]  # (B, D, 1, L), as the Swift pipeline
    outs = []
    for i in range(0, len(z), batch):
        out = predict["Unet"]({"sample": z[i:i + batch], "timestep": t[i:i + batch],
                               "encoder_hidden_states": states[i:i + batch]})
        outs.append(np.asarray(out["noise_pred"], np.float32))
    return np.concatenate(outs)


def generate(predict: dict[str, Predict], manifest: dict, ids_cond: np.ndarray,
             ids_uncond: np.ndarray, noise_1Chw: np.ndarray) -> np.ndarray:
    """One image (H, W, 3) uint8 by the manifest's DDIM loop, guidance included."""
    sched, w = manifest["schedule"], manifest["guidance_scale"]
    batch = manifest["unet"]["batch"]
    hidden = np.concatenate([encode(predict, ids_uncond), encode(predict, ids_cond)])
    z = noise_1Chw.astype(np.float32)
    for t, a_t, a_s in zip(sched["timesteps"], sched["alphas_cumprod"],
                           sched["alphas_cumprod_prev"]):
        eps_u, eps_c = np.split(unet_eps(predict, batch, np.concatenate([z, z]),
                                         np.full(2, t, np.float32), hidden), 2)
        eps = eps_u + w * (eps_c - eps_u)
        x = (z - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        if sched["clip_sample"]:
            raise NotImplementedError("clip_sample: clamp x here")
        z = np.sqrt(a_s) * x + np.sqrt(1 - a_s) * eps
    image = predict["VAEDecoder"]({"z": z / SWIFT_LATENT_SCALE})["image"][0]
    image = np.clip(np.asarray(image, np.float32) / 2 + 0.5, 0, 1)
    return np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)


def mirror_predictors(mirrors_dir: str | Path, manifest: dict) -> dict[str, Predict]:
    """PyTorch (fp32) callables with the packages' I/O, from a ``snapjax export torch`` folder."""
    import torch

    from export.coreml.wrappers import TextEncoderWrapper, UnetWrapper, VAEDecoderWrapper
    from export.torch.mirror import load_mirror

    schedule = schedule_from_manifest(manifest)
    mirrors_dir = Path(mirrors_dir)

    def runner(wrapper, names):
        def predict(inputs: dict) -> dict:
            with torch.no_grad():
                out = wrapper(*[torch.from_numpy(np.asarray(v, np.float32))
                                for v in inputs.values()])
            out = out if isinstance(out, tuple) else (out,)
            return dict(zip(names, (o.numpy() for o in out)))
        return predict

    builders = {
        "TextEncoder": ("text_encoder", lambda m: TextEncoderWrapper(m),
                        ("last_hidden_state", "pooled_outputs")),
        "Unet": ("unet", lambda m: UnetWrapper(m, schedule), ("noise_pred",)),
        "VAEDecoder": ("vae_decoder", lambda m: VAEDecoderWrapper(m), ("image",)),
    }
    predict = {}
    for name, (folder, wrap, outputs) in builders.items():
        if (mirrors_dir / folder).is_dir():
            attention = manifest["unet"]["attention"] if folder == "unet" else "original"
            predict[name] = runner(wrap(load_mirror(mirrors_dir / folder, attention=attention))
                                   .eval(), outputs)
    return predict


def schedule_from_manifest(manifest: dict):
    from snapjax.diffusion.schedule import NoiseSchedule

    s = manifest["schedule"]
    return NoiseSchedule(
        num_train_timesteps=s["num_train_timesteps"], beta_start=s["beta_start"],
        beta_end=s["beta_end"], beta_schedule=s["beta_schedule"],
        prediction_type=s["model_prediction_type"], timestep_spacing=s["timestep_spacing"],
        steps_offset=s["steps_offset"], clip_sample=s["clip_sample"])


def tokenize(tokenizer_dir: str | Path, prompt: str, length: int) -> np.ndarray:
    """(1, length) ids, padded as Stable Diffusion pads (the tokenizer's pad token)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok([prompt], padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, np.int64)
