"""``snapjax evolve``: robust training interleaved with evolution rounds, resumable.

    snapjax evolve --config configs/world_evolve.py --workdir runs/world/evolve

The config is a robust-training config (``configs/world_robust.py``: the teacher to start from,
``config.robust``) plus ``config.evolve`` (:class:`~snapjax.evolve.evolution.EvolveConfig`).
Each round scores every block, applies its actions to the train state (params, EMA and
optimizer moments: :mod:`snapjax.evolve.surgery`), then robust-trains ``train_steps_per_round``
steps and checkpoints state, data iterator and the spec reached (in the checkpoint's config
JSON), so a killed run resumes with the architecture it had. Writes:

  ``evolution.jsonl``  one row per action: round, action, block, d_quality, d_latency,
                       latency, quality (the full UNet's, before the action);
  ``evolution.png``    quality against latency over the rounds;
  ``model/``           a pipeline folder with the evolved UNet (EMA) for ``snapjax sample``;
  ``evolved_spec.json`` and ``evolve.json`` (summary: latencies, quality, rounds, seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from snapjax import storage
from snapjax import checkpoint as ckpt_lib
from snapjax import pretrained, sharding
from snapjax.config import ConfigError, as_config, from_config, to_json
from snapjax.evolve import evolution, latency as latency_lib
from snapjax.evolve.evolution import EvolveConfig
from snapjax.evolve.quality import build_measure
from snapjax.models.unet import UNet
from snapjax.models.unet_spec import UNetSpec

log = logging.getLogger(__name__)

STATE_KEY = "evolution"  # where the reached spec and round live in each checkpoint's config


def config_for_spec(config: ml_collections.ConfigDict, spec: UNetSpec) -> ml_collections.ConfigDict:
    """The training config of the UNet ``spec`` (its params come from the evolving state)."""
    out = ml_collections.ConfigDict(config.to_dict())
    out.unet = as_config(spec)
    out.diffusion.unet_init = ""
    return out


def _clip_inputs(cfg: EvolveConfig) -> list[str] | None:
    """Quality "clip": the prompts subset, with the CLIP folder checked (before any model
    loads, so a wrong path fails in seconds); None for the other measures."""
    if cfg.quality != "clip":
        return None
    from snapjax.eval.clip_score import check_folder
    from snapjax.eval.prompts import read_prompts
    try:
        check_folder(cfg.clip_model)
        return read_prompts(cfg.prompts_file, cfg.num_prompts, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(f"evolve.clip_model / evolve.prompts_file: {e}") from None


def _measure(config, cfg: EvolveConfig, data, schedule, prompts: list[str] | None):
    """The quality measure of ``cfg.quality``: on fixed held-out world data ("world",
    "denoise"), or CLIP score of samples of ``prompts`` ("clip", any data source)."""
    from snapjax.train.objectives.components import load_tokenizer
    dcfg = config.diffusion
    if cfg.quality != "clip" and data.source != "world":
        raise ConfigError(f"evolve.quality={cfg.quality!r} scores on the embedded world; with "
                          f"data.source={data.source!r} use evolve.quality='clip' (with "
                          "evolve.clip_model and evolve.prompts_file)")
    if not dcfg.vae:
        raise ConfigError(f"evolve.quality={cfg.quality!r} decodes samples: set diffusion.vae")
    text, text_params = pretrained.load_component(dcfg.text_encoder, "text_encoder")
    vae, vae_params = pretrained.load_component(dcfg.vae, "vae")
    tokenizer = load_tokenizer(dcfg.tokenizer, text.spec.max_length)
    world = (dataclasses.replace(data.world, resolution=data.resolution)
             if data.source == "world" else None)
    return build_measure(cfg.quality, text_encoder=text, text_params=text_params, vae=vae,
                         vae_params=vae_params, tokenizer=tokenizer, schedule=schedule,
                         world=world, num_prompts=cfg.num_prompts, num_steps=cfg.sample_steps,
                         guidance_scale=cfg.guidance_scale, seed=cfg.seed,
                         clip_model=cfg.clip_model, prompts=prompts,
                         sample_size=data.resolution // vae.spec.downsample_factor,
                         batch_size=cfg.batch_size)


class _SpecTrainer:
    """The robust-training step of one spec: its setup, state shardings and compiled step."""

    def __init__(self, config, spec: UNetSpec):
        from snapjax.train import loop, state as state_lib
        self.setup = loop.build_setup(config_for_spec(config, spec))
        objective, mesh, mesh_cfg = self.setup.objective, self.setup.mesh, self.setup.mesh_cfg
        self.abstract_state, self.state_shardings = state_lib.abstract_state(
            objective.init_params, self.setup.optimizer, mesh, mesh_cfg, objective.pretrained)
        self._frozen_shardings = sharding.tree_shardings(objective.frozen, mesh, mesh_cfg)
        self.frozen = jax.device_put(objective.frozen, self._frozen_shardings)
        self._compiled = None

    def step(self, state, batch, rng):
        if self._compiled is None:
            mesh, mesh_cfg = self.setup.mesh, self.setup.mesh_cfg
            batch_spec = sharding.batch_sharding(mesh, mesh_cfg)
            replicated = sharding.replicated(mesh)
            self._compiled = jax.jit(
                self.setup.objective.step,
                in_shardings=(self.state_shardings, {k: batch_spec for k in batch}, replicated,
                              self._frozen_shardings),
                out_shardings=(self.state_shardings, replicated),
                donate_argnums=(0,)).lower(state, batch, rng, self.frozen).compile()
        return self._compiled(state, batch, rng, self.frozen)


def run_evolution(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evolves ``config``'s UNet in ``workdir`` (resuming if it holds a checkpoint)."""
    from snapjax.data.pipeline import make_train_iterator
    from snapjax.diffusion.schedule import NoiseSchedule
    from snapjax.train import loop, objectives, state as state_lib

    t_start = time.perf_counter()
    workdir = storage.path(workdir)
    storage.check_writable(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = from_config(EvolveConfig, config.evolve, "evolve")
    prompts = _clip_inputs(cfg)
    if not config.robust.enabled:
        log.warning("config.robust.enabled is False: evolution without robust training")
    if not config.diffusion.unet_init:
        raise ConfigError("evolution starts from a trained UNet: set diffusion.unet_init (or "
                          "config.teacher_pipeline in configs/world_evolve.py)")
    start_setup = loop.build_setup(config)  # loads the teacher; validates every section
    data_cfg = objectives.data_config(config)
    schedule = from_config(NoiseSchedule, config.schedule, "schedule")
    start_spec = pretrained.read_spec(config.diffusion.unet_init, "unet")
    factor = pretrained.read_spec(config.diffusion.vae, "vae").downsample_factor
    table_for = _table_cache(cfg.latency_source, data_cfg.resolution, factor)
    start_table = table_for(start_spec)
    start_latency = latency_lib.unet_cost(start_spec, start_table)
    target = cfg.target_latency * start_latency
    evolution.check_target(start_spec, start_table, target)
    measure = _measure(config, cfg, data_cfg, schedule, prompts)

    mesh, mesh_cfg = start_setup.mesh, start_setup.mesh_cfg
    ckpt_cfg = from_config(ckpt_lib.CheckpointConfig, config.checkpoint, "checkpoint")
    checkpointer = ckpt_lib.TrainCheckpointer(workdir / "checkpoints", ckpt_cfg)
    batch_keys = start_setup.objective.batch_keys
    data = make_train_iterator(data_cfg, global_batch_size=start_setup.train.batch_size,
                               seed=start_setup.train.seed,
                               tokenizer=start_setup.objective.tokenizer)
    init_rng, step_rng = jax.random.split(jax.random.key(start_setup.train.seed))
    base_json = to_json(config)
    rows_path = workdir / "evolution.jsonl"
    primary = jax.process_index() == 0
    preemption = ckpt_lib.PreemptionWatch()
    try:
        with jax.set_mesh(mesh):
            latest = checkpointer.latest_step()
            if latest is None:
                objective = start_setup.objective
                state, _ = state_lib.create_sharded_state(
                    objective.init_params, start_setup.optimizer, init_rng, mesh, mesh_cfg,
                    objective.pretrained)
                spec, done_round, round_end, final = start_spec, -1, 0, False
                if primary:  # one writer of the shared log
                    rows_path.write_text("")
                trainer = None
            else:
                saved = checkpointer.saved_config(latest)[STATE_KEY]
                spec = UNetSpec.from_dict(saved["spec"])
                done_round, round_end = saved["round"], saved["round_end_step"]
                final = saved.get("final", False)
                trainer = _SpecTrainer(config, spec)
                state = checkpointer.restore(latest, trainer.abstract_state, data)
                if primary:
                    _truncate_rows(rows_path, done_round)
                log.info("resumed evolution after round %d at step %d: %d blocks", done_round,
                         latest, spec.num_blocks)
            step_rng = jax.device_put(step_rng, sharding.replicated(mesh))

            def save(round_index: int) -> None:
                meta = {"spec": dataclasses.asdict(spec), "round": round_index,
                        "round_end_step": round_end, "final": final}
                checkpointer.save(int(state.step), state, data, {**base_json, STATE_KEY: meta})

            def train_until(end_step: int, desc: str) -> bool:
                """Robust-trains to ``end_step``; True if preempted on the way (then saved)."""
                nonlocal state
                from tqdm import tqdm
                bar = tqdm(total=max(end_step - int(state.step), 0), desc=desc, unit="step",
                           dynamic_ncols=True, leave=False,
                           disable=not start_setup.train.progress_bar or jax.process_index() > 0)
                metrics = None
                while int(state.step) < end_step:
                    batch = _batch(data, batch_keys, mesh, mesh_cfg)
                    state, metrics = trainer.step(state, batch, step_rng)
                    bar.update(1)
                    if preemption.reached(int(state.step)):
                        bar.close()
                        save(done_round)
                        checkpointer.wait()
                        return True
                bar.close()
                if metrics is not None:
                    _check_finite(jax.device_get(metrics), int(state.step))
                return False

            # A run killed during a round's training finishes that training first.
            if trainer is not None and train_until(round_end, f"robust r{done_round}"):
                return {"preempted": True}
            # A finished run asked for more rounds evolves on; its final training then runs
            # again after the new last action.
            for r in range(done_round + 1, cfg.rounds):
                table = table_for(spec)
                result = evolution.evolution_round(
                    r, spec, state.ema_params["unet"], unet=UNet(spec), measure=measure,
                    table=table, target=target, cfg=cfg)
                if primary:
                    storage.append_text(rows_path, "".join(
                        json.dumps({**row, "step": int(state.step)}) + "\n"
                        for row in result.rows()))
                log.info("round %d: latency %.4g -> %.4g %s, %s %.4f, actions %s", r,
                         result.latency, result.latency_after, table.unit, measure.key,
                         result.quality[measure.key], [a[:2] for a in result.actions])
                if not result.actions:
                    break
                spec, state = evolution.apply_actions(state, spec, result.actions,
                                                      cfg.duplicate_init)
                final = False
                trainer = _SpecTrainer(config, spec)
                state = jax.device_put(state, trainer.state_shardings)
                done_round, round_end = r, int(state.step) + cfg.train_steps_per_round
                if train_until(round_end, f"robust r{r}"):
                    return {"preempted": True}
                save(r)
            if not final and cfg.final_train_steps:
                trainer = trainer or _SpecTrainer(config, spec)
                final, round_end = True, int(state.step) + cfg.final_train_steps
                if train_until(round_end, "robust final"):
                    return {"preempted": True}
                save(done_round)
            checkpointer.wait()
            final_quality = measure(UNet(spec), state.ema_params["unet"],
                                    np.ones(spec.num_blocks, np.float32))
            trainer = trainer or _SpecTrainer(config, spec)
            trainer.setup.objective.export(state, workdir / "model")
    finally:
        preemption.close()
        checkpointer.close()
        data.close()
    final_latency = latency_lib.unet_cost(spec, table_for(spec))
    summary = {
        "start_latency": start_latency, "final_latency": final_latency,
        "target_latency": target, "latency_ratio": final_latency / start_latency,
        "unit": start_table.unit, "source": cfg.latency_source, "rule": cfg.rule,
        "final_quality": final_quality, "blocks": spec.num_blocks,
        "start_blocks": start_spec.num_blocks,
        "seconds": time.perf_counter() - t_start}
    if jax.process_index() == 0:
        (workdir / "evolved_spec.json").write_text(spec.to_json() + "\n")
        (workdir / "evolve.json").write_text(json.dumps(summary, indent=1) + "\n")
        plot_rounds(rows_path, workdir / "evolution.png", measure.key, start_table.unit)
    return summary


def _check_finite(metrics, step: int) -> None:
    from snapjax.train.loop import TrainingDiverged
    from snapjax.train.metrics import all_finite, to_float_dict
    values = to_float_dict(metrics)
    if not all_finite({k: values[k] for k in ("loss", "grad_norm")}):
        raise TrainingDiverged(f"loss={values['loss']} grad_norm={values['grad_norm']} at step "
                               f"{step}: stopping without saving this round")


def _batch(data, keys, mesh, mesh_cfg):
    local = next(data)
    return sharding.global_batch({k: local[k] for k in keys}, mesh, mesh_cfg)


def _table_cache(source: str, resolution: int, factor: int):
    """spec -> its latency table, each block signature priced once per run."""
    prices: dict[str, float] = {}

    def table(spec: UNetSpec) -> latency_lib.LatencyTable:
        return latency_lib.latency_table(spec, resolution, source, downsample_factor=factor,
                                         prices=prices)
    return table


def _truncate_rows(path: epath.Path, last_round: int) -> None:
    if not path.exists():
        return
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["round"] <= last_round))


