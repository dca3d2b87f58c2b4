"""FID with the standard Inception-v3 weights, read from a file (local or gs://), never downloaded.

The FID that papers report (SnapFusion's Fig. 4 / 6 included) uses the TensorFlow Inception
of 2015-12-05, whose PyTorch form is NVIDIA's TorchScript file ``inception-2015-12-05.pt``
(StyleGAN2-ADA's metrics; clean-fid and torch-fidelity ship the same network): called as
``model(images_uint8_NCHW, return_features=True)`` it resizes to 299 x 299 the TensorFlow way
and returns the 2048 pool features. snapjax loads that file with ``torch.jit.load`` and never
downloads it: give its path (``--inception FILE``, local or ``gs://``). Its SHA-256 is
recorded with every result, and a hash other than the one expected (``--inception-sha256``) is
warned about, naming the file, since FIDs from different Inception weights are not comparable.

Reference statistics (mean and covariance of the reference images' features) are computed once
per reference set and weights file, and cached as ``.npz`` beside the results (a bucket's
folder too: the cache is read and written through file objects).

Like CLIP (:mod:`snapjax.eval.clip_score`), the metric model is PyTorch: torch is imported only
inside the functions that run it.

Legend: N images, F features (2048 for the standard file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os

import numpy as np

from snapjax import storage
from snapjax.eval import frechet

log = logging.getLogger(__name__)

STANDARD_FILE = "inception-2015-12-05.pt"


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class InceptionFeatures:
    """``extractor(images_uint8_BHWC) -> (B, F)`` float64 pool features."""

    model: object
    path: str
    sha256: str
    device: object
    batch_size: int = 50

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, expected_sha256: str | None = None,
                  device: str | None = None, batch_size: int = 50) -> "InceptionFeatures":
        path = storage.path(path)
        with storage.clear_errors(path, "read"):
            if not path.is_file():
                raise ValueError(f"Inception weights {path} not found: FID needs the "
                                 f"TorchScript file {STANDARD_FILE} (StyleGAN2-ADA's metrics "
                                 "file), local or gs://; snapjax never downloads metric models")
        digest = sha256(path)
        if expected_sha256 and digest != expected_sha256.lower():
            log.warning("Inception weights %s have SHA-256 %s, not the expected %s: FIDs "
                        "computed with them are not comparable to published ones",
                        path, digest, expected_sha256)
        import warnings

        import torch  # the metric model is PyTorch: see the module docstring
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript, but the standard file is one; nothing
                # else reads it with the exact published network.
                warnings.simplefilter("ignore", DeprecationWarning)
                # A bucket's file is read into memory (about 100 MB): torch wants a file.
                source = io.BytesIO(path.read_bytes()) if storage.is_remote(path) else str(path)
                model = torch.jit.load(source, map_location="cpu").eval()
        except RuntimeError as e:
            raise ValueError(f"Inception weights {path}: not a TorchScript file "
                             f"torch.jit.load can read ({str(e).splitlines()[0]})") from None
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model.to(device), str(path), digest, device, batch_size)

    def __call__(self, images_BHWC: np.ndarray) -> np.ndarray:
        import torch
        images_BHWC = np.asarray(images_BHWC)
        if images_BHWC.ndim != 4 or images_BHWC.shape[-1] != 3 or images_BHWC.dtype != np.uint8:
            raise ValueError("FID features take uint8 RGB images (B, H, W, 3), got "
                             f"{images_BHWC.dtype} {images_BHWC.shape}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(images_BHWC), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(
                    images_BHWC[i:i + self.batch_size].transpose(0, 3, 1, 2))).to(self.device)
                out.append(self.model(x, return_features=True).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


def reference_stats(extractor: InceptionFeatures, images_BHWC: np.ndarray,
                    cache: str | os.PathLike,
                    *, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the reference set's features, from ``cache`` (an ``.npz``) when
    it holds this set (``key``: e.g. the sorted image ids) under these weights, else computed
    and written there."""
    cache = storage.path(cache)
    tag = hashlib.sha256(json.dumps([key, extractor.sha256]).encode()).hexdigest()[:16]
    if cache.is_file():
        # np.load and np.savez take file objects: the cache may sit in a bucket.
        with np.load(io.BytesIO(cache.read_bytes())) as f:
            if str(f["tag"]) == tag:
                return f["mu"], f["sigma"]
        log.info("%s holds statistics of another reference set or weights; recomputing", cache)
    mu, sigma = frechet.gaussian_stats(extractor(images_BHWC))
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, tag=np.asarray(tag))
    if storage.is_remote(cache):
        cache.write_bytes(buf.getvalue())  # an object appears whole
    else:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(cache)
    return mu, sigma


def fid(extractor: InceptionFeatures, images_BHWC: np.ndarray, ref_mu: np.ndarray,
        ref_sigma: np.ndarray) -> float:
    """FID of ``images_BHWC`` against reference statistics."""
    return frechet.frechet_distance_from_stats(
        *frechet.gaussian_stats(extractor(images_BHWC)), ref_mu, ref_sigma)
