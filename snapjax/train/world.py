"""``snapjax world``: the whole SnapFusion chain on the embedded world, one command on a laptop.

    snapjax world --workdir runs/world                      # every stage, then the report
    snapjax world --workdir runs/world --stages eval,report # a subset (earlier stages' folders
                                                            # must exist)

Stages, in order (each one the command its docs page describes, on its ``configs/world_*.py``
with the folders of the stages before it; ``configs/world_chain.py`` says how the chain sizes
them):

  vae       the world VAE                                   WORKDIR/vae/model
  teacher   the text-to-image teacher on its latents        WORKDIR/teacher/model
  robust    robust training of the teacher's UNet           WORKDIR/robust/model
  evolve    architecture evolution (robust training goes on) WORKDIR/evolve/model
  decoder   teacher latents, then the pruned decoder        WORKDIR/decoder/model
  distill   step distillation, the paper's direct schedule  WORKDIR/distill/direct_<N/4>/model
  final     the distilled UNet with the pruned decoder      WORKDIR/final/model
  eval      every model on the same prompts and seeds       WORKDIR/eval/eval.json
  export    the final model to PyTorch and Core ML (the manifest samples at the eval's best
            guidance for it)                                 WORKDIR/export/{torch,coreml}
  ablations (only when asked: --stages ablations,report) the variants behind the paper's other
            claims, each scored like the chain's models   WORKDIR/ablations/<name>
  report    REPORT.md and report.json: the paper's claims, one row per model

A stage whose output exists is skipped (folders are written atomically, so an existing one is
complete); a killed training stage resumes from its checkpoint: run the same command again.
Delete a stage's output to run it again. ``--STAGE.KEY=VALUE`` overrides a key of that stage's
config (``--teacher.train.steps=2000``); ``--config.KEY=VALUE`` one of the chain's config.
``WORKDIR/chain.json`` keeps every stage's time and outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import ml_collections

from snapjax.config import ConfigError, load_config

log = logging.getLogger(__name__)

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
CHAIN_FILE = "chain.json"
# Stages whose config file takes --STAGE.KEY=VALUE overrides.
STAGE_CONFIGS = {"vae": "world_vae.py", "teacher": "world_teacher.py",
                 "robust": "world_robust.py", "evolve": "world_evolve.py",
                 "decoder": "world_decoder.py", "distill": "world_distill.py"}


def config_path(name: str) -> str:
    path = CONFIGS / name
    if not path.is_file():
        raise ConfigError(f"{path} not found: snapjax world runs from a source checkout "
                          "(pip install -e .), where configs/ sits beside snapjax/")
    return str(path)


@dataclasses.dataclass
class Chain:
    """The chain's workdir, its config (``configs/world_chain.py``) and per-stage overrides."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    overrides: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)

    def folder(self, stage: str) -> pathlib.Path:
        return self.workdir / stage

    def model(self, stage: str) -> pathlib.Path:
        """The folder the next stages read from."""
        if stage == "distill":
            steps = self.config.distill_teacher_steps // 4
            return self.workdir / "distill" / f"direct_{steps}" / "model"
        if stage == "eval":
            return self.workdir / "eval" / "eval.json"
        if stage in ("export", "ablations"):
            return self.workdir / stage
        if stage == "report":
            return self.workdir / "REPORT.md"
        return self.workdir / stage / "model"

    def stage_config(self, stage: str, extra: Sequence[str] = ()) -> ml_collections.ConfigDict:
        """The stage's config file (chain variant) with the chain's sizing, then ``extra`` (the
        folders of earlier stages), then the user's ``--STAGE.KEY=VALUE`` flags."""
        spec = f"{config_path(STAGE_CONFIGS[stage])}:{self.config.variant}"
        return load_config(spec, [*self.config.stage_overrides[stage], *extra,
                                  *self.overrides.get(stage, ())])


