"""``snapjax world``: the embedded world end to end, one command on a laptop.

    snapjax world --workdir runs/world

trains the world VAE (configs/world_vae.py) into ``WORKDIR/vae``, then the text-to-image
teacher on its latents (configs/world_teacher.py) into ``WORKDIR/teacher``, and prints the
attribute accuracy of the teacher's samples (DDIM, 50 steps, classifier-free guidance) as read
by the world's attribute reader. Sample grids land in ``WORKDIR/*/samples``, metrics in
``WORKDIR/*/metrics.jsonl``, the trained models in ``WORKDIR/*/model``; ``WORKDIR/world.json``
sums it up. Both runs resume if interrupted: run the same command again.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time

import jax

from snapjax.config import ConfigError, load_config

log = logging.getLogger(__name__)

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _config_path(name: str) -> str:
    path = CONFIGS / name
    if not path.is_file():
        raise ConfigError(f"{path} not found: snapjax world runs from a source checkout "
                          "(pip install -e .), where configs/ sits beside snapjax/")
    return str(path)


def run_world(workdir: str | pathlib.Path, variant: str = "cpu", *,
              vae_overrides: list[str] = (), teacher_overrides: list[str] = ()) -> dict:
    """Train the VAE and the teacher, score the teacher's samples; ``*_overrides`` are
    ``--config.KEY=VALUE`` flags for each config (the tests shorten both runs with them)."""
    from snapjax.train.loop import train_and_evaluate

    workdir = pathlib.Path(workdir)
    vae_dir, teacher_dir = workdir / "vae", workdir / "teacher"
    timings = {}
    t0 = time.perf_counter()
    vae_config = load_config(f"{_config_path('world_vae.py')}:{variant}", list(vae_overrides))
    vae_metrics = train_and_evaluate(vae_config, vae_dir)
    timings["vae_seconds"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    teacher_config = load_config(f"{_config_path('world_teacher.py')}:{variant}",
                                 [f"--config.diffusion.vae={vae_dir / 'model'}",
                                  *teacher_overrides])
    teacher_metrics = train_and_evaluate(teacher_config, teacher_dir)
    timings["teacher_seconds"] = time.perf_counter() - t1
    timings["total_seconds"] = time.perf_counter() - t0

    summary = {"vae": {k: v for k, v in vae_metrics.items() if k in ("loss", "sample/recon_l1")},
               "teacher": {k: v for k, v in teacher_metrics.items()
                           if k == "loss" or k.startswith("eval/")},
               **{k: round(v, 1) for k, v in timings.items()}}
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "world.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/world",
                        help="where the VAE and teacher runs go (default runs/world)")
    parser.add_argument("--variant", default="cpu", choices=("cpu", "accel"),
                        help="config variant: cpu (a 2-core laptop) or accel (a GPU/TPU)")


def run(args: argparse.Namespace) -> int:
    from snapjax.train.loop import setup_logging
    setup_logging()
    summary = run_world(args.workdir, args.variant)
    if jax.process_index() == 0:
        acc = summary["teacher"]
        print("world teacher samples, attribute accuracy read back by the reader:")
        for key in sorted(acc):
            if key.startswith("eval/accuracy/"):
                print(f"  {key[len('eval/accuracy/'):]:10s} {acc[key]:.3f}")
        print(f"time: VAE {summary['vae_seconds']:.0f}s, teacher "
              f"{summary['teacher_seconds']:.0f}s, total {summary['total_seconds']:.0f}s; "
              f"summary in {args.workdir}/world.json")
    return 0
