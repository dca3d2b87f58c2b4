"""docs/figures/distill_guidance.png: Frechet distance against all-attributes accuracy over the
guidance scale, one curve per 2-step world student and the 50-step teacher (docs/distill.md, "Ablations"), from the
`snapjax score-blocks --json` files of each (model, guidance) pair.

    python docs/figures/plot_distill_guidance.py runs/world/distill_scores docs/figures
"""

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MODELS = {"teacher50": "teacher, 50 steps", "direct_2": "CFG-aware p=0.1, gamma=0.2 (paper)",
          "direct_2_vanilla": "vanilla (p=0)", "direct_2_cfg1": "CFG-aware only (p=1)",
          "direct_2_gamma0": "p=0.1, gamma=0"}
GUIDANCE = (1, 2, 4, 7, 10)


def main(scores: str, out: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model, label in MODELS.items():
        acc, fd = [], []
        for g in GUIDANCE:
            full = json.loads((pathlib.Path(scores) / f"sweep_{model}_g{g}.json").read_text())["full"]
            acc.append(np.mean(full["accuracy/all"]))
            fd.append(np.mean(full["frechet_distance"]))
        style = {"linestyle": "--", "color": "black"} if model == "teacher50" else {}
        ax.plot(acc, fd, marker="o", label=label, **style)
        for a, f, g in zip(acc, fd, GUIDANCE):
            ax.annotate(str(g), (a, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("all-attributes accuracy (reader)")
    ax.set_ylabel("Frechet distance (reader features)")
    ax.set_yscale("log")
    ax.set_title("2-step world students, guidance 1-10 (3 seeds x 256)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(out) / "distill_guidance.png"
    fig.savefig(path, dpi=120)
    print(path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
