"""The embedded world: procedural images of simple objects with captions from the same attributes.

Every item is a pure function of (spec.seed, index): its random numbers come from
`np.random.SeedSequence([seed, index])`, so items are identical whatever the call order and
whether they are rendered one by one or in a batch. The world knows each item's ground truth
(integer attribute labels), which is what lets `snapjax.eval.reader` score generated images.

Shapes are drawn from signed distance functions with a one-pixel coverage ramp, which
anti-aliases as well as supersampling at a fraction of the cost (rendering is on the training
path, so it must stay in the thousands of images per second).

Legend: N items, H height, W width, C=3 colour channels.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import pathlib
import re
from collections.abc import Sequence

import numpy as np

# ---- the full palette: every name the world can ever use (the tokenizer covers all of them) ----

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 210),
    "white": (240, 240, 240),
    "orange": (250, 140, 30),
    "cyan": (40, 210, 220),
    "pink": (250, 120, 190),
    "brown": (140, 90, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
# Radius as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.13, "medium": 0.175, "large": 0.22}
# Object centre (x, y) as fractions of the image side; y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (110, 110, 110),
    "navy": (20, 25, 70),
}
# Relation of object 1 to object 2, and where each object then sits.
RELATIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left of": ((0.26, 0.5), (0.74, 0.5)),
    "right of": ((0.74, 0.5), (0.26, 0.5)),
    "above": ((0.5, 0.26), (0.5, 0.74)),
    "below": ((0.5, 0.74), (0.5, 0.26)),
}
# Object 1's position label in a two-object scene follows from the relation.
RELATION_POSITION = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
NONE = "none"

# Phrasings: several per value, for caption variety; parse_caption understands all of them.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "on the top"),
    "bottom": ("at the bottom", "on the bottom"),
    "center": ("in the center", "in the middle"),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}
ONE_OBJECT_TEMPLATES = (
    "{a} {obj} {pos}",
    "{pos} there is {a} {obj}",
    "a photo of {a} {obj} {pos}",
    "there is {a} {obj} {pos}",
    "an image of {a} {obj} {pos}",
)
TWO_OBJECT_TEMPLATES = (
    "{a} {obj} {rel} {a2} {obj2}",
    "there is {a} {obj} {rel} {a2} {obj2}",
    "a photo of {a} {obj} {rel} {a2} {obj2}",
)
# Words a user may type that mean a world word.
SYNONYMS = {"big": "large", "tiny": "small", "centre": "center", "middle": "center",
            "grey": "gray", "violet": "purple", "plus": "cross"}

TEMPLATE_WORDS = ("a", "an", "the", "of", "on", "at", "in", "to", "is", "there", "photo",
                  "image", "background", "left", "right", "top", "bottom", "above", "below")


def _all_world_words() -> tuple[str, ...]:
    words: set[str] = set(TEMPLATE_WORDS) | set(COLOURS) | set(SHAPES) | set(SIZES)
    words |= set(POSITIONS) | set(BACKGROUNDS) | set(SYNONYMS) | {NONE}
    for phrases in (*POSITION_PHRASES.values(), *RELATION_PHRASES.values()):
        for phrase in phrases:
            words.update(phrase.split())
    for template in ONE_OBJECT_TEMPLATES + TWO_OBJECT_TEMPLATES:
        words.update(re.sub(r"\{\w+\}", " ", template).split())
    return tuple(sorted(words))


# Every word any world caption (or a synonym a user may type) can contain: each is one token.
WORLD_WORDS: tuple[str, ...] = _all_world_words()


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Which world: image size, seed, and the attribute values in use (names from the palette).

    An attribute with a single value is implied and never written in captions.
    With max_objects=2, a scene holds a second object with probability two_object_prob and the
    caption states the relation of the first object to the second.
    """

    resolution: int = 32
    seed: int = 0
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    sizes: tuple[str, ...] = ("small", "large")
    positions: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
    backgrounds: tuple[str, ...] = ("black",)
    max_objects: int = 1
    two_object_prob: float = 0.5
    # Nuisance variation so that the image distribution is not a finite set of pictures.
    position_jitter: float = 0.03
    size_jitter: float = 0.08
    colour_jitter: int = 15

    def __post_init__(self):
        if self.resolution < 8:
            raise ValueError(f"WorldSpec.resolution must be >= 8, got {self.resolution}")
        if self.seed < 0:
            raise ValueError(f"WorldSpec.seed must be >= 0, got {self.seed}")
        for field, palette in (("colours", COLOURS), ("shapes", SHAPES), ("sizes", SIZES),
                               ("positions", POSITIONS), ("backgrounds", BACKGROUNDS)):
            values = getattr(self, field)
            if isinstance(values, str) or not values:
                raise ValueError(f"WorldSpec.{field} must be a non-empty tuple of names, got {values!r}")
            unknown = [v for v in values if v not in palette]
            if unknown:
                raise ValueError(f"WorldSpec.{field}: unknown {unknown}; known: {list(palette)}")
            if len(set(values)) != len(values):
                raise ValueError(f"WorldSpec.{field} has duplicates: {values}")
            object.__setattr__(self, field, tuple(values))
        if self.max_objects not in (1, 2):
            raise ValueError(f"WorldSpec.max_objects must be 1 or 2, got {self.max_objects}")
        if self.max_objects == 2:
            missing = [p for p in RELATION_POSITION.values() if p not in self.positions]
            if missing:
                raise ValueError(f"WorldSpec with max_objects=2 needs positions {missing} "
                                 "(object 1's position follows from the relation)")
        if not 0.0 <= self.two_object_prob <= 1.0:
            raise ValueError(f"WorldSpec.two_object_prob must be in [0, 1], got {self.two_object_prob}")

    @property
    def attributes(self) -> dict[str, tuple[str, ...]]:
        """Attribute name -> value names; an item's label for an attribute indexes this tuple."""
        attrs = {"colour": self.colours, "shape": self.shapes, "size": self.sizes,
                 "position": self.positions, "background": self.backgrounds}
        if self.max_objects == 2:
            attrs.update({"relation": (NONE, *RELATIONS), "colour2": (NONE, *self.colours),
                          "shape2": (NONE, *self.shapes), "size2": (NONE, *self.sizes)})
        return attrs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WorldSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"WorldSpec: unknown fields {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# Attribute vocabulary of the default world.
