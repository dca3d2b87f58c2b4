"""Writes the world's CLIP-format BPE tokenizer files (vocab.json, merges.txt, configs).

The layout follows OpenAI CLIP's: the 256 byte symbols, the same with '</w>', one entry per
merge result, then <|startoftext|> and <|endoftext|>. The merges are learned by plain BPE on
the world's words until every word is a single symbol, so `CLIPTokenizer.from_pretrained`
reads each world word as ONE token and any other text as smaller pieces (down to bytes).

Regenerate the committed files with:  python -m snapjax.data.make_world_vocab
"""

from __future__ import annotations

import collections
import json
import pathlib
import sys

from snapjax.data.world import WORLD_WORDS, world_tokenizer_folder

EOW = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77   # SD-v1.5's context length; the text encoder may use fewer positions.


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _symbols(word: str) -> tuple[str, ...]:
    byte_map = bytes_to_unicode()
    chars = [byte_map[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + EOW)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE training: merge the most frequent adjacent pair until every word is one symbol.

    Ties break on the pair itself, so the result does not depend on set or dict order.
    """
    corpus = {w: _symbols(w) for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in corpus.values()):
        counts: collections.Counter = collections.Counter()
        for s in corpus.values():
            counts.update(zip(s, s[1:]))
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        corpus = {w: _merge(s, pair) for w, s in corpus.items()}
    return merges


def build_vocab(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_merges(words)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + EOW for b in base]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_world_vocab(folder: pathlib.Path) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json."""
    folder = pathlib.Path(folder)  # local: the package's asset folder (a maintainer's tool)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(WORLD_WORDS)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n",
                                       encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
              "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    folder = pathlib.Path(argv[0]) if argv else world_tokenizer_folder()  # local, as above
    write_world_vocab(folder)
    print(f"wrote the world tokenizer ({len(WORLD_WORDS)} words) to {folder}")


if __name__ == "__main__":
    main()
