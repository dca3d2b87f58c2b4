"""Random-access data sources: ``len(source)`` and ``source[i] -> record``, as grain reads them.

A record is a dict of numpy arrays and strings:

- image sources (world, image folder, webdataset tars, TFDS): ``image`` uint8 [R, R, 3]
  (shorter side resized to R, center-cropped) and ``caption`` str; the world adds
  ``attributes`` {name: int32 scalar}, its ground truth;
- prepared shards (``snapjax prepare``): ``latent_mean`` and ``latent_logvar`` float32
  [h, w, Z] (raw VAE posterior, unscaled), ``context`` float32 [L, D], ``caption``, ``index``;
  latents a teacher generated (``snapjax generate-latents``) have no ``latent_logvar`` and add
  ``guidance_scale``.

An image that cannot be read (corrupt, truncated, missing file) gives ``{"skip": reason}``
instead of raising: the pipeline drops and counts such records, so one bad file never stops a
run, and since the same index always gives the same record, skipping stays deterministic.
Setup errors (missing folder, malformed metadata.jsonl) raise at construction, naming the file.

Sources hold no open file handles when pickled, so grain worker processes can use them.

Prepared shards may live in a ``gs://`` bucket: :class:`PreparedSource` copies such a folder
to a local cache once (see :func:`local_prepared_copy`). Image folders, webdataset tars and
TFDS data_dirs are read from local disk only, and refuse a ``gs://`` path.

Legend: R resolution, h w latent height/width, Z latent channels, L tokens, D text width.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import msgpack
import numpy as np

from snapjax import storage
from snapjax.data import images
from snapjax.data.world import WorldSpec, render

log = logging.getLogger(__name__)

Record = dict[str, Any]

# Hugging Face imagefolder's caption column, img2dataset's caption extension, common TFDS names.
IMAGEFOLDER_CAPTION_KEY = "text"
WEBDATASET_CAPTION_EXT = "txt"
WEBDATASET_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TFDS_IMAGE_KEY = "image"
TFDS_CAPTION_KEY = "caption"
METADATA_FILE = "metadata.jsonl"
# How many bad metadata lines an error lists before "... and N more".
MAX_LISTED_ERRORS = 5


class DataError(ValueError):
    """A data setup the user must fix (bad folder, malformed captions file, bad shards)."""


def _refuse_remote(path: str | os.PathLike, kind: str) -> None:
    if storage.is_remote(path):
        raise DataError(f"{path}: {kind} sources must be local; copy them or run snapjax "
                        "prepare into gs://")


def _require_dir(path: str | os.PathLike, what: str) -> pathlib.Path:
    # local: image, webdataset and TFDS sources refuse gs:// (_refuse_remote) and read with
    # os / tarfile calls; prepared folders in a bucket are copied first (local_prepared_copy).
    folder = pathlib.Path(path).expanduser()
    if not str(path):
        raise DataError(f"no {what} given (data.path is empty)")
    if not folder.exists():
        raise FileNotFoundError(f"{what} {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{what} {folder} is not a folder")
    return folder


def skip(reason: str) -> Record:
    """The record of an unreadable item; the pipeline counts and drops it."""
    return {"skip": reason}


# ---------------------------------------------------------------- the embedded world


class WorldSource:
    """Items 0 .. size-1 of the procedural world (DESIGN.md §6); deterministic by index.

    The world is unbounded; ``size`` only fixes what one epoch is, i.e. when the shuffle order
    is redrawn. Different ``spec.seed`` values give disjoint-looking worlds (held-out data).
    """

    def __init__(self, spec: WorldSpec, size: int):
        if size < 1:
            raise DataError(f"world size must be >= 1, got {size}")
        self.spec, self.size = spec, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Record:
        image, caption, labels = render(int(index), self.spec)
        return {"image": image, "caption": caption,
                "attributes": {k: np.int32(v) for k, v in labels.items()}}

    def __repr__(self) -> str:
        return f"WorldSource(size={self.size}, spec={self.spec})"


# ---------------------------------------------------------------- image folder + metadata.jsonl


def read_metadata(path: pathlib.Path, caption_key: str) -> tuple[list[str], list[str]]:
    """(file names, captions) from a Hugging Face imagefolder ``metadata.jsonl``.

    Each non-blank line must be a JSON object with a string ``file_name`` and a string caption
    under ``caption_key``; the same file may appear on several lines (one per caption). All bad
    lines are found before failing, and the error lists the first few with their line numbers.
    """
    files, captions, errors = [], [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(entry, dict):
                errors.append(f"line {lineno}: expected a JSON object, got {type(entry).__name__}")
                continue
            problems = []
            for key in ("file_name", caption_key):
                if key not in entry:
                    problems.append(f"missing {key!r}")
                elif not isinstance(entry[key], str):
                    problems.append(f"{key!r} must be a string, got {type(entry[key]).__name__}")
            if problems:
                errors.append(f"line {lineno}: {'; '.join(problems)} (keys: {sorted(entry)})")
                continue
            files.append(entry["file_name"])
            captions.append(entry[caption_key])
    if errors:
        more = len(errors) - MAX_LISTED_ERRORS
        listed = "\n  ".join(errors[:MAX_LISTED_ERRORS]) + (f"\n  ... and {more} more" if more > 0 else "")
        raise DataError(f"{path}: {len(errors)} malformed line(s); each line must be like "
                        f'{{"file_name": "0001.png", "{caption_key}": "a caption"}}:\n  {listed}')
    if not files:
        raise DataError(f"{path} has no entries")
    return files, captions


class ImageFolderSource:
    """A folder of images with captions in ``metadata.jsonl`` (Hugging Face imagefolder).

    ``file_name`` is relative to the folder. Missing or undecodable images are skipped (and
    counted) when read, not checked up front: a stat per file would make opening a
    million-image folder slow on network file systems.
    """

    def __init__(self, folder: str | os.PathLike, resolution: int,
                 caption_key: str = IMAGEFOLDER_CAPTION_KEY):
        _refuse_remote(folder, "image-folder")
        self.folder = _require_dir(folder, "image folder")
        metadata = self.folder / METADATA_FILE
        if not metadata.is_file():
            raise FileNotFoundError(
                f"{self.folder} has no {METADATA_FILE} (Hugging Face imagefolder convention: one "
                f'JSON object per line, e.g. {{"file_name": "0001.png", "{caption_key}": "a red circle"}})')
        self.files, self.captions = read_metadata(metadata, caption_key)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Record:
        path = self.folder / self.files[index]
        try:
            data = path.read_bytes()
        except OSError as e:
            return skip(f"{path}: cannot read ({e.strerror or e})")
        try:
            image = images.load_image(data, self.resolution, str(path))
        except images.UnreadableImage as e:
            return skip(str(e))
        return {"image": image, "caption": self.captions[index]}

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.folder}, {len(self)} images)"


# ---------------------------------------------------------------- webdataset tars (img2dataset)


def _split_member(name: str) -> tuple[str, str]:
    """webdataset naming: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _index_tar(path: pathlib.Path, image_exts: Sequence[str], caption_ext: str):
    """Per sample of one tar: (key, image ext, image offset, size, caption offset, size).

    A tar truncated or damaged part-way keeps the samples before the damage (with a warning).
    """
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if not m.isfile() or m.offset_data + m.size > file_size:
                    continue
                key, ext = _split_member(m.name)
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = (m.offset_data, m.size)
    except tarfile.ReadError as e:
        if not order:
            raise DataError(f"{path}: not a readable uncompressed tar ({e}); webdataset shards must "
                            "be plain .tar files for random access") from e
        log.warning("%s: damaged after %d samples (%s); using those", path, len(order), e)
    rows = []
    for key in order:
        parts = members[key]
        ext = next((e for e in image_exts if e in parts), None)
        if ext is None:
            continue  # e.g. a .json-only entry for a failed download
        cap = parts.get(caption_ext, (-1, 0))
        rows.append((key, ext, *parts[ext], *cap))
    return rows


class WebDatasetSource:
    """webdataset tar shards as img2dataset writes them: ``00000.tar`` holding ``KEY.jpg`` (or
    .png/.webp) and ``KEY.txt``. The tars are indexed once, at construction (headers only, in
    parallel); reads are then a seek + read of one member. A sample without a caption file gets
    the empty caption."""

    def __init__(self, path: str | os.PathLike, resolution: int,
                 caption_ext: str = WEBDATASET_CAPTION_EXT,
                 image_exts: Sequence[str] = WEBDATASET_IMAGE_EXTS, num_threads: int = 16):
        _refuse_remote(path, "webdataset")
        root = pathlib.Path(path).expanduser()  # local: gs:// refused above
        if root.is_file():
            self.shards = [root]
        else:
            folder = _require_dir(path, "webdataset folder")
            self.shards = sorted(folder.glob("*.tar"))
            if not self.shards:
                raise DataError(f"webdataset folder {folder} has no .tar shards")
        self.resolution = resolution
        image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        caption_ext = caption_ext.lower().lstrip(".")
        with futures.ThreadPoolExecutor(max(1, min(num_threads, len(self.shards)))) as pool:
            per_shard = list(pool.map(lambda p: _index_tar(p, image_exts, caption_ext), self.shards))
        shard_id, keys, exts, table = [], [], [], []
        for s, rows in enumerate(per_shard):
            for key, ext, *offsets in rows:
                shard_id.append(s)
                keys.append(key)
                exts.append(ext)
                table.append(offsets)
        if not keys:
            raise DataError(f"{root}: no samples with an image member ({', '.join(image_exts)}) "
                            f"in {len(self.shards)} tar(s)")
        # Compact arrays: an index of 100M samples stays a few GB at most, and pickles fast.
        self._shard = np.asarray(shard_id, np.int32)
        self._keys = np.asarray(keys, dtype=np.bytes_)
        self._exts = np.asarray(exts, dtype=np.bytes_)
        self._offsets = np.asarray(table, np.int64).reshape(-1, 4)  # image off, size, caption off, size
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def _fd(self, shard: int) -> int:
        with self._lock:
            if shard not in self._fds:
                self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
            return self._fds[shard]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    def __getitem__(self, index: int) -> Record:
        s = int(self._shard[index])
        img_off, img_size, cap_off, cap_size = (int(v) for v in self._offsets[index])
        where = f"{self.shards[s]}:{self._keys[index].decode()}.{self._exts[index].decode()}"
        try:
            data = self._read(s, img_off, img_size)
            caption = self._read(s, cap_off, cap_size).decode("utf-8", "replace") if cap_off >= 0 else ""
        except OSError as e:
            return skip(f"{where}: cannot read ({e})")
        try:
            image = images.load_image(data, self.resolution, where)
        except images.UnreadableImage as e:
            return skip(str(e))
        return {"image": image, "caption": caption.strip()}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = {}, None  # descriptors and locks do not cross processes
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.shards)} shards, {len(self)} samples)"


