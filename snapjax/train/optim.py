"""The optimizer: AdamW, warmup then cosine or constant learning rate, global-norm clipping.

EMA and gradient accumulation are not optax transforms here: the EMA lives in the train state
(it is saved and sampled from, never optimised) and accumulation is a scan over microbatches
inside the step (see :mod:`snapjax.train.steps`), so one call is one optimizer update.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    warmup_steps: int = 500
    # "cosine" (decays to end_lr_factor * lr at the last step) or "constant"
    schedule: str = "cosine"
    end_lr_factor: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # SnapFusion (paper): AdamW, weight decay 0.01
    grad_clip_norm: float | None = 1.0
    ema_decay: float = 0.9999
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"opt.schedule={self.schedule!r}: expected 'cosine' or 'constant'")
        if self.lr < 0 or self.warmup_steps < 0:
            raise ValueError(f"opt.lr and opt.warmup_steps must be >= 0, got {self.lr}, "
                             f"{self.warmup_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"opt.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"opt.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"opt.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")


def learning_rate(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``end_lr_factor * lr`` or constant."""
    warmup = min(cfg.warmup_steps, total_steps)
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        after = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1),
                                            alpha=cfg.end_lr_factor)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def _decay_mask(params):
    # Weight decay on matrices and conv kernels only: decaying biases and norm scales towards 0
    # fights the normalisation rather than regularising.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
