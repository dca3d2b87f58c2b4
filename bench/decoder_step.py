"""Time one VAE decoder forward, the teacher against its pruned student, in JAX and PyTorch.

CPU (docs/BENCHMARKS.md, "Pruned decoder", has the runs and their exact flags):
  python bench/decoder_step.py --batch-sizes 1 --iters 1 --repeats 3 --warmup 1 \
      --jax-dtype fp32 --device-check off --out decoder_step.json
GPU:
  python bench/decoder_step.py --batch-sizes 1 8 --out decoder_step.json
Smoke check (tiny VAE, any machine):
  python bench/decoder_step.py --preset tiny --resolution 64 --batch-sizes 1 --iters 2 \
      --device-check off

The teacher is ``VAEDecoder(preset)`` with random weights (N(0, 1/fan_in) kernels, unit scales,
zero biases); the student is ``snapjax.models.prune.prune_decoder(teacher, --ratio)``, the same
code path as training's initialisation. Both run in the same process on the same inputs: snapjax
(jitted, ``--jax-dtype`` compute) and the PyTorch mirror (``export.torch.vae.VAEDecoderMirror``,
fp16 on CUDA, fp32 elsewhere, eager, inference mode, NCHW unless ``--torch-channels-last``).

What is timed: ``--iters`` back-to-back forwards of an already compiled / warmed-up model, ended
by one device sync, divided by ``--iters``; the median of ``--repeats`` such loops. Not timed:
weight creation and pruning, the cast to the compute dtype, compilation (reported separately).
The speed-up is teacher ms / student ms per framework and batch size; every loop's time is in
the JSON (``loops_ms``), to show the noise on a shared machine.
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

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # PyTorch shares the device
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from snapjax.flops import matmul_flops  # noqa: E402
from snapjax.models import vae as vae_lib  # noqa: E402
from snapjax.models.prune import prune_decoder  # noqa: E402

JAX_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


def _latent_input(spec, batch: int = 1):
    return jnp.zeros((batch, 1, 1, spec.latent_channels))


def random_decoder_params(spec, seed: int = 0) -> dict:
    """N(0, 1/fan_in) kernels, unit scales, zero biases (float32, numpy: no XLA init compile)."""
    rs = np.random.default_rng(seed)
    abstract = jax.eval_shape(vae_lib.VAEDecoder(spec).init, jax.random.key(0),
                              _latent_input(spec))["params"]

    def leaf(path, x):
        name = path[-1].key
        if name == "kernel":
            return rs.standard_normal(x.shape, dtype=np.float32) * np.float32(
                np.prod(x.shape[:-1]) ** -0.5)
        return np.full(x.shape, 1.0 if name == "scale" else 0.0, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def gflops(spec, params, latent: int) -> float:
    """Matmul/conv GFLOP of one forward at batch 1 (snapjax.flops; traced, nothing runs)."""
    z = jax.ShapeDtypeStruct((1, latent, latent, spec.latent_channels), jnp.float32)
    module = vae_lib.VAEDecoder(spec)
    return matmul_flops(lambda p, z: module.apply({"params": p}, z), params, z) / 1e9


def time_loops(run, sync, iters: int, repeats: int) -> list[float]:
    """(Wall time of ``iters`` calls then one sync) / iters in ms, for each of ``repeats`` loops."""
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()
        sync(out)
        means.append((time.perf_counter() - t0) / iters * 1e3)
    return means


def latents(spec, batch: int, latent: int) -> np.ndarray:
    """Raw latents (NHWC) as the decoder sees them: N(0, 1) / scaling_factor."""
    rs = np.random.default_rng(1)
    z = rs.standard_normal((batch, latent, latent, spec.latent_channels)) / spec.scaling_factor
    return z.astype(np.float32)


def bench_jax(spec, params, z: np.ndarray, args) -> dict:
    dtype = JAX_DTYPES[args.jax_dtype]
    model = vae_lib.VAEDecoder(spec, dtype)
    params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
    x = jax.device_put(jnp.asarray(z, dtype))
    fwd = jax.jit(lambda p, z: model.apply({"params": p}, z))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        compiled(params, x).block_until_ready()
    last = [None]

    def run():
        last[0] = compiled(params, x)
        return last[0]

    loops = time_loops(run, lambda o: o.block_until_ready(), args.iters, args.repeats)
    if not np.isfinite(np.asarray(last[0])).all():  # the last timed output: no extra forward
        raise RuntimeError("non-finite decoder output")
    return {"ms": statistics.median(loops), "loops_ms": loops, "compile_s": compile_s}


def bench_torch(spec, params, z: np.ndarray, args) -> dict:
    import torch

    from export.torch.mirror import mirror_from_params

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32  # fp16 convs are slow or missing on CPU
    layout = torch.channels_last if args.torch_channels_last else torch.contiguous_format
    model = mirror_from_params("vae_decoder", spec, params).to(device, dtype).eval()
    model = model.to(memory_format=layout)
    x = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to(device, dtype, memory_format=layout)

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            model(x)
        sync(None)
        warm_s = time.perf_counter() - t0
        last = [None]

        def run():
            last[0] = model(x)
            return last[0]

        loops = time_loops(run, sync, args.iters, args.repeats)
        if not torch.isfinite(last[0]).all():
            raise RuntimeError("non-finite decoder output")
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {"ms": statistics.median(loops), "loops_ms": loops, "warmup_s": warm_s,
            "dtype": str(dtype).replace("torch.", ""), "device": str(device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15", help="VAE preset: sd15 or tiny")
    p.add_argument("--ratio", type=float, default=0.5, help="the student's width ratio")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--jax-dtype", default="bf16", choices=sorted(JAX_DTYPES))
    p.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    p.add_argument("--torch-channels-last", action="store_true",
                   help="run the mirror in channels_last memory format (NHWC, as XLA does)")
    p.add_argument("--device-check", choices=["on", "off"], default="on",
                   help="on: refuse to run without a GPU/TPU (no CPU numbers by mistake)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.iters < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--iters and --repeats must be >= 1, --warmup >= 0")

    backend = jax.default_backend()
    if args.device_check == "on" and backend == "cpu":
        p.error("JAX sees no accelerator; pass --device-check off for a CPU run")
    teacher = vae_lib.preset(args.preset)
    if args.resolution % teacher.downsample_factor:
        p.error(f"--resolution {args.resolution} is not a multiple of the VAE's "
                f"{teacher.downsample_factor}")
    latent = args.resolution // teacher.downsample_factor
    teacher_params = random_decoder_params(teacher)
    student, student_params = prune_decoder(teacher, teacher_params, args.ratio)
    models = {"teacher": (teacher, teacher_params), "student": (student, student_params)}

    report = {
        "preset": args.preset, "ratio": args.ratio, "resolution": args.resolution,
        "latent": latent, "date": time.strftime("%Y-%m-%d"),
        "decoders": {name: {"decoder_channels": list(spec.decoder_channels),
                            "norm_groups": spec.decoder_groups, "params": count(params),
                            "gflop_batch1": gflops(spec, params, latent)}
                     for name, (spec, params) in models.items()},
        "jax": {"version": jax.__version__, "backend": backend,
                "device": str(jax.devices()[0].device_kind), "dtype": args.jax_dtype},
        "host": platform.node(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "iters": args.iters, "warmup": args.warmup,
        "repeats": args.repeats, "results": [], "speedup": [],
    }
    if "torch" in args.frameworks:
        import torch
        report["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                           "channels_last": args.torch_channels_last,
                           "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                           else "cpu"}
    print(json.dumps({k: report[k] for k in ("preset", "ratio", "resolution", "decoders")},
                     indent=1), flush=True)

    frameworks = {name: {"jax": bench_jax, "torch": bench_torch}[name] for name in args.frameworks}
    for batch in args.batch_sizes:
        z = latents(teacher, batch, latent)
        for framework, fn in frameworks.items():
            ms = {}
            for name, (spec, params) in models.items():
                row = {"framework": framework, "decoder": name, "batch": batch}
                try:
                    row.update(fn(spec, params, z, args))
                    ms[name] = row["ms"]
                except Exception as e:  # e.g. out of memory at a large batch: report, go on
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                report["results"].append(row)
                print(_format_row(row), flush=True)
            if len(ms) == 2:
                speedup = ms["teacher"] / ms["student"]
                report["speedup"].append({"framework": framework, "batch": batch,
                                          "speedup": speedup})
                print(f"{framework:6s} batch {batch:3d}  student is {speedup:.2f}x faster",
                      flush=True)

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return report


def _format_row(row: dict) -> str:
    head = f"{row['framework']:6s} {row['decoder']:8s} batch {row['batch']:3d}"
    if "error" in row:
        return f"{head}  FAILED {row['error']}"
    extra = (f"compile {row['compile_s']:.1f}s" if "compile_s" in row
             else f"warm-up {row['warmup_s']:.1f}s")
    return f"{head}  {row['ms']:10.1f} ms  ({extra})"


if __name__ == "__main__":
    main()
