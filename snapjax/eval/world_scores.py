"""The world's per-image metrics of a set of generated images, each with a bootstrap interval.

The reader (:mod:`snapjax.eval.reader`) reads every image once; over the N images:
  ``accuracy/<attr>``  the fraction whose stated attribute is read as captioned (the world's
                       CLIP score, per attribute); ``accuracy/mean`` their mean;
  ``accuracy/all``     the fraction with every stated attribute right (the headline rate).
The Fréchet distance to real renders (the world's FID, :func:`snapjax.eval.reader.score`) is
not here: resampling images biases it, so its spread comes from seeds
(:func:`snapjax.eval.intervals.seed_interval`, which :mod:`snapjax.eval.evaluate` applies).

Legend: N images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from snapjax.eval import intervals
from snapjax.eval import reader as reader_lib


def score_with_intervals(reader, images, attributes: Mapping[str, np.ndarray], *,
                         num_resamples: int = intervals.DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """{metric: {"value", "low", "high", "n"}} for the accuracies above."""
    feats_NF, per_attr, all_ok = reader_lib.correct_per_image(reader, images, attributes)
    opts = dict(num_resamples=num_resamples, seed=seed)
    out = {}
    for attr, values in per_attr.items():
        out[f"accuracy/{attr}"] = intervals.mean_interval(values[~np.isnan(values)], **opts)
    if per_attr:
        # The mean over attributes, resampled jointly (same images for every attribute).
        stacked = np.stack(list(per_attr.values()))
        out["accuracy/mean"] = intervals.statistic_interval(
            lambda idx: float(np.mean(np.nanmean(stacked[:, idx], axis=1))),
            feats_NF.shape[0], **opts)
    out["accuracy/all"] = intervals.mean_interval(all_ok, **opts)
    return out
