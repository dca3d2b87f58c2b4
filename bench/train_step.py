"""Training-step throughput and MFU of the SD-v1.5 UNet (64x64 latents = 512x512 images).

    python bench/train_step.py                       # sd15, bf16, batch 8..256 on all devices
    python bench/train_step.py --batch-sizes 32,64 --attention cudnn --out bench.json
    python bench/train_step.py --batch-sizes 64,128,256 --attention cudnn --remat
    python bench/train_step.py --smoke               # tiny UNet on CPU: checks the script runs

The step is the one ``snapjax train`` runs for configs/sd15_finetune.py (prepared latents and
77x768 contexts, v-prediction, AdamW with clipping, EMA), jitted with the same shardings over a
(data=-1) mesh of the local devices, params float32 and compute in ``--dtype``. Each batch size
is compiled, warmed up and timed over ``--steps`` steps; sizes that run out of memory are
reported as OOM and larger ones are not tried.

Model FLOPs per image are 3x the forward pass (forward + backward), the forward counted by XLA
for a batch-1 UNet call (803 GFLOP for SD-v1.5 at 64x64, DESIGN.md section 9); MFU = model
FLOP/s per device / the device's dense bf16 peak (snapjax.train.metrics.PEAK_TFLOPS). XLA's own
count for the whole step (optimizer included) is reported too.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd15", help="UNet preset (sd15, tiny)")
    p.add_argument("--batch-sizes", default="8,16,32,64,128,256",
                   help="global batch sizes, comma-separated, ascending")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--attention", default=None, help="jax.nn.dot_product_attention "
                   "implementation: None (XLA) or cudnn")
    p.add_argument("--remat", action="store_true",
                   help="recompute each UNet block in the backward pass (diffusion.unet_remat): "
                        "larger batches fit; MFU still counts 3x the forward")
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp size (data = the rest)")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny UNet, 8x8 latents, batches 2,4, float32, 2 steps (CPU check)")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.latent, args.context_len, args.dtype = "tiny", 8, 8, "float32"
        args.batch_sizes, args.steps, args.warmup = "2,4", 2, 1
    return args


def _is_oom(e: Exception) -> bool:
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from snapjax import sharding
    from snapjax.diffusion.schedule import NoiseSchedule
    from snapjax.models.unet import UNet
    from snapjax.models.unet_spec import preset
    from snapjax.sharding import MeshConfig
    from snapjax.train import metrics, optim, state as state_lib, steps

    spec = preset(args.preset)
    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.dtype]
    unet = UNet(spec, dtype, attention_impl=args.attention, remat=args.remat)
    mesh_cfg = MeshConfig(data=-1, fsdp=args.fsdp)
    mesh = sharding.make_mesh(mesh_cfg, jax.local_devices())
    optimizer = optim.make_optimizer(optim.OptimConfig(lr=1e-5, warmup_steps=0), 1000)
    step_fn = functools.partial(
        steps.unet_diffusion_step, unet=unet,
        schedule=NoiseSchedule(prediction_type="v_prediction"),
        inputs=functools.partial(steps.cached_inputs, caption_dropout=0.1), optimizer=optimizer,
        ema_decay=0.9999)

    def init_params(rng):
        z = jnp.zeros((1, 8, 8, spec.in_channels))
        return {"unet": unet.init(rng, z, jnp.zeros((1,), jnp.int32),
                                  jnp.zeros((1, 1, spec.context_dim)))["params"]}

    # Model FLOPs: XLA's count of one batch-1 forward pass, times 3 for forward + backward.
    fwd = jax.jit(lambda p, z, t, c: unet.apply({"params": p}, z, t, c)).lower(
        jax.eval_shape(init_params, jax.random.key(0))["unet"],
        jax.ShapeDtypeStruct((1, args.latent, args.latent, spec.in_channels), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
        jax.ShapeDtypeStruct((1, args.context_len, spec.context_dim), jnp.float32)).compile()
    fwd_flops = metrics.compiled_flops(fwd) or float("nan")
    model_flops_per_image = 3 * fwd_flops
    peak = metrics.peak_tflops(jax.local_devices()[0])
    n_dev = mesh.size
    print(f"device: {n_dev} x {jax.local_devices()[0].device_kind}; peak bf16 "
          f"{peak or 'unknown'} TFLOP/s per device; UNet {args.preset} forward "
          f"{fwd_flops / 1e9:.4g} GFLOP/image at {args.latent}x{args.latent}; "
          f"compute {args.dtype}, attention {args.attention or 'xla'}, "
          f"remat {'on' if args.remat else 'off'}", flush=True)

    repl = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh, mesh_cfg)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        split = sharding.batch_split(mesh, mesh_cfg)
        if batch % split:
            print(f"batch {batch}: skipped (not divisible by {split})")
            continue
        row = {"batch": batch}
        try:
            state, state_sh = state_lib.create_sharded_state(
                lambda k: init_params(k), optimizer, jax.random.key(0), mesh, mesh_cfg)
            gen = np.random.default_rng(0)
            data = sharding.global_batch({
                "latent": gen.standard_normal((batch, args.latent, args.latent,
                                               spec.in_channels), np.float32),
                "context": gen.standard_normal((batch, args.context_len, spec.context_dim),
                                               np.float32)}, mesh, mesh_cfg)
            frozen = {"empty_context": jax.device_put(
                np.zeros((1, args.context_len, spec.context_dim), np.float32), repl)}
            jitted = jax.jit(step_fn, in_shardings=(state_sh, {k: batch_sh for k in data}, repl,
                                                    {"empty_context": repl}),
                             out_shardings=(state_sh, repl), donate_argnums=(0,))
            rng = jax.device_put(jax.random.key(1), repl)
            t0 = time.perf_counter()
            compiled = jitted.lower(state, data, rng, frozen).compile()
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            xla_flops = metrics.compiled_flops(compiled)
            for _ in range(args.warmup):
                state, m = compiled(state, data, rng, frozen)
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = compiled(state, data, rng, frozen)
            jax.block_until_ready((state, m))
            sec = (time.perf_counter() - t0) / args.steps
            model_tflops = model_flops_per_image * batch / sec / n_dev / 1e12
            row.update(ms_per_step=round(1e3 * sec, 2), images_per_s=round(batch / sec, 1),
                       model_tflops_per_device=round(model_tflops, 3),
                       xla_tflops_per_device=(round(xla_flops / sec / 1e12, 3) if xla_flops
                                              else None),
                       mfu=round(model_tflops / peak, 3) if peak else None,
                       loss=float(m["loss"]))
            mem = compiled.memory_analysis()
            if mem is not None:
                row["temp_gib"] = round(mem.temp_size_in_bytes / 2 ** 30, 2)
            del state
        except Exception as e:  # noqa: BLE001 - an OOM ends the sweep, anything else is a bug
            if not _is_oom(e):
                raise
            row["oom"] = True
        results.append(row)
        print(json.dumps(row), flush=True)
        if row.get("oom"):
            break
    fits = [r for r in results if not r.get("oom")]
    if fits:
        best = fits[-1]
        print(f"largest batch that fits: {best['batch']}: {best['images_per_s']} images/s, "
              f"{best['model_tflops_per_device']} model TFLOP/s per device, MFU "
              f"{best['mfu'] if best['mfu'] is not None else 'n/a (unknown peak)'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": jax.local_devices()[0].device_kind,
                       "devices": n_dev, "forward_gflop_per_image": fwd_flops / 1e9,
                       "results": results}, f, indent=1)
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
