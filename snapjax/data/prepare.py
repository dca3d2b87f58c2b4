"""``snapjax prepare``: encode a dataset once into ArrayRecord shards that training reads.

Each image goes through the VAE encoder and each caption through the tokenizer and text
encoder, in fixed-size jitted batches; every record keeps the VAE posterior's ``latent_mean``
and ``latent_logvar`` (raw, unscaled, [h, w, Z]), the text ``context`` [L, D], the caption and
the source index. Keeping the posterior rather than one draw lets training use the mean
(default) or draw fresh latents every epoch (``data.sample_latents``) from the same shards;
``index.json`` records the VAE's scaling factor, which the reader applies.

The output appears all at once (:func:`snapjax.storage.write_folder`): shards are written to a
local temporary folder, renamed to ``OUT`` when complete or, for a ``gs://`` bucket, uploaded
with ``index.json`` last, so an interrupted run never leaves something that looks finished
(readers recognise a prepared folder by its ``index.json``). An existing
non-empty ``OUT`` is refused unless ``--overwrite``. Unreadable images are skipped, counted,
and listed (first few) in ``index.json``.

The encoders are plain functions (:class:`Encoders`), so tests and other models plug in
without this module knowing them; :func:`load_encoders` builds the real ones from diffusers /
transformers folders.

Legend: B batch, R resolution, h w latent height/width, Z latent channels, L tokens, D width.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from etils import epath

from snapjax import storage
from snapjax.cli import UserError
from snapjax.data import images, sources
from snapjax.data.pipeline import SOURCES, DataConfig, open_source
from snapjax.data.world import WorldSpec

log = logging.getLogger(__name__)

STORE_DTYPES = ("float16", "float32")
# Skipped items whose reasons index.json lists.
MAX_LISTED_SKIPS = 20


@dataclasses.dataclass(frozen=True)
class Encoders:
    """What ``prepare`` runs on each batch (always full batches: the caller pads).

    encode_images: float32 [B, R, R, 3] in [-1, 1] -> (mean, logvar), each [B, h, w, Z].
    encode_text: B captions -> context float32 [B, L, D].
    scaling_factor: the VAE's latent scale (0.18215 for SD-v1.5), stored in index.json.
    info: what was loaded (paths, specs), stored in index.json.
    """

    encode_images: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    encode_text: Callable[[list[str]], np.ndarray]
    scaling_factor: float
    info: dict = dataclasses.field(default_factory=dict)


class ShardWriter:
    """ArrayRecord files of at most ``shard_size`` records: data-00000.array_record, ..."""

    def __init__(self, folder: epath.Path, shard_size: int):
        self.folder, self.shard_size = folder, shard_size
        self.shards: list[dict[str, Any]] = []
        self._writer = None

    def write(self, payload: bytes) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self.shards[-1]["count"] == self.shard_size:
            self._close_current()
            name = f"data-{len(self.shards):05d}.array_record"
            # group_size:1 makes every record its own chunk: cheap random access for training.
            self._writer = ArrayRecordWriter(str(self.folder / name), "group_size:1")
            self.shards.append({"file": name, "count": 0})
        self._writer.write(payload)
        self.shards[-1]["count"] += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._close_current()


def check_output(out: str | os.PathLike, overwrite: bool) -> epath.Path:
    """``out`` as a path, or FileExistsError when it is a file or a non-empty folder and not
    ``overwrite``; an empty folder is written into."""
    out = storage.path(out)
    with storage.clear_errors(out, "read"):
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"output {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty; pass "
                                  "--overwrite to replace it")
    return out


def write_output(out: epath.Path, write: Callable[[epath.Path], None]) -> None:
    """``write(tmp)`` into a local temporary folder that :func:`snapjax.storage.write_folder`
    then puts at ``out`` (check_output has already refused what must not be replaced)."""
    if not storage.is_remote(out):
        # Left by a killed run: OUT.tmp (older snapjax) or our write_folder prefix.
        for old in [out.with_name(out.name + ".tmp"), *out.parent.glob(f"{_tmp_prefix(out)}*")]:
            if old.is_dir():
                shutil.rmtree(old)
    storage.write_folder(out, write, overwrite=True, prefix=_tmp_prefix(out))


def _tmp_prefix(out: epath.Path) -> str:
    return f".{out.name}.prepare-tmp-"


def _encode_batch(records: list[dict], encoders: Encoders, batch_size: int, dtype: np.dtype):
    """(latent_mean, latent_logvar, context) for the records, padded to a full batch first so
    that a jitted encoder compiles once."""
    n = len(records)
    images_BRRC = np.stack([r["image"] for r in records])
    captions = [r["caption"] for r in records]
    if n < batch_size:
        images_BRRC = np.concatenate([images_BRRC, np.repeat(images_BRRC[-1:], batch_size - n, 0)])
        captions = captions + [captions[-1]] * (batch_size - n)
    mean, logvar = encoders.encode_images(images.to_model_range(images_BRRC))
    context = encoders.encode_text(captions)
    mean, logvar, context = (np.asarray(a)[:n].astype(dtype) for a in (mean, logvar, context))
    if mean.shape != logvar.shape or mean.ndim != 4 or context.ndim != 3:
        raise ValueError(f"encoders returned mean {mean.shape}, logvar {logvar.shape}, context "
                         f"{context.shape}; expected [B, h, w, Z] twice and [B, L, D]")
    return mean, logvar, context


def prepare(source, out: str | os.PathLike, encoders: Encoders, *, batch_size: int = 32,
            shard_size: int = 1000, dtype: str = "float16", overwrite: bool = False,
            limit: int | None = None, resolution: int | None = None,
            source_info: dict | None = None, num_threads: int = 8,
            progress: bool = True) -> dict:
    """Encode ``source`` (records with ``image`` and ``caption``) into shards in ``out``.

    Returns the index written to ``out/index.json``.
    """
    import grain

    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose one of {list(STORE_DTYPES)}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    out = check_output(out, overwrite)
    storage.check_writable(out)
    n = len(source) if limit is None else min(limit, len(source))
    ds = grain.MapDataset.source(source)[:n].to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_size))
    index: dict = {}

    def write(tmp: epath.Path) -> None:
        writer = ShardWriter(tmp, shard_size)
        try:
            index.update(_encode_all(ds, n, writer, encoders, batch_size, np.dtype(dtype),
                                     progress, out.name))
        finally:
            writer.close()
        index.update({
            "dtype": dtype,
            "scaling_factor": float(encoders.scaling_factor),
            "resolution": resolution,
            "source": source_info or {"repr": repr(source)},
            "encoders": encoders.info,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        (tmp / sources.PREPARED_INDEX).write_text(json.dumps(index, indent=1))

    write_output(out, write)
    return index


def _encode_all(ds, n: int, writer: ShardWriter, encoders: Encoders, batch_size: int,
                store: np.dtype, progress: bool, name: str) -> dict:
    """Encode the ``n`` items of ``ds`` into ``writer``; the index's counting fields."""
    from tqdm import tqdm

    skipped: list[str] = []
    shapes: dict[str, list[int]] = {}
    count = 0

    def flush(batch: list[dict]) -> None:
        nonlocal count
        mean, logvar, context = _encode_batch(batch, encoders, batch_size, store)
        shapes.update(latent=list(mean.shape[1:]), context=list(context.shape[1:]))
        for i, rec in enumerate(batch):
            writer.write(sources.encode_record({
                "latent_mean": mean[i], "latent_logvar": logvar[i], "context": context[i],
                "caption": rec["caption"], "index": int(rec["index"])}))
        count += len(batch)

    batch: list[dict] = []
    # grain returns records in index order; the index travels with the record.
    for index, rec in enumerate(tqdm(ds, total=n, unit="img", disable=not progress,
                                     desc=f"prepare {name}")):
        if "skip" in rec:
            skipped.append(rec["skip"])
            log.warning("skipped unreadable image: %s", rec["skip"])
            continue
        batch.append({**rec, "index": index})
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    writer.close()
    if count == 0:
        raise sources.DataError(f"no readable images among {n} (skipped {len(skipped)}; "
                                f"first: {skipped[:1]})")
    return {"format": sources.PREPARED_FORMAT, "count": count, "shards": writer.shards,
            "latent_shape": shapes["latent"], "context_shape": shapes["context"],
            "read": n, "skipped": len(skipped), "skipped_examples": skipped[:MAX_LISTED_SKIPS]}


