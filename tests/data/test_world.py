"""The embedded world: determinism, captions vs labels, pixels vs labels, and its tokenizer."""

import dataclasses
import filecmp
import json

import numpy as np
import pytest
from transformers import CLIPTokenizer

from snapjax.data import world
from snapjax.data.make_world_vocab import bytes_to_unicode, write_world_vocab
from snapjax.data.world import (ATTRIBUTES, WorldSpec, canonical_labels, caption_labels, parse_caption,
                                render, render_batch, world_tokenizer_folder)

TWO = WorldSpec(max_objects=2, sizes=("small", "medium", "large"), backgrounds=("black", "gray"),
                shapes=("circle", "square", "triangle", "cross", "ring", "diamond"))


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(str(world_tokenizer_folder()))


@pytest.mark.parametrize("spec", [WorldSpec(), TWO], ids=["one", "two"])
def test_deterministic_in_any_order_and_batching(spec):
    idx = np.array([5, 0, 123456, 17, 3])
    images, captions, labels = render_batch(idx, spec)
    images_rev, captions_rev, labels_rev = render_batch(idx[::-1], spec)
    np.testing.assert_array_equal(images_rev[::-1], images)
    assert captions_rev[::-1] == captions
    for i, index in enumerate(idx):
        image, caption, lab = render(int(index), spec)
        np.testing.assert_array_equal(image, images[i])
        assert caption == captions[i]
        assert lab == {k: int(v[i]) for k, v in labels.items()}
    # Another seed is another world.
    other, _, _ = render_batch(idx, dataclasses.replace(spec, seed=1))
    assert not np.array_equal(other, images)


@pytest.mark.parametrize("spec", [WorldSpec(), TWO, WorldSpec(resolution=64)], ids=["one", "two", "64px"])
def test_shapes_ranges_and_variety(spec):
    images, captions, labels = render_batch(np.arange(500), spec)
    res = spec.resolution
    assert images.shape == (500, res, res, 3) and images.dtype == np.uint8
    assert set(labels) == set(spec.attributes)
    for attr, values in spec.attributes.items():
        assert labels[attr].dtype == np.int32 and labels[attr].shape == (500,)
        # Every value of every attribute occurs (500 draws, at most 7 values).
        assert set(labels[attr].tolist()) == set(range(len(values))), attr
    assert len({im.tobytes() for im in images}) == 500       # all images differ
    assert images.max() > 200 and images.min() < 20          # bright objects on dark backgrounds
    assert all(isinstance(c, str) and c == c.strip() for c in captions)


@pytest.mark.parametrize("spec", [WorldSpec(), TWO], ids=["one", "two"])
def test_captions_state_the_labels(spec):
    _, captions, labels = render_batch(np.arange(1000), spec)
    for i, caption in enumerate(captions):
        assert parse_caption(caption, spec) == {k: int(v[i]) for k, v in labels.items()}, caption
    parsed = caption_labels(captions, spec)
    for attr in spec.attributes:
        np.testing.assert_array_equal(parsed[attr], labels[attr])
    assert len(set(captions)) > 100                           # template variety


def test_pixels_follow_labels():
    # An independent check of the renderer: the object's pixels have the labelled colour,
    # their bounding box is centred on the labelled position (up to the 0.03 jitter and
    # partial-coverage pixels), and large objects cover more pixels.
    spec = WorldSpec(colour_jitter=0)
    images, _, labels = render_batch(np.arange(300), spec)
    palette = np.array([world.COLOURS[c] for c in spec.colours], float)
    grid = (np.arange(spec.resolution) + 0.5) / spec.resolution
    areas = {0: [], 1: []}
    for im, c, p, s in zip(images.astype(float), labels["colour"], labels["position"], labels["size"]):
        mask = im.sum(-1) > 3 * 40                             # background is black (+ <= 8)
        mean_rgb = im[mask & (np.abs(im - palette[c]).max(-1) < 2)]
        assert len(mean_rgb) > 10                              # fully covered pixels have the exact colour
        ys, xs = np.nonzero(mask)
        cx, cy = world.POSITIONS[spec.positions[p]]
        bx, by = (grid[xs].min() + grid[xs].max()) / 2, (grid[ys].min() + grid[ys].max()) / 2
        assert abs(bx - cx) < 0.05 and abs(by - cy) < 0.05, (bx, by, cx, cy)
        areas[int(s)].append(mask.sum())
    assert min(areas[1]) > max(areas[0])


