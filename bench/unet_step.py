"""Time one UNet forward: snapjax (JAX, bf16 compute) against diffusers (PyTorch, fp16).

GPU (the numbers to report):
  python bench/unet_step.py --batch-sizes 2 16 --resolution 512 --out unet_step.json
CPU smoke check (tiny UNet, any machine):
  python bench/unet_step.py --preset tiny --resolution 64 --batch-sizes 1 --iters 2 \
      --warmup 1 --device-check off

What is timed: ``--iters`` back-to-back forwards of an already compiled / warmed-up model, ended
by one device sync (JAX: ``block_until_ready``; PyTorch: CUDA events, or a wall clock and
``torch.cuda.synchronize`` where there is no CUDA), divided by ``--iters``; the median of
``--repeats`` such loops is reported. Not timed: weight creation, the one-time cast of the JAX
parameters from float32 to the compute dtype, compilation (reported separately for JAX) and
torch.compile's autotuning.

TFLOP/s uses 803 GFLOP per 512x512 SD-v1.5 forward at batch 1 (DESIGN.md), times the batch; it
is only reported for the sd15 preset at 512x512.

Attention: ``jax.nn.dot_product_attention(implementation=None)`` is XLA's unfused attention
(it materialises the B N L L scores in float32); ``--jax-attention cudnn`` asks for cuDNN's fused
kernel, which needs bf16/fp16 and a head width that is a multiple of 8 and at most 128 (256 on
Hopper). SD-v1.5's head widths are 40, 80 and 160, so 160 only fuses on Hopper (H100/H200).
diffusers uses PyTorch's scaled_dot_product_attention (flash attention for fp16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# JAX grabs 75% of GPU memory at start-up by default; PyTorch runs in the same process here.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from snapjax.models.unet import UNet, abstract_unet_params, count_params  # noqa: E402
from snapjax.models.unet_spec import preset  # noqa: E402

GFLOP_SD15_512_B1 = 803.0


def random_params(spec, dtype, seed: int = 0) -> dict:
    """N(0, 1/fan_in) kernels, unit scales, zero biases; made in numpy: no XLA init compile."""
    rs = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            a = rs.standard_normal(x.shape, dtype=np.float32) * np.float32(
                np.prod(x.shape[:-1]) ** -0.5)
        else:
            a = np.full(x.shape, 1.0 if name == "scale" else 0.0, np.float32)
        return jax.device_put(jnp.asarray(a, dtype))  # the one cast, outside the timed region

    return jax.tree_util.tree_map_with_path(leaf, abstract_unet_params(spec))


def time_loop(run, sync, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of (wall time of ``iters`` calls then one sync) / iters, in ms."""
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()
        sync(out)
        means.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(means)


JAX_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


def bench_jax(spec, params, batch: int, latent: int, args, attention: str | None) -> dict:
    dtype = JAX_DTYPES[args.jax_dtype]
    model = UNet(spec, dtype, attention_impl=attention)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (batch, latent, latent, spec.in_channels), dtype)
    t = jnp.full((batch,), 500.0, jnp.float32)
    ctx = jax.random.normal(k2, (batch, args.context_len, spec.context_dim), dtype)
    fwd = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        compiled(params, x, t, ctx).block_until_ready()
    ms = time_loop(lambda: compiled(params, x, t, ctx), lambda o: o.block_until_ready(),
                   args.iters, args.repeats)
    out = np.asarray(compiled(params, x, t, ctx))
    if not np.isfinite(out).all():
        raise RuntimeError("non-finite UNet output")
    return {"ms": ms, "compile_s": compile_s}


def torch_config(spec) -> dict:
    from snapjax.convert.unet import diffusers_config_from_spec
    return {k: v for k, v in diffusers_config_from_spec(spec).items() if not k.startswith("_")}


