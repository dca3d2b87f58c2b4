"""What a denoiser predicts, and how to get from one prediction to another.

With ``z_t = alpha x + sigma eps`` (alpha^2 + sigma^2 = 1) a model may predict
``epsilon`` (eps), ``sample`` (x) or ``v_prediction`` (v = alpha eps - sigma x); any one of them
plus z_t gives the other two. The formulas are written in the same form as diffusers'
DDIMScheduler so that float32 results agree to rounding.

alpha and sigma may be scalars or per-example vectors (B,); they broadcast over the trailing axes
of z. Works on numpy and jax arrays alike.
"""

from __future__ import annotations

from typing import Any

from snapjax.diffusion.schedule import PREDICTION_TYPES

Array = Any  # jax.Array or np.ndarray


def broadcast_like(a: Array | float, x: Array) -> Array:
    """``a`` (scalar or leading-axes array, e.g. (B,)) reshaped to broadcast against ``x``."""
    if not hasattr(a, "ndim") or a.ndim == 0:
        return a
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                         f"got {prediction_type!r}")


def to_x_eps(pred: Array, z_t: Array, alpha: Array, sigma: Array,
             prediction_type: str) -> tuple[Array, Array]:
    """(x_hat, eps_hat) from a model's prediction at z_t."""
    _check(prediction_type)
    a, s = broadcast_like(alpha, z_t), broadcast_like(sigma, z_t)
    if prediction_type == "epsilon":
        return (z_t - s * pred) / a, pred
    if prediction_type == "sample":
        return pred, (z_t - a * pred) / s
    return a * z_t - s * pred, a * pred + s * z_t


def from_x_eps(x: Array, eps: Array, alpha: Array, sigma: Array, prediction_type: str) -> Array:
    """The prediction a model of ``prediction_type`` should make for clean x and noise eps."""
    _check(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x
    return v_target(x, eps, alpha, sigma)


def v_target(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """v = alpha eps - sigma x."""
    return broadcast_like(alpha, x) * eps - broadcast_like(sigma, x) * x


def convert(pred: Array, z_t: Array, alpha: Array, sigma: Array, from_type: str,
            to_type: str) -> Array:
    """Re-express a prediction at z_t in another parametrisation (e.g. an eps teacher as v)."""
    x, eps = to_x_eps(pred, z_t, alpha, sigma, from_type)
    return from_x_eps(x, eps, alpha, sigma, to_type)


def add_noise(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """z_t = alpha x + sigma eps (the forward process)."""
    return broadcast_like(alpha, x) * x + broadcast_like(sigma, x) * eps
