"""Architecture evolution (SnapFusion, Algorithm 1): score blocks, act, keep training.

A round scores every block ``b`` by ``value_b = dQuality_b / dLatency_b``: the quality lost when
``b`` is dropped (one mask per block through one compiled measure) over what ``b`` costs in the
latency table. While the UNet is slower than the target, the ``group_size`` lowest-value blocks
are removed; once it meets the target, the highest-value blocks are duplicated as long as the
target still holds; when neither is possible, evolution stops. Between rounds the caller robust-
trains the edited UNet (``train`` callback), optimizer state and EMA carried through surgery.

:func:`evolution_round` is the decision (nothing is edited), :func:`apply_actions` the surgery on
a train state; ``snapjax evolve`` (:mod:`snapjax.evolve.run`) is the loop around them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from snapjax.evolve import latency as latency_lib
from snapjax.evolve import surgery
from snapjax.models.unet_spec import UNetSpec

RULES = ("value", "cheapest", "random")


@dataclasses.dataclass(frozen=True)
class EvolveConfig:
    """``config.evolve``: when and how the architecture changes.

    rounds: at most this many evolution rounds (each: score, act, then robust-train).
    train_steps_per_round: robust-training steps after each action (the paper's "every K").
    final_train_steps: robust-training steps after the last action, before the export (the
      last blocks removed get more than one round's recovery).
    target_latency: the goal, as a fraction of the starting UNet's latency by the table.
    latency_source: "macs", "measured" or a JSON table (:mod:`snapjax.evolve.latency`).
    group_size: blocks removed (or duplicated) per action; the paper acts in groups.
    duplicate: once under the target, duplicate the most valuable blocks while it holds.
    duplicate_init: "zero" (the copy starts silent) or "copy".
    quality: "world" (reader accuracy of DDIM samples), "denoise" (minus the loss on a
      fixed batch) or "clip" (CLIP score of DDIM samples of a prompts file); see
      :mod:`snapjax.evolve.quality`.
    num_prompts / sample_steps / guidance_scale / seed: the fixed validation set of the
      quality measure (prompts and sampling for "world" and "clip", batch size for "denoise";
      for "clip", a seeded subset of num_prompts lines of prompts_file).
    clip_model: quality "clip": a local transformers CLIP model folder (never downloaded).
    prompts_file: quality "clip": a UTF-8 text file, one prompt per line.
    batch_size: quality "clip": prompts sampled (and decoded) at a time.
    rule: how blocks are ranked: "value" (dQuality / dLatency, the paper's), or the naive
      baselines "cheapest" (lowest latency first) and "random" (seeded by seed and round),
      which still measure quality each round but ignore it when choosing.
    """

    rounds: int = 12
    train_steps_per_round: int = 50
    final_train_steps: int = 0
    target_latency: float = 0.6
    latency_source: str = "macs"
    group_size: int = 1
    duplicate: bool = True
    duplicate_init: str = "zero"
    quality: str = "denoise"
    num_prompts: int = 64
    sample_steps: int = 8
    guidance_scale: float = 4.0
    seed: int = 0
    rule: str = "value"
    clip_model: str = ""
    prompts_file: str = ""
    batch_size: int = 16

    def __post_init__(self):
        from snapjax.evolve.quality import MEASURES
        if self.rule not in RULES:
            raise ValueError(f"evolve.rule={self.rule!r}: expected one of {RULES}")
        if self.rounds < 1 or self.group_size < 1 or self.num_prompts < 1 \
                or self.sample_steps < 1 or self.train_steps_per_round < 0 \
                or self.final_train_steps < 0 or self.batch_size < 1:
            raise ValueError("evolve.rounds, group_size, num_prompts, sample_steps and "
                             "batch_size must be >= 1, train_steps_per_round and "
                             "final_train_steps >= 0")
        if not 0.0 < self.target_latency <= 1.0:
            raise ValueError(f"evolve.target_latency={self.target_latency} must be a fraction "
                             "of the starting latency in (0, 1]")
        if self.quality not in MEASURES:
            raise ValueError(f"evolve.quality={self.quality!r}: expected one of {MEASURES}")
        if self.quality == "clip" and not (self.clip_model and self.prompts_file):
            missing = [k for k in ("clip_model", "prompts_file") if not getattr(self, k)]
            raise ValueError(f"evolve.quality='clip' needs evolve.clip_model (a local CLIP model "
                             "folder) and evolve.prompts_file (one prompt per line); missing: "
                             f"{', '.join('evolve.' + k for k in missing)}")
        if self.duplicate_init not in surgery.INITS:
            raise ValueError(f"evolve.duplicate_init={self.duplicate_init!r}: expected one of "
                             f"{surgery.INITS}")


@dataclasses.dataclass(frozen=True)
class BlockScore:
    name: str
    d_quality: float
    d_latency: float

    @property
    def value(self) -> float:
        return self.d_quality / max(self.d_latency, 1e-12)


def score_blocks(spec: UNetSpec, measure: Callable, unet, unet_params,
                 table: latency_lib.LatencyTable) -> tuple[dict, list[BlockScore]]:
    """(the full UNet's quality, one score per block): dQuality = full - dropped."""
    n = spec.num_blocks
    full = measure(unet, unet_params, np.ones(n, np.float32))
    scores = []
    for i, name in enumerate(spec.block_names()):
        mask = np.ones(n, np.float32)
        mask[i] = 0.0
        dropped = measure(unet, unet_params, mask)
        scores.append(BlockScore(name, full[measure.key] - dropped[measure.key], table[name]))
    return full, scores


def best_reachable(spec: UNetSpec, table: latency_lib.LatencyTable) -> float:
    """The lowest latency removal can reach: the fixed part plus the cheapest block of each of
    the down and up paths (a path must keep one block, :func:`surgery.plan_remove`)."""
    keep = 0.0
    for path in ("down", "up"):
        costs = [table[b.name] for b in spec.blocks() if b.path == path and not b.removed]
        keep += min(costs) if costs else 0.0
    return table.fixed + keep


def _ranked(scores: list[BlockScore], cfg: EvolveConfig, removing: bool,
            round_index: int) -> list[BlockScore]:
    if cfg.rule == "value":
        return sorted(scores, key=lambda s: ((s.value if removing else -s.value), s.name))
    if cfg.rule == "cheapest":
        return sorted(scores, key=lambda s: ((s.d_latency if removing else -s.d_latency), s.name))
    order = np.random.default_rng([cfg.seed, round_index]).permutation(len(scores))
    return [scores[i] for i in order]


def choose_actions(spec: UNetSpec, scores: list[BlockScore], latency: float, target: float,
                   cfg: EvolveConfig, round_index: int = 0) -> list[tuple[str, str, str]]:
    """[(action, block, scored as)] for this round: removals while over the target, else
    duplications that keep it; [] when neither is possible (evolution has converged).

    Actions apply in order; ``block`` is the name when its action runs (an earlier action in
    the same unit may have shifted it), ``scored as`` the name it was scored under.
    """
    if latency > target:
        action = "remove"
    elif cfg.duplicate:
        action = "duplicate"
    else:
        return []
    ranked = _ranked(scores, cfg, action == "remove", round_index)
    actions, current, budget = [], spec, target - latency
    alias = {s.name: s.name for s in scores}  # scored name -> its name in `current`
    for s in ranked:
        if len(actions) == cfg.group_size:
            break
        if action == "duplicate" and not ((cfg.rule != "value" or s.d_quality > 0)
                                          and s.d_latency <= budget):
            continue
        name = alias[s.name]
        try:
            edit = (surgery.plan_remove(current, name) if action == "remove"
                    else surgery.plan_duplicate(current, name, cfg.duplicate_init))
        except ValueError:  # the last block of its path: not removable
            continue
        actions.append((action, name, s.name))
        budget -= s.d_latency
        current = edit.spec
        alias = {k: edit.renames.get(v, v) for k, v in alias.items() if v != edit.drop}
    return actions


@dataclasses.dataclass
class Round:
    round: int
    actions: list[tuple[str, str, str]]
    scores: list[BlockScore]
    quality: dict
    latency: float
    latency_after: float
    spec_after: UNetSpec

    def rows(self) -> list[dict[str, Any]]:
        """evolution.jsonl rows: one per action (or one 'stop' row)."""
        by_name = {s.name: s for s in self.scores}
        base = {"round": self.round, "latency": self.latency, "latency_after": self.latency_after,
                **{f"quality/{k}": v for k, v in self.quality.items()}}
        if not self.actions:
            return [{**base, "action": "stop", "block": None, "d_quality": None,
                     "d_latency": None}]
        return [{**base, "action": action, "block": name, "scored_as": scored,
                 "d_quality": by_name[scored].d_quality, "d_latency": by_name[scored].d_latency}
                for action, name, scored in self.actions]


def evolution_round(round_index: int, spec: UNetSpec, unet_params, *, unet, measure,
                    table: latency_lib.LatencyTable, target: float,
                    cfg: EvolveConfig) -> Round:
    """Score every block of ``spec`` and decide this round's actions (nothing is edited)."""
    quality, scores = score_blocks(spec, measure, unet, unet_params, table)
    latency = latency_lib.unet_cost(spec, table)
    actions = choose_actions(spec, scores, latency, target, cfg, round_index)
    after = spec
    for action, name, _ in actions:
        plan = surgery.plan_remove if action == "remove" else surgery.plan_duplicate
        after = plan(after, name).spec
    latency_after = latency + sum((1 if a == "duplicate" else -1) * table[scored]
                                  for a, _, scored in actions)
    return Round(round_index, actions, scores, quality, latency, latency_after, after)


def check_target(spec: UNetSpec, table: latency_lib.LatencyTable, target: float) -> None:
    reachable = best_reachable(spec, table)
    if target < reachable:
        raise ValueError(
            f"latency target {target:.4g} {table.unit} is unreachable: removing every block "
            f"that can go leaves {reachable:.4g} {table.unit} (fixed part {table.fixed:.4g} plus "
            f"one block on each path), {reachable / latency_lib.unet_cost(spec, table):.1%} of "
            "the starting latency; raise evolve.target_latency")


def apply_actions(state, spec: UNetSpec, actions: list[tuple[str, str, str]], init: str):
    """A round's actions applied to a train state (params, EMA, optimizer): (spec, state)."""
    for action, name, _ in actions:
        edit = (surgery.plan_remove(spec, name) if action == "remove"
                else surgery.plan_duplicate(spec, name, init))
        spec, state = surgery.edit_train_state(state, edit)
    return spec, state

