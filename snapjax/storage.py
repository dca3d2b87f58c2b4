"""One path layer for every folder a user names: local paths and ``gs://`` buckets.

Every workdir, model folder, pipeline folder, prepared dataset, report and export goes through
:func:`path`, which gives an ``etils.epath.Path`` for both (local paths made absolute, so a
folder named relative to the shell stays the same folder). Orbax and tensorstore read and write
``gs://`` themselves; JSON, text and small files go through epath (gcsfs underneath).

Folders are written by :func:`write_folder`: locally into a temporary sibling renamed into
place (atomic), and for a bucket, where a folder cannot be renamed at once, into a local
staging folder that is then uploaded with each folder's own files after its subfolders and its
JSON files last. Every folder kind snapjax reads is recognised by a JSON file at its top
(``snapjax_model.json``, the pipeline's and the prepared data's files, ``model_index.json``),
so an upload killed part-way leaves a folder that every reader refuses as incomplete.

A local GCS emulator is used by setting ``STORAGE_EMULATOR_HOST`` (as for Google's client
libraries); :func:`configure_emulator` points tensorstore and gcsfs at it as well.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from etils import epath

REMOTE_PREFIX = "gs://"


def is_remote(p: str | os.PathLike) -> bool:
    return os.fspath(p).startswith(REMOTE_PREFIX)


def path(p: str | os.PathLike) -> epath.Path:
    """The folder or file ``p`` names: ``gs://bucket/...`` or a local path made absolute."""
    s = os.fspath(p)
    if s.startswith(REMOTE_PREFIX):
        configure_emulator()
        if not s[len(REMOTE_PREFIX):].split("/")[0]:
            raise ValueError(f"{s}: no bucket name after gs://")
        return epath.Path(s.rstrip("/"))
    if "://" in s:
        raise ValueError(f"{s}: unsupported scheme; snapjax reads and writes local paths and "
                         f"gs:// buckets")
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def configure_emulator() -> None:
    """Point tensorstore and gcsfs at ``STORAGE_EMULATOR_HOST`` when it is set.

    Google's client libraries read that variable; tensorstore reads its own, and gcsfs's
    bucket-type probe goes through a gRPC API emulators do not serve. Values already set win.
    """
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_VERSION", "1")
    # An emulator takes any token; without one tensorstore asks the metadata server.
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import sys
    if "gcsfs" in sys.modules:  # imported before the variable was set: use the plain one
        import fsspec
        import gcsfs.core
        fsspec.register_implementation("gs", gcsfs.core.GCSFileSystem, clobber=True)


def bucket_of(p: str | os.PathLike) -> str:
    return os.fspath(p)[len(REMOTE_PREFIX):].split("/")[0]


def refresh(p: str | os.PathLike) -> None:
    """Forget gcsfs's cached listings, so a folder another process wrote is seen."""
    if is_remote(p):
        import fsspec
        fsspec.filesystem("gs").invalidate_cache()


@contextlib.contextmanager
def clear_errors(p: str | os.PathLike, action: str) -> Iterator[None]:
    """Turn a bucket's missing-bucket and permission errors into one line naming ``p``."""
    try:
        yield
    except OSError as e:
        if not is_remote(p) or isinstance(e, (FileExistsError, IsADirectoryError,
                                              NotADirectoryError)):
            raise
        text = str(e)
        if isinstance(e, PermissionError) or "Forbidden" in text or "403" in text:
            raise PermissionError(f"{p}: no permission to {action} (the bucket's owner grants "
                                  f"it: storage.objects.create / get / list)") from e
        if isinstance(e, FileNotFoundError):
            _require_bucket(p)
        raise


def _require_bucket(p: str | os.PathLike) -> None:
    if is_remote(p) and not bucket_exists(p):
        raise FileNotFoundError(f"{p}: bucket gs://{bucket_of(p)} does not exist")


def bucket_exists(p: str | os.PathLike) -> bool:
    import fsspec
    fs = fsspec.filesystem("gs")
    try:
        fs.ls(bucket_of(p), detail=False)
        return True
    except FileNotFoundError:
        return False
    except OSError:  # forbidden to list: it exists
        return True


def check_writable(folder: str | os.PathLike) -> None:
    """Fail now, naming ``folder``, if it cannot be written (a bucket that does not exist, or
    one without permission), rather than deep inside a checkpoint write later."""
    if not is_remote(folder):
        return
    import socket  # every process of a pod probes: a name of its own
    probe = path(folder) / f".snapjax-write-check-{socket.gethostname()}-{os.getpid()}"
    with clear_errors(folder, "write"):
        _require_bucket(folder)
        probe.write_text("")
        probe.unlink(missing_ok=True)


