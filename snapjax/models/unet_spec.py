"""The UNet as data: which blocks exist, in which order, at which width.

A spec lists, per resolution stage, the ordered *units* of the down path and of the up path.
A unit is a string over three letters:

  ``R``  a ResNet block;
  ``r``  a ResNet block whose residual branch was removed: only its shortcut is left (identity,
         or a 1x1 conv where the channel count changes or a skip is concatenated);
  ``A``  a cross-attention transformer after the ResNet (residual, so removing it = identity).

So ``"RA"`` is SD's cross-attention unit, ``"R"`` a plain ResNet unit, ``"rA"`` one whose ResNet
was removed by evolution, ``"r"`` one whose ResNet and attention are both gone.

Skips follow SD: ``conv_in``, every down unit and every downsampler push one skip; every up unit
pops one. For the shapes to meet, stage ``s`` has ``len(up[s]) == len(down[s]) + 1``.
``up`` is indexed by stage like ``down`` (``up[0]`` is the full-resolution stage) although the up
path runs deepest stage first.

Blocks that can be dropped at call time (robust training) are named by :meth:`UNetSpec.block_names`;
a ``block_mask`` is a float vector in that order (1 = run, 0 = drop).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

_UNIT_LETTERS = frozenset("RrA")


def _check_unit(unit: str, where: str) -> None:
    if not unit or unit[0] not in "Rr" or set(unit) - _UNIT_LETTERS or unit[1:] not in ("", "A"):
        raise ValueError(
            f"{where}: unit {unit!r} is not one of 'R', 'RA', 'r', 'rA' "
            "(a ResNet, kept or removed, optionally followed by one attention block)")


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """A UNet2DConditionModel-style network described by data (see module docstring)."""

    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down: tuple[tuple[str, ...], ...] = (("RA", "RA"), ("RA", "RA"), ("RA", "RA"), ("R", "R"))
    up: tuple[tuple[str, ...], ...] = (
        ("RA", "RA", "RA"), ("RA", "RA", "RA"), ("RA", "RA", "RA"), ("R", "R", "R"))
    # "RAR", "RR" (attention removed), "R" (one ResNet: diffusers' UNetMidBlock2D) or "" (none)
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

    def __post_init__(self):
        n = len(self.block_channels)
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
        if self.mid not in ("RAR", "RR", "R", ""):
            raise ValueError(f"UNetSpec.mid={self.mid!r}: expected 'RAR', 'RR', 'R' or ''")
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

    def block_names(self) -> tuple[str, ...]:
        """Droppable blocks in execution order; the order of a ``block_mask`` vector.

        Names match the parameter tree: ``down_{s}_{u}_res``, ``down_{s}_{u}_attn``,
        ``mid_res_0``, ``mid_attn``, ``mid_res_1``, ``up_{s}_{u}_res``, ``up_{s}_{u}_attn``.
        Removed blocks (``r``, missing ``A``) are not listed: there is nothing left to drop.
        """
        names = []

        def unit_blocks(prefix: str, unit: str):
            if unit[0] == "R":
                names.append(f"{prefix}_res")
            if unit.endswith("A"):
                names.append(f"{prefix}_attn")

        for s in range(self.num_stages):
            for u, unit in enumerate(self.down[s]):
                unit_blocks(f"down_{s}_{u}", unit)
        if self.mid:
            names.append("mid_res_0")
            if self.mid == "RAR":
                names.append("mid_attn")
            if len(self.mid) > 1:
                names.append("mid_res_1")
        for s in reversed(range(self.num_stages)):
            for u, unit in enumerate(self.up[s]):
                unit_blocks(f"up_{s}_{u}", unit)
        return tuple(names)

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

PRESETS: dict[str, UNetSpec] = {"sd15": SD15, "tiny": TINY}


def preset(name: str) -> UNetSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