def plot_rounds(rows_path, out_path, quality_key: str, unit: str) -> None:
    """Quality (the full UNet's, before each round's action) against latency, round by round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in storage.path(rows_path).read_text().splitlines() if line]
    per_round = {r["round"]: r for r in rows}
    xs = [r["latency"] for r in per_round.values()]
    ys = [r[f"quality/{quality_key}"] for r in per_round.values()]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(xs, ys, "o-")
    for (x, y), r in zip(zip(xs, ys), per_round):
        ax.annotate(str(r), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"UNet latency ({unit})")
    ax.set_ylabel(quality_key)
    ax.set_title("architecture evolution, by round")
    ax.invert_xaxis()
    fig.tight_layout()
    with storage.path(out_path).open("wb") as f:  # a bucket's file too
        fig.savefig(f, format="png")
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="an evolution config: configs/world_evolve.py[:cpu]")
    parser.add_argument("--workdir", required=True,
                        help="checkpoints, evolution.jsonl/.png, model/, evolve.json")
    parser.set_defaults(_accepts_overrides=True)
    parser.epilog = "Any --config.KEY=VALUE after these overrides that config key."


def run(args: argparse.Namespace) -> int:
    from snapjax.config import load_config
    from snapjax.train.loop import initialize_distributed, setup_logging
    setup_logging()
    config = load_config(args.config, getattr(args, "overrides", []) or [])
    initialize_distributed()
    summary = run_evolution(config, args.workdir)
    if jax.process_index() == 0 and not summary.get("preempted"):
        print(f"evolved: {summary['start_blocks']} -> {summary['blocks']} blocks, latency "
              f"{summary['start_latency']:.4g} -> {summary['final_latency']:.4g} "
              f"{summary['unit']} ({summary['latency_ratio']:.1%}), quality "
              f"{ {k: round(v, 4) for k, v in summary['final_quality'].items()} } in "
              f"{summary['seconds']:.0f}s; {args.workdir}/model")
    return 0
