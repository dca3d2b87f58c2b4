"""vocab.json + merges.txt for exported folders, also from a tokenizer.json-only folder
(what transformers 5 saves); reference: the original tokenizer's ids."""

from __future__ import annotations

import pytest

from export.tokenizer_files import write_clip_tokenizer_files
from snapjax.models.tokenizer import write_clip_vocab
from tests.export.tiny_models import WORDS

PROMPTS = ["a red circle on the left", "the blue square", "an unknown word"]


def _ids(folder):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    return tok(PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids


def test_vocab_and_merges_derived_from_tokenizer_json(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_vocab(tmp_path / "orig", WORDS)
    CLIPTokenizer.from_pretrained(str(tmp_path / "orig")).save_pretrained(str(tmp_path / "fast"))
    assert not (tmp_path / "fast" / "vocab.json").exists()  # transformers 5 writes tokenizer.json
    write_clip_tokenizer_files(tmp_path / "fast", tmp_path / "out", only_vocab=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["merges.txt", "vocab.json"]
    (tmp_path / "out" / "tokenizer_config.json").write_text(
        (tmp_path / "orig" / "tokenizer_config.json").read_text())
    assert _ids(tmp_path / "out") == _ids(tmp_path / "orig")


def test_folder_without_a_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        write_clip_tokenizer_files(tmp_path / "empty", tmp_path / "out")