def check_readable(folder: str | os.PathLike, what: str = "folder") -> epath.Path:
    """``folder`` as a path, or a one-line error: no such bucket, no permission, no folder."""
    p = path(folder)
    with clear_errors(folder, "read"):
        _require_bucket(folder)
        if not p.exists():
            raise FileNotFoundError(f"{folder}: not a folder (no such {what})")
    return p


def write_folder(folder: str | os.PathLike, write: Callable[[epath.Path], None], *,
                 overwrite: bool = False, prefix: str | None = None) -> epath.Path:
    """Run ``write(tmp)`` into a local temporary folder, then put it at ``folder``.

    ``tmp`` is always on the local disk (so any library can write into it). Refuses an existing
    ``folder`` unless ``overwrite``. A failure or Ctrl-C part-way leaves neither a half-written
    folder that loads nor the temporary one: locally the temporary sibling is renamed into
    place; in a bucket the upload sends each folder's JSON files last (module docstring).
    """
    folder = path(folder)
    with clear_errors(folder, "write"):
        if folder.exists() and not overwrite:
            raise FileExistsError(f"{folder} exists; pass --overwrite (overwrite=True) to "
                                  f"replace it")
        if is_remote(folder):
            return _write_remote(folder, write, overwrite, prefix)
        return _write_local(folder, write, prefix)


def _write_local(folder: epath.Path, write, prefix) -> epath.Path:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(tempfile.mkdtemp(prefix=prefix or f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


@contextlib.contextmanager
def _staging(prefix: str) -> Iterator[epath.Path]:
    """A local temporary folder (under ``$SNAPJAX_STAGING`` if set), removed afterwards."""
    tmp = epath.Path(tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("SNAPJAX_STAGING")))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_remote(folder: epath.Path, write, overwrite: bool, prefix) -> epath.Path:
    with _staging(prefix or f"snapjax-{folder.name}.staging-") as tmp:
        write(tmp)
        if folder.exists():
            assert overwrite  # write_folder refused it otherwise
            # Its top-level JSON first: from here on the old folder no longer loads.
            for f in folder.iterdir():
                if f.name.endswith(".json"):
                    f.unlink()
            folder.rmtree()
        upload(tmp, folder)
    refresh(folder)
    return folder


def upload(local: epath.Path, remote: epath.Path) -> None:
    """Copy a local folder into the bucket: subfolders before a folder's own files, JSON last."""
    entries = sorted(local.iterdir())
    for sub in (e for e in entries if e.is_dir()):
        upload(sub, remote / sub.name)
    files = [e for e in entries if not e.is_dir()]
    for f in sorted(files, key=lambda f: f.name.endswith(".json")):
        _copy_file(f, remote / f.name)


def download(remote: epath.Path, local: epath.Path) -> None:
    """Copy a folder from the bucket (or anywhere) to a local folder."""
    local.mkdir(parents=True, exist_ok=True)
    for e in remote.iterdir():
        if e.is_dir():
            download(e, local / e.name)
        else:
            _copy_file(e, local / e.name)


def _copy_file(src: epath.Path, dst: epath.Path) -> None:
    # Streamed: parameter files of a large model do not fit in memory twice.
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


@contextlib.contextmanager
def local_folder(folder: str | os.PathLike) -> Iterator[epath.Path]:
    """``folder`` on the local disk, for libraries that only open local files: itself when it
    is local, else a temporary copy removed afterwards."""
    p = path(folder)
    if not is_remote(p):
        yield p
        return
    with _staging(f"snapjax-{p.name}.download-") as tmp:
        with clear_errors(folder, "read"):
            download(p, tmp)
        yield tmp


@contextlib.contextmanager
def local_output(folder: str | os.PathLike) -> Iterator[epath.Path]:
    """A local folder to write files for ``folder`` into (added to what is there): ``folder``
    itself when it is local, else a staging folder uploaded into the bucket on success."""
    p = path(folder)
    if not is_remote(p):
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    with _staging(f"snapjax-{p.name}.staging-") as tmp:
        yield tmp
        with clear_errors(folder, "write"):
            upload(tmp, p)


def append_text(file: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``file``. A bucket's objects cannot be appended to: there the file is
    read and written again whole (for small logs such as evolution.jsonl)."""
    p = path(file)
    if is_remote(p):
        p.write_text((p.read_text() if p.exists() else "") + text)
    else:
        with p.open("a") as f:
            f.write(text)