ATTRIBUTES: dict[str, tuple[str, ...]] = WorldSpec().attributes


def world_tokenizer_folder() -> pathlib.Path:
    """The package-data folder that `transformers.CLIPTokenizer.from_pretrained` loads."""
    return pathlib.Path(str(importlib.resources.files("snapjax.data") / "assets"))


# ---- sampling: a fixed layout of uniforms per item, so adding features never shifts old ones ----

_U_COLOUR, _U_SHAPE, _U_SIZE, _U_POSITION, _U_BACKGROUND, _U_TEMPLATE, _U_PHRASE = range(7)
_U_JITTER = 7            # 7..9: dx, dy, dr of object 1
_U_RGB = 10              # 10..12: colour jitter of object 1
_U_BG_JITTER = 13
_U_TWO, _U_RELATION, _U_COLOUR2, _U_SHAPE2, _U_SIZE2 = 14, 15, 16, 17, 18
_U_JITTER2 = 19          # 19..21
_U_RGB2 = 22             # 22..24
_U_PHRASE2 = 25
_N_UNIFORMS = 32


def _uniforms(indices_N: np.ndarray, seed: int) -> np.ndarray:
    rows = [np.random.default_rng(np.random.SeedSequence([seed, int(i)])).random(_N_UNIFORMS)
            for i in indices_N]
    return np.stack(rows) if rows else np.zeros((0, _N_UNIFORMS))


def _pick(u: np.ndarray, n: int) -> np.ndarray:
    return np.minimum((u * n).astype(np.int64), n - 1)


