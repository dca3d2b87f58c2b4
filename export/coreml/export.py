"""``snapjax export coreml``: the folder Apple's ml-stable-diffusion Swift pipeline loads, plus a
manifest with the sampling schedule.

Output folder::

  TextEncoder.mlpackage  Unet.mlpackage (or UnetChunk1/UnetChunk2.mlpackage)  VAEDecoder.mlpackage
  vocab.json  merges.txt
  snapjax_coreml_manifest.json

Per component: fp32 mirror, parity against snapjax, fp16 overflow check (a component that fails
it is exported in fp32, with a warning), conversion, optional compression, optional chunking.
Compile to ``.mlmodelc`` on a Mac (``xcrun coremlcompiler compile X.mlpackage Resources/``):
the package names are the names the Swift pipeline looks for. ``out`` may be local or ``gs://``:
the folder is written locally, then put into place (:func:`snapjax.pretrained.replace_folder`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from collections.abc import Callable

from etils import epath

from export.checkpoint import ExportSource
from export.coreml import compress as compression
from export.coreml.convert import PACKAGE_NAMES, input_specs, read_io, to_coreml, wrap
from export.coreml.manifest import MANIFEST_FILE, build_manifest
from export.parity import fp16_check, parity_error
from export.report import Row, folder_size
from export.tokenizer_files import write_clip_tokenizer_files
from export.torch.layers import ATTENTION_IMPLEMENTATIONS
from export.torch.mirror import mirror_from_params
from snapjax import storage
from snapjax.pretrained import replace_folder
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.pipeline import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_STEPS

CHUNK_THRESHOLD_BYTES = 1 << 30  # Apple chunks UNets over 1 GB (iOS memory mapping limits)
MIRROR_KIND = {"text_encoder": "text_encoder", "unet": "unet", "vae": "vae_decoder"}


@dataclasses.dataclass(frozen=True)
class CoreMLOptions:
    attention: str = "split_einsum"
    # 2: classifier-free guidance in one call; 1: two calls, or the one call of a
    # guidance-conditioned UNet. None: 2, or 1 for a guidance-conditioned UNet.
    unet_batch: int | None = None
    quantize_bits: int | None = None     # 6 or 4 (palettization), 8 (linear int8)
    chunk: bool = False                  # split the Unet in two when over chunk_threshold_bytes
    chunk_threshold_bytes: int = CHUNK_THRESHOLD_BYTES
    latent_size: int | None = None       # default: the pipeline's sample_size, else 64
    context_length: int | None = None    # default: the text encoder's max_length, else 77
    num_steps: int | None = None         # default: the pipeline's, else 50
    guidance_scale: float | None = None  # default: the pipeline's, else 7.5
    weight_threshold: int = compression.WEIGHT_THRESHOLD

    def __post_init__(self):
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: expected one of "
                             f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.unet_batch not in (None, 1, 2):
            raise ValueError(f"unet batch {self.unet_batch}: expected 2 (guidance in one call) "
                             "or 1")
        compression.check_bits(self.quantize_bits)


def unet_batch_for(spec, requested: int | None) -> int:
    """The Unet package's batch: ``requested``, or 2 (guidance's two halves in one call); a
    guidance-conditioned UNet runs once per step at batch 1, and refuses batch 2."""
    if spec is not None and spec.guidance_embed_dim:
        if requested == 2:
            raise ValueError(
                f"--unet-batch 2: this UNet is guidance-conditioned (guidance_embed_dim="
                f"{spec.guidance_embed_dim}): it takes the guidance scale as an input and samples "
                "with one batch-1 call per step, with no unconditional half to batch; use "
                "--unet-batch 1 or leave the option out")
        return 1
    return requested or 2


def _resolve(source: ExportSource, opts: CoreMLOptions,
             log) -> tuple[NoiseSchedule, int, int, int, float, int]:
    schedule = source.schedule
    if schedule is None:
        schedule = NoiseSchedule()
        if "unet" in source.components:
            log("warning: the checkpoint records no noise schedule; assuming SD-v1.5's "
                "(epsilon prediction, leading spacing)")
    latent = opts.latent_size or source.sample_size or 64
    text = source.components.get("text_encoder")
    context = opts.context_length or (text.spec.max_length if text else 77)
    steps = opts.num_steps or source.num_steps or DEFAULT_NUM_STEPS
    if source.num_steps and steps != source.num_steps:
        log(f"warning: the pipeline records {source.num_steps} sampling steps; the manifest's "
            f"grid for {steps} is not the one it was trained or evaluated on")
    guidance = opts.guidance_scale if opts.guidance_scale is not None else (
        source.guidance_scale if source.guidance_scale is not None else DEFAULT_GUIDANCE_SCALE)
    unet = source.components.get("unet")
    batch = unet_batch_for(unet.spec if unet else None, opts.unet_batch)
    if unet is not None:
        factor = 2 ** (unet.spec.num_stages - 1)
        if latent % factor:
            raise ValueError(f"latent size {latent} is not a multiple of {factor} (the UNet's "
                             "downsampling)")
    return schedule, latent, context, steps, guidance, batch


def export_coreml(source: ExportSource, out: str | os.PathLike,
                  opts: CoreMLOptions = CoreMLOptions(), *, overwrite: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Convert every component of ``source``; returns the manifest (also written to ``out``)."""
    schedule, latent, context, steps, guidance, batch = _resolve(source, opts, log)
    manifest: dict = {}

    def write(tmp: epath.Path) -> None:
        rows, models = [], {}
        order = [k for k in ("text_encoder", "unet", "vae") if k in source.components]
        for i, kind in enumerate(order, 1):
            prefix = f"[{i}/{len(order)}] "
            row, packages = _export_component(
                MIRROR_KIND[kind], source.components[kind], tmp, opts, schedule=schedule,
                latent=latent, context=context, batch=batch,
                log=lambda msg, p=prefix: log(p + msg))
            rows.append(row)
            models[row.component] = packages
        if source.tokenizer_dir is not None:
            write_clip_tokenizer_files(source.tokenizer_dir, tmp, only_vocab=True)
        unet, vae = source.components.get("unet"), source.components.get("vae")
        text = source.components.get("text_encoder")
        manifest.update(build_manifest(
            schedule=schedule, num_steps=steps, guidance_scale=guidance, models=models,
            latent_channels=unet.spec.in_channels if unet else 4, latent_size=latent,
            image_size=latent * vae.spec.downsample_factor if vae else None,
            scaling_factor=vae.spec.scaling_factor if vae else None,
            unet_batch=batch, context_length=context, attention=opts.attention,
            vocab_size=text.spec.vocab_size if text else None,
            components=[r.as_dict() for r in rows],
            guidance_embed_dim=unet.spec.guidance_embed_dim if unet else 0))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))

    replace_folder(out, write, overwrite=overwrite)
    return manifest


