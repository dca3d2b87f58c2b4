"""CLIP tokenizer files for exported folders: ``vocab.json`` and ``merges.txt`` always present.

Apple's Swift pipeline (and transformers 4's slow CLIPTokenizer) read ``vocab.json`` +
``merges.txt``; transformers 5 saves only ``tokenizer.json``. We copy what the source folder has
and derive the two classic files from ``tokenizer.json``'s BPE model where they are missing.
"""

from __future__ import annotations

import json
import os
import tempfile

from etils import epath

from snapjax import storage

VOCAB, MERGES, FAST = "vocab.json", "merges.txt", "tokenizer.json"
_COPIED = (VOCAB, MERGES, FAST, "tokenizer_config.json", "special_tokens_map.json")


def write_clip_tokenizer_files(source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                               *, only_vocab: bool = False) -> list[epath.Path]:
    """Copy the tokenizer of ``source_dir`` to ``out_dir`` (either local or ``gs://``); returns
    the files written.

    ``only_vocab``: write just vocab.json and merges.txt (what a Core ML folder needs).
    """
    source, out_dir = storage.path(source_dir), storage.path(out_dir)
    with storage.clear_errors(source_dir, "read"):
        if not source.is_dir():
            raise FileNotFoundError(f"{source_dir}: tokenizer folder not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ((VOCAB, MERGES) if only_vocab else _COPIED):
        if (source / name).is_file():
            # Small files, read whole: a bucket's folder is no shutil path.
            (out_dir / name).write_bytes((source / name).read_bytes())
            written.append(out_dir / name)
    if not ((out_dir / VOCAB).is_file() and (out_dir / MERGES).is_file()):
        vocab, merges = _bpe_from_fast(source)
        (out_dir / VOCAB).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out_dir / MERGES).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                      encoding="utf-8")
        written += [out_dir / VOCAB, out_dir / MERGES]
    return written


def clip_tokenizer(folder: str | os.PathLike):
    """The transformers ``CLIPTokenizer`` of a tokenizer folder; a bucket's folder is read
    through a local copy of its tokenizer files alone (an export folder also holds packages)."""
    from transformers import CLIPTokenizer

    if not storage.is_remote(folder):
        return CLIPTokenizer.from_pretrained(str(storage.path(folder)))
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(folder, tmp)
        return CLIPTokenizer.from_pretrained(tmp)


def _bpe_from_fast(source_dir: epath.Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    path = source_dir / FAST
    if not path.is_file():
        raise FileNotFoundError(f"{source_dir}: a CLIP tokenizer folder needs {VOCAB} + {MERGES} "
                                f"or {FAST}; found neither")
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a tokenizers file with a model section ({e})") from e
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; CLIP's tokenizer is BPE")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges
