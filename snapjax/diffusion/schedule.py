"""The discrete noise schedule of SD-v1.5 and the DDIM timestep grids, as diffusers computes them.

Everything here is numpy and runs outside jit: a sampler gets a :class:`SamplingPlan` (timesteps
and the cumulative alphas it steps between) as plain arrays, so the jitted loop never branches on
the schedule and plans of equal length share one compilation.

``alphas_cumprod`` reproduces diffusers' float32 computation bit for bit (torch's linspace and its
double-accumulated cumprod), so samples match ``DDIMScheduler`` to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DDIM_LANDINGS = ("diffusers", "next")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM training schedule plus the DDIM sampling conventions (defaults: SD-v1.5)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    # False: the last DDIM step lands on abar[0] (SD-v1.5), True: on abar = 1 (a clean sample).
    set_alpha_to_one: bool = False
    # Clamp the predicted x to [-clip_sample_range, clip_sample_range] at every step (diffusers'
    # DDIM default is True; SD-v1.5's config turns it off).
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # Where a DDIM step lands: "diffusers" at t - num_train_timesteps // num_steps, as
    # DDIMScheduler does; "next" at the grid's next timestep. They differ only when num_steps does
    # not divide num_train_timesteps (trailing 32 or 16 of 1000: steps 31 or 32 apart), where only
    # "next" nests a 16-step grid in a 32-step one, as step distillation needs. Not a diffusers key.
    ddim_landing: str = "diffusers"

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("ddim_landing", self.ddim_landing, DDIM_LANDINGS)
        _check_int("num_train_timesteps", self.num_train_timesteps, minimum=2)
        _check_int("steps_offset", self.steps_offset, minimum=0)
        for key in ("beta_start", "beta_end"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"NoiseSchedule.{key} must be a number in [0, 1), got {value!r}")
        for key in ("set_alpha_to_one", "clip_sample"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"NoiseSchedule.{key} must be true or false, "
                                 f"got {getattr(self, key)!r}")
        if (isinstance(self.clip_sample_range, bool)
                or not isinstance(self.clip_sample_range, (int, float))
                or self.clip_sample_range <= 0):
            raise ValueError("NoiseSchedule.clip_sample_range must be a positive number, "
                             f"got {self.clip_sample_range!r}")

    @property
    def clip_range(self) -> float | None:
        """The x-clamp a DDIM step applies, or None (what the step functions take)."""
        return float(self.clip_sample_range) if self.clip_sample else None

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> NoiseSchedule:
        """The schedule that ``DDIMScheduler.from_config(config)`` samples with.

        ``config`` is a scheduler_config.json (path) or its dict, from DDIMScheduler, PNDMScheduler
        (SD-v1.5's) or another SD scheduler. As in diffusers, a missing key takes DDIMScheduler's
        default; keys that only tune another sampler (PNDM's ``skip_prk_steps``, Euler's
        ``use_karras_sigmas``, ...) are ignored. Values DDIM sampling here does not support and
        unknown keys raise ValueError naming the key.
        """
        where = "scheduler config"
        if not isinstance(config, Mapping):
            where = str(config)
            try:
                from snapjax import storage
                config = json.loads(storage.path(config).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{where}: cannot read a scheduler config: {e}") from e
            if not isinstance(config, Mapping):
                raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
        values = dict(DDIM_DEFAULTS)
        for key, value in config.items():
            if key.startswith("_") or key in IGNORED_KEYS:
                continue
            if key not in DDIM_DEFAULTS:
                raise ValueError(f"{where}: unknown key {key!r} (not a DDIMScheduler option nor a "
                                 "known option of another SD scheduler)")
            values[key] = value
        for key, unsupported in (("trained_betas", lambda v: v is not None),
                                 ("thresholding", bool), ("rescale_betas_zero_snr", bool)):
            if unsupported(values.pop(key)):
                raise ValueError(f"{where}: {key}={config[key]!r} is not supported "
                                 f"(only {DDIM_DEFAULTS[key]!r})")
        for key in ("dynamic_thresholding_ratio", "sample_max_value"):  # only used by thresholding
            values.pop(key)
        if values["beta_schedule"] not in BETA_SCHEDULES:
            raise ValueError(f"{where}: beta_schedule={values['beta_schedule']!r} is not supported "
                             f"(one of {', '.join(BETA_SCHEDULES)})")
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def to_diffusers_config(self) -> dict[str, Any]:
        """A DDIMScheduler config (scheduler_config.json) that samples exactly as this schedule."""
        config = {"_class_name": "DDIMScheduler", **DDIM_DEFAULTS}
        config.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                       if f.name != "ddim_landing"})
        return config

    def diffusers_samples_exactly(self, num_steps: int) -> bool:
        """Whether DDIMScheduler at ``num_steps`` steps lands where this schedule does."""
        return self.ddim_landing == "diffusers" or bool(np.array_equal(
            ddim_prev_timesteps(self, num_steps),
            ddim_prev_timesteps(dataclasses.replace(self, ddim_landing="diffusers"), num_steps)))


# DDIMScheduler.__init__'s defaults: what diffusers fills in for a key a config leaves out.
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

# Options of other diffusers schedulers (PNDM, DDPM, Euler, LMS, DPM-Solver, DEIS, UniPC, Heun,
# KDPM2, LCM, TCD) that choose how *they* walk the same training schedule; DDIM has no use for them.
IGNORED_KEYS = frozenset({
    "algorithm_type", "disable_corrector", "euler_at_final", "final_sigmas_type", "flow_shift",
    "interpolation_type", "lambda_min_clipped", "lower_order_final", "original_inference_steps",
    "predict_x0", "shift_terminal", "sigma_max", "sigma_min", "skip_prk_steps", "solver_order",
    "solver_p", "solver_type", "time_shift_type", "timestep_scaling", "timestep_type",
    "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
    "use_karras_sigmas", "use_lu_lambdas", "variance_type",
})


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"NoiseSchedule.{key} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(key: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"NoiseSchedule.{key} must be an integer >= {minimum}, got {value!r}")


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(..., dtype=float32) on CPU: a float32 step, each point start + i*step (first
    # half) or end - (n-1-i)*step (second half) rounded once to float32.
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, np.float64(start32) + step * i,
                    np.float64(end32) - step * (n - 1 - i)).astype(np.float32)


def betas(schedule: NoiseSchedule) -> np.ndarray:
    """beta_t, float32 (num_train_timesteps,)."""
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        return _torch_linspace_f32(schedule.beta_start ** 0.5, schedule.beta_end ** 0.5, n) ** 2
    return _torch_linspace_f32(schedule.beta_start, schedule.beta_end, n)


def alphas_cumprod(schedule: NoiseSchedule) -> np.ndarray:
    """abar_t = prod_{s<=t} (1 - beta_s), float32 (num_train_timesteps,), as diffusers has it."""
    # torch's CPU cumprod accumulates float32 in double and rounds each output once.
    return np.cumprod((np.float32(1) - betas(schedule)).astype(np.float64)).astype(np.float32)


def final_alpha_cumprod(schedule: NoiseSchedule) -> np.float32:
    """abar that the last DDIM step lands on."""
    return np.float32(1.0) if schedule.set_alpha_to_one else alphas_cumprod(schedule)[0]


def alpha_sigma(abar):
    """(alpha, sigma) = (sqrt(abar), sqrt(1 - abar)); numpy in, numpy out; jax in, jax out."""
    xp = jnp if isinstance(abar, jax.Array) else np
    return xp.sqrt(abar), xp.sqrt(1 - abar)


def ddim_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """``DDIMScheduler.set_timesteps(num_steps)``'s timesteps: descending, int64 (num_steps,)."""
    n = schedule.num_train_timesteps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) \
            or not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be an integer in [1, num_train_timesteps={n}], "
                         f"got {num_steps!r}")
    spacing = schedule.timestep_spacing
    if spacing == "linspace":
        t = np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        t = (np.arange(num_steps) * (n // num_steps)).round()[::-1].astype(np.int64)
        t = t + schedule.steps_offset
    else:  # trailing
        t = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    if len(t) != num_steps or t.min() < 0 or t.max() >= n:
        # diffusers itself breaks here: trailing spacing's float arange overshoots for some counts
        # (61, 103, ... of 1000) and leading's offset pushes 1000 steps past the last timestep.
        raise ValueError(
            f"{spacing!r} spacing with num_steps={num_steps}, steps_offset={schedule.steps_offset} "
            f"gives timesteps {t[:3].tolist()}...{t[-3:].tolist()} (count {len(t)}), not "
            f"{num_steps} timesteps in [0, {n - 1}] (diffusers' DDIMScheduler fails the same way); "
            "choose another step count")
    return t


def ddim_prev_timesteps(schedule: NoiseSchedule, num_steps: int) -> np.ndarray:
    """The timestep each DDIM step lands on, as ``DDIMScheduler.step`` computes it; -1 = the end.

    diffusers uses ``t - num_train_timesteps // num_steps`` for every spacing, which is the next
    timestep of the grid for leading spacing and for trailing when num_steps divides
    num_train_timesteps, but not for linspace spacing; we reproduce it, quirks included.
    ``schedule.ddim_landing="next"`` lands on the grid's next timestep instead.
    """
    t = ddim_timesteps(schedule, num_steps)
    if schedule.ddim_landing == "next":
        return np.append(t[1:], -1)
    return np.maximum(t - schedule.num_train_timesteps // num_steps, -1)


class SamplingPlan(NamedTuple):
    """What a sampler loop steps through (K steps): z at timesteps[k] goes to abar_prev[k]."""

    timesteps: np.ndarray       # int32 (K,), what the denoiser is told
    prev_timesteps: np.ndarray  # int32 (K,), -1 = past the last training timestep
    abar: np.ndarray            # float32 (K,), alphas_cumprod[timesteps]
    abar_prev: np.ndarray       # float32 (K,), alphas_cumprod[prev] or the final alpha


def abar_at(schedule: NoiseSchedule, t: np.ndarray) -> np.ndarray:
    """alphas_cumprod at integer timesteps; a negative timestep means the final alpha."""
    t = np.asarray(t)
    abar = alphas_cumprod(schedule)
    if t.size and t.max() >= len(abar):
        raise ValueError(f"timestep {int(t.max())} is past the schedule's last ({len(abar) - 1})")
    final = final_alpha_cumprod(schedule)
    return np.where(t >= 0, abar[np.maximum(t, 0)], final).astype(np.float32)


def _plan(schedule: NoiseSchedule, t: np.ndarray, prev: np.ndarray) -> SamplingPlan:
    return SamplingPlan(t.astype(np.int32), prev.astype(np.int32),
                        abar_at(schedule, t), abar_at(schedule, prev))


def ddim_plan(schedule: NoiseSchedule, num_steps: int) -> SamplingPlan:
    """The plan of ``DDIMScheduler`` with ``set_timesteps(num_steps)``."""
    return _plan(schedule, ddim_timesteps(schedule, num_steps),
                 ddim_prev_timesteps(schedule, num_steps))


def plan_from_timesteps(schedule: NoiseSchedule, timesteps) -> SamplingPlan:
    """A plan through any strictly decreasing timesteps: each step lands on the next one, the last
    on the final alpha (e.g. a distilled student's grid, or the teacher's t -> t' -> t'')."""
    t = np.asarray(timesteps)
    n = schedule.num_train_timesteps
    if t.ndim != 1 or not t.size or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty 1-D integer sequence, got {timesteps!r}")
    if t.min() < 0 or t.max() >= n or np.any(np.diff(t) >= 0):
        raise ValueError(f"timesteps must strictly decrease within [0, {n - 1}], "
                         f"got {t.tolist()}")
    return _plan(schedule, t, np.append(t[1:], -1))
