"""The evaluation's figures: quality curves over the guidance sweep, and side-by-side grids.

The curve plot is the paper's Fig. 4 / 6 form: one curve per model (and step count) through its
guidance scales, the distribution metric (FID, or the world's Fréchet distance) against the
alignment metric (CLIP score, or the world's all-attributes accuracy); down and right is
better. Error bars are the bootstrap intervals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from etils import epath

from snapjax import storage

# (x metric, y metric, x label, y label) per kind of evaluation
AXES = {"world": ("accuracy/all", "frechet_distance", "all-attributes accuracy",
                  "Fréchet distance (reader features)"),
        "real": ("clip_score", "fid", "CLIP score", "FID")}


def curves(results: Mapping[str, dict], kind: str) -> dict[str, list[tuple]]:
    """label -> [(guidance, x, x_low, x_high, y, y_low, y_high)] sorted by guidance, one curve
    per (model, steps); settings without both metrics are left out."""
    xk, yk = AXES[kind][:2]
    out: dict[str, list[tuple]] = {}
    for name, res in results.items():
        for row in res["settings"]:
            m = row["metrics"]
            if xk not in m or yk not in m:
                continue
            label = f"{name}, {row['steps']} steps"
            out.setdefault(label, []).append(
                (row["guidance"], m[xk]["value"], m[xk]["low"], m[xk]["high"],
                 m[yk]["value"], m[yk]["low"], m[yk]["high"]))
    return {k: sorted(v) for k, v in out.items()}


def plot_curves(results: Mapping[str, dict], kind: str, path: str | os.PathLike,
                title: str = "") -> epath.Path | None:
    """Write the curve plot as PNG; None when no setting has both metrics."""
    data = curves(results, kind)
    if not data:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xk, yk, xlabel, ylabel = AXES[kind]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, pts in data.items():
        p = np.asarray(pts, np.float64)
        bars = lambda v, lo, hi: np.clip([v - lo, hi - v], 0, None)  # noqa: E731
        ax.errorbar(p[:, 1], p[:, 4], xerr=bars(p[:, 1], p[:, 2], p[:, 3]),
                    yerr=bars(p[:, 4], p[:, 5], p[:, 6]), marker="o", capsize=2, label=label)
        for g, x, y in zip(p[:, 0], p[:, 1], p[:, 4]):
            ax.annotate(f"{g:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # Two lines: the axis names are long enough to run off a one-line title.
    ax.set_title(title or f"{ylabel}\nvs {xlabel} over guidance (labels: scale)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = storage.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: the path may be in a bucket
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path


def side_by_side(rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """One image: a row of images per entry (same prompts and seeds, column by column), the
    rows in order; rows shorter than the longest are padded black."""
    if not rows:
        raise ValueError("no images to tile")
    arrays = [np.asarray(a) for a in rows.values()]
    h, w, c = arrays[0].shape[1:]
    cols = max(len(a) for a in arrays)
    grid = np.zeros((len(arrays) * h, cols * w, c), np.uint8)
    for r, a in enumerate(arrays):
        if a.shape[1:] != (h, w, c):
            raise ValueError(f"images of shape {a.shape[1:]} and {(h, w, c)} in one grid")
        for k, img in enumerate(a):
            grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    return grid
