"""COCO caption annotations and text files as prompt sets."""

import json

import pytest

from snapjax.eval.prompts import coco_prompts, load_prompt_set


def _coco(tmp_path, images=10, per_image=5):
    anns, k = [], 0
    for img in range(images):
        for c in range(per_image):
            # ids descending within an image: the lowest id is the last one written
            anns.append({"image_id": 1000 + img, "id": 10_000 - k, "caption": f" img {img}  cap {c} "})
            k += 1
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 1000 + i} for i in range(images)],
                                "annotations": anns}))
    return path


def test_one_caption_per_image_lowest_id_in_image_order(tmp_path):
    ps = coco_prompts(_coco(tmp_path))
    assert ps.image_ids == list(range(1000, 1010))
    assert ps.prompts == [f"img {i} cap 4" for i in range(10)]    # lowest id, whitespace folded


def test_seeded_subset_is_reproducible_and_sorted(tmp_path):
    path = _coco(tmp_path)
    a, b, c = coco_prompts(path, 4, seed=1), coco_prompts(path, 4, seed=1), coco_prompts(path, 4, seed=2)
    assert a == b and a.image_ids != c.image_ids
    assert a.image_ids == sorted(a.image_ids) and len(a) == 4


def test_named_sets_and_text_files(tmp_path):
    path = _coco(tmp_path)
    assert len(load_prompt_set(f"coco2017-5k={path}")) == 10       # every image
    assert len(load_prompt_set(f"coco-6k={path}", num=3)) == 3
    with pytest.raises(ValueError, match="fewer than the 6000"):
        load_prompt_set(f"coco-6k={path}")
    text = tmp_path / "p.txt"
    text.write_text("a cat\n\nа dog\n")
    ps = load_prompt_set(str(text))
    assert ps.prompts == ["a cat", "а dog"] and ps.image_ids is None
    with pytest.raises(ValueError, match="expected one of"):
        load_prompt_set(f"coco9={path}")


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "non-empty 'annotations' list"),
    ('{"images": []}', "non-empty 'annotations' list"),
    ('{"annotations": [{"caption": "x"}]}', r"annotations\[0\] needs an integer 'image_id'"),
    ("not json", "not a JSON file"),
])
def test_wrong_shape_annotations_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        coco_prompts(path)


def test_more_prompts_than_the_set_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="caption 10 images, fewer than the 11"):
        coco_prompts(_coco(tmp_path), 11)
    with pytest.raises(ValueError, match="does not exist"):
        coco_prompts(tmp_path / "nope.json")
