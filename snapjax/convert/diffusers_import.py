"""``snapjax import``: a diffusers Stable Diffusion folder to a snapjax pipeline folder.

Every tensor is checked on the way in (see :mod:`snapjax.convert.mapping`); the output holds
Orbax params and specs only, so later stages never need PyTorch or diffusers.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="diffusers folder (model_index.json, unet/, vae/, text_encoder/, "
                             "tokenizer/, scheduler/)")
    parser.add_argument("--out", required=True, help="snapjax pipeline folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
    from snapjax.pipeline import TextToImage
    from snapjax.summary import format_table, summarize

    pipe = TextToImage.from_pretrained(args.model)
    out = pipe.save_pretrained(args.out, overwrite=args.overwrite)
    components = {kind: (kind, getattr(pipe, kind).spec) for kind in ("unet", "vae", "text_encoder")}
    print(format_table(summarize(components, pipe.sample_size * pipe.vae_factor),
                       pipe.sample_size * pipe.vae_factor))
    print(f"wrote {out}")
    return 0
