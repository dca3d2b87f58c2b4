"""Image bytes to model-ready pixels: decode, resize the shorter side, center-crop.

Every source goes through :func:`load_image`, so all of them treat a file the same way and
raise the same :class:`UnreadableImage` for anything PIL cannot turn into pixels (the pipeline
skips and counts those; it never crashes on them).

Legend: R resolution (output height = width), B batch.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Stable Diffusion training scripts resize with an antialiased filter, then center-crop.
RESAMPLE = Image.Resampling.BICUBIC


class UnreadableImage(ValueError):
    """An image that cannot be decoded (corrupt, truncated, not an image, missing file)."""


def resize_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """uint8 [R, R, 3]: shorter side resized to R (bicubic, antialiased), then the center square."""
    w, h = img.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), RESAMPLE)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.asarray(img, dtype=np.uint8)


def load_image(data: bytes, resolution: int, where: str) -> np.ndarray:
    """Encoded bytes to uint8 [R, R, 3]; UnreadableImage (naming ``where``) when undecodable."""
    try:
        img = Image.open(io.BytesIO(data))
        # JPEG: let the decoder downscale by a power of two while staying >= R on both sides.
        img.draft("RGB", (resolution, resolution))
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, EOFError... on bad bytes
        raise UnreadableImage(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e
    try:
        img.load()
        img = img.convert("RGB")
        if min(img.size) < 1:
            raise ValueError(f"empty image {img.size}")
        return resize_center_crop(img, resolution)
    except Exception as e:  # see above
        raise UnreadableImage(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


def array_to_image(pixels: np.ndarray, resolution: int, where: str) -> np.ndarray:
    """An already-decoded uint8 [H, W, C] array (C = 1, 3 or 4) to uint8 [R, R, 3]."""
    a = np.asarray(pixels)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.dtype != np.uint8 or 0 in a.shape:
        raise UnreadableImage(f"{where}: expected uint8 [H, W, 1|3|4] pixels, "
                              f"got {a.dtype} {a.shape}")
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")
    return resize_center_crop(img, resolution)


def to_model_range(images_BRRC: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] to float32 [-1, 1], the range the VAE takes."""
    return images_BRRC.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
