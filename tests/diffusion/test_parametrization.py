"""eps / v / x conversions: closed-form identities; diffusers' get_velocity as the v reference."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from snapjax.diffusion import parametrization as P
from snapjax.diffusion.schedule import NoiseSchedule, alpha_sigma, alphas_cumprod


def draws(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 4, 2))
    eps = rng.standard_normal((3, 4, 4, 2))
    abar = np.array([0.999, 0.5, 0.004])  # near-clean, middle, near-pure-noise, one per example
    alpha, sigma = alpha_sigma(abar)
    return x, eps, alpha, sigma, P.add_noise(x, eps, alpha, sigma)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_round_trip_recovers_x_and_eps(prediction_type):
    x, eps, alpha, sigma, z = draws()
    pred = P.from_x_eps(x, eps, alpha, sigma, prediction_type)
    x_hat, eps_hat = P.to_x_eps(pred, z, alpha, sigma, prediction_type)
    # float64 throughout: only rounding, amplified by 1/alpha or 1/sigma near the ends (<= 16x).
    np.testing.assert_allclose(x_hat, x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(eps_hat, eps, rtol=0, atol=1e-12)


def test_v_identities_of_the_design():
    x, eps, alpha, sigma, z = draws(1)
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    v = P.v_target(x, eps, alpha, sigma)
    np.testing.assert_allclose(v, a * eps - s * x, rtol=0, atol=1e-14)
    np.testing.assert_allclose(a * z - s * v, x, rtol=0, atol=1e-12)      # x = alpha z - sigma v
    np.testing.assert_allclose(s * z + a * v, eps, rtol=0, atol=1e-12)    # eps = sigma z + alpha v
    np.testing.assert_allclose(P.convert(eps, z, alpha, sigma, "epsilon", "v_prediction"), v,
                               rtol=0, atol=1e-12)


def test_v_target_matches_diffusers_get_velocity():
    schedule = NoiseSchedule()
    ref = DDPMScheduler(beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                        beta_schedule=schedule.beta_schedule)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    eps = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    t = np.array([0, 500, 999])
    want = ref.get_velocity(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t))
    alpha, sigma = alpha_sigma(jnp.asarray(alphas_cumprod(schedule)[t]))
    got = P.v_target(jnp.asarray(x), jnp.asarray(eps), alpha, sigma)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=1e-6)
    noisy = ref.add_noise(torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(t))
    np.testing.assert_allclose(np.asarray(P.add_noise(jnp.asarray(x), jnp.asarray(eps), alpha,
                                                      sigma)), noisy.numpy(), rtol=0, atol=1e-6)


def test_unknown_prediction_type():
    x, eps, alpha, sigma, z = draws()
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        P.to_x_eps(eps, z, alpha, sigma, "flow")