def _require(chain: Chain, *stages: str) -> None:
    for stage in stages:
        if not chain.model(stage).exists():
            raise FileNotFoundError(f"{chain.model(stage)} is missing: it is the output of the "
                                    f"{stage!r} stage; run it first (--stages {stage},...)")


def _train(chain: Chain, stage: str, extra: Sequence[str]) -> dict:
    from snapjax.train.loop import train_and_evaluate
    metrics = train_and_evaluate(chain.stage_config(stage, extra), chain.folder(stage))
    return {k: v for k, v in metrics.items()
            if k == "loss" or k.startswith(("eval/", "sample/"))}


def stage_vae(chain: Chain) -> dict:
    return _train(chain, "vae", [])


def stage_teacher(chain: Chain) -> dict:
    _require(chain, "vae")
    return _train(chain, "teacher", [f"--config.diffusion.vae={chain.model('vae')}"])


def stage_robust(chain: Chain) -> dict:
    _require(chain, "teacher")
    return _train(chain, "robust", [f"--config.teacher_pipeline={chain.model('teacher')}"])


def stage_evolve(chain: Chain) -> dict:
    from snapjax.evolve.run import run_evolution
    _require(chain, "robust")
    config = chain.stage_config("evolve", [f"--config.teacher_pipeline={chain.model('robust')}"])
    return run_evolution(config, str(chain.folder("evolve")))


def stage_decoder(chain: Chain) -> dict:
    from snapjax.data.generated import generate_latents, world_prompts
    from snapjax.pipeline import TextToImage
    _require(chain, "teacher")
    lat = chain.config.latents
    sets = {"train": (lat.train_count, 0), "heldout": (lat.heldout_count, 1)}
    pipe = None
    for name, (count, seed) in sets.items():
        out = chain.workdir / "latents" / name
        if (out / "index.json").is_file():
            continue
        pipe = pipe or TextToImage.from_pretrained(chain.model("teacher"))
        # Held-out latents: other captions (world seed 1) and other noise (seed 1).
        generate_latents(pipe, world_prompts(count, world_seed=seed), out, count=count,
                         num_steps=lat.steps, seed=seed, batch_size=lat.batch_size,
                         overwrite=out.exists(),
                         source_info={"prompts": "world", "world_seed": seed,
                                      "pipeline": str(chain.model("teacher"))})
    return _train(chain, "decoder", decoder_inputs(chain))


def decoder_inputs(chain: Chain) -> list[str]:
    """The decoder stage's flags for the chain's teacher and latents."""
    latents = chain.workdir / "latents"
    return [f"--config.data.path={latents / 'train'}",
            f"--config.decoder.teacher={chain.model('teacher')}",
            f"--config.decoder.eval_latents={latents / 'heldout'}",
            f"--config.decoder.eval_count={chain.config.latents.heldout_count}"]


def run_distill(chain: Chain, workdir: pathlib.Path, stages, extra: Sequence[str] = ()) -> list:
    """``snapjax distill``'s stages on the distill config with the chain's sizing, the user's
    ``--distill.KEY=VALUE`` flags, then ``extra`` (an ablation's variant, which must win)."""
    from snapjax.train.distill_chain import run_chain
    spec = f"{config_path(STAGE_CONFIGS['distill'])}:{chain.config.variant}"
    return run_chain(spec, workdir, stages, [*chain.config.stage_overrides["distill"],
                                             *chain.overrides.get("distill", ()), *extra])


def stage_distill(chain: Chain) -> dict:
    from snapjax.train.distill_chain import plan
    _require(chain, "teacher", "evolve")
    stages = plan("direct", str(chain.model("teacher")), chain.config.distill_teacher_steps,
                  str(chain.model("evolve")))
    return {"stages": run_distill(chain, chain.folder("distill"), stages)}


