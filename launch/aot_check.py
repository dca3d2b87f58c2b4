"""Compile a config's train step for a mesh you do not have, and print per-device memory.

    # 64 fake CPU devices standing in for the chips (memory is XLA:CPU's estimate; the TPU
    # flash-attention kernel cannot compile for CPU, so XLA's attention stands in):
    python launch/aot_check.py --config configs/sd15_finetune.py --devices 64 \\
        --config.diffusion.attention=xla

    # A real TPU topology, compiled by libtpu without a TPU attached (pip install "jax[tpu]",
    # or just libtpu, e.g. into a side folder: pip install --target /tmp/libtpu libtpu and
    # PYTHONPATH=/tmp/libtpu). libtpu warns that it finds no TPU worker: harmless here. SD-v1.5's
    # step takes ~20 minutes to compile on a 2-core machine.
    python launch/aot_check.py --config configs/sd15_finetune.py --topology v5p:4x4x4

    # any config override works as with snapjax train:
    python launch/aot_check.py --config configs/sd15_finetune.py --devices 8 \\
        --config.train.batch_size=64 --config.mesh.fsdp=8

Nothing is loaded or computed: model folders are read for their specs (or the config's specs
are used: --config.diffusion.unet_init= builds SD-v1.5's shape from config.unet), parameters,
optimizer state and batch are ShapeDtypeStructs with the shardings the run would use, and the
step is lowered and compiled exactly as ``snapjax train`` jits it. The report: the mesh, how
the big parameters are split, FLOPs per device per step and ``compiled.memory_analysis()``
(arguments, outputs, temporaries; peak ~ arguments + temporaries + outputs - donated aliases).
On CPU the numbers are XLA:CPU's buffer assignment, a proxy for an accelerator's; a TPU
topology gives libtpu's own figures.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/x.py[:variant]")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
    where.add_argument("--topology", help="TPU topology, e.g. v4:2x2x2, v5e:4x4, v5p:4x4x4")
    parser.add_argument("--chips-per-host", default="2,2,1",
                        help="with --topology: chips per host bounds (default 2,2,1)")
    parser.add_argument("--chip-config", default=None,
                        help="with --topology: libtpu chip config; default megacore for v4 "
                             "(one JAX device per chip, as on a real v4 slice), else libtpu's")
    args, overrides = parser.parse_known_args(argv)
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parse(sys.argv[1:] if argv is None else argv)
    if not args.topology:
        # Must happen before JAX initialises its CPU backend.
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(
            flags + [f"--xla_force_host_platform_device_count={args.devices}"])

    import jax

    from snapjax import sharding
    from snapjax.config import load_config
    from snapjax.train import state as state_lib
    from snapjax.train.loop import build_setup

    config = load_config(args.config, overrides)

    if args.topology:
        from jax.experimental import topologies
        try:
            chip_config = args.chip_config or (
                "megacore" if args.topology.startswith("v4:") else None)
            topo = topologies.get_topology_desc(
                topology_name=args.topology, platform="tpu",
                chips_per_host_bounds=tuple(int(c) for c in args.chips_per_host.split(",")),
                **({"chip_config_name": chip_config} if chip_config else {}))
        except Exception as e:  # no libtpu, unknown topology name
            print(f"aot_check: cannot describe TPU topology {args.topology!r} ({e}); install "
                  "libtpu (pip install 'jax[tpu]') or use --devices N", file=sys.stderr)
            return 2
        devices = topo.devices
    else:
        devices = jax.devices()

    try:
        setup = build_setup(config, devices, abstract=True)
    except ValueError as e:  # a config that cannot target these devices (ConfigError and kin)
        print(f"aot_check: {e}", file=sys.stderr)
        return 2
    train, mesh_cfg, opt_cfg, mesh = setup.train, setup.mesh_cfg, setup.opt_cfg, setup.mesh
    optimizer, objective = setup.optimizer, setup.objective

    abstract, state_sh = state_lib.abstract_state(objective.init_params, optimizer, mesh,
                                                  mesh_cfg, objective.pretrained)
    batch_sh = sharding.batch_sharding(mesh, mesh_cfg)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh)
             for k, v in objective.batch_shapes(train.batch_size).items()}
    frozen_sh = sharding.tree_shardings(objective.frozen, mesh, mesh_cfg)
    frozen = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          objective.frozen, frozen_sh)
    replicated = sharding.replicated(mesh)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    jitted = jax.jit(objective.step,
                     in_shardings=(state_sh, {k: batch_sh for k in batch}, replicated, frozen_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=(0,))
    with jax.set_mesh(mesh):
        compiled = jitted.lower(abstract, batch, rng, frozen).compile()

    params = jax.tree.leaves(abstract.params)
    n_params = sum(p.size for p in params)
    split = sum(p.size for p in params
                if any(axis is not None for axis in p.sharding.spec))
    print(f"config      {args.config} {' '.join(overrides)}")
    print(f"devices     {len(devices)} x {devices[0].device_kind} "
          f"({'topology ' + args.topology if args.topology else 'fake CPU devices'})")
    print(f"mesh        {dict(mesh.shape)}")
    print(f"batch       {train.batch_size} global, "
          f"{train.batch_size // sharding.batch_split(mesh, mesh_cfg)} per batch shard, "
          f"{opt_cfg.grad_accum_steps} microbatch(es); compute {train.compute_dtype}")
    print(f"params      {n_params / 1e6:.1f} M trained, {100 * split / n_params:.0f}% of them "
          "in sharded tensors")
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    if analysis and "flops" in analysis:
        print(f"flops       {analysis['flops'] / 1e12:.3f} TFLOP per device per step")
    mem = compiled.memory_analysis()
    if mem is None:
        print("memory      (not reported by this backend)")
        return 0
    gib = 2 ** 30
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    for name in fields:
        print(f"  {name:30s} {getattr(mem, name) / gib:9.3f} GiB {getattr(mem, name):>16d} B")
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    print(f"per-device peak (args + outputs - aliased + temps): {peak / gib:.3f} GiB "
          f"({peak} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
