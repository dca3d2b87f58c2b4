"""Post-training weight compression of Core ML packages (coremltools.optimize.coreml).

* 6-bit and 4-bit palettization: each weight tensor becomes a 2^n-entry lookup table plus n-bit
  indices. The table is 1-D k-means (Lloyd's algorithm from quantile centres), computed here in
  numpy because coremltools' own k-means needs scikit-learn; Apple's converter uses k-means too.
* 8-bit linear quantization: symmetric int8 per output channel.

Only the weights of convolutions and linear layers are compressed; weights with at most
``weight_threshold`` elements stay fp16 (coremltools' default rule), and so do embedding tables
and lookup tables (``gather``, as Apple's converter does) and constants such as attention masks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SUPPORTED_BITS = (4, 6, 8)
WEIGHT_THRESHOLD = 2048
_KMEANS_ITERS = 25
_WEIGHT_OPS = ("conv", "linear", "matmul")


def check_bits(bits: int | None) -> None:
    if bits is not None and bits not in SUPPORTED_BITS:
        raise ValueError(f"--quantize-bits {bits} is not supported; choose 6 or 4 "
                         "(palettization) or 8 (linear int8)")


def kmeans_lut(nbits: int, iters: int = _KMEANS_ITERS) -> Callable[[np.ndarray], tuple]:
    """A coremltools ``lut_function``: weight -> (lut (2^nbits,), uint8 indices (size,))."""
    k = 1 << nbits

    def lut_function(weight: np.ndarray):
        x = np.asarray(weight, np.float64).reshape(-1)
        centres = np.quantile(x, (np.arange(k) + 0.5) / k)
        for _ in range(iters):
            # In 1-D the nearest centre is found by the midpoints between sorted centres.
            idx = np.searchsorted((centres[1:] + centres[:-1]) / 2, x)
            counts = np.bincount(idx, minlength=k)
            sums = np.bincount(idx, weights=x, minlength=k)
            new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centres))
            if np.allclose(new, centres, rtol=0, atol=1e-12):
                break
            centres = new
        idx = np.searchsorted((centres[1:] + centres[:-1]) / 2, x)
        return centres.astype(weight.dtype), idx.astype(np.uint8)

    return lut_function


def compress(mlmodel, bits: int, *, weight_threshold: int = WEIGHT_THRESHOLD):
    """The model with compressed weights (a new MLModel; the input is not changed)."""
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig,
                                             linear_quantize_weights, palettize_weights)

    check_bits(bits)
    if bits == 8:
        op = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                     granularity="per_channel", weight_threshold=weight_threshold)
        return linear_quantize_weights(mlmodel, config=_weights_only(op))
    op = OpPalettizerConfig(mode="custom", lut_function=kmeans_lut(bits),
                            weight_threshold=weight_threshold)
    return palettize_weights(mlmodel, config=_weights_only(op))


def _weights_only(op_config):
    from coremltools.optimize.coreml import OptimizationConfig

    return OptimizationConfig(op_type_configs={t: op_config for t in _WEIGHT_OPS})