def stage_final(chain: Chain) -> dict:
    from snapjax.pipeline import assemble_pipeline
    _require(chain, "distill", "decoder")
    assemble_pipeline(chain.model("final"), chain.model("distill"),
                      {"vae": chain.model("decoder") / "vae"})
    return {"unet": str(chain.model("distill") / "unet"),
            "vae": str(chain.model("decoder") / "vae")}


def eval_models(chain: Chain) -> dict[str, pathlib.Path]:
    """The models the report compares, by the name it gives them."""
    return {"teacher": chain.model("teacher"), "evolved": chain.model("evolve"),
            "student": chain.model("distill"), "final": chain.model("final")}


def eval_settings(chain: Chain) -> dict[str, list]:
    """Per model: (steps, guidance) pairs. The teacher at the reference count (50) and at the
    student's; the evolved UNet at 50 (does evolution keep quality?) and the student's; the
    students at their own count; every one over the guidance sweep."""
    from snapjax.eval.evaluate import Setting
    ev = chain.config.eval
    few = chain.config.distill_teacher_steps // 4
    sweep = [float(w) for w in ev.guidance]

    def grid(*steps):
        return [Setting(s, w) for s in steps for w in sweep]
    return {"teacher": grid(ev.reference_steps, few), "evolved": grid(ev.reference_steps, few),
            "student": grid(few), "final": grid(few)}


def evaluate_folders(chain: Chain, folders: Mapping[str, pathlib.Path], settings: Mapping,
                     out: pathlib.Path, *, latency: bool) -> dict:
    """Score pipeline folders as the chain does (its prompts, seeds and DDIM grid) into
    ``out/eval.json`` with its curves and grids; returns the results."""
    from snapjax.data.world import WorldSpec
    from snapjax.eval.evaluate import WorldTask, check_same_latents, evaluate, run_info
    from snapjax.eval.run import write_outputs
    from snapjax.pipeline import TextToImage
    ev = chain.config.eval
    pipes = {}
    for name, folder in folders.items():
        pipe = TextToImage.from_pretrained(folder)
        pipe.schedule = dataclasses.replace(pipe.schedule, timestep_spacing=ev.spacing)
        pipes[name] = pipe
    latent, _, factor = check_same_latents(pipes)
    task = WorldTask.build(WorldSpec(resolution=latent * factor), ev.num_prompts)
    results, images = evaluate(pipes, task, settings, seeds=list(ev.seeds),
                               batch_size=ev.batch_size, latency=latency)
    for name, folder in folders.items():
        results[name]["folder"] = str(folder)
    info = {**run_info(len(task.prompts), list(ev.seeds)), "spacing": ev.spacing}
    write_outputs(out, results, images, info, "world")
    return results


def stage_eval(chain: Chain) -> dict:
    _require(chain, "teacher", "evolve", "distill", "final")
    evaluate_folders(chain, eval_models(chain), eval_settings(chain), chain.folder("eval"),
                     latency=chain.config.eval.latency)
    return {"eval": str(chain.model("eval"))}


