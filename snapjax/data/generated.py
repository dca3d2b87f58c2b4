"""``snapjax generate-latents``: a teacher pipeline's own latents for prompts, cached as shards.

    snapjax generate-latents --pipeline runs/world/teacher/model --world-captions \\
        --count 4096 --out runs/world/latents/train

SnapFusion trains its pruned decoder on latents the teacher UNet generates from text prompts
(section 3.2): no image data is needed. This samples each prompt with the pipeline's DDIM
(``--steps``, 50 by default) and classifier-free guidance at a scale drawn per latent from
``--guidance-range``, and writes the final latents in the format ``snapjax prepare`` writes
(:mod:`snapjax.data.prepare`), so ``data.source = "prepared"`` reads them: ``latent_mean`` is
the generated latent (raw, unscaled), ``context`` the prompt's encoding, plus ``caption``,
``index`` and ``guidance_scale``; there is no ``latent_logvar`` (a generated latent has no
posterior). ``index.json`` records ``"latents": "generated"`` and how they were made.

Latent i uses prompt ``i mod len(prompts)``, noise from ``(seed, i)``
(:func:`snapjax.sampling.initial_noise`) and a guidance scale from ``(seed, i)``, so a record
does not depend on the batch size, and the teacher's ``snapjax sample --seed S`` of the same
prompt at the same scale reproduces it. Output is atomic, like ``snapjax prepare``, and ``--out``
may be a ``gs://`` folder (:func:`snapjax.storage.write_folder`, ``index.json`` uploaded last).

Legend: B batch, h w latent height/width, C latent channels, L tokens, D text width.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from snapjax import storage
from snapjax.cli import UserError
from snapjax.data import prepare as prepare_lib
from snapjax.data import sources

log = logging.getLogger(__name__)

DEFAULT_GUIDANCE_RANGE = (2.0, 10.0)
# A second stream of (seed, i) draws, apart from the noise's: the guidance scale.
_GUIDANCE_STREAM = 1


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line of a UTF-8 text file (blank lines skipped); errors name the file."""
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist or is not a file")
    data = path.read_bytes()
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"prompts file {path} is not text (a NUL byte at offset {nul}); give "
                         "a UTF-8 file with one prompt per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "give a UTF-8 file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts (it is empty or only blank lines)")
    return prompts


def world_prompts(count: int, world_seed: int = 0) -> list[str]:
    """The captions of the world's first ``count`` items for ``world_seed`` (the teacher's
    training distribution for seed 0)."""
    from snapjax.data.world import WorldSpec, render_batch
    return list(render_batch(np.arange(count), WorldSpec(seed=world_seed))[1])


def guidance_scales(seed: int, first_index: int, batch: int,
                    guidance_range: tuple[float, float]) -> np.ndarray:
    """Latent i's guidance scale: uniform in ``guidance_range`` from ``(seed, i)``."""
    lo, hi = guidance_range
    u = [np.random.default_rng((seed, _GUIDANCE_STREAM, first_index + i)).random()
         for i in range(batch)]
    return (lo + (hi - lo) * np.asarray(u)).astype(np.float32)


def _check_range(guidance_range: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(g) for g in guidance_range)
    if not 1.0 <= lo <= hi:
        raise ValueError(f"guidance range ({lo}, {hi}): need 1 <= min <= max (1 is unguided)")
    return lo, hi


