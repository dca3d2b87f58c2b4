"""The schedule and timestep grids against diffusers' DDIMScheduler (the reference)."""

import inspect
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from snapjax.diffusion.schedule import (DDIM_DEFAULTS, NoiseSchedule, alpha_sigma, alphas_cumprod,
                                        betas, ddim_plan, ddim_prev_timesteps, ddim_timesteps,
                                        plan_from_timesteps)

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, as published.
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SCHEDULES = {
    "sd15": NoiseSchedule(),
    "linear": NoiseSchedule(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "short": NoiseSchedule(num_train_timesteps=37, beta_start=0.001, beta_end=0.03),
}


def reference(schedule: NoiseSchedule) -> DDIMScheduler:
    return DDIMScheduler.from_config(schedule.to_diffusers_config())


@pytest.mark.parametrize("name", SCHEDULES)
def test_alphas_cumprod_match_diffusers(name):
    schedule = SCHEDULES[name]
    ref = reference(schedule)
    # Currently bit-exact (torch 2.x CPU linspace/cumprod); 1e-7 leaves room for other torch builds.
    np.testing.assert_allclose(betas(schedule), ref.betas.numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(alphas_cumprod(schedule), ref.alphas_cumprod.numpy(), rtol=0,
                               atol=1e-7)
    assert alphas_cumprod(schedule).dtype == np.float32


def test_alpha_sigma_closed_form():
    abar = alphas_cumprod(NoiseSchedule()).astype(np.float64)
    alpha, sigma = alpha_sigma(abar)
    np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(alpha, np.sqrt(abar), rtol=1e-15)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("trailing", 1),
                                            ("linspace", 1)])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 7, 8, 16, 25, 32, 50, 999, 1000])
def test_timesteps_match_set_timesteps(spacing, offset, num_steps):
    schedule = NoiseSchedule(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and offset == 1 and num_steps == 1000:
        pytest.skip("past the last timestep; checked by test_bad_step_counts")
    ref = reference(schedule)
    ref.set_timesteps(num_steps)
    np.testing.assert_array_equal(ddim_timesteps(schedule, num_steps), ref.timesteps.numpy())


def landing_abar(ref: DDIMScheduler, t: int) -> float:
    # With a 'sample' model predicting x = 1 at z = alpha_t (so eps = 0), step() returns
    # sqrt(abar_prev): the alpha diffusers lands on, read from its own step.
    alpha_t = float(ref.alphas_cumprod[t]) ** 0.5
    out = ref.step(torch.ones(1), t, torch.full((1,), alpha_t, dtype=torch.float32)).prev_sample
    return float(out[0]) ** 2


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps,set_alpha_to_one", [(8, False), (50, False), (7, True)])
def test_plan_lands_where_diffusers_step_lands(spacing, num_steps, set_alpha_to_one):
    schedule = NoiseSchedule(timestep_spacing=spacing, prediction_type="sample",
                             set_alpha_to_one=set_alpha_to_one)
    plan = ddim_plan(schedule, num_steps)
    ref = reference(schedule)
    ref.set_timesteps(num_steps)
    got = [landing_abar(ref, int(t)) for t in ref.timesteps]
    np.testing.assert_allclose(plan.abar_prev, got, rtol=2e-6)
    np.testing.assert_allclose(plan.abar, ref.alphas_cumprod[ref.timesteps].numpy(), rtol=0)
    final = 1.0 if set_alpha_to_one else float(ref.alphas_cumprod[0])
    if spacing == "trailing" and num_steps == 7:
        # 1000 // 7 = 142 steps from t = 142 land on t = 0, not on the final alpha (diffusers).
        assert plan.prev_timesteps[-1] == 0 and plan.abar_prev[-1] == ref.alphas_cumprod[0]
    else:
        assert plan.prev_timesteps[-1] == -1 and plan.abar_prev[-1] == np.float32(final)


def test_prev_timesteps_follow_the_grid_for_leading_and_trailing():
    for spacing in ("leading", "trailing"):
        schedule = NoiseSchedule(timestep_spacing=spacing)
        t = ddim_timesteps(schedule, 8)
        np.testing.assert_array_equal(ddim_prev_timesteps(schedule, 8), np.append(t[1:], -1))
        np.testing.assert_array_equal(ddim_plan(schedule, 8).abar_prev,
                                      plan_from_timesteps(schedule, t).abar_prev)
    # linspace: diffusers steps by N // K, off the grid; we keep its quirk.
    assert ddim_prev_timesteps(NoiseSchedule(timestep_spacing="linspace"), 8)[0] == 999 - 125


def test_bad_step_counts():
    with pytest.raises(ValueError, match="num_steps must be an integer in"):
        ddim_timesteps(NoiseSchedule(), 0)
    with pytest.raises(ValueError, match="num_steps must be an integer in"):
        ddim_timesteps(NoiseSchedule(), 1001)
    with pytest.raises(ValueError, match="steps_offset=1"):
        ddim_timesteps(NoiseSchedule(), 1000)
    # diffusers' trailing arange overshoots at 61 steps: 62 timesteps, the last one -1.
    ref = reference(NoiseSchedule(timestep_spacing="trailing"))
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
    with pytest.raises(ValueError, match="'trailing' spacing with num_steps=61"):
        ddim_timesteps(NoiseSchedule(timestep_spacing="trailing"), 61)
    with pytest.raises(ValueError, match="strictly decrease"):
        plan_from_timesteps(NoiseSchedule(), [500, 500, 1])
    with pytest.raises(ValueError, match="strictly decrease"):
        plan_from_timesteps(NoiseSchedule(), [1000, 1])


def test_sd15_config_reads_as_sd15_defaults_and_as_diffusers_reads_it():
    schedule = NoiseSchedule.from_diffusers_config(SD15_CONFIG)
    assert schedule == NoiseSchedule()
    ref = DDIMScheduler.from_config(SD15_CONFIG)
    np.testing.assert_array_equal(alphas_cumprod(schedule), ref.alphas_cumprod.numpy())
    ref.set_timesteps(50)
    np.testing.assert_array_equal(ddim_timesteps(schedule, 50), ref.timesteps.numpy())
    assert float(ref.final_alpha_cumprod) == ddim_plan(schedule, 50).abar_prev[-1]


def test_missing_keys_take_ddim_defaults():
    signature = inspect.signature(DDIMScheduler.__init__).parameters
    assert DDIM_DEFAULTS == {k: p.default for k, p in signature.items() if k != "self"}
    schedule = NoiseSchedule.from_diffusers_config({"beta_start": 0.0001, "beta_end": 0.02})
    ref = DDIMScheduler()
    assert schedule.clip_sample and schedule.set_alpha_to_one and schedule.steps_offset == 0
    assert schedule.beta_schedule == ref.config.beta_schedule == "linear"


@pytest.mark.parametrize("schedule", [
    NoiseSchedule(),
    NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0),
    NoiseSchedule(beta_schedule="linear", clip_sample=True, clip_sample_range=2.0,
                  set_alpha_to_one=True, timestep_spacing="linspace"),
])
def test_to_diffusers_config_round_trips(schedule, tmp_path):
    config = schedule.to_diffusers_config()
    assert NoiseSchedule.from_diffusers_config(config) == schedule
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    assert NoiseSchedule.from_diffusers_config(path) == schedule
    ref = DDIMScheduler.from_config(config)
    for key in ("prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one",
                "clip_sample", "clip_sample_range", "beta_schedule"):
        assert ref.config[key] == getattr(schedule, key), key


