"""Prompt sets for evaluation: COCO caption annotations or a text file.

COCO's ``captions_val2014.json`` / ``captions_val2017.json`` hold ``{"images": [...],
"annotations": [{"image_id": int, "id": int, "caption": str}, ...]}`` with about five captions
per image. The sets the text-to-image papers score on:
  ``coco2014-30k``  30,000 captions drawn from the 2014 validation annotations (one per image,
                    seeded), the FID-30K protocol (SnapFusion's Fig. 4 / 6, GigaGAN, BK-SDM);
  ``coco2017-5k``   the first caption (lowest annotation id) of each 2017 validation image;
  ``coco-6k``       a seeded 6,000-caption subset (one per image), SnapFusion's cheaper sweep.
Subsets are seeded (``numpy.random.default_rng(seed)``), kept in image-id order, and the image
ids come with them so that reference statistics can be matched to the same images.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from etils import epath

from snapjax import storage


# name -> (captions per image, default count: None = one per image, all images)
COCO_SETS = {"coco2014-30k": 30_000, "coco2017-5k": None, "coco-6k": 6_000}


@dataclasses.dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    image_ids: list[int] | None   # COCO image of each prompt; None for a text file
    source: str                   # the file it came from

    def __len__(self) -> int:
        return len(self.prompts)


def seeded_subset(count: int, num: int, seed: int, source: str, unit: str) -> np.ndarray:
    """Sorted indices of ``num`` of ``count`` items (``default_rng(seed)``, no replacement);
    ``source`` and ``unit`` word the error when there are fewer than asked for."""
    if num < 1:
        raise ValueError(f"asked for {num} prompts ({source} {count} {unit}); need at least 1")
    if num > count:
        raise ValueError(f"{source} {count} {unit}, fewer than the {num} prompts asked for")
    return np.sort(np.random.default_rng(seed).choice(count, size=num, replace=False))


def read_prompts(path: str | os.PathLike, num: int | None = None, seed: int = 0) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped, ends stripped).

    ``num``: a seeded subset of that many (``default_rng(seed).choice`` without replacement),
    kept in file order; None or the file's count: every prompt.
    """
    path = storage.path(path)  # a local file or gs://
    if not path.is_file():
        raise ValueError(f"prompts file {path} does not exist (a UTF-8 text file, one prompt "
                         "per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one per line)")
    if num is None:
        return prompts
    return [prompts[i] for i in seeded_subset(len(prompts), num, seed,
                                              f"prompts file {path} has", "prompts")]


def _coco_annotations(path: epath.Path) -> list[tuple[int, int, str]]:
    """(image_id, annotation id, caption) of a COCO captions file, checked for shape."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"COCO annotations {path}: not a JSON file ({e})") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list) or not anns:
        raise ValueError(f"COCO annotations {path}: expected an object with a non-empty "
                         "'annotations' list (captions_val2014.json / captions_val2017.json), "
                         f"got {type(data).__name__} with keys "
                         f"{sorted(data)[:6] if isinstance(data, dict) else '-'}")
    out = []
    for i, a in enumerate(anns):
        if not (isinstance(a, dict) and isinstance(a.get("image_id"), int)
                and isinstance(a.get("caption"), str)):
            raise ValueError(f"COCO annotations {path}: annotations[{i}] needs an integer "
                             f"'image_id' and a string 'caption', got {str(a)[:120]}")
        out.append((a["image_id"], int(a.get("id", i)), " ".join(a["caption"].split())))
    return out


def coco_prompts(path: str | os.PathLike, num: int | None = None, seed: int = 0) -> PromptSet:
    """One caption per image (the lowest annotation id of each), all images or a seeded
    subset of ``num`` images, in image-id order."""
    path = storage.path(path)  # a local file or gs://
    if not path.is_file():
        raise ValueError(f"COCO annotations {path} does not exist (captions_val2014.json or "
                         "captions_val2017.json from the COCO annotations archive)")
    first: dict[int, tuple[int, str]] = {}
    for image_id, ann_id, caption in _coco_annotations(path):
        if image_id not in first or ann_id < first[image_id][0]:
            first[image_id] = (ann_id, caption)
    ids = sorted(first)
    if num is not None:
        ids = [ids[i] for i in seeded_subset(len(ids), num, seed,
                                             f"COCO annotations {path} caption", "images")]
    return PromptSet([first[i][1] for i in ids], ids, str(path))


def load_prompt_set(spec: str, num: int | None = None, seed: int = 0) -> PromptSet:
    """``NAME=FILE`` for a named COCO set (``coco2014-30k=captions_val2014.json``), a ``.json``
    COCO annotations file, or a text file with one prompt per line."""
    name, sep, file = spec.partition("=")
    if sep:
        if name not in COCO_SETS:
            raise ValueError(f"prompt set {name!r}: expected one of {sorted(COCO_SETS)} "
                             "(or give a file path alone)")
        return coco_prompts(file, COCO_SETS[name] if num is None else num, seed)
    if spec.endswith(".json"):
        return coco_prompts(spec, num, seed)
    return PromptSet(read_prompts(spec, num, seed), None, spec)
