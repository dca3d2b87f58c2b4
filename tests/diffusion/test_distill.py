"""The step-distillation target against diffusers' DDIMScheduler and closed-form math.

A teacher given in closed form (a fixed nonlinear function of z and t) takes two DDIM steps in
diffusers' scheduler; one DDIM step of the student's own scheduler from the target x must land
on the same z_s, within 1e-5 relative to max |z_s| (float32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snapjax.diffusion import distill
from snapjax.diffusion.parametrization import from_x_eps
from snapjax.diffusion.schedule import NoiseSchedule, alpha_sigma, alphas_cumprod, ddim_plan
from tests.conftest import max_rel_err

N = 8


def _teacher(z, t):
    """A closed-form teacher: any fixed function of (z, t) will do; numpy and torch alike."""
    tanh = torch.tanh if isinstance(z, torch.Tensor) else np.tanh
    scale = (0.3 + 0.0007 * t).reshape((-1,) + (1,) * (z.ndim - 1))
    return scale * z + 0.2 * tanh(z)


def _scheduler(schedule, steps):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(schedule.to_diffusers_config())
    sched.set_timesteps(steps)
    return sched


def _teacher_jax(z, t):
    import jax.numpy as jnp
    return (0.3 + 0.0007 * t.astype(jnp.float32))[:, None, None, None] * z + 0.2 * jnp.tanh(z)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_one_student_step_from_the_target_lands_on_the_teachers_two(spacing, prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type, timestep_spacing=spacing)
    teacher_sched = _scheduler(schedule, N)
    ts = [int(t) for t in teacher_sched.timesteps]
    # Trailing grids nest: the student's scheduler takes the step. Leading ones do not, so the
    # step t -> s is checked in closed form over three consecutive teacher timesteps.
    triples = (list(zip(*distill.student_grid(schedule, N))) if spacing == "trailing"
               else [(ts[j], ts[j + 1], ts[j + 2]) for j in range(0, len(ts) - 2, 2)])
    rng = np.random.default_rng(0)
    for t, t_mid, s in triples:
        z_t = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
        z = torch.from_numpy(z_t.copy()).double()
        for step_t in (t, t_mid):  # diffusers' own two teacher steps
            out = _teacher(z, torch.full((2,), float(step_t), dtype=torch.float64))
            z = teacher_sched.step(out, step_t, z).prev_sample
        z_s = z.numpy()
        t_B, mid_B, s_B = (np.full((2,), v, np.int32) for v in (t, t_mid, s))
        x = np.asarray(distill.two_step_target(_teacher_jax, z_t, t_B, mid_B, s_B, schedule))
        abar = alphas_cumprod(schedule)
        a_t, sig_t = alpha_sigma(np.float64(abar[t]))
        student_out = from_x_eps(x, (z_t - a_t * x) / sig_t, a_t, sig_t, prediction_type)
        if spacing == "trailing":
            student_sched = _scheduler(schedule, N // 2)
            landed = student_sched.step(torch.from_numpy(np.asarray(student_out, np.float64)), t,
                                        torch.from_numpy(z_t).double()).prev_sample.numpy()
        else:
            a_s, sig_s = alpha_sigma(np.float64(abar[s]))
            landed = a_s * x + sig_s * (z_t - a_t * x) / sig_t
        assert max_rel_err(landed, z_s) < 1e-5, (t, t_mid, s)


def test_trailing_grids_nest_and_leading_grids_are_refused():
    grid = distill.student_grid(NoiseSchedule(timestep_spacing="trailing"), 8)
    assert grid.t.tolist() == [999, 749, 499, 249]
    assert grid.t_mid.tolist() == [874, 624, 374, 124]
    assert grid.s.tolist() == [749, 499, 249, -1]
    # the student's grid is the one sampling uses
    assert grid.t.tolist() == ddim_plan(NoiseSchedule(timestep_spacing="trailing"), 4).timesteps.tolist()
    with pytest.raises(ValueError, match="not every second step.*trailing"):
        distill.student_grid(NoiseSchedule(timestep_spacing="leading"), 8)
    for bad in (7, 1, 0, 2.0, True):
        with pytest.raises(ValueError, match="even integer"):
            distill.student_grid(NoiseSchedule(timestep_spacing="trailing"), bad)


def test_loss_spaces_are_the_x_loss_times_their_snr_factor():
    rng = np.random.default_rng(1)
    z_t = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    x_target = rng.standard_normal(z_t.shape).astype(np.float32)
    out = rng.standard_normal(z_t.shape).astype(np.float32)
    abar = np.asarray([0.05, 0.5, 0.98], np.float32)
    snr = abar / (1 - abar)
    x_err = np.asarray(distill.distill_loss(out, z_t, x_target, abar, prediction_type="sample",
                                            space="x")) / np.maximum(snr, 1)
    np.testing.assert_allclose(np.mean((out - x_target) ** 2, axis=(1, 2, 3)), x_err, rtol=1e-5)
    np.testing.assert_allclose(distill.truncated_snr_weight(abar), np.maximum(snr, 1), rtol=1e-6)
    v = distill.distill_loss(out, z_t, x_target, abar, prediction_type="sample", space="v")
    eps = distill.distill_loss(out, z_t, x_target, abar, prediction_type="sample", space="eps")
    np.testing.assert_allclose(v, x_err * (1 + snr), rtol=1e-4)
    np.testing.assert_allclose(eps, x_err * snr, rtol=1e-4)
    with pytest.raises(ValueError, match="loss space"):
        distill.distill_loss(out, z_t, x_target, abar, prediction_type="sample", space="l1")


def _ddim_step_closed_form(out, z, t, s, abar, final, prediction_type):
    """DDIM (eta 0) from t to s in float64, from the formulas: x_hat, eps_hat, then
    alpha_s x_hat + sigma_s eps_hat (s = -1: the final alpha)."""
    a_t, sig_t = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
    if prediction_type == "epsilon":
        eps = out
        x = (z - sig_t * eps) / a_t
    else:  # v = alpha eps - sigma x
        x = a_t * z - sig_t * out
        eps = sig_t * z + a_t * out
    ab_s = final if s < 0 else abar[s]
    return np.sqrt(ab_s) * x + np.sqrt(1 - ab_s) * eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_papers_32_to_16_nests_when_steps_land_on_the_next_grid_timestep(prediction_type):
    """1000 / 32 is not whole: with diffusers' landing (t - 31) the 16-step trailing grid is not
    every second 32-step one; landing on the grid's next timestep it is, and one student step
    from the target reaches the teacher's two steps (closed-form DDIM, float64)."""
    schedule = NoiseSchedule(prediction_type=prediction_type, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="ddim_landing='next'"):
        distill.student_grid(schedule, 32)
    schedule = NoiseSchedule(prediction_type=prediction_type, timestep_spacing="trailing",
                             ddim_landing="next")
    grid = distill.student_grid(schedule, 32)
    assert grid.t.tolist() == ddim_plan(schedule, 16).timesteps.tolist()
    assert grid.s.tolist() == grid.t.tolist()[1:] + [-1]
    assert not schedule.diffusers_samples_exactly(16) and schedule.diffusers_samples_exactly(8)
    assert "ddim_landing" not in schedule.to_diffusers_config()
    abar = alphas_cumprod(schedule).astype(np.float64)
    final = np.float64(alphas_cumprod(schedule)[0])
    rng = np.random.default_rng(0)
    for t, t_mid, s in zip(*grid):
        z_t = rng.standard_normal((2, 4, 4, 3))
        z = z_t
        for a, b in ((t, t_mid), (t_mid, s)):
            out = _teacher(torch.from_numpy(z), torch.full((2,), float(a),
                                                          dtype=torch.float64)).numpy()
            z = _ddim_step_closed_form(out, z, a, b, abar, final, prediction_type)
        t_B, mid_B, s_B = (np.full((2,), v, np.int32) for v in (t, t_mid, s))
        x = np.asarray(distill.two_step_target(_teacher_jax, z_t.astype(np.float32), t_B, mid_B,
                                               s_B, schedule), np.float64)
        a_t, sig_t = np.sqrt(abar[t]), np.sqrt(1 - abar[t])
        ab_s = final if s < 0 else abar[s]
        landed = np.sqrt(ab_s) * x + np.sqrt(1 - ab_s) * (z_t - a_t * x) / sig_t
        assert max_rel_err(landed, z) < 1e-5, (t, t_mid, s)
