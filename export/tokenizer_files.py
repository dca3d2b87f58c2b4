"""CLIP tokenizer files for exported folders: ``vocab.json`` and ``merges.txt`` always present.

Apple's Swift pipeline (and transformers 4's slow CLIPTokenizer) read ``vocab.json`` +
``merges.txt``; transformers 5 saves only ``tokenizer.json``. We copy what the source folder has
and derive the two classic files from ``tokenizer.json``'s BPE model where they are missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

VOCAB, MERGES, FAST = "vocab.json", "merges.txt", "tokenizer.json"
_COPIED = (VOCAB, MERGES, FAST, "tokenizer_config.json", "special_tokens_map.json")


def write_clip_tokenizer_files(source_dir: str | Path, out_dir: str | Path,
                               *, only_vocab: bool = False) -> list[Path]:
    """Copy the tokenizer of ``source_dir`` to ``out_dir``; returns the files written.

    ``only_vocab``: write just vocab.json and merges.txt (what a Core ML folder needs).
    """
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"{source_dir}: tokenizer folder not found")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ((VOCAB, MERGES) if only_vocab else _COPIED):
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
            written.append(out_dir / name)
    if not ((out_dir / VOCAB).is_file() and (out_dir / MERGES).is_file()):
        vocab, merges = _bpe_from_fast(source_dir)
        (out_dir / VOCAB).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out_dir / MERGES).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                      encoding="utf-8")
        written += [out_dir / VOCAB, out_dir / MERGES]
    return written


def _bpe_from_fast(source_dir: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
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