# ---------------------------------------------------------------- TFDS prepared on disk


def import_tfds():
    """tensorflow_datasets, or an ImportError saying how to get it (TensorFlow is not needed)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "data source 'tfds' needs the tensorflow-datasets package: pip install "
            "tensorflow-datasets. TensorFlow itself is not needed to read a dataset prepared on "
            "disk in the array_record file format (tfds.data_source)") from e
    return tfds


def _feature(example, key: str, where: str):
    """``example[a][b]`` for key ``a/b``; works on examples and on tfds FeaturesDicts alike."""
    value = example
    for part in key.split("/"):
        try:
            value = value[part]
        except (KeyError, TypeError, IndexError):
            raise DataError(f"{where}: no feature {key!r} (features: {sorted(example.keys())})") from None
    return value


class TFDSSource:
    """A TFDS dataset prepared on disk (``tfds.data_source(name, split, data_dir)``; array_record
    format, never downloads). Images are read undecoded and decoded here, so unreadable ones
    are skipped like everywhere else. ``image_key``/``caption_key`` may be nested (``a/b``)."""

    def __init__(self, name: str, data_dir: str | os.PathLike, resolution: int, split: str = "train",
                 image_key: str = TFDS_IMAGE_KEY, caption_key: str = TFDS_CAPTION_KEY):
        if not name:
            raise DataError("data source 'tfds' needs a dataset name (data.tfds_name)")
        _refuse_remote(data_dir, "TFDS")
        self.data_dir = _require_dir(data_dir, "TFDS data_dir")
        self.name, self.split, self.resolution = name, split, resolution
        self.image_key, self.caption_key = image_key, caption_key
        self._ds = None
        ds = self._open()
        features = getattr(getattr(ds, "dataset_info", None), "features", None)
        if features is not None:  # fail at open time, not at the first read
            for key in (image_key, caption_key):
                _feature(features, key, f"TFDS dataset {name!r} in {self.data_dir}")
        self._len = len(ds)

    def _open(self):
        if self._ds is None:
            tfds = import_tfds()
            decoders = {self.image_key.split("/")[0]: tfds.decode.SkipDecoding()}
            try:
                self._ds = tfds.data_source(self.name, split=self.split, data_dir=str(self.data_dir),
                                            download=False, decoders=decoders)
            except Exception as e:  # tfds raises many types (AssertionError, DatasetNotFoundError...)
                raise DataError(f"cannot open TFDS dataset {self.name!r} split {self.split!r} in "
                                f"{self.data_dir}: {type(e).__name__}: {e}") from e
        return self._ds

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Record:
        where = f"tfds {self.name}[{self.split}] #{index}"
        example = self._open()[int(index)]
        pixels = _feature(example, self.image_key, where)
        caption = _feature(example, self.caption_key, where)
        if isinstance(caption, np.ndarray) and caption.ndim == 0:
            caption = caption.item()
        if not isinstance(caption, (str, bytes)):
            raise DataError(f"{where}: feature {self.caption_key!r} is a {type(caption).__name__}, "
                            "not one caption string (pick a string feature with data.caption_key)")
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", "replace")
        try:
            if isinstance(pixels, (bytes, np.bytes_)):
                image = images.load_image(bytes(pixels), self.resolution, where)
            else:
                image = images.array_to_image(pixels, self.resolution, where)
        except images.UnreadableImage as e:
            return skip(str(e))
        return {"image": image, "caption": str(caption)}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_ds"] = None  # reopened lazily in each worker process
        return state

    def __repr__(self) -> str:
        return f"TFDSSource({self.name}[{self.split}] in {self.data_dir}, {len(self)} examples)"


# ---------------------------------------------------------------- prepared ArrayRecord shards

PREPARED_FORMAT = "snapjax-prepared-v1"
PREPARED_INDEX = "index.json"
# latent_logvar is absent from generated latents (`snapjax generate-latents`): no posterior.
ARRAY_FIELDS = ("latent_mean", "latent_logvar", "context")


def encode_record(record: Record) -> bytes:
    """One prepared example as msgpack: arrays as {dtype, shape, data}, the rest as is."""
    out = {}
    for k, v in record.items():
        if isinstance(v, np.ndarray):
            out[k] = {"dtype": v.dtype.str, "shape": list(v.shape), "data": np.ascontiguousarray(v).tobytes()}
        else:
            out[k] = v
    return msgpack.packb(out, use_bin_type=True)


def decode_record(data: bytes) -> Record:
    raw = msgpack.unpackb(data, raw=False)
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict) and set(v) == {"dtype", "shape", "data"}:
            out[k] = np.frombuffer(v["data"], dtype=np.dtype(v["dtype"])).reshape(v["shape"])
        else:
            out[k] = v
    return out


def read_prepared_index(folder: str | os.PathLike) -> dict:
    """The checked ``index.json`` of a prepared folder, local or ``gs://``."""
    folder = storage.path(folder)
    path = folder / PREPARED_INDEX
    with storage.clear_errors(folder, "read"):
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {PREPARED_INDEX}: not a folder written by "
                                    "`snapjax prepare` (or its upload did not finish)")
        text = path.read_text()
    try:
        index = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if index.get("format") != PREPARED_FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r}, expected {PREPARED_FORMAT!r}")
    return index


