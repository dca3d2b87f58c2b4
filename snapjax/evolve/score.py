"""``snapjax score-blocks``: what each UNet block of a world pipeline is worth.

    snapjax score-blocks --model runs/world/robust/model --quality world --seeds 0 1 2

For every droppable block, the quality with that block dropped against the full UNet's, over
several seeds of the validation set (sampling noise for ``world``, noise and timesteps for
``denoise``), with the spread. This is evolution's scoring (:mod:`snapjax.evolve.evolution`)
run on its own, and the measurement behind robust training's claim: after robust training,
dropping any one block should cost much less than in the UNet fine-tuned without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from snapjax import storage
from snapjax.evolve.evolution import score_blocks
from snapjax.evolve.latency import latency_table
from snapjax.evolve.quality import build_measure


def block_drop_scores(pipe, world, *, quality: str = "world", num_prompts: int = 256,
                      num_steps: int = 8, guidance_scale: float = 4.0,
                      seeds=(0, 1, 2), blocks: bool = True) -> dict:
    """{"full": {metric: [per seed]}, "drop": {block: [dQuality per seed]}, "key": metric,
    "latency_gflop": {block: cost}} for pipeline ``pipe`` on the world ``world``.
    ``blocks=False`` measures the full UNet only."""
    spec = pipe.unet.spec
    side = pipe.sample_size * pipe.vae.spec.downsample_factor
    table = latency_table(spec, side, "macs", downsample_factor=pipe.vae.spec.downsample_factor)
    full: dict[str, list[float]] = {}
    drop: dict[str, list[float]] = {name: [] for name in spec.block_names()} if blocks else {}
    key = None
    for seed in seeds:
        measure = build_measure(quality, text_encoder=pipe.text_encoder,
                                text_params=pipe.text_encoder_params, vae=pipe.vae,
                                vae_params=pipe.vae_params, tokenizer=pipe.tokenizer,
                                schedule=pipe.schedule, world=world, num_prompts=num_prompts,
                                num_steps=num_steps, guidance_scale=guidance_scale, seed=seed)
        key = measure.key
        if not blocks:
            metrics, scores = measure(pipe.unet, pipe.unet_params,
                                      np.ones(spec.num_blocks, np.float32)), []
        else:
            metrics, scores = score_blocks(spec, measure, pipe.unet, pipe.unet_params, table)
        for k, v in metrics.items():
            full.setdefault(k, []).append(v)
        for s in scores:
            drop[s.name].append(s.d_quality)
    return {"key": key, "quality": quality, "num_prompts": num_prompts, "num_steps": num_steps,
            "guidance_scale": guidance_scale, "seeds": list(seeds), "full": full, "drop": drop,
            "latency_gflop": dict(table)}


def _sd(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_scores(result: dict) -> str:
    key = result["key"]
    full = np.asarray(result["full"][key])
    lines = [f"{key} of the full UNet: {full.mean():.4f} +- {_sd(full):.4f} "
             f"({len(full)} seeds x {result['num_prompts']} prompts)"]
    for k, v in result["full"].items():
        if k != key:
            lines.append(f"  {k}: {np.mean(v):.4f} +- {_sd(np.asarray(v)):.4f}")
    if not result["drop"]:
        return "\n".join(lines)
    lines.append(f"{'block':<18}{'GFLOP':>9}{'drop (mean)':>13}{'sd':>9}")
    for name, values in result["drop"].items():
        v = np.asarray(values)
        lines.append(f"{name:<18}{result['latency_gflop'][name]:>9.4f}{v.mean():>13.4f}"
                     f"{_sd(v):>9.4f}")
    drops = np.asarray(list(result["drop"].values()))
    lines.append(f"{'mean over blocks':<27}{drops.mean():>13.4f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a world pipeline folder")
    # The world's own measures; CLIP score needs a CLIP folder and prompts (snapjax evolve).
    parser.add_argument("--quality", default="world", choices=("world", "denoise"))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="DDIM steps (quality=world)")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--no-blocks", action="store_true",
                        help="measure the full UNet only (e.g. at 50 steps)")
    parser.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default=None,
                        help="sample on this DDIM grid instead of the folder's (e.g. a teacher on "
                             "the trailing grid its distilled students use)")


def run(args: argparse.Namespace) -> int:
    from snapjax.data.world import WorldSpec
    from snapjax.pipeline import TextToImage
    pipe = TextToImage.from_pretrained(args.model)
    if args.spacing:
        pipe.schedule = dataclasses.replace(pipe.schedule, timestep_spacing=args.spacing)
    world = WorldSpec(resolution=pipe.sample_size * pipe.vae.spec.downsample_factor)
    result = block_drop_scores(pipe, world, quality=args.quality, num_prompts=args.num_prompts,
                               num_steps=args.steps, guidance_scale=args.guidance,
                               seeds=tuple(args.seeds), blocks=not args.no_blocks)
    print(format_scores(result))
    if args.json:
        storage.path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0
