"""Bootstrap confidence intervals: every evaluation number comes with its spread.

The percentile bootstrap (Efron): resample the N scored images with replacement R times,
recompute the statistic on each resample, and report the (1 - level) / 2 and (1 + level) / 2
quantiles of the R values, for a mean of per-image values (accuracy, CLIP score: vectorised
over all resamples at once); :func:`statistic_interval` takes any function of the resampled
indices (the mean accuracy over attributes) and gives the basic interval [2 v - q_high,
2 v - q_low], equal to the percentile one for an unbiased statistic.

A Fréchet distance is not resampled at all. Its covariance estimate biases it upwards, and a
resample with repeated images (about a third of a bootstrap resample's rows) is biased far
more: on the world (64 reader features) the resampled distances sat far above the measured
one and no bootstrap interval, percentile or basic, covered it. The grouped jackknife fails
too: the square root of the covariances' near-zero eigenvalues makes the distance non-smooth,
and its interval came out ten times wider than the spread between seeds (2026-12-02: half-width
15 against per-seed values 21.9 and 20.6). So distances get their spread from seeds
(:func:`seed_interval`): the mean of one value per noise seed, each on the same prompts, and
the t interval of that mean.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


def _indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
    if n < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 samples, got {n}")
    if num_resamples < 2:
        raise ValueError(f"num_resamples={num_resamples}: need at least 2")
    return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def _quantiles(values_R: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level={level}: a confidence level lies in (0, 1)")
    low, high = np.quantile(values_R, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def mean_interval(values_N: np.ndarray, *, num_resamples: int = DEFAULT_RESAMPLES,
                  level: float = DEFAULT_LEVEL, seed: int = 0) -> dict:
    """{"value", "low", "high", "n"} for the mean of per-sample values ``values_N``."""
    values_N = np.asarray(values_N, np.float64)
    if values_N.ndim != 1:
        raise ValueError(f"per-sample values must be 1-D, got shape {values_N.shape}")
    idx_RN = _indices(values_N.shape[0], num_resamples, seed)
    low, high = _quantiles(values_N[idx_RN].mean(axis=1), level)
    return {"value": float(values_N.mean()), "low": low, "high": high, "n": int(values_N.shape[0])}


def statistic_interval(statistic: Callable[[np.ndarray], float], n: int, *,
                       num_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                       seed: int = 0) -> dict:
    """{"value", "low", "high", "n"} for ``statistic(indices)`` of ``n`` samples: the value v
    on ``arange(n)`` and the basic bootstrap interval over ``num_resamples`` index sets (see
    the module docstring: it stays centred on v when resampling biases the statistic)."""
    idx_RN = _indices(n, num_resamples, seed)
    values = np.asarray([statistic(idx) for idx in idx_RN], np.float64)
    q_low, q_high = _quantiles(values, level)
    value = float(statistic(np.arange(n)))
    return {"value": value, "low": 2 * value - q_high, "high": 2 * value - q_low, "n": int(n)}


def seed_interval(values_K: np.ndarray, *, level: float = DEFAULT_LEVEL,
                  samples_per_seed: int) -> dict:
    """{"value", "low", "high", "n", "seeds", "sd"} for one value per seed: the mean, the
    Student-t interval of the mean (no interval, low = high = the value, from one seed)."""
    from scipy import stats
    values_K = np.asarray(values_K, np.float64)
    k = values_K.shape[0]
    if k < 1:
        raise ValueError("seed_interval needs at least one value")
    mean = float(values_K.mean())
    sd = float(values_K.std(ddof=1)) if k > 1 else 0.0
    half = float(stats.t.ppf((1 + level) / 2, k - 1) * sd / np.sqrt(k)) if k > 1 else 0.0
    return {"value": mean, "low": mean - half, "high": mean + half, "n": int(samples_per_seed),
            "seeds": int(k), "sd": sd}


def format_interval(result: dict, digits: int = 3) -> str:
    """'0.943 [0.925, 0.958] (n=768)', or for a seed interval '20.3 [18.1, 22.5] (3 seeds x
    n=256, sd 0.9)'."""
    f = f"{{:.{digits}f}}"
    head = f"{f.format(result['value'])} [{f.format(result['low'])}, {f.format(result['high'])}]"
    if "seeds" in result:
        return f"{head} ({result['seeds']} seeds x n={result['n']}, sd {f.format(result['sd'])})"
    return f"{head} (n={result['n']})"