def _check_indices(indices) -> np.ndarray:
    indices_N = np.asarray(indices)
    if indices_N.ndim != 1 or (indices_N.size and not np.issubdtype(indices_N.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-D sequence of integers, got shape {indices_N.shape} "
                         f"dtype {indices_N.dtype}")
    if indices_N.size and indices_N.min() < 0:
        raise ValueError(f"indices must be >= 0, got min {indices_N.min()}")
    return indices_N.astype(np.int64)


def sample_attributes(indices: Sequence[int], spec: WorldSpec) -> dict[str, np.ndarray]:
    """Integer labels [N] per attribute (see spec.attributes) of the given items."""
    return _sample(_check_indices(indices), spec)[0]


def _sample(indices_N: np.ndarray, spec: WorldSpec):
    u_NK = _uniforms(indices_N, spec.seed)
    n = len(indices_N)
    labels = {
        "colour": _pick(u_NK[:, _U_COLOUR], len(spec.colours)),
        "shape": _pick(u_NK[:, _U_SHAPE], len(spec.shapes)),
        "size": _pick(u_NK[:, _U_SIZE], len(spec.sizes)),
        "position": _pick(u_NK[:, _U_POSITION], len(spec.positions)),
        "background": _pick(u_NK[:, _U_BACKGROUND], len(spec.backgrounds)),
    }
    if spec.max_objects == 2:
        two_N = u_NK[:, _U_TWO] < spec.two_object_prob
        relation_N = np.where(two_N, 1 + _pick(u_NK[:, _U_RELATION], len(RELATIONS)), 0)
        labels["relation"] = relation_N
        for name, col, count in (("colour2", _U_COLOUR2, len(spec.colours)),
                                 ("shape2", _U_SHAPE2, len(spec.shapes)),
                                 ("size2", _U_SIZE2, len(spec.sizes))):
            labels[name] = np.where(two_N, 1 + _pick(u_NK[:, col], count), 0)
        # Object 1's position label is where the relation puts it.
        relation_names = (NONE, *RELATIONS)
        for r in range(1, len(relation_names)):
            pos_id = spec.positions.index(RELATION_POSITION[relation_names[r]])
            labels["position"] = np.where(relation_N == r, pos_id, labels["position"])
    labels = {k: v.astype(np.int32).reshape(n) for k, v in labels.items()}
    return labels, u_NK


# ---- rendering ----

def _box_sdf(px, py, hx, hy):
    dx, dy = np.abs(px) - hx, np.abs(py) - hy
    outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0)


def _triangle_sdf(px, py, r):
    # Equilateral triangle, apex up, bounding box centred on the object centre.
    k = np.sqrt(3.0)
    h = 1.05 * r                                       # half side
    x = np.abs(px) - h
    # y up; the centroid sits h/(2k) below the bounding-box centre, and iq's formula adds h/k.
    y = -py + h / (2 * k) + h / k
    fold = x + k * y > 0
    x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * h, 0)
    return -np.hypot(x, y) * np.sign(y)


def _shape_sdf(shape: str, px, py, r):
    """Signed distance (fraction of the image side) to a shape of radius r centred at 0."""
    if shape == "circle":
        return np.hypot(px, py) - r
    if shape == "square":
        return _box_sdf(px, py, 0.85 * r, 0.85 * r)
    if shape == "triangle":
        return _triangle_sdf(px, py, r)
    if shape == "cross":
        t = 0.33 * r
        return np.minimum(_box_sdf(px, py, r, t), _box_sdf(px, py, t, r))
    if shape == "ring":
        return np.abs(np.hypot(px, py) - 0.72 * r) - 0.28 * r
    if shape == "diamond":
        return (np.abs(px) + np.abs(py) - 1.1 * r) / np.sqrt(2.0)
    raise ValueError(f"unknown shape {shape!r}")


def _coverage_NHW(shape_N, cx_N, cy_N, r_N, spec: WorldSpec) -> np.ndarray:
    res = spec.resolution
    grid = (np.arange(res, dtype=np.float32) + 0.5) / res
    cov_NHW = np.zeros((len(shape_N), res, res), np.float32)
    for s, name in enumerate(spec.shapes):
        sel = np.flatnonzero(shape_N == s)
        if not sel.size:
            continue
        px = grid[None, None, :] - cx_N[sel, None, None].astype(np.float32)
        py = grid[None, :, None] - cy_N[sel, None, None].astype(np.float32)
        sdf = _shape_sdf(name, px, py, r_N[sel, None, None].astype(np.float32))
        # Fraction of the pixel inside the shape, approximated by a one-pixel ramp on the SDF.
        cov = 0.5 - sdf * res
        np.clip(cov, 0.0, 1.0, out=cov)
        cov_NHW[sel] = cov
    return cov_NHW


