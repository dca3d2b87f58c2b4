"""``snapjax train``: the training loop, one function for one device or a pod.

    snapjax train --config configs/world_teacher.py --workdir runs/world_teacher \\
        [--config.opt.lr=3e-4 ...]

:func:`train_and_evaluate` builds the mesh, the data iterator and the state (restored from
``workdir/checkpoints`` when there is one), then runs the jitted step. The host never waits on
the device inside the loop: step n is dispatched before step n-1's metrics are read. Every
logged step appends to ``workdir/metrics.jsonl`` and TensorBoard; a NaN/Inf loss stops the run
with an error naming the step, before anything is saved; SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from snapjax import checkpoint as ckpt_lib
from snapjax import pretrained, sharding, storage
from snapjax.config import ConfigError, from_config, load_config, to_json
from snapjax.data.pipeline import make_train_iterator
from snapjax.sharding import MeshConfig
from snapjax.train import metrics as metrics_lib
from snapjax.train import objectives, optim, state as state_lib

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``config.train``: how long, how big, how often."""

    steps: int = 1000
    batch_size: int = 64  # global, over all processes and devices
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16" on GPU/TPU; params stay float32
    log_every: int = 50
    sample_every: int = 0  # 0: sample (and evaluate) only after the last step
    progress_bar: bool = True
    export: bool = True  # write the EMA model(s) to workdir/model after the last step

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"train.compute_dtype={self.compute_dtype!r}: expected one of "
                             f"{sorted(COMPUTE_DTYPES)}")
        for key in ("steps", "batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.sample_every < 0:
            raise ValueError(f"train.sample_every must be >= 0, got {self.sample_every}")


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or Inf."""


# ----------------------------------------------------------------------------- distributed

_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def cpu_only_host(env=None) -> bool:
    """Whether JAX will run on the CPU here, decided before any backend starts (a backend must
    not start before ``jax.distributed.initialize``): ``JAX_PLATFORMS`` if set (its first entry),
    else whether an accelerator plugin is installed."""
    import importlib.util
    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS") or jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when this is one process of several.

    Explicit: ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` (``JAX_LOCAL_DEVICE_IDS`` optional), as launch/local.sh sets them.
    ``SNAPJAX_DISTRIBUTED=1`` (launch/tpu.sh, launch/gpu.sh): JAX finds the cluster itself
    (Cloud TPU metadata, SLURM, Open MPI). Otherwise a single process: nothing to do.
    On a CPU-only host, CPU collectives go through gloo (:func:`cpu_only_host`); accelerator
    hosts keep JAX's default.
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    explicit = all(k in env for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                       "JAX_PROCESS_ID"))
    if not explicit and env.get("SNAPJAX_DISTRIBUTED") != "1":
        return
    if cpu_only_host():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"],
                                   int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


# ----------------------------------------------------------------------------- the loop

@dataclasses.dataclass(frozen=True)
class Setup:
    """What a config builds before any data or state: shared by training and the AOT check."""
    train: TrainConfig
    mesh_cfg: MeshConfig
    opt_cfg: optim.OptimConfig
    mesh: jax.sharding.Mesh
    optimizer: Any
    objective: objectives.Objective


def build_setup(config: ml_collections.ConfigDict, devices=None, *,
                abstract: bool = False) -> Setup:
    """Validate the config's sections, build the mesh (checking the batch splits over it), the
    optimizer and the objective. ``abstract``: shapes only, no weights read (AOT compiles)."""
    train = from_config(TrainConfig, config.train, "train")
    mesh_cfg = from_config(MeshConfig, config.mesh, "mesh")
    opt_cfg = from_config(optim.OptimConfig, config.opt, "opt")
    mesh = sharding.make_mesh(mesh_cfg, devices)
    sharding.check_batch_size(train.batch_size, mesh, mesh_cfg,
                              microbatches=opt_cfg.grad_accum_steps)
    optimizer = optim.make_optimizer(opt_cfg, train.steps)
    objective = objectives.build_objective(
        config, optimizer=optimizer, ema_decay=opt_cfg.ema_decay,
        microbatches=opt_cfg.grad_accum_steps, compute_dtype=COMPUTE_DTYPES[train.compute_dtype],
        abstract=abstract, platform=mesh.devices.flat[0].platform)
    return Setup(train, mesh_cfg, opt_cfg, mesh, optimizer, objective)



def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       *, devices=None) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), samples and
    evaluates at the end; returns the last logged metrics. ``devices``: default all."""
    workdir = storage.path(workdir)
    storage.check_writable(workdir)
    ckpt_cfg = from_config(ckpt_lib.CheckpointConfig, config.checkpoint, "checkpoint")
    primary = jax.process_index() == 0
    setup = build_setup(config, devices)
    train, mesh_cfg, mesh = setup.train, setup.mesh_cfg, setup.mesh
    optimizer, objective = setup.optimizer, setup.objective

    data_cfg = objectives.data_config(config)
    data = make_train_iterator(data_cfg, global_batch_size=train.batch_size, seed=train.seed,
                               tokenizer=objective.tokenizer)
    checkpointer = ckpt_lib.TrainCheckpointer(workdir / "checkpoints", ckpt_cfg)
    writer = metrics_lib.MetricsWriter(workdir, enabled=primary)
    preemption = ckpt_lib.PreemptionWatch()
    config_json = to_json(config)
    try:
        with jax.set_mesh(mesh):
            return _train(config_json, train, ckpt_cfg.every_steps, mesh, mesh_cfg, optimizer,
                          objective, data, checkpointer, writer, preemption, workdir)
    finally:
        preemption.close()
        checkpointer.close()  # waits for pending async saves
        writer.close()
        data.close()


def _train(config_json, train: TrainConfig, save_every: int, mesh, mesh_cfg, optimizer,
           objective, data, checkpointer, writer, preemption, workdir) -> dict[str, float]:
    rng = jax.random.key(train.seed)
    init_rng, step_rng = jax.random.split(rng)
    abstract, state_shardings = state_lib.abstract_state(objective.init_params, optimizer, mesh,
                                                         mesh_cfg, objective.pretrained)
    start = checkpointer.latest_step()
    if start is None:
        state, _ = state_lib.create_sharded_state(objective.init_params, optimizer, init_rng,
                                                  mesh, mesh_cfg, objective.pretrained)
        start = 0
        writer.truncate_after(0)
    else:
        _warn_config_changes(checkpointer.saved_config(start), config_json)
        state = checkpointer.restore(start, abstract, data)
        log.info("resumed from step %d (%s)", start, checkpointer.directory)
        writer.truncate_after(start)

    frozen_shardings = sharding.tree_shardings(objective.frozen, mesh, mesh_cfg)
    frozen = jax.device_put(objective.frozen, frozen_shardings)
    batch_spec = sharding.batch_sharding(mesh, mesh_cfg)
    replicated = sharding.replicated(mesh)
    step_rng = jax.device_put(step_rng, replicated)

    if start >= train.steps:
        log.info("already trained to step %d", start)
        return _finish(state, frozen, objective, writer, workdir, train, start, {})

    local_rows: list[int] = []

    def next_batch() -> dict[str, jax.Array]:
        local = next(data)
        missing = [k for k in objective.batch_keys if k not in local]
        if missing:
            raise ConfigError(f"the data batch has {sorted(local)}, but the objective needs "
                              f"{missing}: check data.source")
        if not local_rows:
            local_rows.append(len(local[objective.batch_keys[0]]))
            _check_batch(local, objective.batch_shapes(local_rows[0]))
        return sharding.global_batch({k: local[k] for k in objective.batch_keys}, mesh, mesh_cfg)

    batch = next_batch()
    log.info("process %d/%d feeds %d of the %d rows of each global batch", jax.process_index(),
             jax.process_count(), local_rows[0], batch[objective.batch_keys[0]].shape[0])
    jitted = jax.jit(objective.step,
                     in_shardings=(state_shardings, {k: batch_spec for k in batch}, replicated,
                                   frozen_shardings),
                     out_shardings=(state_shardings, replicated),
                     donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, step_rng, frozen).compile()
    flops = metrics_lib.compiled_flops(compiled)
    log.info("train step compiled in %.1fs; %s GFLOP per device per step",
             time.perf_counter() - t0, f"{flops / 1e9:.2f}" if flops else "unknown")
    peak = metrics_lib.peak_tflops()

    bar = None
    if train.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm
        bar = tqdm(total=train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    last_logged: dict[str, float] = {}
    pending: tuple[int, Any] | None = None  # (step number, device metrics) not yet read
    interval_start, interval_steps = time.perf_counter(), 0
    last_saved = start
    step = start

    def read(pending_metrics) -> dict[str, float]:
        n, device_metrics = pending_metrics
        values = metrics_lib.to_float_dict(jax.device_get(device_metrics))
        if not metrics_lib.all_finite({k: values[k] for k in ("loss", "grad_norm")}):
            checkpointer.wait()
            raise TrainingDiverged(
                f"loss={values['loss']} grad_norm={values['grad_norm']} at step {n}: stopping "
                f"without saving; the last good checkpoint is step {last_saved} in "
                f"{checkpointer.directory}")
        return values

    def log_step(n: int, values: dict[str, float]) -> None:
        nonlocal interval_start, interval_steps, last_logged
        now = time.perf_counter()
        perf = metrics_lib.throughput(steps=interval_steps, seconds=now - interval_start,
                                      batch_size=train.batch_size, flops_per_device_step=flops,
                                      num_devices=mesh.size, peak=peak)
        interval_start, interval_steps = now, 0
        last_logged = {**values, **perf}
        writer.write(n, last_logged)
        if bar is not None:
            bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)

    while step < train.steps:
        if batch is None:
            batch = next_batch()
        state, device_metrics = compiled(state, batch, step_rng, frozen)
        batch = None
        step += 1
        interval_steps += 1
        # Step `step` is queued on the device; now read the previous one's numbers.
        if pending is not None:
            values = read(pending)
            if pending[0] % train.log_every == 0:
                log_step(pending[0], values)
        pending = (step, device_metrics)
        if bar is not None:
            bar.update(1)

        preempted = preemption.reached(step)
        save_now = preempted or step % save_every == 0
        if save_now or step == train.steps:
            values = read(pending)  # never save a state whose loss is not finite
            if step % train.log_every == 0 or step == train.steps:
                log_step(step, values)
            pending = None
            checkpointer.save(step, state, data, config_json)
            last_saved = step
        if preempted:
            log.warning("preempted: saved step %d, waiting for the write, exiting", step)
            checkpointer.wait()
            if bar is not None:
                bar.close()
            return last_logged
        if train.sample_every and step % train.sample_every == 0 and step < train.steps:
            _sample(state, frozen, objective, writer, step)
    if bar is not None:
        bar.close()
    return _finish(state, frozen, objective, writer, workdir, train, step, last_logged)


def _check_batch(local: dict, expected: dict[str, jax.ShapeDtypeStruct]) -> None:
    """Data that does not fit the model fails here, naming the entry, not deep inside jit."""
    for key, want in expected.items():
        got = np.asarray(local[key])
        if got.shape != want.shape or got.dtype.kind != np.dtype(want.dtype).kind:
            raise ConfigError(f"data batch entry {key!r} is {got.dtype}{list(got.shape)} but the "
                              f"model takes {np.dtype(want.dtype)}{list(want.shape)}: check "
                              "data.resolution and the model specs")


def _sample(state, frozen, objective, writer, step: int) -> dict[str, float]:
    if objective.sample is None:
        return {}
    t0 = time.perf_counter()
    grid, captions, values = objective.sample(state, frozen, step)
    values = dict(values, **{"sample/seconds": time.perf_counter() - t0})
    path = writer.write_image(step, "samples", grid, captions)
    writer.write(step, values)
    log.info("step %d samples: %s %s", step, path,
             " ".join(f"{k}={v:.3f}" for k, v in values.items()))
    return values


def _finish(state, frozen, objective, writer, workdir, train, step, last_logged):
    out = dict(last_logged)
    out.update(_sample(state, frozen, objective, writer, step))
    if train.export:
        # Every process: the export gathers the weights to each host (a collective), then
        # pretrained.replace_folder lets process 0 write the folder while the others wait.
        folder = workdir / "model"
        objective.export(state, folder)
        # Every process reads the folder back (specs and parameter metadata): the next stage
        # runs on all of them, so each must see the whole folder process 0 wrote.
        arrays = sum(pretrained.read_back(folder).values())
        log.info("process %d/%d reads back %s: %d arrays", jax.process_index(),
                 jax.process_count(), folder, arrays)
    writer.flush()
    return out


def _warn_config_changes(saved: dict, current: dict) -> None:
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(saved), flat(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if saved and changed:
        log.warning("resuming with a changed config: %s",
                    ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed))


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="config file and optional variant: configs/world_teacher.py[:cpu]")
    parser.add_argument("--workdir", required=True,
                        help="checkpoints, metrics.jsonl, TensorBoard files, samples, model/")
    parser.set_defaults(_accepts_overrides=True)
    parser.epilog = ("Any --config.KEY=VALUE after these overrides that config key, "
                     "e.g. --config.opt.lr=3e-4 --config.mesh.fsdp=4")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax narrates every save at INFO


def run(args: argparse.Namespace) -> int:
    setup_logging()
    config = load_config(args.config, getattr(args, "overrides", []) or [])
    initialize_distributed()
    try:
        metrics = train_and_evaluate(config, args.workdir)
    except TrainingDiverged as e:
        print(f"snapjax train: error: {e}", file=sys.stderr, flush=True)
        return 1
    if jax.process_index() == 0:
        shown = {k: round(v, 4) for k, v in metrics.items()
                 if k in ("loss",) or k.startswith("eval/") or k.startswith("sample/")}
        print(f"done: {shown}")
    return 0
