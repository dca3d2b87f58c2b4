"""Tokenizer: ids equal transformers' CLIPTokenizer on the same folder, and a hand-built expectation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from transformers import CLIPTokenizer

from snapjax.models.tokenizer import BOS, EOS, Tokenizer, bytes_to_unicode, write_clip_vocab

WORDS = ["a", "photo", "of", "red", "blue", "cat", "circle", "square", "café", "東京", "left"]
LONG = "a red cat left of a blue square " * 12  # 96 words -> more than 75 tokens
PROMPTS = ["a photo of a red cat", "", "café 東京 🙂", "A  BLUE\tsquare, left!", LONG]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("tok"), WORDS)


def _reference(folder, prompts):
    ref = CLIPTokenizer.from_pretrained(str(folder))
    return np.asarray(ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


def test_matches_clip_tokenizer(folder):
    tok = Tokenizer.from_folder(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(PROMPTS)
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, _reference(folder, PROMPTS))


def test_hand_built_expectation(folder):
    """Independent of transformers: BOS, one token per known word, EOS, then EOS padding."""
    vocab = json.loads((folder / "vocab.json").read_text())
    ids = Tokenizer.from_folder(folder)(["a photo of a red cat", ""])
    words = [vocab[w + "</w>"] for w in "a photo of a red cat".split()]
    expected = [vocab[BOS], *words, vocab[EOS]]
    np.testing.assert_array_equal(ids[0], expected + [vocab[EOS]] * (77 - len(expected)))
    np.testing.assert_array_equal(ids[1], [vocab[BOS]] + [vocab[EOS]] * 76)

    # An unknown non-ASCII word falls back to byte symbols: the emoji is 4 UTF-8 bytes.
    b2u = bytes_to_unicode()
    emoji = [b2u[b] for b in "🙂".encode()]
    got = Tokenizer.from_folder(folder)(["🙂"])[0][:6]
    np.testing.assert_array_equal(
        got, [vocab[BOS], *(vocab[c] for c in emoji[:-1]), vocab[emoji[-1] + "</w>"], vocab[EOS]])


def test_long_prompt_warns_with_count_and_prompt(folder):
    tok = Tokenizer.from_folder(folder)
    n_tokens = len(CLIPTokenizer.from_pretrained(str(folder))(LONG).input_ids)
    assert n_tokens > 77
    with pytest.warns(UserWarning, match=f"{n_tokens - 77} token") as record:
        ids = tok([LONG])
    assert "a red cat left" in str(record[0].message)
    assert ids[0, -1] == tok.eos_token_id  # truncation keeps the EOS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a prompt that fits must not warn
        tok(["a red cat"])


def test_properties_follow_the_folder(folder):
    tok = Tokenizer.from_folder(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    assert tok.vocab_size == len(vocab) == max(vocab.values()) + 1
    assert tok.max_length == 77
    assert tok.pad_token_id == tok.eos_token_id == vocab[EOS]  # SD-v1.5 pads with EOS


def test_max_length_override_and_missing(folder, tmp_path):
    np.testing.assert_array_equal(Tokenizer.from_folder(folder, max_length=8)(["a cat"]).shape, (1, 8))
    other = write_clip_vocab(tmp_path / "nolimit", ["cat"])
    config = json.loads((other / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_max_length"):
        Tokenizer.from_folder(other)


def test_missing_files_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder|does not exist"):
        Tokenizer.from_folder(tmp_path / "nowhere")
    broken = write_clip_vocab(tmp_path / "broken", ["cat"])
    (broken / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        Tokenizer.from_folder(broken)


def test_one_string_is_refused(folder):
    with pytest.raises(TypeError, match="list of prompts"):
        Tokenizer.from_folder(folder)("a cat")


def test_save_round_trip_writes_clip_files(folder, tmp_path):
    tok = Tokenizer.from_folder(folder)
    saved = tok.save(tmp_path / "saved")
    assert (saved / "vocab.json").read_text(encoding="utf-8") and (saved / "merges.txt").is_file()
    assert json.loads((saved / "vocab.json").read_text()) == json.loads(
        (folder / "vocab.json").read_text())
    prompts = PROMPTS[:4]
    np.testing.assert_array_equal(Tokenizer.from_folder(saved)(prompts), tok(prompts))
    (saved / "tokenizer.json").unlink()  # the classic vocab.json + merges.txt alone suffice
    np.testing.assert_array_equal(Tokenizer.from_folder(saved)(prompts), tok(prompts))


def test_save_keeps_a_non_default_length(folder, tmp_path):
    tok = Tokenizer.from_folder(folder, max_length=24)
    reloaded = Tokenizer.from_folder(tok.save(tmp_path / "saved"))
    assert reloaded.max_length == 24
    np.testing.assert_array_equal(reloaded(PROMPTS[:2]), tok(PROMPTS[:2]))
