"""Devices, mesh and where every array lives: the only module that knows about devices.

The mesh has three axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimizer state sharded, gathered per layer by XLA) and ``tensor`` (model
parallelism inside a layer). Arrays name their dimensions with *logical* axes; a short rule
list from the config maps each logical axis to mesh axes.

Models do not annotate their parameters yet, so :func:`logical_axes` derives the logical names
of a parameter from its kind and shape, here and nowhere else:

  conv kernel (kh, kw, in, out) -> (None, None, 'embed', 'mlp')
  dense kernel (in, out)        -> ('embed', 'mlp')
  embedding (vocab, width)      -> ('vocab', 'embed')
  bias, norm scale, scalars     -> replicated

A dimension is sharded only when the mesh axes divide it; a parameter under
``min_shard_size`` elements stays replicated (gathering it would cost more than storing it).
A parameter at or above the threshold that the rules leave unsharded falls back to sharding
its largest divisible dimension over ``fsdp``, so that FSDP really holds every large tensor once.
The batch dimension of activations is logical axis ``batch``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# A rule maps a logical axis to None (replicate), a mesh axis, or a tuple of mesh axes.
Rules = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape (one axis may be -1: the remaining devices) and logical-axis rules."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: Rules = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
    )
    min_shard_size: int = 2 ** 16

    def __post_init__(self):
        sizes = self.axis_sizes
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"mesh: at most one axis may be -1, got data={self.data}, "
                             f"fsdp={self.fsdp}, tensor={self.tensor}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh: axis sizes must be positive or -1, got data={self.data}, "
                             f"fsdp={self.fsdp}, tensor={self.tensor}")
        for rule in self.rules:
            if len(rule) != 2:
                raise ValueError(
                    f"mesh.rules: each rule is (logical_axis, mesh_axes), got {rule!r}")
            for axis in _as_tuple(rule[1]):
                if axis not in MESH_AXES:
                    raise ValueError(f"mesh.rules: {rule!r} names mesh axis {axis!r}; "
                                     f"mesh axes are {MESH_AXES}")
        if self.min_shard_size < 0:
            raise ValueError(f"mesh.min_shard_size must be >= 0, got {self.min_shard_size}")

    @property
    def axis_sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    def resolved_shape(self, num_devices: int) -> tuple[int, int, int]:
        """The mesh shape with -1 filled in; a clear error when it cannot cover the devices."""
        sizes = list(self.axis_sizes)
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh: {num_devices} devices cannot be split as data={self.data}, "
                    f"fsdp={self.fsdp}, tensor={self.tensor}: the fixed axes ({known} devices) "
                    f"do not divide {num_devices}")
            sizes[sizes.index(-1)] = num_devices // known
        elif known != num_devices:
            raise ValueError(
                f"mesh: data={self.data} x fsdp={self.fsdp} x tensor={self.tensor} = {known} "
                f"devices, but {num_devices} are available; set one axis to -1 to use the rest")
        return tuple(sizes)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over ``devices`` (default: all devices of all processes).

    Devices keep ``jax.devices()`` order (grouped by process), so process ``p`` holds a
    contiguous block of the batch: the rows its own data iterator produced.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.resolved_shape(len(devices))
    # Auto axes: jit in/out shardings pin the layout and XLA propagates it inside the step.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ----------------------------------------------------------------------------- parameters

def logical_axes(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (or optimizer-state leaf) from its name and shape."""
    name = path[-1] if path else ""
    if name == "embedding" and len(shape) == 2:
        return ("vocab", "embed")
    if len(shape) == 4:
        return (None, None, "embed", "mlp")
    if len(shape) == 2:
        return ("embed", "mlp")
    return (None,) * len(shape)


def _mesh_axes_for(logical: str | None, rules: Rules) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, axes in rules:
        if name == logical:
            return _as_tuple(axes)
    return ()