def bench_torch(spec, batch: int, latent: int, args, compile_mode: str | None) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32  # fp16 convs are slow or missing on CPU
    torch.manual_seed(0)
    with device:
        model = UNet2DConditionModel(**torch_config(spec)).to(dtype).eval()
    x = torch.randn(batch, spec.in_channels, latent, latent, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    ctx = torch.randn(batch, args.context_len, spec.context_dim, device=device, dtype=dtype)
    fwd = model if compile_mode is None else torch.compile(model, mode=compile_mode)

    def run():
        return fwd(x, t, ctx).sample

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(max(args.warmup, 1 if compile_mode else 0)):
            run()
        sync(None)
        warm_s = time.perf_counter() - t0
        if cuda:
            means = []
            for _ in range(args.repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.iters):
                    run()
                end.record()
                torch.cuda.synchronize()
                means.append(start.elapsed_time(end) / args.iters)
            ms = statistics.median(means)
        else:
            ms = time_loop(run, sync, args.iters, args.repeats)
        if not torch.isfinite(run()).all():
            raise RuntimeError("non-finite UNet output")
    del model, fwd
    if cuda:
        torch.cuda.empty_cache()
    return {"ms": ms, "warmup_s": warm_s, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15", help="UNet preset: sd15 or tiny")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 16])
    p.add_argument("--resolution", type=int, default=512, help="image side; latents are 1/8")
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jax-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--jax-attention", nargs="+", default=None,
                   help="implementations to time: xla cudnn (default: both on GPU, xla elsewhere)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--torch-compile", nargs="+", default=["eager", "default"],
                   help="eager and/or torch.compile modes, e.g. default max-autotune-no-cudagraphs")
    p.add_argument("--device-check", choices=["on", "off"], default="on",
                   help="on: refuse to run without a GPU/TPU (no CPU numbers by mistake)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    if args.device_check == "on" and backend == "cpu":
        p.error("JAX sees no accelerator; pass --device-check off for a CPU smoke run")
    spec = preset(args.preset)
    latent = args.resolution // 8
    attentions = args.jax_attention or (["xla", "cudnn"] if backend == "gpu" else ["xla"])

    report = {
        "preset": args.preset, "resolution": args.resolution, "latent": latent,
        "params": count_params(abstract_unet_params(spec)),
        "jax": {"version": jax.__version__, "backend": backend,
                "device": str(jax.devices()[0].device_kind), "dtype": args.jax_dtype},
        "host": platform.node(), "iters": args.iters, "warmup": args.warmup,
        "repeats": args.repeats, "results": [],
    }
    if not args.skip_torch:
        import torch
        report["torch"] = {"version": torch.__version__, "cuda": torch.cuda.is_available(),
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                           else "cpu"}

    def add(framework, variant, batch, fn):
        row = {"framework": framework, "variant": variant, "batch": batch}
        try:
            row.update(fn())
        except Exception as e:  # one failing variant (e.g. cuDNN shape limits) must not end the run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "ms" in row and args.preset == "sd15" and args.resolution == 512:
            row["tflops"] = GFLOP_SD15_512_B1 * batch / row["ms"]  # GFLOP / ms = TFLOP/s
        report["results"].append(row)
        print(_format_row(row), flush=True)

    jax_params = random_params(spec, JAX_DTYPES[args.jax_dtype])
    for batch in args.batch_sizes:
        for attention in attentions:
            impl = None if attention == "xla" else attention
            add("jax", f"{args.jax_dtype} attention={attention}", batch,
                lambda: bench_jax(spec, jax_params, batch, latent, args, impl))
        if not args.skip_torch:
            for mode in args.torch_compile:
                compile_mode = None if mode == "eager" else mode
                add("torch", "eager" if compile_mode is None else f"compile({mode})", batch,
                    lambda: bench_torch(spec, batch, latent, args, compile_mode))

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


def _format_row(row: dict) -> str:
    head = f"{row['framework']:6s} {row['variant']:28s} batch {row['batch']:3d}"
    if "error" in row:
        return f"{head}  FAILED {row['error']}"
    tflops = f"{row['tflops']:7.1f} TFLOP/s" if "tflops" in row else ""
    extra = f"compile {row['compile_s']:.1f}s" if "compile_s" in row else (
        f"warm-up {row['warmup_s']:.1f}s")
    return f"{head}  {row['ms']:9.2f} ms  {tflops}  ({extra})"


if __name__ == "__main__":
    main()
