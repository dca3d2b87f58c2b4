"""Fréchet distance between two feature sets (the formula behind FID).

For Gaussians N(mu1, S1) and N(mu2, S2) the squared 2-Wasserstein distance is
    |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2).
The trace term is computed from symmetric eigendecompositions (S1^1/2 S2 S1^1/2 is symmetric
PSD), which, unlike a general matrix square root of S1 S2, never produces complex parts or
needs an epsilon retry when a covariance is singular (fewer samples than features).

Legend: N samples, F features.
"""

from __future__ import annotations

import numpy as np


def _sqrt_psd(m_FF: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m_FF + m_FF.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_stats(feats_NF: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] of a feature set, in float64."""
    feats_NF = np.asarray(feats_NF, np.float64)
    if feats_NF.ndim != 2 or feats_NF.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, F], got shape {feats_NF.shape}")
    return feats_NF.mean(0), np.cov(feats_NF, rowvar=False).reshape(feats_NF.shape[1], -1)


def frechet_distance_from_stats(mu1: np.ndarray, sigma1: np.ndarray,
                                mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    f = mu1.shape[0]
    if mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    s1_half = _sqrt_psd(sigma1)
    cross_eig = np.linalg.eigvalsh(s1_half @ sigma2 @ s1_half)
    trace_sqrt = np.sqrt(np.clip(cross_eig, 0, None)).sum()
    diff = mu1 - mu2
    d = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    # Rounding can make a zero distance slightly negative.
    return float(max(d, 0.0))


def frechet_distance(feats_a_NF: np.ndarray, feats_b_NF: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, F] (same F)."""
    a, b = np.asarray(feats_a_NF), np.asarray(feats_b_NF)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, F] with the same F, got {a.shape} and {b.shape}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
