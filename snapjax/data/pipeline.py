"""Training input: a deterministic, infinite, checkpointable grain pipeline, sharded per process.

The global stream is ``source`` in a seeded permutation, redrawn every epoch and repeated
forever. Global batch n is elements ``[n*G, (n+1)*G)`` of that stream; process p reads only
the contiguous block ``[n*G + p*G/P, n*G + (p+1)*G/P)`` of it, so the per-process batches,
concatenated in process order, are exactly the single-process global batch (what
``jax.make_array_from_process_local_data`` assembles).

Unreadable images arrive as ``{"skip": reason}`` records (see :mod:`snapjax.data.sources`);
the iterator drops them, counts them (``iterator.skipped``, logged) and fills the batch from
this process's next elements. Skipping is a pure function of the data, so runs stay
deterministic; the only thing lost is the exact single-process equivalence above, from the
first skipped image on (batches stay disjoint across processes).

The iterator's state is a small JSON dict (position in this process's stream, batches and
skips so far, the layout); ``set_state`` rebuilds the grain pipeline at that position, so
resuming gives exactly the batches the uninterrupted run would have given. A state saved
with another process count or global batch size resumes at the same global batch number.

Legend: B per-process batch, G global batch, P process count, R resolution.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from snapjax.data import images, sources
from snapjax.data.world import WorldSpec

log = logging.getLogger(__name__)

SOURCES = ("world", "imagefolder", "webdataset", "tfds", "prepared")
IMAGE_DTYPES = ("float32", "uint8")
# A run of this many unreadable images in a row means the data is broken, not a few bad files.
MAX_CONSECUTIVE_SKIPS = 1000
# Skipped images logged one by one before switching to a summary every SKIP_LOG_EVERY.
SKIP_LOG_FIRST = 10
SKIP_LOG_EVERY = 100
STATE_VERSION = 1

Batch = dict[str, Any]
Tokenizer = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training data comes from and how it is read (the config's ``data`` section).

    source: world | imagefolder | webdataset | tfds | prepared.
    path: the image folder, the folder of .tar shards (or one .tar), the TFDS data_dir, or the
      folder `snapjax prepare` wrote; unused for the world.
    resolution: images are resized (shorter side) and center-cropped to this; for the world,
      the rendering size (it overrides world.resolution); for prepared data, checked against
      the resolution the shards were made at.
    caption_key / image_key: "" means the source's convention: imagefolder caption column
      "text"; webdataset caption extension "txt" and image extensions "jpg,jpeg,png,webp"
      (image_key is a comma-separated list there); tfds features "caption" and "image".
    tfds_name, split: the TFDS dataset (``name[/config][:version]``) and split.
    world: the world's spec; world_size: items per epoch of the (unbounded) world.
    shuffle: a seeded global permutation per epoch (no shuffle buffer: sources are random access).
    image_dtype: float32 (in [-1, 1]) or uint8 (in [0, 255], 4x less host-to-device traffic;
      convert on device).
    sample_latents: prepared data only: draw latents from the stored VAE posterior
      (mean + std * noise, seeded per element) instead of using the mean.
    num_threads, prefetch_buffer_size: grain's reader threads and read-ahead (elements).
    num_workers: grain worker processes for decoding (0 = threads only in this process).
    """

    source: str = "world"
    path: str = ""
    resolution: int = 32
    caption_key: str = ""
    image_key: str = ""
    tfds_name: str = ""
    split: str = "train"
    world: WorldSpec = WorldSpec()
    world_size: int = 1_000_000
    shuffle: bool = True
    image_dtype: str = "float32"
    sample_latents: bool = False
    num_threads: int = 8
    prefetch_buffer_size: int = 64
    num_workers: int = 0

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source={self.source!r}; choose one of {list(SOURCES)}")
        if self.source != "world" and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path")
        if self.source == "tfds" and not self.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name (the TFDS dataset name)")
        if self.sample_latents and self.source != "prepared":
            raise ValueError("data.sample_latents needs data.source='prepared' (latents made by "
                             "`snapjax prepare`)")
        if self.image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"data.image_dtype={self.image_dtype!r}; choose one of {list(IMAGE_DTYPES)}")
        for name in ("resolution", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        for name in ("num_threads", "prefetch_buffer_size", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 0")
        if not isinstance(self.world, WorldSpec):
            raise ValueError(f"data.world must be a WorldSpec, got {type(self.world).__name__}")
        if self.world.resolution != self.resolution:
            object.__setattr__(self, "world", dataclasses.replace(self.world, resolution=self.resolution))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DataConfig":
        """From a config section (dict or ml_collections ConfigDict); unknown keys are errors.

        ``world`` is a dict of WorldSpec fields; the world renders at data.resolution (a
        world.resolution that differs is an error)."""
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"data config: unknown key(s) {unknown}; known: {known}")
        if "world" in d and not isinstance(d["world"], WorldSpec):
            world = dict(d["world"])
            resolution = d.get("resolution", cls.resolution)
            if world.get("resolution", resolution) != resolution:
                raise ValueError(f"data config: data.world.resolution={world['resolution']} differs "
                                 f"from data.resolution={resolution}; the world renders at "
                                 "data.resolution (drop data.world.resolution)")
            d["world"] = WorldSpec.from_dict({**world, "resolution": resolution})
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["world"] = {k: v for k, v in self.world.to_dict().items() if k != "resolution"}
        return d


def open_source(cfg: DataConfig):
    """The random-access source the config names (errors name the missing folder or bad file)."""
    if cfg.source == "world":
        return sources.WorldSource(cfg.world, cfg.world_size)
    if cfg.source == "imagefolder":
        return sources.ImageFolderSource(cfg.path, cfg.resolution,
                                         cfg.caption_key or sources.IMAGEFOLDER_CAPTION_KEY)
    if cfg.source == "webdataset":
        exts = cfg.image_key.split(",") if cfg.image_key else sources.WEBDATASET_IMAGE_EXTS
        return sources.WebDatasetSource(cfg.path, cfg.resolution,
                                        caption_ext=cfg.caption_key or sources.WEBDATASET_CAPTION_EXT,
                                        image_exts=exts)
    if cfg.source == "tfds":
        return sources.TFDSSource(cfg.tfds_name, cfg.path, cfg.resolution, split=cfg.split,
                                  image_key=cfg.image_key or sources.TFDS_IMAGE_KEY,
                                  caption_key=cfg.caption_key or sources.TFDS_CAPTION_KEY)
    src = sources.PreparedSource(cfg.path)
    if cfg.sample_latents and src.index.get("latents") == "generated":
        raise ValueError(f"data.sample_latents: {cfg.path} holds latents a teacher generated "
                         "(`snapjax generate-latents`), which have no VAE posterior to draw from")
    made_at = src.index.get("resolution")
    if made_at is not None and made_at != cfg.resolution:
        raise ValueError(f"prepared data {cfg.path} was made at resolution {made_at}, but "
                         f"data.resolution={cfg.resolution}")
    return src


# ---------------------------------------------------------------- the per-process stream


class _ProcessBlocks(grain.MapDataset):
    """Process p's share of a stream: block p of each run of P consecutive blocks of B elements."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, block: int):
        super().__init__(parent)
        self._p, self._n, self._block = process_index, process_count, block

    def __len__(self) -> int:
        return len(self._parent) // self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        run, offset = divmod(index, self._block)
        return self._parent[(run * self._n + self._p) * self._block + offset]

    def __str__(self) -> str:
        return f"_ProcessBlocks(process={self._p}/{self._n}, block={self._block})"


def _prepared_latent(scaling_factor: float):
    """Record (, rng) -> record with ``latent`` = scaling_factor * (mean, or a posterior draw
    when grain's random_map passes an rng seeded by the seed and the element's stream index)."""

    def with_latent(rec, rng: np.random.Generator | None = None):
        z = rec["latent_mean"]
        if rng is not None:
            std = np.exp(0.5 * rec["latent_logvar"])
            z = z + std * rng.standard_normal(z.shape, dtype=np.float32)
        return {**rec, "latent": (z * np.float32(scaling_factor)).astype(np.float32)}

    return with_latent


def _global_stream(cfg: DataConfig, source, seed: int) -> grain.MapDataset:
    """The infinite, seeded global stream of records (same on every process)."""
    shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat()  # reseeds the shuffle each epoch
    if cfg.source == "prepared":
        fn = _prepared_latent(source.scaling_factor)
        ds = ds.random_map(fn, seed=map_seed) if cfg.sample_latents else ds.map(fn)
    return ds


# ---------------------------------------------------------------- batches


def _make_batch(records: list[dict], image_dtype: str, tokenizer: Tokenizer | None) -> Batch:
    first = records[0]
    batch: Batch = {}
    if "image" in first:
        images_BRRC = np.stack([r["image"] for r in records])
        batch["image"] = images.to_model_range(images_BRRC) if image_dtype == "float32" else images_BRRC
    if "latent" in first:
        batch["latent"] = np.stack([r["latent"] for r in records])
        batch["context"] = np.stack([r["context"] for r in records])
    if "attributes" in first:
        batch["attributes"] = {k: np.stack([r["attributes"][k] for r in records]).astype(np.int32)
                               for k in first["attributes"]}
    if tokenizer is not None:
        ids = np.asarray(tokenizer([r["caption"] for r in records]))
        if ids.ndim != 2 or ids.shape[0] != len(records):
            raise ValueError(f"tokenizer returned shape {ids.shape} for {len(records)} captions; "
                             "expected [B, max_length]")
        batch["input_ids"] = ids.astype(np.int32)
    return batch


class TrainIterator(grain.DatasetIterator):
    """Infinite iterator of this process's batches (dicts of numpy arrays, leading dim B).

    ``get_state()``/``set_state()`` give JSON-able dicts, and the class is a grain
    ``DatasetIterator``, so ``grain.checkpoint.CheckpointSave/Restore`` (Orbax) work as is.
    ``skipped`` counts the unreadable images dropped so far (restored with the state).
    """

    def __init__(self, make_stream: Callable[[int], grain.IterDataset], make_batch: Callable,
                 layout: dict[str, int]):
        self._it = None  # before anything can fail: close() (also run by __del__) reads it
        super().__init__()
        self._make_stream, self._make_batch, self._layout = make_stream, make_batch, layout
        self._block = layout["global_batch_size"] // layout["process_count"]
        self._position = 0       # elements of this process's stream consumed (kept or skipped)
        self._batches = 0
        self._skipped = 0

    @property
    def skipped(self) -> int:
        return self._skipped

    @property
    def batches(self) -> int:
        return self._batches

    def _stream(self):
        if self._it is None:
            self._it = iter(self._make_stream(self._position))
        return self._it

    def __next__(self) -> Batch:
        self._assert_not_closed()
        it = self._stream()
        records, consecutive = [], 0
        while len(records) < self._block:
            rec = next(it)
            self._position += 1
            if "skip" in rec:
                self._note_skip(rec["skip"])
                consecutive += 1
                if consecutive >= MAX_CONSECUTIVE_SKIPS:
                    raise sources.DataError(
                        f"{consecutive} unreadable images in a row (last: {rec['skip']}); the data "
                        "is broken, not just a few bad files")
                continue
            consecutive = 0
            records.append(rec)
        self._batches += 1
        return self._make_batch(records)

    def _note_skip(self, reason: str) -> None:
        self._skipped += 1
        if self._skipped <= SKIP_LOG_FIRST:
            log.warning("skipped unreadable image (%d so far): %s", self._skipped, reason)
        elif self._skipped % SKIP_LOG_EVERY == 0:
            log.warning("%d unreadable images skipped so far (latest: %s)", self._skipped, reason)

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "position": self._position, "batches": self._batches,
                "skipped": self._skipped, **self._layout}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = sorted({"version", "position", "batches", "skipped", *self._layout} - set(state))
        if missing:
            raise ValueError(f"data iterator state lacks {missing}: not saved by this pipeline")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"data iterator state version {state['version']}, expected {STATE_VERSION}")
        if state["seed"] != self._layout["seed"]:
            raise ValueError(f"data iterator state was saved with seed {state['seed']}, but this "
                             f"pipeline has seed {self._layout['seed']}")
        same_layout = all(state[k] == self._layout[k]
                          for k in ("process_index", "process_count", "global_batch_size"))
        if same_layout:
            position = int(state["position"])
        else:
            # Another layout: continue at the same global batch number. Exact unless images were
            # skipped before (skips move a process's position ahead of batches * B).
            position = int(state["batches"]) * self._block
            log.warning("data state from %d process(es) x global batch %d resumed on %d x %d at "
                        "global batch %d", state["process_count"], state["global_batch_size"],
                        self._layout["process_count"], self._layout["global_batch_size"],
                        state["batches"])
        self._close_stream()
        self._position, self._batches = position, int(state["batches"])
        self._skipped = int(state["skipped"])

    def start_prefetch(self) -> None:
        self._stream()

    def _close_stream(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None

    def close(self) -> None:
        self._close_stream()
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator({self._layout})"


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags, which raise unless parsed; outside an absl app
    (our CLI is argparse) take their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_cfg: DataConfig, *, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None,
                        tokenizer: Tokenizer | None = None, source=None) -> TrainIterator:
    """This process's infinite, deterministic, checkpointable batch iterator.

    Batches: ``image`` [B, R, R, 3] (float32 in [-1, 1], or uint8 with data.image_dtype) for
    image sources, ``latent`` [B, h, w, Z] float32 (already times the VAE scaling factor) and
    ``context`` [B, L, D] float32 for prepared data; ``attributes`` {name: int32 [B]} for the
    world; ``input_ids`` int32 [B, 77] when a tokenizer is given. B = global_batch_size /
    process_count. ``process_index``/``process_count`` default to jax's. ``source`` replaces
    the source data_cfg names (any object with ``__len__`` and ``__getitem__`` giving records).
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} cannot be split evenly over "
                         f"{process_count} process(es); use a positive multiple of {process_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"data seed {seed} must be in [0, 2**32)")
    block = global_batch_size // process_count
    source = open_source(data_cfg) if source is None else source
    local = _ProcessBlocks(_global_stream(data_cfg, source, seed), process_index, process_count, block)
    read = grain.ReadOptions(num_threads=data_cfg.num_threads,
                             prefetch_buffer_size=data_cfg.prefetch_buffer_size)

    def make_stream(position: int) -> grain.IterDataset:
        ds = local[position:].to_iter_dataset(read)
        if data_cfg.num_workers:
            _absl_flags_ready()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
        return ds

    def make_batch(records):
        return _make_batch(records, data_cfg.image_dtype, tokenizer)

    layout = {"process_index": process_index, "process_count": process_count,
              "global_batch_size": global_batch_size, "seed": seed}
    log.info("data: %r, process %d/%d, batch %d of %d", source, process_index, process_count,
             block, global_batch_size)
    return TrainIterator(make_stream, make_batch, layout)
