"""``snapjax sample``: prompts to PNGs (one per prompt and a grid) with any pipeline folder."""

from __future__ import annotations

import argparse
import json
import re
import time
import numpy as np

from snapjax import storage


def read_prompts(prompt: list[str] | None, prompts_file: str | None) -> list[str]:
    prompts = list(prompt or [])
    if prompts_file:
        path = storage.path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts-file {path}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt (repeatable) or --prompts-file")
    return prompts


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "empty"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pipeline folder (snapjax or diffusers)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=None,
                        help="DDIM steps (default: the pipeline's, else 50)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="CFG scale, 1 = none (default: the pipeline's, else 7.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per device call")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="compute dtype (bfloat16 on accelerators)")
    parser.add_argument("--out", required=True, help="output folder for PNGs and grid.png")


def run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp
    from PIL import Image
    from tqdm import tqdm

    from snapjax.pipeline import TextToImage, image_grid

    prompts = read_prompts(args.prompt, args.prompts_file)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    pipe = TextToImage.from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    steps = pipe.num_steps if args.steps is None else args.steps
    guidance = pipe.guidance_scale if args.guidance is None else args.guidance
    out = storage.path(args.out)
    storage.check_writable(out)
    images, start = [], time.perf_counter()
    batches = range(0, len(prompts), args.batch_size)
    for b in tqdm(batches, desc=f"sampling {steps} steps, guidance {guidance:g}", unit="batch"):
        chunk = prompts[b:b + args.batch_size]
        # Noise comes from (seed, prompt index): an image does not depend on --batch-size.
        images.append(pipe(chunk, num_steps=steps, guidance_scale=guidance,
                           seed=args.seed, first_index=b, negative_prompt=args.negative_prompt,
                           height=args.height, width=args.width))
    images = np.concatenate(images)
    seconds = time.perf_counter() - start
    records = []
    with storage.local_output(out) as local:  # a bucket's files are uploaded at the end
        for i, (prompt, image) in enumerate(zip(prompts, images)):
            name = f"{i:04d}_{_slug(prompt)}.png"
            Image.fromarray(image).save(local / name)
            records.append({"file": name, "prompt": prompt})
        Image.fromarray(image_grid(images)).save(local / "grid.png")
        (local / "prompts.json").write_text(json.dumps(
            {"model": str(args.model), "steps": steps, "guidance": guidance,
             "seed": args.seed, "images": records}, indent=1))
    print(f"wrote {len(images)} images and grid.png to {out} in {seconds:.1f}s")
    return 0