def _export_component(kind: str, comp, tmp: epath.Path, opts: CoreMLOptions, *,
                      schedule: NoiseSchedule, latent: int, context: int, batch: int,
                      log: Callable[[str], None]) -> tuple[Row, list[str]]:
    """Checks, conversion, compression and chunking of one component; (row, package names)."""
    name = PACKAGE_NAMES[kind]
    log(f"{name}: mirror, parity and fp16 checks")
    mirror = mirror_from_params(kind, comp.spec, comp.params,
                                attention=opts.attention if kind == "unet" else "original")
    # Checks run at a small latent size: the weights, not the resolution, decide the outcome.
    sizes = ({"latent_size": min(latent, 2 * 2 ** (comp.spec.num_stages - 1))}
             if kind == "unet" else {})
    err = parity_error(kind, comp.spec, comp.params, mirror, **sizes)
    fp16 = fp16_check(mirror, kind, comp.spec, **sizes)
    precision, note = "float16", ""
    if not fp16.ok:
        precision, note = "float32", f"fp16 check failed: {fp16.reason}"
        warnings.warn(f"{name}: {fp16.reason}; exporting it in float32 (slower, twice the "
                      "size, no Neural Engine)", stacklevel=3)
        log(f"warning: {name}: {fp16.reason}; exported in float32")

    log(f"{name}: converting to Core ML ({precision})")
    inputs = input_specs(kind, comp.spec, batch=batch, latent_size=latent,
                         context_length=context, precision=precision)
    metadata = {"model_prediction_type": schedule.prediction_type} if kind == "unet" else None
    model = to_coreml(kind, wrap(kind, mirror, schedule), comp.spec, inputs,
                      precision=precision, metadata=metadata)
    path = tmp / f"{name}.mlpackage"
    model.save(str(path))
    size_before = folder_size(path)
    if opts.quantize_bits:
        log(f"{name}: compressing weights to {opts.quantize_bits} bits")
        compression.compress(model, opts.quantize_bits,
                             weight_threshold=opts.weight_threshold).save(str(path))
        note = note or f"{opts.quantize_bits}-bit"

    packages = [path.name]
    if kind == "unet" and opts.chunk and folder_size(path) > opts.chunk_threshold_bytes:
        log(f"{name}: splitting into two chunks")
        packages = chunk_unet(path)
    elif kind == "unet" and folder_size(path) > CHUNK_THRESHOLD_BYTES:
        log(f"warning: {name} is {folder_size(path) / 2**30:.1f} GB; iOS loads it more "
            "reliably in two chunks (--chunk)")
    row = Row(name, sum(p.numel() for p in mirror.parameters()),
              sum(folder_size(tmp / p) for p in packages), parity=err, precision=precision,
              fp16_err=fp16.rel_err, size_before_bytes=size_before if opts.quantize_bits else None,
              note=note)
    return row, packages


def chunk_unet(path: epath.Path) -> list[str]:
    """Split ``Unet.mlpackage`` into ``UnetChunk1/2.mlpackage`` (Apple's names), drop the whole;
    ``path`` is in the local staging folder (coremltools writes local files)."""
    import coremltools as ct

    tmp = path.parent / ".chunks"
    ct.models.utils.bisect_model(str(path), str(tmp), merge_chunks_to_pipeline=False,
                                 check_output_correctness=False)  # needs macOS to run the models
    stem = path.name[: -len(".mlpackage")]
    names = []
    for k in (1, 2):
        target = path.parent / f"{stem}Chunk{k}.mlpackage"
        shutil.move(str(tmp / f"{stem}_chunk{k}.mlpackage"), str(target))
        names.append(target.name)
    shutil.rmtree(tmp)
    shutil.rmtree(path)
    return names


def package_io(path: str | os.PathLike) -> tuple[dict, dict]:
    """{name: (shape, dtype)} of a saved package's inputs and outputs (reads the spec only; a
    package in a bucket is copied locally first, as coremltools reads local files)."""
    import coremltools as ct

    with storage.local_folder(path) as local:
        return read_io(ct.models.MLModel(str(local), skip_model_load=True).get_spec())