def _object_colour(colour_N, u_N3, spec: WorldSpec) -> np.ndarray:
    base = np.array([COLOURS[c] for c in spec.colours], np.float32)[colour_N]
    jitter = (2 * u_N3 - 1) * spec.colour_jitter
    return np.clip(base + jitter, 0, 255).astype(np.float32)


def _draw(img_NHWC, cov_NHW, rgb_N3):
    """Composites a flat-coloured object over the image in place (alpha = coverage)."""
    img_NHWC += cov_NHW[..., None] * (rgb_N3[:, None, None, :] - img_NHWC)


def _render_images(labels, u_NK, spec: WorldSpec) -> np.ndarray:
    n, res = len(u_NK), spec.resolution
    bg = np.array([BACKGROUNDS[b] for b in spec.backgrounds], np.float32)[labels["background"]]
    bg = np.clip(bg + (2 * u_NK[:, _U_BG_JITTER, None] - 1) * 8, 0, 255)
    img_NHWC = np.empty((n, res, res, 3), np.float32)
    img_NHWC[:] = bg[:, None, None, :]

    size_r = np.array([SIZES[s] for s in spec.sizes])
    centres = np.array([POSITIONS[p] for p in spec.positions])
    cx_N, cy_N = centres[labels["position"], 0], centres[labels["position"], 1]
    two_N = np.zeros(n, bool)
    if spec.max_objects == 2:
        two_N = labels["relation"] > 0
        rel_centres = np.array([RELATIONS[r] for r in RELATIONS])        # [R, 2 objects, xy]
        rel = np.maximum(labels["relation"] - 1, 0)
        cx_N = np.where(two_N, rel_centres[rel, 0, 0], cx_N)
        cy_N = np.where(two_N, rel_centres[rel, 0, 1], cy_N)

    def jittered(cx, cy, size_id, col):
        j = spec.position_jitter * (2 * u_NK[:, col:col + 2] - 1)
        r = size_r[size_id] * (1 + spec.size_jitter * (2 * u_NK[:, col + 2] - 1))
        return cx + j[:, 0], cy + j[:, 1], r

    cx, cy, r = jittered(cx_N, cy_N, labels["size"], _U_JITTER)
    cov = _coverage_NHW(labels["shape"], cx, cy, r, spec)
    _draw(img_NHWC, cov, _object_colour(labels["colour"], u_NK[:, _U_RGB:_U_RGB + 3], spec))

    if two_N.any():
        sel = np.flatnonzero(two_N)
        rel = labels["relation"][sel] - 1
        cx2, cy2 = rel_centres[rel, 1, 0], rel_centres[rel, 1, 1]
        j = spec.position_jitter * (2 * u_NK[sel, _U_JITTER2:_U_JITTER2 + 2] - 1)
        r2 = size_r[labels["size2"][sel] - 1] * (1 + spec.size_jitter * (2 * u_NK[sel, _U_JITTER2 + 2] - 1))
        cov2 = _coverage_NHW(labels["shape2"][sel] - 1, cx2 + j[:, 0], cy2 + j[:, 1], r2, spec)
        rgb2 = _object_colour(labels["colour2"][sel] - 1, u_NK[sel, _U_RGB2:_U_RGB2 + 3], spec)
        sub_NHWC = img_NHWC[sel]
        _draw(sub_NHWC, cov2, rgb2)
        img_NHWC[sel] = sub_NHWC
    # Values stay within [0, 255] (convex combinations of clipped colours), so rounding suffices.
    return (img_NHWC + 0.5).astype(np.uint8)


# ---- captions ----

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(spec: WorldSpec, colour: int, shape: int, size: int) -> str:
    words = []
    if len(spec.sizes) > 1:
        words.append(spec.sizes[size])
    if len(spec.colours) > 1:
        words.append(spec.colours[colour])
    words.append(spec.shapes[shape])
    return " ".join(words)