# ---------------------------------------------------------------- real encoders


def load_encoders(vae: str, text_encoder: str, tokenizer: str) -> Encoders:
    """Jitted encoders from a VAE folder and a text-encoder folder (snapjax model folders, or
    diffusers AutoencoderKL / transformers CLIPTextModel folders) and a CLIP tokenizer folder
    ("world" = the embedded world's vocabulary)."""
    import jax

    from snapjax.data.world import world_tokenizer_folder
    from snapjax.models.tokenizer import Tokenizer
    from snapjax.models.vae import VAE
    from snapjax.pretrained import load_component

    vae_module, vae_params = load_component(vae, "vae")
    te_module, te_params = load_component(text_encoder, "text_encoder")
    tok_folder = world_tokenizer_folder() if tokenizer == "world" else tokenizer
    tok = Tokenizer.from_folder(tok_folder, max_length=te_module.spec.max_length)
    if tok.vocab_size > te_module.spec.vocab_size:
        raise ValueError(f"tokenizer {tok_folder} has {tok.vocab_size} tokens but the text encoder "
                         f"{text_encoder} embeds only {te_module.spec.vocab_size}")

    encode_image = jax.jit(lambda p, x: vae_module.apply({"params": p}, x, method=VAE.encode))
    encode_ids = jax.jit(lambda p, ids: te_module.apply({"params": p}, ids))

    def encode_images(x_BRRC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, logvar = encode_image(vae_params, x_BRRC)
        return np.asarray(mean), np.asarray(logvar)

    def encode_text(captions: list[str]) -> np.ndarray:
        return np.asarray(encode_ids(te_params, tok(captions)))

    info = {"vae": str(vae), "text_encoder": str(text_encoder), "tokenizer": str(tok_folder),
            "vae_spec": dataclasses.asdict(vae_module.spec),
            "text_encoder_spec": dataclasses.asdict(te_module.spec)}
    return Encoders(encode_images, encode_text, vae_module.spec.scaling_factor, info)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0].replace("``", "")
    src = parser.add_argument_group("source")
    src.add_argument("--source", choices=[s for s in SOURCES if s != "prepared"], default="world",
                     help="what to read (default: world)")
    src.add_argument("--path", default="", help="image folder, folder of .tar shards, or TFDS data_dir")
    src.add_argument("--tfds-name", default="", help="TFDS dataset name (with --source tfds)")
    src.add_argument("--split", default="train", help="TFDS split (default: train)")
    src.add_argument("--caption-key", default="", help="caption column / extension / feature "
                     "(default: text, txt, caption for imagefolder, webdataset, tfds)")
    src.add_argument("--image-key", default="", help="image feature (tfds) or comma-separated "
                     "extensions (webdataset)")
    src.add_argument("--world-seed", type=int, default=0, help="world seed (with --source world)")
    src.add_argument("--resolution", type=int, required=True, help="image side after resize + crop")
    src.add_argument("--limit", type=int, default=None,
                     help="encode at most this many items (required for the unbounded world)")
    enc = parser.add_argument_group("encoders")
    enc.add_argument("--model", default="", help="diffusers pipeline folder: sets --vae, "
                     "--text-encoder and --tokenizer to its vae/, text_encoder/, tokenizer/")
    enc.add_argument("--vae", default="", help="VAE folder: snapjax model folder (e.g. the world "
                     "VAE's <workdir>/model) or diffusers AutoencoderKL folder")
    enc.add_argument("--text-encoder", default="", help="text encoder folder: snapjax model "
                     "folder or transformers CLIPTextModel folder")
    enc.add_argument("--tokenizer", default="", help="CLIP tokenizer folder, or 'world' "
                     "(default: the tokenizer/ folder next to --text-encoder)")
    outg = parser.add_argument_group("output")
    outg.add_argument("--out", required=True, help="output folder (written atomically)")
    outg.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    outg.add_argument("--batch-size", type=int, default=32)
    outg.add_argument("--shard-size", type=int, default=1000, help="records per ArrayRecord file")
    outg.add_argument("--dtype", choices=STORE_DTYPES, default="float16",
                      help="storage dtype of latents and contexts (default: float16)")
    outg.add_argument("--num-threads", type=int, default=8, help="image reading threads")


