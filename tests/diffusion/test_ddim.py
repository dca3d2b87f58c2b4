"""DDIM steps and whole sampling loops against diffusers' DDIMScheduler driven as
StableDiffusionPipeline drives it (NCHW torch), with a closed-form fake denoiser in both frameworks.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from snapjax.diffusion import ddim
from snapjax.diffusion.guidance import cfg_combine, guided_output
from snapjax.diffusion.parametrization import to_x_eps
from snapjax.diffusion.schedule import NoiseSchedule, alpha_sigma, ddim_plan, plan_from_timesteps

B, H, W, C, L, D = 2, 4, 3, 4, 3, 5
W_CTX = np.random.default_rng(7).standard_normal((D, C)).astype(np.float32) * 0.5


def fake_denoiser_jax(gain, z_BHWC, t_B, ctx_BLD):
    """A smooth, t- and context-dependent stand-in for the UNet (``gain`` plays the params)."""
    t = t_B.astype(jnp.float32)[:, None, None, None]
    ctx = (ctx_BLD.mean(axis=1) @ W_CTX)[:, None, None, :]
    return gain * jnp.tanh(z_BHWC * (1 + t / 1000)) + 0.3 * jnp.sin(2 * z_BHWC + t / 300) + ctx


def fake_denoiser_torch(z_BCHW, t, ctx_BLD, gain=0.8):
    t = torch.as_tensor(t).float()
    ctx = (ctx_BLD.mean(dim=1) @ torch.from_numpy(W_CTX))[:, :, None, None]
    return gain * torch.tanh(z_BCHW * (1 + t / 1000)) + 0.3 * torch.sin(2 * z_BCHW + t / 300) + ctx


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((B, H, W, C)).astype(np.float32)
    cond = rng.standard_normal((B, L, D)).astype(np.float32)
    uncond = rng.standard_normal((1, L, D)).astype(np.float32)
    return z, cond, uncond


def diffusers_pipeline_loop(schedule, num_steps, z_BHWC, cond_BLD, uncond_1LD, guidance_scale):
    """The denoising loop of StableDiffusionPipeline.__call__, with DDIM and our fake UNet."""
    scheduler = DDIMScheduler.from_config(schedule.to_diffusers_config())
    scheduler.set_timesteps(num_steps)
    do_cfg = guidance_scale > 1
    latents = torch.from_numpy(z_BHWC).permute(0, 3, 1, 2) * scheduler.init_noise_sigma
    cond = torch.from_numpy(cond_BLD)
    prompt_embeds = torch.cat([torch.from_numpy(uncond_1LD).expand_as(cond), cond]) if do_cfg \
        else cond
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_cfg else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = fake_denoiser_torch(latent_model_input, t, prompt_embeds)
        if do_cfg:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, eta=0.0).prev_sample
    return latents.permute(0, 2, 3, 1).numpy()


def test_ddim_needs_no_initial_scaling():
    scheduler = DDIMScheduler.from_config(NoiseSchedule().to_diffusers_config())
    assert scheduler.init_noise_sigma == 1.0
    z = torch.randn(1, 4, 2, 2)
    assert scheduler.scale_model_input(z, 999) is z


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,set_alpha_to_one,clip_sample",
                         [("leading", False, False), ("trailing", True, False),
                          ("leading", False, True)])
def test_one_step_matches_scheduler_step(prediction_type, spacing, set_alpha_to_one, clip_sample):
    schedule = NoiseSchedule(prediction_type=prediction_type, timestep_spacing=spacing,
                             set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample)
    scheduler = DDIMScheduler.from_config(schedule.to_diffusers_config())
    scheduler.set_timesteps(10)
    plan = ddim_plan(schedule, 10)
    rng = np.random.default_rng(1)
    for k in (0, 4, 9):  # first, middle, last (final alpha) step
        z = rng.standard_normal((B, C, H, W)).astype(np.float32) * 1.5
        out = rng.standard_normal((B, C, H, W)).astype(np.float32) * 1.5
        t = int(scheduler.timesteps[k])
        assert t == plan.timesteps[k]
        want = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(z))
        got = ddim.ddim_step(jnp.asarray(out), jnp.asarray(z), plan.abar[k], plan.abar_prev[k],
                             prediction_type=prediction_type, clip_range=schedule.clip_range)
        scale = np.abs(want.prev_sample.numpy()).max()
        np.testing.assert_allclose(np.asarray(got), want.prev_sample.numpy(), rtol=0,
                                   atol=2e-6 * scale)
        x_hat, _ = to_x_eps(jnp.asarray(out), jnp.asarray(z), *alpha_sigma(plan.abar[k]),
                            prediction_type)
        if clip_sample:
            x_hat = jnp.clip(x_hat, -1, 1)
        np.testing.assert_allclose(np.asarray(x_hat), want.pred_original_sample.numpy(), rtol=0,
                                   atol=2e-6 * np.abs(want.pred_original_sample.numpy()).max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_whole_loop_matches_diffusers_pipeline_loop(prediction_type, spacing, guidance_scale):
    schedule = NoiseSchedule(prediction_type=prediction_type, timestep_spacing=spacing)
    z, cond, uncond = inputs()
    want = diffusers_pipeline_loop(schedule, 10, z, cond, uncond, guidance_scale)
    denoise = functools.partial(fake_denoiser_jax, jnp.float32(0.8))
    got = ddim.sample(denoise, z, cond, uncond, schedule=schedule, num_steps=10,
                      guidance_scale=guidance_scale)
    rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    print(f"max |ours - diffusers| / max |diffusers| = {rel:.2e}")
    assert rel < 1e-5, rel


@pytest.mark.parametrize("spacing,num_steps", [("leading", 50), ("linspace", 16)])
def test_long_loop_matches_diffusers_pipeline_loop(spacing, num_steps):
    schedule = NoiseSchedule(timestep_spacing=spacing)
    z, cond, uncond = inputs(3)
    want = diffusers_pipeline_loop(schedule, num_steps, z, cond, uncond, 7.5)
    got = ddim.sample(functools.partial(fake_denoiser_jax, 0.8), z, cond, uncond,
                      schedule=schedule, num_steps=num_steps, guidance_scale=7.5)
    rel = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    print(f"max |ours - diffusers| / max |diffusers| = {rel:.2e}")
    assert rel < 1e-5, rel


def test_compiles_once_across_guidance_scales_params_and_grids():
    traces = []

    def counting_denoiser(gain, z_BHWC, t_B, ctx_BLD):
        traces.append(z_BHWC.shape[0])
        return fake_denoiser_jax(gain, z_BHWC, t_B, ctx_BLD)

    z, cond, uncond = inputs()
    leading, trailing = NoiseSchedule(), NoiseSchedule(timestep_spacing="trailing")
    outs = [ddim.sample(functools.partial(counting_denoiser, jnp.float32(gain)), z, cond, uncond,
                        schedule=schedule, num_steps=8, guidance_scale=w)
            for gain, schedule, w in [(0.8, leading, 7.5), (0.8, leading, 3.0),
                                      (0.5, leading, 7.5), (0.8, trailing, 7.5)]]
    assert traces == [2 * B], traces  # one trace, with the 2B guidance batch
    assert all(np.abs(np.asarray(a - b)).max() > 1e-3 for a, b in zip(outs, outs[1:]))
    ddim.sample(functools.partial(counting_denoiser, jnp.float32(0.8)), z, cond, None,
                schedule=leading, num_steps=8, guidance_scale=1)
    assert traces == [2 * B, B], traces  # unguided: another program, with a batch of B


def test_per_example_guidance_and_grids_match_separate_runs():
    schedule = NoiseSchedule()
    z, cond, uncond = inputs(4)
    uncond_B = np.broadcast_to(uncond, cond.shape)
    grids = [np.array([999, 666, 333]), np.array([801, 401, 1])]
    plans = [plan_from_timesteps(schedule, g) for g in grids]
    ws = [2.0, 9.0]
    separate = [ddim.ddim_loop(functools.partial(fake_denoiser_jax, 0.8), z[i:i + 1], cond[i:i + 1],
                               uncond_B[i:i + 1], p.timesteps, p.abar, p.abar_prev, w,
                               prediction_type="epsilon")
                for i, (p, w) in enumerate(zip(plans, ws))]
    stack = [np.stack([p[j] for p in plans], axis=1) for j in (0, 2, 3)]  # (K, B)
    together = jax.jit(functools.partial(ddim.ddim_loop, functools.partial(fake_denoiser_jax, 0.8),
                                         prediction_type="epsilon"))(
        z, cond, uncond_B, *stack, jnp.asarray(ws))
    separate = np.concatenate(separate)
    np.testing.assert_allclose(np.asarray(together), separate, rtol=0,
                               atol=1e-6 * np.abs(separate).max())


def test_teacher_two_steps_equal_a_two_step_plan():
    # What step distillation does by hand: t -> t' -> t'' with ddim_step and guided outputs.
    schedule = NoiseSchedule(prediction_type="v_prediction")
    z, cond, uncond = inputs(5)
    uncond_B = np.broadcast_to(uncond, cond.shape)
    denoise = functools.partial(fake_denoiser_jax, 0.8)
    plan = plan_from_timesteps(schedule, [701, 651, 601])
    zk = jnp.asarray(z)
    for k in range(2):
        t_B = jnp.full((B,), plan.timesteps[k])
        out = guided_output(denoise, zk, t_B, jnp.asarray(cond), jnp.asarray(uncond_B), 5.0)
        zk = ddim.ddim_step(out, zk, plan.abar[k], plan.abar_prev[k],
                            prediction_type="v_prediction")
    two = [a[:2] for a in plan[:1] + plan[2:]]
    loop = ddim.ddim_loop(denoise, z, cond, uncond_B, *two, 5.0, prediction_type="v_prediction")
    np.testing.assert_allclose(np.asarray(zk), np.asarray(loop), rtol=0, atol=1e-6)


def test_cfg_combine_closed_form():
    u, c = jnp.array([[1.0, 2.0]]), jnp.array([[3.0, -1.0]])
    np.testing.assert_allclose(cfg_combine(u, c, 7.5), [[1 + 7.5 * 2, 2 + 7.5 * -3]])
    np.testing.assert_allclose(cfg_combine(u, c, 1.0), c)
    np.testing.assert_allclose(cfg_combine(u, c, 0.0), u)


class TinyDenoiser(nn.Module):
    """A Flax module called as the UNet will be: apply({'params': p}, z, t, ctx)."""

    @nn.compact
    def __call__(self, z_BHWC, t_B, ctx_BLD):
        temb = jnp.sin(t_B.astype(jnp.float32) / 100)[:, None, None, None]
        ctx = nn.Dense(z_BHWC.shape[-1])(ctx_BLD.mean(axis=1))[:, None, None, :]
        return nn.Dense(z_BHWC.shape[-1])(z_BHWC) + temb + ctx


def test_flax_module_partial_matches_an_eager_python_loop():
    z, cond, uncond = inputs(6)
    module = TinyDenoiser()
    params = module.init(jax.random.key(0), jnp.asarray(z), jnp.zeros((B,), jnp.int32),
                         jnp.asarray(cond))["params"]
    schedule = NoiseSchedule()
    got = ddim.sample(functools.partial(module.apply, {"params": params}), z, cond, uncond,
                      schedule=schedule, num_steps=4, guidance_scale=7.5)
    plan = ddim_plan(schedule, 4)
    apply = jax.jit(module.apply)  # per call, not the loop: the reference stays a Python loop
    zk = jnp.asarray(z)
    for t, abar, abar_prev in zip(plan.timesteps, plan.abar, plan.abar_prev):
        t_B = jnp.full((B,), t)
        u = apply({"params": params}, zk, t_B, jnp.broadcast_to(uncond, cond.shape))
        c = apply({"params": params}, zk, t_B, jnp.asarray(cond))
        zk = ddim.ddim_step(u + 7.5 * (c - u), zk, abar, abar_prev, prediction_type="epsilon")
    np.testing.assert_allclose(np.asarray(got), np.asarray(zk), rtol=0,
                               atol=1e-5 * np.abs(np.asarray(zk)).max())


def test_bad_inputs_give_clear_errors():
    z, cond, uncond = inputs()
    denoise = functools.partial(fake_denoiser_jax, 0.8)
    kw = dict(schedule=NoiseSchedule(), num_steps=4)
    with pytest.raises(ValueError, match="needs context_uncond_BLD"):
        ddim.sample(denoise, z, cond, None, guidance_scale=7.5, **kw)
    with pytest.raises(ValueError, match=r"context_cond_BLD must be \(B=2, L, D\)"):
        ddim.sample(denoise, z, cond[:1], uncond, guidance_scale=7.5, **kw)
    with pytest.raises(ValueError, match="context_uncond_BLD must be"):
        ddim.sample(denoise, z, cond, uncond[:, :2], guidance_scale=7.5, **kw)
    with pytest.raises(ValueError, match=r"latents_BHWC must be a float \(B, H, W, C\)"):
        ddim.sample(denoise, z[0], cond, uncond, guidance_scale=7.5, **kw)
    with pytest.raises(ValueError, match="bound argument .*'train'.* is bool"):
        ddim.sample(functools.partial(denoise, train=False), z, cond, uncond, guidance_scale=7.5,
                    **kw)
    with pytest.raises(ValueError, match="num_steps must be an integer"):
        ddim.sample(denoise, z, cond, uncond, guidance_scale=7.5, schedule=NoiseSchedule(),
                    num_steps=0)
