"""Between the training mesh and the host: pulling params back, placing host arrays next to
them, and tiling preview images into one grid."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from snapjax import sampling, sharding
from snapjax.train.state import TrainState


def to_host(tree):
    """Device arrays -> numpy, also for arrays spread over several processes."""
    return jax.tree.map(sampling.host_array, tree)


def replicated_like(state: TrainState, x: np.ndarray):
    """A host array replicated on the mesh the state lives on (works across processes)."""
    leaf = jax.tree.leaves(state.params)[0]
    mesh = getattr(leaf.sharding, "mesh", None)
    if isinstance(mesh, Mesh):
        return jax.device_put(x, sharding.replicated(mesh))
    return x


def grid(images_NHWC: np.ndarray, rows: int) -> np.ndarray:
    """uint8 images -> one uint8 grid image, row-major, 2-pixel gaps."""
    images_NHWC = np.asarray(images_NHWC)
    if images_NHWC.dtype != np.uint8:
        raise TypeError(f"grid takes uint8 images (sampling.to_uint8), got {images_NHWC.dtype}")
    n, h, w, c = images_NHWC.shape
    cols = int(np.ceil(n / rows))
    pad = 2
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + col * (w + pad):pad + col * (w + pad) + w] = images_NHWC[i]
    return out

