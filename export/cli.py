"""export a checkpoint to PyTorch mirrors, a diffusers folder or Core ML packages

``snapjax export torch|coreml|latency-blocks`` plugs into the snapjax CLI through the
``snapjax.commands`` entry point (snapjax never imports this package).

  snapjax export torch  --checkpoint C --out DIR [--overwrite] [--no-diffusers]
  snapjax export coreml --checkpoint C --out DIR [--quantize-bits 6] [--attention split_einsum]
                        [--chunk] [--unet-batch 1|2] [--latent-size N] [--steps N] [--guidance W]
  snapjax export latency-blocks --spec PRESET_OR_MODEL --resolution 512 --out DIR

``C`` is a pipeline folder (snapjax or diffusers) or a single model folder. ``latency-blocks``
writes one Core ML package per distinct UNet block signature plus the fixed part, for a latency
table timed on a Mac (export/coreml/time_blocks_macos.py). Every folder (``C``, ``DIR``, a
``--spec`` folder) may be local or ``gs://bucket/...``.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint to PyTorch / diffusers / "
                                   "Core ML", description=__doc__.splitlines()[0])
    targets = parser.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True

    t = targets.add_parser("torch", help="PyTorch mirrors (+ a diffusers folder where it fits)")
    _common(t)
    t.add_argument("--no-diffusers", action="store_true",
                   help="write only the mirrors, no diffusers pipeline folder")
    t.set_defaults(_run=run_torch)

    c = targets.add_parser("coreml", help="Core ML packages for Apple's ml-stable-diffusion")
    _common(c)
    c.add_argument("--attention", choices=("original", "split_einsum"), default="split_einsum",
                   help="attention layout: split_einsum for the Neural Engine (default), "
                        "original for GPU/CPU")
    c.add_argument("--unet-batch", type=int, choices=(1, 2), default=None,
                   help="Unet batch: 2 runs guidance's two halves in one call (default); a "
                        "guidance-conditioned UNet runs once per step at batch 1")
    c.add_argument("--quantize-bits", type=int, default=None, metavar="{4,6,8}",
                   help="compress weights: 6 or 4 = palettization, 8 = linear int8")
    c.add_argument("--chunk", action="store_true",
                   help="split the Unet into UnetChunk1/UnetChunk2 when it is over 1 GB")
    c.add_argument("--chunk-threshold-mb", type=float, default=1024.0, help=argparse.SUPPRESS)
    c.add_argument("--compress-min-elements", type=int, default=2048, help=argparse.SUPPRESS)
    c.add_argument("--latent-size", type=int, default=None,
                   help="latent side (image side / VAE factor); default: the pipeline's, else 64")
    c.add_argument("--steps", type=int, default=None,
                   help="sampling steps for the manifest; default: the pipeline's, else 50")
    c.add_argument("--guidance", type=float, default=None,
                   help="guidance scale for the manifest; default: the pipeline's, else 7.5")
    c.set_defaults(_run=run_coreml)

    b = targets.add_parser("latency-blocks",
                           help="per-block Core ML packages for a latency table")
    b.add_argument("--spec", required=True,
                   help="UNet preset (sd15, snapfusion, tiny), UNet model folder or pipeline "
                        "folder")
    b.add_argument("--resolution", type=int, default=512,
                   help="image side in pixels; the latent side is this over the VAE factor "
                        "(the pipeline's, else 8) (default 512)")
    b.add_argument("--out", required=True, help="output folder, local or gs:// (must not exist)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    b.add_argument("--attention", choices=("original", "split_einsum"), default="split_einsum",
                   help="attention layout (default split_einsum, for the Neural Engine)")
    b.add_argument("--context-length", type=int, default=None,
                   help="text tokens the transformers attend to (default 77, CLIP's)")
    b.set_defaults(_run=run_latency_blocks)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="pipeline folder (snapjax or diffusers) or a single model folder "
                        "(local or gs://)")
    p.add_argument("--out", required=True, help="output folder, local or gs:// (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--components", default=None,
                   help="comma-separated subset of unet,vae,text_encoder (default: all present)")


_START = time.monotonic()


def _log(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def _check_out(args) -> None:
    """Refuse an existing --out, or a bucket that cannot be written, before loading anything:
    refusing late would waste the whole conversion."""
    from snapjax import storage

    out = storage.path(args.out)
    with storage.clear_errors(args.out, "read"):
        exists = out.exists()
    if exists and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
    storage.check_writable(args.out)


def _source(args):
    from export.checkpoint import load_source

    _check_out(args)
    components = tuple(c.strip() for c in args.components.split(",")) if args.components else None
    _log(f"reading {args.checkpoint}")
    return load_source(args.checkpoint, components)


def _finish(rows: list[dict], out: str, extra: str = "") -> int:
    from export.report import Row, format_table

    print(format_table([Row(**r) for r in rows]))
    print(f"written: {out}" + (f"\n{extra}" if extra else ""))
    return 0


def _guard(fn):
    """FileExistsError and PermissionError (a bucket's) are no ValueError; report them like the
    CLI's other user errors."""
    def run(args) -> int:
        try:
            return fn(args)
        except (FileExistsError, PermissionError) as e:
            print(f"snapjax export {args.target}: error: {e}", file=sys.stderr)
            return 2
    return run


@_guard
def run_torch(args) -> int:
    from export.torch.export import export_torch

    source = _source(args)
    report = export_torch(source, args.out, overwrite=args.overwrite,
                          diffusers=not args.no_diffusers, log=_log)
    extra = ("diffusers pipeline: " + str(args.out) + "/diffusers" if report.get("diffusers")
             else "no diffusers folder: " + "; ".join(report.get("diffusers_misfits", []))
             if report.get("diffusers_misfits") else "")
    return _finish(report["components"], args.out, extra)


@_guard
def run_coreml(args) -> int:
    from export.checkpoint import peek_unet_spec
    from export.coreml.compress import check_bits
    from export.coreml.export import CoreMLOptions, export_coreml, unet_batch_for

    check_bits(args.quantize_bits)  # fail before reading a multi-GB checkpoint
    if args.unet_batch == 2 and (not args.components or "unet" in args.components):
        unet_batch_for(peek_unet_spec(args.checkpoint), args.unet_batch)
    opts = CoreMLOptions(
        attention=args.attention, unet_batch=args.unet_batch, quantize_bits=args.quantize_bits,
        chunk=args.chunk, chunk_threshold_bytes=int(args.chunk_threshold_mb * 2**20),
        latent_size=args.latent_size, num_steps=args.steps, guidance_scale=args.guidance,
        weight_threshold=args.compress_min_elements)
    source = _source(args)
    manifest = export_coreml(source, args.out, opts, overwrite=args.overwrite, log=_log)
    notes = manifest["swift_pipeline"]["notes"]
    return _finish(manifest["components"], args.out, "Swift pipeline: " + " ".join(notes))


@_guard
def run_latency_blocks(args) -> int:
    from export.coreml.latency_blocks import export_latency_blocks, resolve_spec
    from snapjax.evolve.latency import latent_side_of

    _check_out(args)
    spec, vae_factor = resolve_spec(args.spec)
    side = latent_side_of(args.resolution, vae_factor)
    extra = {"context_length": args.context_length} if args.context_length else {}
    meta = export_latency_blocks(spec, side, args.out, attention=args.attention,
                                 overwrite=args.overwrite, log=_log, **extra)
    print(f"{len(meta['blocks'])} block signatures and the fixed part at latent {side}x{side}: "
          f"{args.out}\ntime them on a Mac: python -m export.coreml.time_blocks_macos "
          f"--blocks {args.out} --out latency.json")
    return 0
