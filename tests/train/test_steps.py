"""Train steps, optimizer and state against closed-form references (one CPU device)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models.vae import VAE, VAESpec
from snapjax.train import optim, steps
from snapjax.train.state import init_state


def _linear_loss(params, frozen, batch, rng):
    del frozen, rng
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean(jnp.square(pred - batch["y"])), {}


def _linear_setup():
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(16, 5)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
    init = lambda key: {"w": jax.random.normal(key, (5, 3)), "b": jnp.zeros((3,))}  # noqa: E731
    return batch, init


@pytest.mark.parametrize("microbatches", [2, 4])
def test_grad_accumulation_equals_full_batch(microbatches):
    batch, init = _linear_setup()
    tx = optax.sgd(0.1)
    state = init_state(init, tx, jax.random.key(0))
    run = lambda a: steps.train_step(state, batch, jax.random.key(1), {},  # noqa: E731
                                     loss_fn=_linear_loss, optimizer=tx, ema_decay=0.9,
                                     microbatches=a)
    full, m_full = jax.jit(lambda: run(1))()
    acc, m_acc = jax.jit(lambda: run(microbatches))()
    # Reference: plain SGD on the closed-form gradient of the mean squared error.
    x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
    w, b = np.asarray(state.params["w"], np.float64), np.asarray(state.params["b"], np.float64)
    r = x @ w + b - y
    grad_w, grad_b = 2 * x.T @ r / r.size, 2 * r.sum(0) / r.size
    for out in (full, acc):
        np.testing.assert_allclose(out.params["w"], w - 0.1 * grad_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.params["b"], b - 0.1 * grad_b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m_acc["loss"], np.mean(r ** 2), rtol=1e-5)
    np.testing.assert_allclose(m_full["loss"], np.mean(r ** 2), rtol=1e-5)
    # EMA after one update: 0.9 * initial + 0.1 * new params.
    np.testing.assert_allclose(acc.ema_params["w"], 0.9 * w + 0.1 * np.asarray(acc.params["w"]),
                               rtol=1e-5, atol=1e-6)
    assert int(acc.step) == 1


def test_learning_rate_schedule_closed_form():
    cfg = optim.OptimConfig(lr=2.0, warmup_steps=10, schedule="cosine", end_lr_factor=0.1)
    sched = optim.learning_rate(cfg, total_steps=110)
    for step in (0, 5, 10, 60, 110):
        if step <= 10:
            want = 2.0 * step / 10
        else:
            frac = (step - 10) / 100
            want = 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        assert abs(float(sched(step)) - want) < 1e-5, (step, float(sched(step)), want)
    const = optim.learning_rate(optim.OptimConfig(lr=3.0, warmup_steps=0, schedule="constant"), 5)
    assert float(const(4)) == 3.0
    with pytest.raises(ValueError, match="opt.schedule='linear'"):
        optim.OptimConfig(schedule="linear")


def test_weight_decay_skips_vectors_and_clipping_applies():
    cfg = optim.OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5,
                            grad_clip_norm=1.0)
    tx = optim.make_optimizer(cfg, 10)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    # Zero gradient: only decoupled weight decay moves the matrix (-lr * wd * w); not the bias.
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.0)


def _abar_reference(n=1000):
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), n, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def test_min_snr_weight_closed_form():
    abar = jnp.asarray([0.999, 0.5, 0.01])
    snr = np.asarray(abar) / (1 - np.asarray(abar))
    got_eps = steps.min_snr_weight(abar, 5.0, "epsilon")
    got_v = steps.min_snr_weight(abar, 5.0, "v_prediction")
    np.testing.assert_allclose(got_eps, np.minimum(snr, 5) / snr, rtol=1e-5)
    np.testing.assert_allclose(got_v, np.minimum(snr, 5) / (snr + 1), rtol=1e-5)
    np.testing.assert_allclose(steps.min_snr_weight(abar, None, "epsilon"), 1.0)


class _PixelLinear(nn.Module):
    """A UNet stand-in: a per-pixel linear map of z_t that ignores t and the context."""

    @nn.compact
    def __call__(self, z, t, ctx):
        return nn.Dense(z.shape[-1])(z)


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", None), ("v_prediction", 5.0)])
def test_diffusion_loss_matches_numpy(prediction_type, gamma):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    unet = _PixelLinear()
    x = jax.random.normal(jax.random.key(3), (6, 4, 4, 4))
    params = {"unet": unet.init(jax.random.key(0), x, None, None)["params"]}
    batch = {"latent": x, "context": jnp.ones((6, 3, 8))}
    inputs = functools.partial(steps.cached_inputs, caption_dropout=0.1)
    rng = jax.random.key(7)
    loss, _ = steps.diffusion_loss(params, {"empty_context": jnp.zeros((1, 3, 8))}, batch, rng,
                                   unet=unet, inputs=inputs, schedule=schedule,
                                   min_snr_gamma=gamma)
    # Same random draws, math redone in numpy (float64).
    _, r_t, r_eps = jax.random.split(rng, 3)
    t = np.asarray(jax.random.randint(r_t, (6,), 0, 1000))
    eps = np.asarray(jax.random.normal(r_eps, x.shape), np.float64)
    abar = _abar_reference()[t][:, None, None, None]
    xs = np.asarray(x, np.float64)
    z = np.sqrt(abar) * xs + np.sqrt(1 - abar) * eps
    w = np.asarray(params["unet"]["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["unet"]["Dense_0"]["bias"], np.float64)
    pred = z @ w + b
    target = eps if prediction_type == "epsilon" else np.sqrt(abar) * eps - np.sqrt(1 - abar) * xs
    per = np.mean((pred - target) ** 2, axis=(1, 2, 3))
    snr = abar[:, 0, 0, 0] / (1 - abar[:, 0, 0, 0])
    weight = np.ones(6) if gamma is None else np.minimum(snr, gamma) / (snr + 1)
    np.testing.assert_allclose(float(loss), np.mean(weight * per), rtol=2e-5)


def test_caption_dropout_swaps_in_the_empty_context():
    batch = {"latent": jnp.zeros((5, 2, 2, 4)), "context": jnp.ones((5, 3, 8))}
    frozen = {"empty_context": jnp.full((1, 3, 8), -2.0)}
    _, all_dropped = steps.cached_inputs(None, frozen, batch, jax.random.key(0), caption_dropout=1.0)
    _, none_dropped = steps.cached_inputs(None, frozen, batch, jax.random.key(0), caption_dropout=0.0)
    np.testing.assert_array_equal(all_dropped, -2.0)
    np.testing.assert_array_equal(none_dropped, 1.0)
    _, some = steps.cached_inputs(None, frozen, {**batch, "context": jnp.ones((4000, 1, 1))},
                                  jax.random.key(1), caption_dropout=0.1)
    rate = float(jnp.mean(some[:, 0, 0] == -2.0))
    assert abs(rate - 0.1) < 0.02, rate  # 4000 draws: 0.1 +- 3 sigma (0.014)


def test_vae_loss_closed_form_kl_and_recon():
    spec = VAESpec(encoder_channels=(8,), decoder_channels=(8,), layers_per_block=1,
                   norm_groups=4, mid_attention=False)
    vae = VAE(spec)
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1, maxval=1)
    # Random params straight from the shapes (compiling Flax's init costs a minute on CPU), and
    # everything jitted: op-by-op execution of a conv net is slow too.
    shapes = jax.eval_shape(vae.init, jax.random.key(1), x)["params"]
    gen = np.random.default_rng(1)
    params = {"vae": jax.tree.map(
        lambda s: jnp.asarray(gen.normal(size=s.shape) * 0.2, jnp.float32), shapes)}
    rng = jax.random.key(2)
    loss, m = jax.jit(functools.partial(steps.vae_loss, vae=vae, kl_weight=0.5, recon="l2"))(
        params, {}, {"image": x}, rng)
    mean, logvar = jax.jit(functools.partial(vae.apply, method="encode"))(
        {"params": params["vae"]}, x)
    mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
    # KL(N(mu, s^2) || N(0, 1)) per element = (mu^2 + s^2 - 1 - log s^2) / 2.
    kl = np.mean(0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar))
    z = mean + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(rng, mean.shape))
    rec = np.asarray(jax.jit(functools.partial(vae.apply, method="decode"))(
        {"params": params["vae"]}, jnp.asarray(z, jnp.float32)), np.float64)
    mse = np.mean((rec - np.asarray(x)) ** 2)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-4)
    np.testing.assert_allclose(float(m["recon"]), mse, rtol=1e-4)
    np.testing.assert_allclose(float(loss), mse + 0.5 * kl, rtol=1e-4)
    # uint8 images are the same images: [0, 255] -> [-1, 1] on device.
    x8 = np.round((np.asarray(x) + 1) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(steps.model_range(jnp.asarray(x8)), x8 / 127.5 - 1, atol=1e-6)