def _encoder_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    model = storage.path(args.model) if args.model else None
    if model is not None and not model.is_dir():
        raise FileNotFoundError(f"--model {model} does not exist or is not a folder")
    vae = args.vae or (str(model / "vae") if model else "")
    te = args.text_encoder or (str(model / "text_encoder") if model else "")
    if not vae or not te:
        raise ValueError("give --model, or both --vae and --text-encoder")
    tok = args.tokenizer or (str(model / "tokenizer") if model else
                             str(storage.path(te).parent / "tokenizer"))
    return vae, te, tok


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.source == "world" and not args.limit:
        raise ValueError("--source world is unbounded: give --limit (how many items to encode)")
    world = {"world": WorldSpec(seed=args.world_seed), "world_size": args.limit} if args.source == "world" else {}
    cfg = DataConfig(source=args.source, path=args.path, resolution=args.resolution,
                     caption_key=args.caption_key, image_key=args.image_key,
                     tfds_name=args.tfds_name, split=args.split, **world)
    try:  # before anything slow: a refused output should not cost a model load
        check_output(args.out, args.overwrite)
    except FileExistsError as e:
        raise UserError(str(e)) from None
    vae, te, tok = _encoder_paths(args)
    source = open_source(cfg)
    encoders = load_encoders(vae, te, tok)
    index = prepare(source, args.out, encoders, batch_size=args.batch_size,
                    shard_size=args.shard_size, dtype=args.dtype, overwrite=args.overwrite,
                    limit=args.limit, resolution=args.resolution, source_info=cfg.to_dict(),
                    num_threads=args.num_threads)
    print(f"wrote {index['count']} records in {len(index['shards'])} shard(s) to {args.out} "
          f"(latent {index['latent_shape']}, context {index['context_shape']}, {index['dtype']}); "
          f"skipped {index['skipped']} unreadable image(s)")
    return 0
