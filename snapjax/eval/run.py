"""``snapjax eval``: score pipelines over step counts and a guidance sweep; JSON, plot, grids.

    # the world: the reader's accuracy and Fréchet distance, 256 held-out captions x 3 seeds
    snapjax eval --model teacher=runs/world/teacher/model --model runs/world/chain/direct_2/model \\
        --steps 2 --guidance 1 2 4 7 10 --seeds 0 1 2 --out runs/world/eval

    # real scale: CLIP score and FID on COCO captions, metric models from files (never downloaded)
    snapjax eval --model sd15=SD_FOLDER --prompts coco2014-30k=captions_val2014.json \\
        --clip-model CLIP_FOLDER --inception inception-2015-12-05.pt \\
        --reference-images val2014/ --out runs/sd15/eval

Without ``--prompts`` the models are scored on the embedded world. ``--steps`` and
``--guidance`` default to each folder's own; given, every model runs every pair. Writes
``OUT/eval.json`` (every number with its interval and sample count, the cost per image and the
latency measured on this backend), ``OUT/curves.png`` (Fréchet distance vs accuracy, or FID vs
CLIP score, one curve per model and step count) and ``OUT/grid_<setting>.png`` (the same
prompts and seeds, one row per model). Model folders, ``--out`` and the metric files may be
``gs://`` paths (:mod:`snapjax.storage`); ``eval.json`` is written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging

import numpy as np
from etils import epath

from snapjax import storage
from snapjax.eval.evaluate import RealTask, Setting, WorldTask, evaluate, run_info
from snapjax.eval.intervals import format_interval

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def parse_models(specs: list[str]) -> dict[str, str]:
    """``NAME=FOLDER`` or ``FOLDER`` (named after the folder, or its parent for ``.../model``)."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder = spec
            parts = [part for part in spec.rstrip("/").split("/") if part]  # local or gs://
            last, parent = parts[-1] if parts else "", parts[-2] if len(parts) > 1 else ""
            name = parent if last == "model" and parent and not parent.endswith(":") else last
        if not name or not folder:
            raise ValueError(f"--model {spec!r}: expected NAME=FOLDER or FOLDER")
        if name in out:
            raise ValueError(f"--model: two models named {name!r}; name them (NAME=FOLDER)")
        out[name] = folder
    return out


def settings_for(pipe, steps: list[int] | None, guidance: list[float] | None) -> list[Setting]:
    steps = steps or [pipe.num_steps]
    guidance = guidance or [pipe.guidance_scale]
    return [Setting(s, float(w)) for s in steps for w in guidance]


def load_reference_images(folder: str, side: int) -> tuple[np.ndarray, str]:
    """uint8 (N, side, side, 3) of every image file in ``folder`` (shorter side resized, centre
    square: the training data's preprocessing), and a key naming the set (its sorted file
    names) for the stats cache."""
    from snapjax.data.images import load_image
    root = storage.path(folder)
    with storage.clear_errors(folder, "read"):
        if not root.is_dir():
            raise ValueError(f"--reference-images {root}: not a folder of images")
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"--reference-images {root}: {len(files)} image files "
                         f"({'/'.join(IMAGE_SUFFIXES)}); FID needs at least 2")
    images = [load_image(f.read_bytes(), side, str(f)) for f in files]
    return np.stack(images), json.dumps([f.name for f in files])


def build_real_task(args, side: int) -> RealTask:
    from snapjax.eval.prompts import load_prompt_set
    prompts = load_prompt_set(args.prompts, args.num_prompts, args.prompt_seed)
    if not args.clip_model and not args.inception:
        raise ValueError("--prompts scores real prompts: give --clip-model (CLIP score) and/or "
                         "--inception with --reference-images (FID)")
    clip = inception = ref = None
    if args.clip_model:
        from snapjax.eval.clip_score import ClipScorer
        clip = ClipScorer.from_folder(args.clip_model)
    if args.inception:
        if not args.reference_images:
            raise ValueError("--inception: FID also needs --reference-images (a folder of the "
                             "reference set's images)")
        from snapjax.eval import fid
        inception = fid.InceptionFeatures.from_file(args.inception,
                                                    expected_sha256=args.inception_sha256)
        images, key = load_reference_images(args.reference_images, side)
        ref = fid.reference_stats(inception, images, storage.path(args.out) / "reference_stats.npz",
                                  key=key)
    return RealTask(prompts.prompts, clip, inception, ref)


