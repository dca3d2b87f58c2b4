"""The UNet as data: which blocks exist, in which order, at which width.

A spec lists, per resolution stage, the ordered *units* of the down path and of the up path,
plus one mid unit. A unit is a string: a head ResNet, kept ``R`` or removed ``r``, followed by
any number of further ResNets ``R`` and cross-attention transformers ``A``, in execution order:

  ``R``     SD's plain ResNet unit;            ``RA``   SD's cross-attention unit;
  ``rA``    its ResNet removed by evolution;   ``r``    ResNet and attention both gone;
  ``RAA``   a second attention after the first (evolution duplicated it);
  ``RRA``   a second ResNet, then an attention.

A removed head ResNet ``r`` keeps its shortcut (identity, or a 1x1 conv where the channel
count changes or a skip is concatenated), so the unit still maps its input to the stage's
width. Blocks after the head keep the width, so removing one deletes its letter entirely.
``mid`` is a unit of the same grammar at the deepest width (``RAR`` for SD, ``rAR``, ``RA``),
or ``""`` for no mid block.

Skips follow SD: ``conv_in``, every down unit and every downsampler push one skip; every up unit
pops one. For the shapes to meet, stage ``s`` has ``len(up[s]) == len(down[s]) + 1``.
``up`` is indexed by stage like ``down`` (``up[0]`` is the full-resolution stage) although the up
path runs deepest stage first.

Block names (parameter names too) count each kind within its unit: in unit ``down_{s}_{u}`` the
ResNets are ``down_{s}_{u}_res``, ``down_{s}_{u}_res_1``, ... and the transformers
``down_{s}_{u}_attn``, ``down_{s}_{u}_attn_1``, ...; in the mid unit ``mid_res_0``,
``mid_res_1``, ... and ``mid_attn``, ``mid_attn_1``, .... SD's names are the ``k = 0`` ones, so
diffusers checkpoints import unchanged. Removing or inserting a block renames the later blocks
of the same kind in that unit (surgery renames their parameters with them).

Blocks that can be dropped at call time (robust training) are named by :meth:`UNetSpec.block_names`;
a ``block_mask`` is a float vector in that order (1 = run, 0 = drop), or one such row per example.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

_UNIT = re.compile(r"[Rr][RA]*")


def _check_unit(unit: str, where: str) -> None:
    if not isinstance(unit, str) or not _UNIT.fullmatch(unit):
        raise ValueError(
            f"{where}: unit {unit!r} is not a head ResNet ('R' kept or 'r' removed) followed by "
            "any number of ResNets 'R' and attention blocks 'A' (e.g. 'R', 'RA', 'rA', 'RAA')")


@dataclasses.dataclass(frozen=True)
class Block:
    """One ResNet or transformer of a spec, with what its cost and surgery depend on.

    ``name``: as in the parameter tree. ``kind``: "res" or "attn". ``path``: "down", "mid" or
    "up"; ``stage``: resolution stage (side = latent side / 2**stage); ``unit``: unit index in
    its stage (0 for mid); ``position``: letter index in the unit string.
    ``in_channels`` / ``out_channels``: what the block takes and gives (differ only for a head
    ResNet). ``removed``: a head ResNet reduced to its shortcut (``r``): not droppable, no
    residual branch, but its 1x1 shortcut (if any) still runs.
    """

    name: str
    kind: str
    path: str
    stage: int
    unit: int
    position: int
    in_channels: int
    out_channels: int
    removed: bool = False

    @property
    def has_shortcut_conv(self) -> bool:
        return self.kind == "res" and self.in_channels != self.out_channels


def unit_prefix(path: str, stage: int, unit: int) -> str:
    return "mid" if path == "mid" else f"{path}_{stage}_{unit}"


def letter_names(path: str, stage: int, unit: int, letters: str) -> list[tuple[str, str]]:
    """(name, kind) of each letter of a unit string, by the naming rule above."""
    prefix = unit_prefix(path, stage, unit)
    counts = {"res": 0, "attn": 0}
    out = []
    for letter in letters:
        kind = "attn" if letter == "A" else "res"
        k = counts[kind]
        counts[kind] += 1
        if path == "mid" and kind == "res":
            out.append((f"mid_res_{k}", kind))
        else:
            out.append((f"{prefix}_{kind}" + (f"_{k}" if k else ""), kind))
    return out


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """A UNet2DConditionModel-style network described by data (see module docstring)."""

    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down: tuple[tuple[str, ...], ...] = (("RA", "RA"), ("RA", "RA"), ("RA", "RA"), ("R", "R"))
    up: tuple[tuple[str, ...], ...] = (
        ("RA", "RA", "RA"), ("RA", "RA", "RA"), ("RA", "RA", "RA"), ("R", "R", "R"))
    # A unit at the deepest width: "RAR" (SD), "R" (diffusers' UNetMidBlock2D), "rAR", ... or ""
    mid: str = "RAR"
    in_channels: int = 4
    out_channels: int = 4
    # Attention heads per stage (diffusers' SD-v1.5 config calls this attention_head_dim: 8).
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    context_dim: int = 768
    transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
    use_linear_projection: bool = False  # SD-v1.5: 1x1 convs around the transformer
    norm_groups: int = 32
    norm_eps: float = 1e-5
    time_embed_dim: int | None = None  # default 4 * block_channels[0]
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # > 0: the UNet also takes the guidance scale w, as sinusoidal features of this width through
    # a projection added to the time embedding's input (a guidance-conditioned student samples
    # with one call per step; diffusers calls the width time_cond_proj_dim). 0: no guidance input.
    guidance_embed_dim: int = 0

    def __post_init__(self):
        n = len(self.block_channels)
        if isinstance(self.guidance_embed_dim, bool) or not isinstance(self.guidance_embed_dim, int) \
                or self.guidance_embed_dim < 0:
            raise ValueError(f"UNetSpec.guidance_embed_dim={self.guidance_embed_dim!r} must be an "
                             "integer >= 0 (0: no guidance input)")
        for field in ("down", "up", "num_heads", "transformer_layers"):
            if len(getattr(self, field)) != n:
                raise ValueError(f"UNetSpec.{field} has {len(getattr(self, field))} stages, "
                                 f"block_channels has {n}")
        for s in range(n):
            for u, unit in enumerate(self.down[s]):
                _check_unit(unit, f"UNetSpec.down[{s}][{u}]")
            for u, unit in enumerate(self.up[s]):
                _check_unit(unit, f"UNetSpec.up[{s}][{u}]")
            if len(self.up[s]) != len(self.down[s]) + 1:
                raise ValueError(
                    f"UNetSpec stage {s}: {len(self.down[s])} down units push "
                    f"{len(self.down[s]) + 1} skips (with the conv_in/downsampler skip) but "
                    f"{len(self.up[s])} up units pop them; need len(up[{s}]) == len(down[{s}]) + 1")
        if self.mid:
            _check_unit(self.mid, "UNetSpec.mid")
        for s, c in enumerate(self.block_channels):
            if c % self.norm_groups:
                raise ValueError(f"UNetSpec.block_channels[{s}]={c} is not divisible by "
                                 f"norm_groups={self.norm_groups}")
            if c % self.num_heads[s]:
                raise ValueError(f"UNetSpec.block_channels[{s}]={c} is not divisible by "
                                 f"num_heads[{s}]={self.num_heads[s]}")

    @property
    def num_stages(self) -> int:
        return len(self.block_channels)

    @property
    def time_dim(self) -> int:
        return self.time_embed_dim or 4 * self.block_channels[0]

    def units(self) -> list[tuple[str, int, int, str]]:
        """(path, stage, unit index, unit string) in execution order: down, mid, up."""
        out = [("down", s, u, unit) for s in range(self.num_stages)
               for u, unit in enumerate(self.down[s])]
        if self.mid:
            out.append(("mid", self.num_stages - 1, 0, self.mid))
        out += [("up", s, u, unit) for s in reversed(range(self.num_stages))
                for u, unit in enumerate(self.up[s])]
        return out

    def blocks(self) -> tuple[Block, ...]:
        """Every ResNet and transformer (removed head ResNets too) in execution order, with
        their channels: the one walk of the skip structure that the UNet, its PyTorch mirror,
        the latency tables and surgery all follow."""
        ch, n = self.block_channels, self.num_stages
        x, skips, out = ch[0], [ch[0]], []
        for path, s, u, unit in self.units():
            if path == "up":
                x += skips.pop()
            for pos, (letter, (name, kind)) in enumerate(
                    zip(unit, letter_names(path, s, u, unit))):
                out.append(Block(name, kind, path, s, u, pos, x if pos == 0 else ch[s], ch[s],
                                 removed=letter == "r"))
            x = ch[s]
            if path == "down":
                skips.append(x)
                if u == len(self.down[s]) - 1 and s < n - 1:
                    skips.append(x)  # the downsampler's skip
        return tuple(out)

    def block(self, name: str) -> Block:
        """The block called ``name``; ValueError listing the droppable names if there is none."""
        for b in self.blocks():
            if b.name == name:
                return b
        raise ValueError(f"UNetSpec has no block {name!r}; blocks: {', '.join(self.block_names())}")

    def block_names(self) -> tuple[str, ...]:
        """Droppable blocks in execution order; the order of a ``block_mask`` vector.

        Removed head ResNets (``r``) are not listed: there is nothing left to drop.
        """
        return tuple(b.name for b in self.blocks() if not b.removed)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"UNetSpec: unknown key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("block_channels", "num_heads", "transformer_layers"):
            if key in d:
                d[key] = tuple(d[key])
        for key in ("down", "up"):
            if key in d:
                d[key] = tuple(tuple(units) for units in d[key])
        return cls(**d)


SD15 = UNetSpec()

# SnapFusion's efficient UNet (paper, Table 3) on SD-v1.5's widths. Table 3 gives only block
# counts per stage. Where it keeps fewer ResNets than SD's skip structure has units, the unit
# stays and loses its ResNet ('r'), and the one removed is the costliest of its stage (the
# up units' heads take the concatenated skip), as evolution's dQuality / dLatency would pick at
# equal quality drop:
#   down 64 (320):  2 RB, 0 CA      down 32 (640): 2 RB, 2 CA     down 16 (1280): 1 RB, 2 CA
#   8x8 (1280):     4 RB of SD's 7 (the three up-4 ResNets removed), 1 CA (mid)
#   up 16 (1280):   2 RB, 6 CA (two per unit)   up 32 (640): 3 RB, 3 CA   up 64 (320): 3 RB, 0 CA
# docs/unet_spec.md gives its params and GFLOPs next to SD-v1.5's and the other arrangements.
SNAPFUSION = UNetSpec(
    down=(("R", "R"), ("RA", "RA"), ("RA", "rA"), ("R", "R")),
    up=(("R", "R", "R"), ("RA", "RA", "RA"), ("rAA", "RAA", "RAA"), ("r", "r", "r")),
    mid="RAR")

# A few-MB UNet with SD-v1.5's structure, for tests and the CPU-sized world configs.
TINY = UNetSpec(
    block_channels=(32, 64),
    down=(("RA",), ("R",)),
    up=(("RA", "RA"), ("R", "R")),
    mid="RAR",
    num_heads=(2, 2),
    context_dim=32,
    transformer_layers=(1, 1),
    norm_groups=8,
)

PRESETS: dict[str, UNetSpec] = {"sd15": SD15, "snapfusion": SNAPFUSION, "tiny": TINY}


def preset(name: str) -> UNetSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