def test_parse_free_form_prompts():
    assert parse_caption("A big RED circle, in the centre!") == {"colour": 0, "shape": 0, "size": 1,
                                                                  "position": 4, "background": 0}
    # Only what is said (plus implied single-valued attributes); unknown words are ignored.
    assert parse_caption("a lovely blue thing") == {"colour": 2, "background": 0}
    with pytest.raises(ValueError, match="orange"):
        parse_caption("an orange circle")                      # palette colour not in this world
    with pytest.raises(ValueError, match="two colours"):
        parse_caption("a red blue circle")
    with pytest.raises(ValueError, match="max_objects=1"):
        parse_caption("a red circle left of a blue square")
    two = parse_caption("a small red circle to the left of a large blue square on a gray background", TWO)
    assert two == {"colour": 0, "shape": 0, "size": 0, "position": 0, "background": 1,
                   "relation": 1, "colour2": 3, "shape2": 2, "size2": 3}
    labels = caption_labels(["a red circle", "a square at the top"])
    np.testing.assert_array_equal(labels["colour"], [0, -1])
    np.testing.assert_array_equal(labels["position"], [-1, 2])


def test_canonical_labels_identify_descriptions_of_one_picture():
    pairs = [("a small red circle right of a large blue square", "a large blue square left of a small red circle"),
             ("a green ring below a white diamond", "a white diamond above a green ring"),
             ("a red square to the left of a cross", "a cross right of a red square")]
    for a, b in pairs:
        la, lb = caption_labels([a], TWO), caption_labels([b], TWO)
        ca, cb = canonical_labels(la, TWO), canonical_labels(lb, TWO)
        assert {k: v.tolist() for k, v in ca.items()} == {k: v.tolist() for k, v in cb.items()}, (a, b)
        # Canonical form is a fixed point, and only "left of"/"above" remain.
        cc = canonical_labels(ca, TWO)
        assert {k: v.tolist() for k, v in cc.items()} == {k: v.tolist() for k, v in ca.items()}
        assert ca["relation"][0] in (1, 3)
    # Whole-world check: after canonicalisation object 1 is always on the left or at the top.
    _, _, labels = render_batch(np.arange(300), TWO)
    canon = canonical_labels(labels, TWO)
    two = canon["relation"] > 0
    assert set(np.asarray(TWO.positions)[canon["position"][two]]) <= {"left", "top"}
    single = ~two
    for k in labels:
        np.testing.assert_array_equal(canon[k][single], labels[k][single])


def test_spec_validation_and_roundtrip():
    assert ATTRIBUTES == WorldSpec().attributes
    with pytest.raises(ValueError, match="magenta"):
        WorldSpec(colours=("red", "magenta"))
    with pytest.raises(ValueError, match="max_objects"):
        WorldSpec(max_objects=3)
    with pytest.raises(ValueError, match="positions"):
        WorldSpec(max_objects=2, positions=("center",))
    assert WorldSpec.from_dict(json.loads(json.dumps(TWO.to_dict()))) == TWO
    with pytest.raises(ValueError, match=">= 0"):
        render(-1)


def test_throughput():
    import time
    render_batch(np.arange(100))
    t = time.perf_counter()
    render_batch(np.arange(2000))
    rate = 2000 / (time.perf_counter() - t)
    # Thousands per second unloaded; the bound leaves room for a busy shared machine.
    assert rate > 500, f"{rate:.0f} images/s"


# ---- tokenizer ----

def test_every_world_word_is_one_token(tokenizer):
    vocab = json.loads((world_tokenizer_folder() / "vocab.json").read_text())
    assert len(vocab) < 1000 and len(tokenizer) == len(vocab)
    for word in world.WORLD_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert ids == [vocab[word + "</w>"]], word


@pytest.mark.parametrize("spec", [WorldSpec(), TWO], ids=["one", "two"])
def test_captions_tokenize_word_by_word(tokenizer, spec):
    _, captions, _ = render_batch(np.arange(1000), spec)
    vocab = json.loads((world_tokenizer_folder() / "vocab.json").read_text())
    unk = tokenizer.unk_token_id
    for caption in captions:
        ids = tokenizer(caption).input_ids
        words = caption.split()
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert unk not in ids[1:-1]
        assert ids[1:-1] == [vocab[w + "</w>"] for w in words], caption
    assert tokenizer.model_max_length == 77


def test_other_text_still_tokenizes(tokenizer):
    byte_tokens = set(bytes_to_unicode().values())
    for text in ["xylophone quartz", "Zebra 42 ünïcode ✓", "hello, world!"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert ids and tokenizer.unk_token_id not in ids
        tokens = tokenizer.convert_ids_to_tokens(ids)
        # Byte-level pieces reassemble the lower-cased text without spaces.
        joined = "".join(t.replace("</w>", "") for t in tokens)
        assert all(ch in byte_tokens for ch in joined)
        b2u = {v: k for k, v in bytes_to_unicode().items()}
        assert bytes(b2u[ch] for ch in joined).decode() == text.lower().replace(" ", "")
    assert tokenizer.decode(tokenizer("a red circle").input_ids, skip_special_tokens=True) == "a red circle"


def test_committed_assets_are_current(tmp_path):
    write_world_vocab(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert filecmp.cmp(tmp_path / name, world_tokenizer_folder() / name, shallow=False), (
            f"{name} is stale: run python -m snapjax.data.make_world_vocab")