def format_results(results: dict) -> str:
    lines = []
    for name, res in results.items():
        for row in res["settings"]:
            head = (f"{name}: {row['steps']} steps, guidance {row['guidance']:g}, "
                    f"{row['unet_calls']} UNet calls, {row['gflop']:.4g} GFLOP/image")
            if "latency_s" in row:
                head += f", {row['latency_s'] * 1e3:.1f} ms/image"
            lines.append(head)
            for k, v in row["metrics"].items():
                lines.append(f"  {k:<22} {format_interval(v, 4)}")
    return "\n".join(lines)


def write_text(path: epath.Path, text: str) -> None:
    """``text`` into ``path`` whole: a bucket's object appears at once; a local file is written
    beside it and renamed."""
    if storage.is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_outputs(out: str | epath.Path, results: dict, images: dict, info: dict,
                  kind: str) -> dict:
    from PIL import Image

    from snapjax.eval.plots import plot_curves, side_by_side
    out = storage.path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    curve = plot_curves(results, kind, out / "curves.png")
    if curve:
        files["curves"] = curve.name
    tags = sorted({tag for _, tag in images})
    for tag in tags:
        rows = {name: imgs for (name, t), imgs in images.items() if t == tag}
        png = io.BytesIO()
        Image.fromarray(side_by_side(rows)).save(png, format="PNG")
        (out / f"grid_{tag}.png").write_bytes(png.getvalue())
        files[f"grid_{tag}"] = f"grid_{tag}.png"
    doc = {**info, "kind": kind, "files": files, "models": results}
    write_text(out / "eval.json", json.dumps(doc, indent=1) + "\n")  # last: the run's record
    return doc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True,
                        help="NAME=FOLDER or FOLDER: a pipeline folder (repeatable)")
    parser.add_argument("--steps", type=int, nargs="+", help="DDIM steps (default: each folder's)")
    parser.add_argument("--guidance", type=float, nargs="+",
                        help="guidance scales, 1 = none (default: each folder's)")
    parser.add_argument("--spacing", choices=("leading", "trailing", "linspace"),
                        help="sample every model on this DDIM grid instead of its folder's")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="world: held-out captions (default 256); real: a seeded subset of "
                             "the prompt set (default: the set's own size)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="noise seeds: accuracy / CLIP score pool their images; Fréchet "
                             "distance / FID take their spread from them (one seed: no spread)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per sampling call")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--prompts", help="real prompts: NAME=FILE for a COCO set "
                        "(coco2014-30k, coco2017-5k, coco-6k), a COCO captions .json or a text file")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt subset")
    parser.add_argument("--clip-model",
                        help="a transformers CLIP folder, local or gs:// (CLIP score)")
    parser.add_argument("--inception", help="the FID Inception TorchScript file "
                        "(inception-2015-12-05.pt), local or gs://")
    parser.add_argument("--inception-sha256", help="warn when the Inception file's hash differs")
    parser.add_argument("--reference-images", help="FID's reference images (a folder)")
    parser.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    from snapjax.pipeline import TextToImage
    from snapjax.train.loop import setup_logging
    setup_logging()
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    folders = parse_models(args.model)
    storage.check_writable(args.out)  # before the models load, not after the sampling
    pipes = {}
    for name, folder in folders.items():
        pipe = TextToImage.from_pretrained(folder)
        if args.spacing:
            pipe.schedule = dataclasses.replace(pipe.schedule, timestep_spacing=args.spacing)
        pipes[name] = pipe
    from snapjax.eval.evaluate import check_same_latents
    latent, _, factor = check_same_latents(pipes)
    settings = {name: settings_for(p, args.steps, args.guidance) for name, p in pipes.items()}
    if args.prompts:
        task, kind = build_real_task(args, latent * factor), "real"
    else:
        from snapjax.data.world import WorldSpec
        task = WorldTask.build(WorldSpec(resolution=latent * factor), args.num_prompts or 256)
        kind = "world"
    results, images = evaluate(pipes, task, settings, seeds=args.seeds,
                               batch_size=args.batch_size, latency=not args.no_latency)
    for name, folder in folders.items():
        results[name]["folder"] = folder
    doc = write_outputs(args.out, results, images,
                        run_info(len(task.prompts), args.seeds), kind)
    print(format_results(results))
    print(f"{doc['samples_per_setting']} samples per setting ({len(task.prompts)} prompts x "
          f"{len(args.seeds)} seeds); written to {args.out}/eval.json")
    return 0
