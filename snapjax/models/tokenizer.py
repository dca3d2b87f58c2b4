"""CLIP BPE tokenization to fixed-length id arrays, and writing CLIP-format vocabularies.

:class:`Tokenizer` wraps ``transformers.CLIPTokenizer.from_pretrained(folder)``: the folder form,
because ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores the files in
transformers 5. :func:`write_clip_vocab` writes such a folder for a small word list (the embedded
world's vocabulary, and test fixtures), no download needed.
"""

from __future__ import annotations

import json
import os
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from snapjax import storage

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_FILES = ("vocab.json", "merges.txt")


class Tokenizer:
    """``tokenizer(prompts) -> int32 [B, max_length]``: BOS, tokens, EOS, then the tokenizer's own
    pad token (SD-v1.5 pads with EOS); prompts that are too long are truncated with a warning."""

    def __init__(self, hf_tokenizer, max_length: int):
        self._tok = hf_tokenizer
        self.max_length = max_length

    @classmethod
    def from_folder(cls, path: str | os.PathLike, max_length: int | None = None) -> "Tokenizer":
        """Load a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json ...),
        local or ``gs://``.

        ``max_length`` defaults to the folder's ``model_max_length`` (77 for SD-v1.5).
        """
        folder = storage.path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist or is not a folder")
        missing = [name for name in VOCAB_FILES if not (folder / name).is_file()]
        # transformers 5 saves only tokenizer.json (the fast tokenizer's file); it loads the same.
        if missing and not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} lacks {', '.join(missing)} "
                                    f"(a CLIP tokenizer needs {' and '.join(VOCAB_FILES)}, "
                                    "or tokenizer.json)")
        from transformers import CLIPTokenizer  # heavy import, only when a tokenizer is needed

        # transformers reads local files only: a bucket's folder (a few MB) is copied first.
        with storage.local_folder(folder) as local:
            tok = CLIPTokenizer.from_pretrained(str(local))
        if max_length is None:
            max_length = tok.model_max_length
            if max_length > 100_000:  # transformers' "no limit" sentinel: the folder does not say
                raise ValueError(f"tokenizer folder {folder}: tokenizer_config.json has no "
                                 "model_max_length; pass max_length (77 for CLIP)")
        return cls(tok, int(max_length))

    def save(self, folder: str | Path) -> Path:
        """Write the tokenizer files (loadable by :meth:`from_folder` and by transformers)."""
        # local: transformers writes local files; pipelines save into write_folder's local tmp.
        folder = Path(folder)
        self._tok.save_pretrained(str(folder))  # tokenizer.json + tokenizer_config.json
        # transformers 5 writes no vocab.json/merges.txt; older transformers and Apple's
        # ml-stable-diffusion read those, so write them from the BPE model too.
        self._tok.backend_tokenizer.model.save(str(folder))
        # The folder's model_max_length is what from_folder reads back: make it this length
        # (the world's tokenizer pads to 24, not to the 77 its source folder may say).
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["model_max_length"] = self.max_length
        config_path.write_text(json.dumps(config, indent=2))
        return folder

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def pad_token_id(self) -> int:
        return int(self._tok.pad_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self._tok.eos_token_id)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("Tokenizer expects a list of prompts, got one string")
        prompts = list(prompts)
        # verbose=False: transformers' own "sequence too long" log is replaced by the warning below.
        full = self._tok(prompts, padding=False, truncation=False, verbose=False).input_ids
        for prompt, ids in zip(prompts, full):
            cut = len(ids) - self.max_length
            if cut > 0:
                # BOS + first max_length-2 tokens + EOS are kept; the removed ones sit before EOS.
                removed = self._tok.decode(ids[self.max_length - 1:-1])
                warnings.warn(
                    f"prompt {prompt!r} is {cut} token(s) longer than the {self.max_length}-token "
                    f"limit of CLIP; truncated: {removed!r}", stacklevel=2)
        ids = self._tok(prompts, padding="max_length", max_length=self.max_length,
                        truncation=True).input_ids
        return np.asarray(ids, dtype=np.int32).reshape(len(prompts), self.max_length)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table, in CLIP's order (printable
    bytes first, then the others mapped past U+00FF), which is also the vocabulary's order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def write_clip_vocab(folder: str | Path, words: Iterable[str], max_length: int = 77) -> Path:
    """Write a CLIP-format tokenizer folder whose BPE knows ``words``.

    The vocabulary is CLIP's layout: the 256 byte symbols, the same with ``</w>`` (end of word),
    one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Each word gets the
    left-to-right merges that spell it, so it usually becomes one token (merges learned for one
    word can split another; any text still tokenizes, byte by byte at worst). Returns the folder.
    """
    folder = Path(folder)  # local: a folder built here (the world's, tests'), then placed
    folder.mkdir(parents=True, exist_ok=True)
    b2u = bytes_to_unicode()
    byte_chars = list(b2u.values())
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        # CLIP normalises to NFC and lowercases; a word never holds whitespace after pre-tokenization.
        for piece in unicodedata.normalize("NFC", word).lower().split():
            symbols = [b2u[b] for b in piece.encode("utf-8")]
            symbols[-1] += "</w>"
            left = symbols[0]
            for right in symbols[1:]:
                merged = left + right
                if merged not in vocab:
                    merges.append((left, right))
                    vocab[merged] = len(vocab)
                left = merged
    for special in (BOS, EOS):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    return folder