def prepared_cache_dir() -> pathlib.Path:
    # local: the cache of bucket copies is this host's disk by definition.
    root = pathlib.Path(os.environ.get("SNAPJAX_CACHE", "~/.cache/snapjax")).expanduser()
    return root / "prepared"


# gs:// folder -> its local copy, for this process.
_LOCAL_COPIES: dict[str, pathlib.Path] = {}


def local_prepared_copy(folder: str | os.PathLike, num_threads: int = 8) -> pathlib.Path:
    """A local copy of the prepared folder ``folder`` (``gs://``), made once per host.

    array_record opens ``gs://`` only through its own GCS client, with its own credentials and
    endpoint (it hangs where it cannot reach them, ignores STORAGE_EMULATOR_HOST and refuses
    bucket names under 3 characters), and a bucket read per record would make training's random
    access slow; so the shards are copied, through the same gcsfs as every other file, into
    ``$SNAPJAX_CACHE/prepared/`` (default ``~/.cache/snapjax``) under a name hashing the path
    and its ``index.json``: a rewritten folder gets a fresh copy, an unchanged one is reused.
    The copy is renamed into place whole, so processes on one host never see half of one.
    """
    remote = storage.check_readable(folder, "prepared data folder")
    key = os.fspath(remote)
    if key in _LOCAL_COPIES:
        return _LOCAL_COPIES[key]
    index = read_prepared_index(remote)
    digest = hashlib.sha256(f"{key}\n{json.dumps(index, sort_keys=True)}".encode()).hexdigest()
    local = prepared_cache_dir() / f"{remote.name}-{digest[:16]}"
    if (local / PREPARED_INDEX).is_file():
        log.info("prepared data %s: reading its local copy %s", key, local)
    else:
        names = [s["file"] for s in index["shards"]]
        with storage.clear_errors(folder, "read"):
            present = {p.name for p in remote.iterdir()}
        missing = [f"{key}/{n}" for n in names if n not in present]
        if missing:
            raise FileNotFoundError(f"{key}: shard file(s) missing: {missing[:3]}")
        log.info("prepared data %s: copying %d shard(s) to %s (ArrayRecord shards are read "
                 "from local disk)", key, len(names), local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{local.name}.download-", dir=local.parent))
        try:
            def copy(name: str) -> None:
                with (remote / name).open("rb") as fin, open(tmp / name, "wb") as fout:
                    shutil.copyfileobj(fin, fout, length=16 << 20)

            with storage.clear_errors(folder, "read"):
                with futures.ThreadPoolExecutor(max(1, min(num_threads, len(names)))) as pool:
                    list(pool.map(copy, names))
            (tmp / PREPARED_INDEX).write_text(json.dumps(index, indent=1))  # last: complete
            try:
                os.rename(tmp, local)
            except OSError:  # another process on this host renamed its copy first
                if not (local / PREPARED_INDEX).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _LOCAL_COPIES[key] = local
    return local


class PreparedSource:
    """ArrayRecord shards written by ``snapjax prepare`` (see :mod:`snapjax.data.prepare`),
    from a local folder or a ``gs://`` one (copied to local disk first: :func:`local_prepared_copy`).

    Yields float32 arrays whatever the stored dtype (float16 by default, to halve the disk)."""

    def __init__(self, folder: str | os.PathLike):
        import grain  # grain's reader handles many shards and pickles into worker processes

        self.location = os.fspath(folder)
        if storage.is_remote(folder):
            self.folder = local_prepared_copy(folder)
        else:
            self.folder = _require_dir(folder, "prepared data folder")
        self.index = read_prepared_index(self.folder)
        paths = [self.folder / s["file"] for s in self.index["shards"]]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder}: shard file(s) missing: {missing[:3]}")
        self._records = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
        if len(self._records) != self.index["count"]:
            raise DataError(f"{self.location}: shards hold {len(self._records)} records but "
                            f"{PREPARED_INDEX} says {self.index['count']}")

    @property
    def scaling_factor(self) -> float:
        return float(self.index["scaling_factor"])

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:
        rec = decode_record(self._records[int(index)])
        for k in ARRAY_FIELDS:
            if k in rec:
                rec[k] = rec[k].astype(np.float32)
        return rec

    def __repr__(self) -> str:
        return f"PreparedSource({self.location}, {len(self)} records)"
