"""What an app does with an exported Core ML folder, written in numpy against model callables.

``predict[name](inputs: dict) -> outputs: dict`` runs one package (TextEncoder, Unet, VAEDecoder)
under Apple's input/output names. On a Mac the callables are Core ML models; anywhere, the
mirror-backed callables of :func:`mirror_predictors` run the same graphs in PyTorch. The loop is
the manifest's (see :mod:`export.coreml.manifest`), so running it against the mirrors checks the
recipe an app follows, and running it against Core ML checks the packages.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from snapjax import storage

Predict = Callable[[dict], dict]
SWIFT_LATENT_SCALE = 0.18215


def encode(predict: dict[str, Predict], ids_1L: np.ndarray) -> np.ndarray:
    """TextEncoder on float32 ids -> last_hidden_state (1, L, D)."""
    out = predict["TextEncoder"]({"input_ids": ids_1L.astype(np.float32)})
    return np.asarray(out["last_hidden_state"], np.float32)


def guidance_features(w_B: np.ndarray, dim: int) -> np.ndarray:
    """(B, dim) float32 features of guidance scales, in float64 (the manifest's
    unet.guidance_features; diffusers' get_guidance_scale_embedding(w - 1, dim))."""
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    args = (np.asarray(w_B, np.float64).reshape(-1, 1) - 1.0) * 1000.0 * freqs[None, :]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
    return np.pad(emb, ((0, 0), (0, dim % 2))).astype(np.float32)


def unet_eps(predict: dict[str, Predict], batch: int, z: np.ndarray, t: np.ndarray,
             hidden_BLD: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Epsilon for a batch, in calls of the Unet's fixed batch size; ``extra`` are further
    per-example inputs by name (a guidance-conditioned Unet's features)."""
    states = hidden_BLD.transpose(0, 2, 1)[:, :, None, :]  # (B, D, 1, L), as the Swift pipeline
    outs = []
    for i in range(0, len(z), batch):
        inputs = {"sample": z[i:i + batch], "timestep": t[i:i + batch],
                  "encoder_hidden_states": states[i:i + batch]}
        inputs.update({name: value[i:i + batch] for name, value in (extra or {}).items()})
        outs.append(np.asarray(predict["Unet"](inputs)["noise_pred"], np.float32))
    return np.concatenate(outs)


def _guidance_scale(manifest: dict, override: float | None) -> float:
    w = manifest.get("guidance_scale") if override is None else override
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ValueError(f"manifest: guidance_scale is {w!r}; the loop needs the guidance scale "
                         "(pass guidance_scale= or export the manifest with --guidance)"
                         + (": this Unet is guidance-conditioned, the scale is one of its inputs"
                            if manifest["unet"].get("guidance_conditioned") else ""))
    return float(w)


def _clip_range(sched: dict) -> float | None:
    if not sched["clip_sample"]:
        return None
    limit = sched.get("clip_sample_range")
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise ValueError(f"manifest: clip_sample is on but clip_sample_range is {limit!r}; "
                         "expected a positive number (the clamp of the predicted x)")
    return float(limit)


def generate(predict: dict[str, Predict], manifest: dict, ids_cond: np.ndarray,
             ids_uncond: np.ndarray | None, noise_1Chw: np.ndarray, *,
             guidance_scale: float | None = None) -> np.ndarray:
    """One image (H, W, 3) uint8 by the manifest's DDIM loop, guidance included.

    A guidance-conditioned Unet (``unet.guidance_conditioned``) is called once per step on the
    prompt alone, with the scale's features as its guidance input; ``ids_uncond`` is unused then.
    ``guidance_scale`` overrides the manifest's.
    """
    sched, unet = manifest["schedule"], manifest["unet"]
    w, clip = _guidance_scale(manifest, guidance_scale), _clip_range(sched)
    batch = unet["batch"]
    conditioned = bool(unet.get("guidance_conditioned"))
    if conditioned:
        name, dim = unet.get("guidance_input"), unet.get("guidance_embed_dim")
        if not name or not dim:
            raise ValueError("manifest: unet.guidance_conditioned is true but unet.guidance_input "
                             f"/ unet.guidance_embed_dim are {name!r} / {dim!r}")
        hidden = encode(predict, ids_cond)
        extra = {name: guidance_features(np.full(1, w), dim)}
    else:
        if ids_uncond is None:
            raise ValueError("ids_uncond: guidance needs the empty (or negative) prompt's ids")
        hidden = np.concatenate([encode(predict, ids_uncond), encode(predict, ids_cond)])
    z = noise_1Chw.astype(np.float32)
    for t, a_t, a_s in zip(sched["timesteps"], sched["alphas_cumprod"],
                           sched["alphas_cumprod_prev"]):
        if conditioned:  # the output is already guided
            eps = unet_eps(predict, batch, z, np.full(1, t, np.float32), hidden, extra)
        else:
            eps_u, eps_c = np.split(unet_eps(predict, batch, np.concatenate([z, z]),
                                             np.full(2, t, np.float32), hidden), 2)
            eps = eps_u + w * (eps_c - eps_u)
        x = (z - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        if clip is not None:  # DDIMScheduler's clip_sample: eps stays the model's
            x = np.clip(x, -clip, clip)
        z = np.sqrt(a_s) * x + np.sqrt(1 - a_s) * eps
    image = predict["VAEDecoder"]({"z": z / SWIFT_LATENT_SCALE})["image"][0]
    image = np.clip(np.asarray(image, np.float32) / 2 + 0.5, 0, 1)
    return np.round(image.transpose(1, 2, 0) * 255).astype(np.uint8)


def mirror_predictors(mirrors_dir: str | os.PathLike, manifest: dict) -> dict[str, Predict]:
    """PyTorch (fp32) callables with the packages' I/O, from a ``snapjax export torch`` folder
    (local or ``gs://``)."""
    import torch

    from export.coreml.wrappers import TextEncoderWrapper, UnetWrapper, VAEDecoderWrapper
    from export.torch.mirror import load_mirror

    schedule = schedule_from_manifest(manifest)
    mirrors_dir = storage.path(mirrors_dir)

    def runner(wrapper, names):
        def predict(inputs: dict) -> dict:
            with torch.no_grad():  # by name: the wrappers' arguments are the packages' inputs
                out = wrapper(**{k: torch.from_numpy(np.asarray(v, np.float32))
                                 for k, v in inputs.items()})
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
        steps_offset=s["steps_offset"], clip_sample=s["clip_sample"],
        # manifests written before the range was recorded: DDIMScheduler's default
        clip_sample_range=s.get("clip_sample_range", 1.0))


def tokenize(tokenizer_dir: str | os.PathLike, prompt: str, length: int) -> np.ndarray:
    """(1, length) ids, padded as Stable Diffusion pads (the tokenizer's pad token)."""
    from export.tokenizer_files import clip_tokenizer

    tok = clip_tokenizer(tokenizer_dir)
    ids = tok([prompt], padding="max_length", max_length=length, truncation=True).input_ids
    return np.asarray(ids, np.int64)