def generate_latents(pipe, prompts: Sequence[str], out: str | os.PathLike, *, count: int,
                     num_steps: int = 50,
                     guidance_range: Sequence[float] = DEFAULT_GUIDANCE_RANGE, seed: int = 0,
                     batch_size: int = 32, shard_size: int = 1000, dtype: str = "float16",
                     overwrite: bool = False, source_info: dict | None = None,
                     progress: bool = True) -> dict:
    """Sample ``count`` latents with pipeline ``pipe`` (a :class:`snapjax.pipeline.TextToImage`)
    into prepared shards in ``out``; returns the index written to ``out/index.json``."""
    from tqdm import tqdm

    from snapjax import sampling

    if dtype not in prepare_lib.STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {list(prepare_lib.STORE_DTYPES)}")
    for name, value in (("count", count), ("num_steps", num_steps), ("batch_size", batch_size),
                        ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if not prompts:
        raise ValueError("no prompts given")
    lo, hi = _check_range(guidance_range)
    out = prepare_lib.check_output(out, overwrite)
    storage.check_writable(out)
    hw = (pipe.sample_size, pipe.sample_size)
    channels = pipe.unet.spec.in_channels
    text = (pipe.text_encoder, pipe.text_encoder_params)
    # The empty prompt's context, once: every batch guides with it.
    uncond = sampling.encode_text(*text, np.asarray(pipe.tokenizer([""] * batch_size), np.int32))
    store = np.dtype(dtype)
    index: dict = {}

    def write(tmp) -> None:
        writer = prepare_lib.ShardWriter(tmp, shard_size)
        try:
            with tqdm(total=count, unit="latent", disable=not progress,
                      desc=f"generate {out.name}") as bar:
                for start in range(0, count, batch_size):
                    n = min(batch_size, count - start)
                    # Full batches only (the last one padded): the sampler compiles once.
                    captions = [prompts[(start + i) % len(prompts)] for i in range(batch_size)]
                    ids = np.asarray(pipe.tokenizer(captions), np.int32)
                    scales = guidance_scales(seed, start, batch_size, (lo, hi))
                    noise = sampling.initial_noise(seed, batch_size, hw, channels,
                                                   first_index=start)
                    # Encoded once: the sampler's conditioning is also the record's context.
                    context = sampling.encode_text(*text, ids)
                    latents = sampling.ddim_latents(
                        pipe.unet, pipe.unet_params, noise, context, uncond,
                        schedule=pipe.schedule, num_steps=num_steps, guidance_scale=scales)
                    raw = np.asarray(latents, np.float32) / np.float32(pipe.vae.spec.scaling_factor)
                    context = np.asarray(context)
                    if not np.isfinite(raw[:n]).all():
                        raise FloatingPointError(
                            f"latents {start}..{start + n - 1} are not finite: the pipeline's "
                            "UNet diverges at these settings")
                    for i in range(n):
                        writer.write(sources.encode_record({
                            "latent_mean": raw[i].astype(store),
                            "context": context[i].astype(store),
                            "caption": captions[i], "index": start + i,
                            "guidance_scale": float(scales[i])}))
                    bar.update(n)
        finally:
            writer.close()
        index.update({
            "format": sources.PREPARED_FORMAT,
            "latents": "generated",
            "count": count,
            "shards": writer.shards,
            "latent_shape": [*hw, channels],
            "context_shape": list(context.shape[1:]),
            "dtype": dtype,
            "scaling_factor": float(pipe.vae.spec.scaling_factor),
            "resolution": pipe.sample_size * pipe.vae.spec.downsample_factor,
            "generator": {"num_steps": num_steps, "guidance_range": [lo, hi], "seed": seed,
                          "num_prompts": len(prompts),
                          "schedule": dataclasses.asdict(pipe.schedule), **(source_info or {})},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        (tmp / sources.PREPARED_INDEX).write_text(json.dumps(index, indent=1))

    prepare_lib.write_output(out, write)
    return index


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].replace("``", "")
    parser.add_argument("--pipeline", required=True,
                        help="the teacher: a snapjax or diffusers pipeline folder")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompts", help="text file, one prompt per line (e.g. COCO captions)")
    prompts.add_argument("--world-captions", action="store_true",
                         help="the embedded world's captions (items 0..count-1 of --world-seed)")
    parser.add_argument("--world-seed", type=int, default=0,
                        help="world seed of --world-captions (default 0, the training world)")
    parser.add_argument("--count", type=int, required=True, help="latents to generate")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                        default=list(DEFAULT_GUIDANCE_RANGE),
                        help="guidance scale drawn uniformly per latent (default 2 10)")
    parser.add_argument("--seed", type=int, default=0, help="noise and guidance seed")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1000, help="records per ArrayRecord file")
    parser.add_argument("--dtype", choices=prepare_lib.STORE_DTYPES, default="float16",
                        help="storage dtype of latents and contexts (default: float16)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # before anything slow: a refused output or bad prompts should not cost a model load
        prepare_lib.check_output(args.out, args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    _check_range(args.guidance_range)
    if args.prompts:
        prompts, info = read_prompts(args.prompts), {"prompts": str(args.prompts)}
    else:
        prompts = world_prompts(args.count, args.world_seed)
        info = {"prompts": "world", "world_seed": args.world_seed}
    from snapjax.pipeline import TextToImage
    pipe = TextToImage.from_pretrained(args.pipeline)
    info["pipeline"] = str(args.pipeline)
    index = generate_latents(pipe, prompts, args.out, count=args.count, num_steps=args.steps,
                             guidance_range=args.guidance_range, seed=args.seed,
                             batch_size=args.batch_size, shard_size=args.shard_size,
                             dtype=args.dtype, overwrite=args.overwrite, source_info=info)
    print(f"wrote {index['count']} generated latents in {len(index['shards'])} shard(s) to "
          f"{args.out} (latent {index['latent_shape']}, {args.steps} DDIM steps, guidance "
          f"{index['generator']['guidance_range']})")
    return 0