def partition_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh,
                   cfg: MeshConfig) -> P:
    """The PartitionSpec of one parameter-shaped leaf under the rules (see module docstring)."""
    if math.prod(shape) < cfg.min_shard_size or not shape:
        return P()
    used: set[str] = set()
    spec: list[Any] = []
    for dim, logical in zip(shape, logical_axes(path, shape)):
        axes = tuple(a for a in _mesh_axes_for(logical, cfg.rules)
                     if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if axes and dim % size == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    if not used and mesh.shape["fsdp"] > 1:
        divisible = [d for d, n in enumerate(shape) if n % mesh.shape["fsdp"] == 0]
        if divisible:
            spec[max(divisible, key=lambda d: shape[d])] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def tree_shardings(tree: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
    """NamedShardings for every array leaf of ``tree`` (params, optimizer state, EMA).

    Optimizer moments have the same path suffix and shape as their parameter, so they get the
    same layout; scalars (step counters) are replicated.
    """
    def leaf_sharding(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        names = tuple(_key_name(p) for p in path)
        return NamedSharding(mesh, partition_spec(names, shape, mesh, cfg))

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def shard_params(params: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
    """Puts an existing (host or single-device) tree onto the mesh under the rules."""
    return jax.device_put(params, tree_shardings(params, mesh, cfg))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- batches

def batch_axes(cfg: MeshConfig) -> tuple[str, ...]:
    return _mesh_axes_for("batch", cfg.rules)


def batch_sharding(mesh: Mesh, cfg: MeshConfig) -> NamedSharding:
    """Leading (batch) dimension split over the mesh axes of logical axis ``batch``."""
    axes = batch_axes(cfg)
    return NamedSharding(mesh, P(axes if axes else None))


def batch_split(mesh: Mesh, cfg: MeshConfig) -> int:
    """How many ways the batch dimension is split."""
    return math.prod(mesh.shape[a] for a in batch_axes(cfg))


def check_batch_size(global_batch: int, mesh: Mesh, cfg: MeshConfig, *,
                     microbatches: int = 1) -> None:
    """A clear error when the global (micro)batch cannot be split evenly over the mesh."""
    split = batch_split(mesh, cfg)
    axes = " x ".join(f"{a}={mesh.shape[a]}" for a in batch_axes(cfg))
    if global_batch % microbatches:
        raise ValueError(f"batch size {global_batch} is not divisible by "
                         f"opt.grad_accum_steps={microbatches}")
    micro = global_batch // microbatches
    if micro % split:
        raise ValueError(
            f"batch size {global_batch}"
            + (f" ({microbatches} microbatches of {micro})" if microbatches > 1 else "")
            + f" cannot be split over the mesh's batch axes ({axes} = {split} ways); "
            f"use a multiple of {split * microbatches}")
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")


def per_batch_shard(fn, batch_size: int):
    """``fn`` run on each device's own rows, for kernels XLA cannot partition (Pallas/Mosaic).

    Inside ``jax.set_mesh`` (training, launch/aot_check.py) this is a ``shard_map`` of ``fn``
    over the mesh axes of logical ``batch`` under the default rules; every argument and the
    result have the batch as their leading axis, the other axes whole on each device. Outside
    a mesh (one device) it is ``fn``. None when ``batch_size`` does not split evenly over
    those axes: the caller takes its partitionable path instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    axes = tuple(a for a in batch_axes(MeshConfig()) if mesh.shape.get(a, 1) > 1)
    if not axes:
        return fn
    if batch_size % math.prod(mesh.shape[a] for a in axes):
        return None
    spec = P(axes)
    # check_vma=False: the kernel is opaque to shard_map's replication checker.
    return jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, cfg: MeshConfig) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axes.

    Each process passes only the rows it read; the global batch is their concatenation in
    process order.
    """
    sharding = batch_sharding(mesh, cfg)
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings (what Orbax restores onto)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def describe(tree: Any) -> dict[str, str]:
    """path -> PartitionSpec string of each leaf; for logs and the AOT report."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        spec = getattr(getattr(leaf, "sharding", None), "spec", None)
        out["/".join(_key_name(p) for p in path)] = str(spec) if spec is not None else "?"
    return out