def best_guidance(chain: Chain) -> float | None:
    """The final model's best-accuracy guidance of the chain's sweep (None before the eval)."""
    from snapjax.eval.report import best
    path = chain.model("eval")
    if not path.is_file():
        return None
    row = best(json.loads(path.read_text())["models"], "final",
               chain.config.distill_teacher_steps // 4)
    return None if row is None else float(row["guidance"])


def stage_export(chain: Chain) -> dict:
    """Through the ``snapjax export`` plugin (snapjax never imports export/)."""
    from snapjax.cli import main as cli_main
    _require(chain, "final")
    out = chain.model("export")
    done = {}
    for target in ("torch", "coreml"):
        if not chain.config.export[target]:
            continue
        folder = out / target
        args = ["export", target, "--checkpoint", str(chain.model("final")), "--out", str(folder)]
        guidance = best_guidance(chain)
        if target == "coreml" and guidance is not None:
            args += ["--guidance", f"{guidance:g}"]   # the manifest's default: the eval's best
        if not folder.exists():
            rc = cli_main(args)
            if rc:
                raise RuntimeError(f"snapjax export {target} --checkpoint "
                                   f"{chain.model('final')} failed (exit {rc}); its error is above")
        done[target] = str(folder)
    out.mkdir(parents=True, exist_ok=True)
    return done


def stage_ablations(chain: Chain) -> dict:
    from snapjax.train.world_ablations import run_ablations
    _require(chain, "teacher", "robust", "evolve", "decoder", "distill", "eval")
    return {name: r.get("models", {}) for name, r in run_ablations(chain).items()}


def stage_report(chain: Chain) -> dict:
    from snapjax.eval.report import write_report
    _require(chain, "eval")
    paths = write_report(chain)
    return {k: str(v) for k, v in paths.items()}


STAGES: dict[str, Callable[[Chain], dict]] = {
    "vae": stage_vae, "teacher": stage_teacher, "robust": stage_robust, "evolve": stage_evolve,
    "decoder": stage_decoder, "distill": stage_distill, "final": stage_final,
    "eval": stage_eval, "export": stage_export, "ablations": stage_ablations,
    "report": stage_report}
# What a plain `snapjax world` runs: the chain without the ablations (they double its time).
DEFAULT_STAGES = tuple(s for s in STAGES if s != "ablations")


def _done(chain: Chain, stage: str) -> bool:
    if stage == "report":
        return False                 # cheap, and it must see the latest numbers
    if stage == "ablations":
        from snapjax.train.world_ablations import result_path, selected
        return all(result_path(chain, n).is_file() for n in selected(chain))
    if stage == "export":
        out = chain.model("export")
        return all((out / t).exists() for t in ("torch", "coreml") if chain.config.export[t])
    return chain.model(stage).exists()


def parse_stages(spec: str | None) -> list[str]:
    if not spec:
        return list(DEFAULT_STAGES)
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise ValueError(f"--stages {spec!r}: unknown stage(s) {unknown}; choose from "
                         f"{','.join(STAGES)}")
    return [s for s in STAGES if s in chosen]   # always in chain order


def read_records(workdir: pathlib.Path) -> dict:
    path = workdir / CHAIN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("stages", {})
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); delete it to start the record afresh") \
            from None


