"""The UNet diffusion step on 8 fake CPU devices (data=2 x fsdp=4) against one device.

Same init (params are created sharded; partitionable threefry makes them identical to the
single-device ones), same batch, same per-step randomness: two steps must give the same losses
(rtol 1e-5) and parameters to within 5% of the two updates' size (max |diff| < 1e-5 with
lr 1e-4; weights are O(0.1-1)). XLA sums gradients in another order across shards, and Adam
divides by sqrt(v): for a gradient entry near zero a rounding-level difference can change the
update by a good fraction of lr (measured here: 3.5e-6). Every parameter over the size
threshold, and its Adam moments, must really be split (each device holds a fraction).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from snapjax import sharding
    from snapjax.sharding import MeshConfig
    from snapjax.diffusion.schedule import NoiseSchedule
    from snapjax.models.unet import UNet
    from snapjax.models.unet_spec import UNetSpec
    from snapjax.train import optim, state as state_lib, steps

    spec = UNetSpec(block_channels=(16, 32), down=(("RA",), ("R",)), up=(("RA", "RA"), ("R", "R")),
                    mid="", num_heads=(2, 2), context_dim=16, transformer_layers=(1, 1),
                    norm_groups=8)
    unet = UNet(spec)
    BLOCK_MASK = None
    # SETUP
    opt = optim.make_optimizer(optim.OptimConfig(lr=1e-4, warmup_steps=0), 10)
    init = lambda k: {"unet": unet.init(k, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                                        jnp.zeros((1, 1, 16)))["params"]}
    step = functools.partial(
        steps.unet_diffusion_step, unet=unet, schedule=NoiseSchedule(prediction_type="v_prediction"),
        inputs=functools.partial(steps.cached_inputs, caption_dropout=0.1), optimizer=opt,
        ema_decay=0.9, min_snr_gamma=5.0, block_mask=BLOCK_MASK, microbatches=2)
    gen = np.random.default_rng(0)
    batch_np = {"latent": gen.normal(size=(16, 8, 8, 4)).astype(np.float32),
                "context": gen.normal(size=(16, 6, 16)).astype(np.float32)}
    frozen_np = {"empty_context": np.zeros((1, 6, 16), np.float32)}
    # STEP

    def run(cfg, devices):
        mesh = sharding.make_mesh(cfg, devices)
        state, shardings = state_lib.create_sharded_state(init, opt, jax.random.key(0), mesh, cfg)
        initial = jax.tree.map(np.asarray, state.params)
        repl = sharding.replicated(mesh)
        frozen_sh = sharding.tree_shardings(frozen_np, mesh, cfg)
        batch = sharding.global_batch(batch_np, mesh, cfg)
        f = jax.jit(step, in_shardings=(shardings, {k: sharding.batch_sharding(mesh, cfg) for k in batch},
                                        repl, frozen_sh),
                    out_shardings=(shardings, repl), donate_argnums=0)
        frozen = jax.device_put(frozen_np, frozen_sh)
        losses, metrics = [], []
        for _ in range(2):
            state, m = f(state, batch, jax.device_put(jax.random.key(1), repl), frozen)
            losses.append(float(m["loss"]))
            metrics.append({k: float(v) for k, v in m.items()})
        return initial, losses, state, metrics

    one_init, one_losses, one, one_metrics = run(MeshConfig(data=1), jax.devices()[:1])
    cfg = MeshConfig(data=2, fsdp=4, min_shard_size=1024)
    many_init, many_losses, many, many_metrics = run(cfg, jax.devices())

    def flat(tree):
        return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    report = {"one_losses": one_losses, "many_losses": many_losses,
              "one_metrics": one_metrics, "many_metrics": many_metrics,
              "init_max_diff": max(float(np.abs(a - b).max()) for a, b in
                                   zip(jax.tree.leaves(one_init), jax.tree.leaves(many_init))),
              "param_max_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                                    zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params))),
              "big": {}, "small_sharded": []}
    mu = flat(many.opt_state)
    for name, leaf in flat(many.params).items():
        fraction = leaf.addressable_shards[0].data.size / leaf.size
        if leaf.size >= cfg.min_shard_size:
            moments = [v for k, v in mu.items() if k.endswith(name) and v.shape == leaf.shape]
            report["big"][name] = [fraction, str(leaf.sharding.spec),
                                   [m.addressable_shards[0].data.size / m.size for m in moments]]
        elif fraction < 1:
            report["small_sharded"].append(name)
    print("REPORT" + json.dumps(report))
""")


def run_sharded(setup: str = "", step: str = "") -> dict:
    """The script's report; ``setup`` is Python run after ``spec`` and ``unet`` are defined
    (it may set BLOCK_MASK, the step's robust-training mask sampler); ``step`` runs after the
    step, batch and frozen inputs are defined (it may replace them: another objective's step)."""
    script = SCRIPT.replace("# SETUP\n", textwrap.dedent(setup) + "\n")
    script = script.replace("# STEP\n", textwrap.dedent(step) + "\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(s for s in out.stdout.splitlines() if s.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


def assert_sharded_matches_single_device(report: dict) -> None:
    assert report["init_max_diff"] == 0.0  # created sharded, bit-identical to one device
    np.testing.assert_allclose(report["many_losses"], report["one_losses"], rtol=1e-5)
    assert report["param_max_diff"] < 1e-5, report["param_max_diff"]

    big = report["big"]
    assert len(big) >= 10, sorted(big)
    for name, (fraction, spec, moment_fractions) in big.items():
        assert fraction <= 0.25, f"{name} {spec}: each device holds {fraction:.2f} of it"
        assert moment_fractions and all(f <= 0.25 for f in moment_fractions), (name, moment_fractions)
    assert report["small_sharded"] == []


def test_sharded_step_matches_single_device_and_shards_big_params():
    assert_sharded_matches_single_device(run_sharded())