def _caption(spec: WorldSpec, lab: dict[str, int], u_K: np.ndarray) -> str:
    obj = _object_phrase(spec, lab["colour"], lab["shape"], lab["size"])
    if spec.max_objects == 2 and lab["relation"] > 0:
        rel_name = (NONE, *RELATIONS)[lab["relation"]]
        phrases = RELATION_PHRASES[rel_name]
        obj2 = _object_phrase(spec, lab["colour2"] - 1, lab["shape2"] - 1, lab["size2"] - 1)
        template = TWO_OBJECT_TEMPLATES[_pick(u_K[_U_TEMPLATE], len(TWO_OBJECT_TEMPLATES))]
        text = template.format(a=_article(obj), obj=obj, a2=_article(obj2), obj2=obj2,
                               rel=phrases[_pick(u_K[_U_PHRASE2], len(phrases))])
    else:
        template = ONE_OBJECT_TEMPLATES[_pick(u_K[_U_TEMPLATE], len(ONE_OBJECT_TEMPLATES))]
        pos = ""
        if len(spec.positions) > 1:
            phrases = POSITION_PHRASES[spec.positions[lab["position"]]]
            pos = phrases[_pick(u_K[_U_PHRASE], len(phrases))]
        text = template.format(a=_article(obj), obj=obj, pos=pos)
    if len(spec.backgrounds) > 1:
        text += f" on a {spec.backgrounds[lab['background']]} background"
    return " ".join(text.split())


# ---- public rendering API ----

