"""The world's metrics of a set of generated images, each with a bootstrap interval.

The reader (:mod:`snapjax.eval.reader`) reads every image once; from its predictions and
features come, over the N images:
  ``accuracy/<attr>``  the fraction whose stated attribute is read as captioned (the world's
                       CLIP score, per attribute); ``accuracy/mean`` their mean;
  ``accuracy/all``     the fraction with every stated attribute right (the headline rate);
  ``frechet_distance`` between reader features of these images and of real renders of the
                       same captions (the world's FID; lower is better).
Accuracies get bootstrap intervals over images. The Fréchet distance is returned as a plain
number: its spread comes from seeds (:func:`snapjax.eval.intervals.seed_interval`, which
:mod:`snapjax.eval.evaluate` applies), since resampling images biases it.

Legend: N images, F reader features.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from snapjax.eval import frechet, intervals
from snapjax.eval import reader as reader_lib


def correct_per_image(reader, images, attributes: Mapping[str, np.ndarray]
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Features [N, F]; per attribute a float [N] of 1 (right), 0 (wrong), NaN (not stated);
    and the all-stated-attributes-right indicator [N]."""
    feats_NF, preds = reader_lib.read(reader, images)
    labels = reader_lib.stated_labels(reader, attributes, feats_NF.shape[0])
    per_attr = {a: np.where(y >= 0, (preds[a] == y).astype(np.float64), np.nan)
                for a, y in labels.items()}
    all_ok = np.ones(feats_NF.shape[0], bool)
    for a, y in labels.items():
        all_ok &= (y < 0) | (preds[a] == y)
    return feats_NF, per_attr, all_ok.astype(np.float64)


def score_with_intervals(reader, images, attributes: Mapping[str, np.ndarray],
                         reference_images=None, *,
                         num_resamples: int = intervals.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """{accuracy metric: {"value", "low", "high", "n"}} and, given ``reference_images`` (real
    renders, any count), ``frechet_distance``: a float, no interval (see the module docstring)."""
    feats_NF, per_attr, all_ok = correct_per_image(reader, images, attributes)
    opts = dict(num_resamples=num_resamples, seed=seed)
    out = {}
    for attr, values in per_attr.items():
        stated = values[~np.isnan(values)]
        out[f"accuracy/{attr}"] = intervals.mean_interval(stated, **opts)
    if per_attr:
        # The mean over attributes, resampled jointly (same images for every attribute).
        stacked = np.stack(list(per_attr.values()))
        out["accuracy/mean"] = intervals.statistic_interval(
            lambda idx: float(np.mean(np.nanmean(stacked[:, idx], axis=1))),
            feats_NF.shape[0], **opts)
    out["accuracy/all"] = intervals.mean_interval(all_ok, **opts)
    if reference_images is not None:
        ref_mu, ref_cov = frechet.gaussian_stats(reader_lib.features(reader, reference_images))
        out["frechet_distance"] = frechet.frechet_distance_from_stats(
            *frechet.gaussian_stats(feats_NF), ref_mu, ref_cov)
    return out


def values(scores: Mapping[str, dict | float]) -> dict[str, float]:
    """The point values of :func:`score_with_intervals`' result."""
    return {k: v["value"] if isinstance(v, dict) else v for k, v in scores.items()}
