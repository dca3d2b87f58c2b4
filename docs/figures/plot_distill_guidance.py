"""docs/figures/{distill_guidance,guided_student}.png: Frechet distance against all-attributes
accuracy over the guidance scale, one curve per world model (docs/distill.md: "Ablations" and
"The guidance-conditioned student"), from the `snapjax score-blocks --json` files of each
(model, guidance) pair, named sweep_<model>_g<guidance>.json.

    python docs/figures/plot_distill_guidance.py runs/world/distill_scores docs/figures
"""

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGURES = {
    "distill_guidance": ("2-step world students, guidance 1-10 (3 seeds x 256)", {
        "teacher50": "teacher, 50 steps", "direct_2": "CFG-aware p=0.1, gamma=0.2 (paper)",
        "direct_2_vanilla": "vanilla (p=0)", "direct_2_cfg1": "CFG-aware only (p=1)",
        "direct_2_gamma0": "p=0.1, gamma=0"}),
    "guided_student": ("4-step world students, guidance 1-10 (3 seeds x 256)", {
        "teacher50": "teacher, 50 steps", "teacher4": "teacher, 4 steps",
        "teacher_4": "two-call student (8 UNet calls)",
        "guided_4": "guidance-conditioned student (4 UNet calls)"}),
}
GUIDANCE = (1, 2, 4, 7, 10)


def main(scores: str, out: str) -> None:
    for name, (title, models) in FIGURES.items():
        files = {m: [pathlib.Path(scores) / f"sweep_{m}_g{g}.json" for g in GUIDANCE]
                 for m in models}
        missing = [str(f) for fs in files.values() for f in fs if not f.is_file()]
        if missing:
            print(f"{name}: skipped, missing {', '.join(missing)}")
            continue
        plot(title, models, files, pathlib.Path(out) / f"{name}.png")


def plot(title: str, models: dict, files: dict, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model, label in models.items():
        acc, fd = [], []
        for f in files[model]:
            full = json.loads(f.read_text())["full"]
            acc.append(np.mean(full["accuracy/all"]))
            fd.append(np.mean(full["frechet_distance"]))
        style = {"linestyle": "--", "color": "black"} if model == "teacher50" else {}
        ax.plot(acc, fd, marker="o", label=label, **style)
        for a, f, g in zip(acc, fd, GUIDANCE):
            ax.annotate(str(g), (a, f), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("all-attributes accuracy (reader)")
    ax.set_ylabel("Frechet distance (reader features)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