def render_batch(indices: Sequence[int], spec: WorldSpec = WorldSpec()
                 ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Items `indices` of the world: (images uint8 [N,H,W,3], captions, labels {attr: int32 [N]})."""
    indices_N = _check_indices(indices)
    labels, u_NK = _sample(indices_N, spec)
    images_NHWC = _render_images(labels, u_NK, spec)
    captions = [_caption(spec, {k: int(v[i]) for k, v in labels.items()}, u_NK[i])
                for i in range(len(indices_N))]
    return images_NHWC, captions, labels


def render(index: int, spec: WorldSpec = WorldSpec()) -> tuple[np.ndarray, str, dict[str, int]]:
    """Item `index` of the world: (image uint8 [H,W,3], caption, labels {attr: int})."""
    images, captions, labels = render_batch([index], spec)
    return images[0], captions[0], {k: int(v[0]) for k, v in labels.items()}


# ---- reading captions back ----

_PALETTE_ATTR = {**{c: "colour" for c in COLOURS}, **{s: "shape" for s in SHAPES},
                 **{s: "size" for s in SIZES}}
_RELATION_RE = re.compile(r"\b(?:to the )?(left of|right of|above|below)\b")
_BACKGROUND_RE = re.compile(r"\b(\w+) background\b")


def _parse_object(words: list[str], spec: WorldSpec, caption: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for w in words:
        attr = _PALETTE_ATTR.get(w)
        if attr is None:
            continue
        allowed = {"colour": spec.colours, "shape": spec.shapes, "size": spec.sizes}[attr]
        if w not in allowed:
            raise ValueError(f"caption {caption!r}: {attr} {w!r} is not in this world's {attr}s {allowed}")
        if attr in found and found[attr] != w:
            raise ValueError(f"caption {caption!r}: two {attr}s ({found[attr]!r}, {w!r}) for one object")
        found[attr] = w
    return found


@functools.lru_cache(maxsize=4096)
def _parse_cached(caption: str, spec: WorldSpec) -> tuple[tuple[str, int], ...]:
    text = " ".join(SYNONYMS.get(w, w) for w in re.findall(r"[a-z]+", caption.lower()))
    labels: dict[str, int] = {}

    bg = _BACKGROUND_RE.search(text)
    if bg:
        if bg.group(1) not in spec.backgrounds:
            raise ValueError(f"caption {caption!r}: background {bg.group(1)!r} is not in {spec.backgrounds}")
        labels["background"] = spec.backgrounds.index(bg.group(1))
        text = text[:bg.start()] + text[bg.end():]

    rel = _RELATION_RE.search(text)
    if rel and spec.max_objects == 1:
        raise ValueError(f"caption {caption!r} relates two objects but this world has max_objects=1")
    if rel:
        rel_name = rel.group(1)
        first = _parse_object(text[:rel.start()].split(), spec, caption)
        second = _parse_object(text[rel.end():].split(), spec, caption)
        labels["relation"] = 1 + list(RELATIONS).index(rel_name)
        labels["position"] = spec.positions.index(RELATION_POSITION[rel_name])
        values = {"colour": spec.colours, "shape": spec.shapes, "size": spec.sizes}
        for attr, v in second.items():
            labels[attr + "2"] = 1 + values[attr].index(v)
    else:
        words = text.split()
        first = _parse_object(words, spec, caption)
        positions = [w for w in words if w in POSITIONS]
        if len(set(positions)) > 1:
            raise ValueError(f"caption {caption!r}: several positions {positions}")
        if positions:
            if positions[0] not in spec.positions:
                raise ValueError(f"caption {caption!r}: position {positions[0]!r} is not in {spec.positions}")
            labels["position"] = spec.positions.index(positions[0])
        if spec.max_objects == 2:
            labels.update(relation=0, colour2=0, shape2=0, size2=0)
    for attr, v in first.items():
        labels[attr] = {"colour": spec.colours, "shape": spec.shapes, "size": spec.sizes}[attr].index(v)

    # Attributes with a single value are implied; captions never spell them out.
    for attr, values in spec.attributes.items():
        if len(values) == 1:
            labels.setdefault(attr, 0)
    if spec.max_objects == 2 and labels.get("relation", 0) > 0:
        for attr, values in (("colour2", spec.colours), ("shape2", spec.shapes), ("size2", spec.sizes)):
            if len(values) == 1:
                labels.setdefault(attr, 1)
    return tuple(sorted(labels.items()))


def parse_caption(caption: str, spec: WorldSpec = WorldSpec()) -> dict[str, int]:
    """The attribute labels a caption states (only those it states, plus implied ones).

    For a world caption this equals the item's labels. Words outside the world are ignored, so
    free-form prompts can be scored on what they say; a world word outside this spec (e.g. a
    colour the spec does not use) or a contradiction raises ValueError.
    """
    parsed = dict(_parse_cached(caption, spec))
    order = list(spec.attributes)
    return {k: parsed[k] for k in order if k in parsed}


def canonical_labels(labels: dict[str, np.ndarray], spec: WorldSpec = WorldSpec()) -> dict[str, np.ndarray]:
    """One label set per picture: "A right of B" becomes "B left of A", "A below B" "B above A".

    Two captions can describe the same two-object picture, so an image alone cannot tell which
    object is "object 1"; whatever reads images (eval/reader.py) reads and is scored in this
    canonical form. Labels < 0 ('unsaid') stay unsaid. Single-object labels are unchanged.
    """
    out = {k: np.array(v, np.int32, copy=True).reshape(-1) for k, v in labels.items()}
    if spec.max_objects == 1 or "relation" not in out:
        return out
    names = (NONE, *RELATIONS)
    rel = out["relation"]
    swap = (rel == names.index("right of")) | (rel == names.index("below"))
    n = rel.shape[0]
    for attr in ("colour", "shape", "size"):
        v1 = out.get(attr, np.full(n, -1, np.int32))
        v2 = out.get(attr + "2", np.full(n, -1, np.int32))
        # Object 1's ids count from 0; object 2's from 1 (0 is 'none').
        as_first = np.where(v2 >= 1, v2 - 1, -1)
        as_second = np.where(v1 >= 0, v1 + 1, -1)
        if attr in out or (swap & (v2 >= 1)).any():
            out[attr] = np.where(swap, as_first, v1).astype(np.int32)
        if attr + "2" in out or (swap & (v1 >= 0)).any():
            out[attr + "2"] = np.where(swap, as_second, v2).astype(np.int32)
    flipped = {names.index("right of"): names.index("left of"), names.index("below"): names.index("above")}
    for old, new in flipped.items():
        sel = rel == old
        out["relation"] = np.where(sel, new, out["relation"]).astype(np.int32)
        if "position" in out:
            pos = spec.positions.index(RELATION_POSITION[names[new]])
            out["position"] = np.where(sel, pos, out["position"]).astype(np.int32)
    return out


def caption_labels(captions: Sequence[str], spec: WorldSpec = WorldSpec()) -> dict[str, np.ndarray]:
    """parse_caption over a batch: {attr: int32 [N]} with -1 where a caption leaves it unsaid."""
    parsed = [parse_caption(c, spec) for c in captions]
    return {attr: np.array([p.get(attr, -1) for p in parsed], np.int32) for attr in spec.attributes}