def _write_records(workdir: pathlib.Path, records: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / (CHAIN_FILE + ".tmp")
    tmp.write_text(json.dumps({"stages": records}, indent=1, default=str) + "\n")
    tmp.replace(workdir / CHAIN_FILE)


def run_world(workdir: str | pathlib.Path, *, stages: Sequence[str] | None = None,
              config: ml_collections.ConfigDict | None = None,
              overrides: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Run ``stages`` (default: all but the ablations) in order, skipping finished ones;
    returns chain.json's records (stage -> seconds, outputs, whether this call ran it)."""
    from snapjax import storage
    if storage.is_remote(workdir):
        # The embedded world's chain is the one-machine CPU job (its report, plots and the
        # reader's cache use local files); a pod runs the stages' own commands, which take
        # gs:// folders (docs/sd15_chain.md).
        raise ValueError(f"snapjax world --workdir {workdir}: the world chain runs on local "
                         "folders; copy its outputs to a bucket afterwards, or run the stages' "
                         "own commands (snapjax train / evolve / eval), which take gs:// folders")
    # local: refused above for gs://
    chain = Chain(pathlib.Path(workdir), config or load_config(config_path("world_chain.py")),
                  dict(overrides or {}))
    unknown = sorted(set(chain.overrides) - set(STAGE_CONFIGS))
    if unknown:
        raise ValueError(f"overrides for {unknown}: only {sorted(STAGE_CONFIGS)} have a config")
    chosen = list(stages or DEFAULT_STAGES)
    records = read_records(chain.workdir)
    for i, stage in enumerate(chosen):
        if _done(chain, stage):
            log.info("stage %d/%d %s: %s exists, skipped", i + 1, len(chosen), stage,
                     chain.model(stage))
            records.setdefault(stage, {})["ran_now"] = False
            continue
        log.info("stage %d/%d %s -> %s", i + 1, len(chosen), stage, chain.model(stage))
        t0 = time.perf_counter()
        outputs = STAGES[stage](chain)
        seconds = time.perf_counter() - t0
        if stage not in ("report", "ablations") and not _done(chain, stage):
            # A training stage returns without its model when it was preempted (it saved).
            _write_records(chain.workdir, records)
            raise InterruptedError(f"stage {stage!r} stopped before writing {chain.model(stage)} "
                                   "(preempted; its checkpoint is saved): run the same command "
                                   "again to resume it")
        records[stage] = {"seconds": round(seconds, 1), "ran_now": True,
                          "output": str(chain.model(stage)), "outputs": outputs}
        _write_records(chain.workdir, records)
    return records


def format_times(records: Mapping[str, dict]) -> str:
    lines, total = [], 0.0
    for stage in STAGES:
        if stage not in records:
            continue
        r = records[stage]
        seconds = r.get("seconds")
        total += seconds or 0.0
        took = "—" if seconds is None else f"{seconds / 60:5.1f} min"
        lines.append(f"  {stage:<8} {took:>9}  {'ran now' if r.get('ran_now') else 'cached'}"
                     f"  {r.get('output', '')}")
    lines.append(f"  {'total':<8} {total / 60:5.1f} min (every stage's own run)")
    return "\n".join(lines)


def split_overrides(extra: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--config.KEY=V`` (the chain's config) and ``--STAGE.KEY=V`` (STAGE's config, passed on
    as ``--config.KEY=V``); a flag for anything else is an error naming it."""
    chain, per_stage = [], {}
    items = list(extra)
    while items:
        arg = items.pop(0)
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"unrecognized argument {arg!r}: expected --config.KEY=VALUE or "
                             f"--STAGE.KEY=VALUE with STAGE one of {sorted(STAGE_CONFIGS)}")
        head, rest = arg[2:].split(".", 1)
        if "=" not in rest and items and not items[0].startswith("--"):
            rest += "=" + items.pop(0)
        if head == "config":
            chain.append(f"--config.{rest}")
        elif head in STAGE_CONFIGS:
            per_stage.setdefault(head, []).append(f"--config.{rest}")
        else:
            raise ValueError(f"unrecognized argument {arg!r}: {head!r} is not 'config' or a "
                             f"stage with a config ({', '.join(sorted(STAGE_CONFIGS))})")
    return chain, per_stage


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/world",
                        help="one folder per stage goes here (default runs/world)")
    parser.add_argument("--config", default=None,
                        help="the chain's config (default configs/world_chain.py; "
                             "configs/world_chain.py:accel for a GPU/TPU)")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset, run in chain order ({','.join(STAGES)}; "
                             "default: all but ablations)")
    parser.set_defaults(_accepts_overrides=True)
    parser.epilog = ("--config.KEY=VALUE overrides the chain's config, --STAGE.KEY=VALUE a "
                     "stage's own config (e.g. --teacher.train.steps=2000)")


def run(args: argparse.Namespace) -> int:
    from snapjax.train.loop import setup_logging
    setup_logging()
    stages = parse_stages(args.stages)
    chain_flags, per_stage = split_overrides(getattr(args, "overrides", []) or [])
    config = load_config(args.config or config_path("world_chain.py"), chain_flags)
    try:
        records = run_world(args.workdir, stages=stages, config=config, overrides=per_stage)
    except InterruptedError as e:
        print(f"snapjax world: {e}")
        return 1
    print("stage times:")
    print(format_times(records))
    report = pathlib.Path(args.workdir) / "REPORT.md"  # local: run_world refuses gs://
    if "report" in records and report.is_file():
        print(f"report: {report}")
    return 0
