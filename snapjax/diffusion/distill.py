"""Step distillation's target (Salimans & Ho 2022, SnapFusion section 4), its grids and losses.

Legend: B batch, H W latent height/width, C latent channels, K student steps.

The teacher takes two DDIM steps t -> t_mid -> s; the student's one DDIM step t -> s must land on
the same z_s, which fixes the clean image x the student should predict at z_t:

    z_s = alpha_s x + sigma_s eps_hat,  eps_hat = (z_t - alpha_t x) / sigma_t
    =>  x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

The student's grid is ``ddim_plan(schedule, N / 2)``, the plan sampling uses, and each of its
steps must be two consecutive steps of the teacher's ``ddim_plan(schedule, N)``: a student
trained on a grid is sampled on it. Trailing spacing nests (8 -> 4 -> 2 of 1000: every second
teacher step); leading spacing does not (its last student step, 1 -> the end, is one teacher
step), which :func:`student_grid` refuses with that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from snapjax.diffusion.ddim import ddim_step
from snapjax.diffusion.parametrization import broadcast_like, from_x_eps, to_x_eps
from snapjax.diffusion.schedule import (NoiseSchedule, alpha_sigma, alphas_cumprod, ddim_plan,
                                        final_alpha_cumprod)

# teacher_fn(z_BHWC, t_B) -> the teacher's output at z_t, in schedule.prediction_type
TeacherFn = Callable[[jax.Array, jax.Array], jax.Array]
LOSS_SPACES = ("x", "v", "eps")


class StudentGrid(NamedTuple):
    """The student's K steps t -> s and the teacher's midpoint of each (int32, -1 = the end)."""

    t: np.ndarray
    t_mid: np.ndarray
    s: np.ndarray


def student_grid(schedule: NoiseSchedule, teacher_steps: int) -> StudentGrid:
    """The grid of a student of ``teacher_steps / 2`` steps, each step paired with the two
    teacher steps it replaces. Raises ValueError for an odd count or grids that do not nest."""
    if isinstance(teacher_steps, bool) or not isinstance(teacher_steps, (int, np.integer)) \
            or teacher_steps < 2 or teacher_steps % 2:
        raise ValueError(f"teacher steps must be an even integer >= 2 (the student takes half), "
                         f"got {teacher_steps!r}")
    teacher = ddim_plan(schedule, teacher_steps)
    student = ddim_plan(schedule, teacher_steps // 2)
    position = {int(t): j for j, t in enumerate(teacher.timesteps)}
    mids = []
    for t, s in zip(student.timesteps.tolist(), student.prev_timesteps.tolist()):
        j = position.get(t)
        ok = (j is not None and j + 1 < len(teacher.timesteps)
              and teacher.prev_timesteps[j] == teacher.timesteps[j + 1]
              and teacher.prev_timesteps[j + 1] == s)
        if not ok:
            raise ValueError(
                f"the {teacher_steps // 2}-step {schedule.timestep_spacing} grid "
                f"{student.timesteps.tolist()} (landing on {student.prev_timesteps.tolist()}) is "
                f"not every second step of the teacher's {teacher_steps}-step grid "
                f"{teacher.timesteps.tolist()}: its step {t} -> {s} is not two teacher steps. "
                "Use schedule.timestep_spacing='trailing', whose grids nest"
                + ("" if schedule.ddim_landing == "next" else
                   ", and ddim_landing='next' when the step counts do not divide "
                   f"{schedule.num_train_timesteps}"))
        mids.append(int(teacher.prev_timesteps[j]))
    return StudentGrid(student.timesteps.astype(np.int32), np.asarray(mids, np.int32),
                       student.prev_timesteps.astype(np.int32))


def abar_of(schedule: NoiseSchedule, t_B: jax.Array) -> jax.Array:
    """alphas_cumprod at integer timesteps (traceable); -1 means the final alpha."""
    abar_T = jnp.asarray(alphas_cumprod(schedule))
    final = jnp.float32(final_alpha_cumprod(schedule))
    return jnp.where(t_B >= 0, abar_T[jnp.maximum(t_B, 0)], final)


def x_landing_on(z_s: jax.Array, z_t: jax.Array, abar_t: jax.Array,
                 abar_s: jax.Array) -> jax.Array:
    """The x whose DDIM step from z_t (at abar_t) lands on z_s (at abar_s)."""
    alpha_t, sigma_t = alpha_sigma(abar_t)
    alpha_s, sigma_s = alpha_sigma(abar_s)
    ratio = sigma_s / sigma_t
    return ((z_s - broadcast_like(ratio, z_t) * z_t)
            / broadcast_like(alpha_s - ratio * alpha_t, z_t))


def two_step_target(teacher_fn: TeacherFn, z_BHWC: jax.Array, t_B: jax.Array,
                    t_mid_B: jax.Array, s_B: jax.Array, schedule: NoiseSchedule) -> jax.Array:
    """The student's x-target at z_t: the teacher steps t -> t_mid -> s (DDIM, its outputs in
    ``schedule.prediction_type``), and the target is :func:`x_landing_on` its z_s."""
    kind, clip = schedule.prediction_type, schedule.clip_range
    abar_t, abar_mid, abar_s = (abar_of(schedule, x) for x in (t_B, t_mid_B, s_B))
    z = z_BHWC.astype(jnp.float32)
    z_mid = ddim_step(teacher_fn(z, t_B).astype(jnp.float32), z, abar_t, abar_mid,
                      prediction_type=kind, clip_range=clip)
    z_s = ddim_step(teacher_fn(z_mid, t_mid_B).astype(jnp.float32), z_mid, abar_mid, abar_s,
                    prediction_type=kind, clip_range=clip)
    return x_landing_on(z_s, z, abar_t, abar_s)


def truncated_snr_weight(abar_B: jax.Array) -> jax.Array:
    """max(alpha^2 / sigma^2, 1): the x-space loss weight of progressive distillation."""
    return jnp.maximum(abar_B / (1.0 - abar_B), 1.0)


def distill_loss(student_out: jax.Array, z_t: jax.Array, x_target: jax.Array,
                 abar_t_B: jax.Array, *, prediction_type: str, space: str = "x") -> jax.Array:
    """Per-example loss (B,) of the student's output (in its ``prediction_type``) against the
    target x: ``x`` with the truncated-SNR weight (default), or the unweighted ``v`` or ``eps``
    error of the target re-expressed at z_t."""
    if space not in LOSS_SPACES:
        raise ValueError(f"distillation loss space {space!r}: expected one of {LOSS_SPACES}")
    alpha, sigma = alpha_sigma(abar_t_B)
    x_hat, eps_hat = to_x_eps(student_out.astype(jnp.float32), z_t, alpha, sigma,
                              prediction_type)
    axes = tuple(range(1, z_t.ndim))
    if space == "x":
        return truncated_snr_weight(abar_t_B) * jnp.mean(jnp.square(x_hat - x_target), axis=axes)
    eps_target = (z_t - broadcast_like(alpha, z_t) * x_target) / broadcast_like(sigma, z_t)
    if space == "eps":
        return jnp.mean(jnp.square(eps_hat - eps_target), axis=axes)
    v_hat = from_x_eps(x_hat, eps_hat, alpha, sigma, "v_prediction")
    v = from_x_eps(x_target, eps_target, alpha, sigma, "v_prediction")
    return jnp.mean(jnp.square(v_hat - v), axis=axes)