@pytest.mark.parametrize("update,match", [
    ({"thresholding": True}, "thresholding=True is not supported"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True is not supported"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas=.* is not supported"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule='squaredcos_cap_v2' is not supported"),
    ({"prediction_type": "flow_prediction"}, "prediction_type must be one of"),
    ({"timestep_spacing": "karras"}, "timestep_spacing must be one of"),
    ({"beta_shedule": "linear"}, "unknown key 'beta_shedule'"),
    ({"num_train_timesteps": 1000.0}, "num_train_timesteps must be an integer"),
    ({"clip_sample": "false"}, "clip_sample must be true or false"),
])
def test_config_errors_name_the_key(update, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_diffusers_config({**SD15_CONFIG, **update})


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json: cannot read"):
        NoiseSchedule.from_diffusers_config(path)
    path.write_text(json.dumps({**SD15_CONFIG, "thresholding": True}))
    with pytest.raises(ValueError, match="scheduler_config.json: thresholding"):
        NoiseSchedule.from_diffusers_config(str(path))


def test_next_landing_steps_onto_the_grid_and_equals_diffusers_where_the_count_divides():
    import dataclasses as dc
    from snapjax.diffusion.schedule import ddim_plan as plan
    base = NoiseSchedule(timestep_spacing="trailing")
    nxt = dc.replace(base, ddim_landing="next")
    for steps in (4, 8, 50):  # divides 1000: the same plan
        assert plan(nxt, steps).prev_timesteps.tolist() == plan(base, steps).prev_timesteps.tolist()
    p = plan(nxt, 16)
    assert p.prev_timesteps.tolist() == p.timesteps.tolist()[1:] + [-1]
    assert plan(base, 16).prev_timesteps.tolist()[:2] == [937, 875]  # diffusers: t - 62, not 874
    with pytest.raises(ValueError, match="ddim_landing"):
        NoiseSchedule(ddim_landing="uniform")
