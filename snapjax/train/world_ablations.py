"""The ablations behind the paper's other claims, as one stage of ``snapjax world``.

    snapjax world --workdir runs/world --stages ablations,report
    snapjax world --workdir runs/world --stages ablations,report \\
        --config.ablations.run='("direct_vs_progressive","cfg_aware_loss")'

Each ablation trains the variant its claim needs with the chain's sizing, on the chain's own
folders (the same teacher, evolved UNet and distillation stages), into
``WORKDIR/ablations/<name>/``, then scores the variants with the chain's evaluation (the same
prompts, noise seeds, guidance sweep and grid, so the rows compare with the chain's eval.json)
into ``WORKDIR/ablations/<name>/eval.json``. The report turns them into verdicts
(:mod:`snapjax.eval.report`). A finished ablation (its ``result.json`` exists) is skipped.

  direct_vs_progressive  progressive 4 -> 2 on the teacher's UNet (its 4-step teacher is the
                         chain's teacher_4) against the chain's direct 2-step student
  cfg_aware_loss         the direct 4 -> 2 stage with the vanilla loss only (p = 0) and the
                         CFG-aware loss only (p = 1), against the chain's mix (p = 0.1)
  original_loss_gamma    the same stage with gamma = 0 (no original denoising loss)
  guidance_conditioned   the evolved UNet 8 -> 4 with a guidance input (one UNet call per
                         step), against the chain's 2-step student at the same UNet calls
  decoder_init           the pruned decoder trained from a random init, the final model with it
  robust_vs_plain        the teacher fine-tuned as long as the robust stage without dropping
                         blocks; every block's drop scored on it and on the robust model
  evolution_vs_naive     evolution with the naive "cheapest" rule (remove the cheapest blocks)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Callable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Ablation:
    name: str
    # Trains the variants; returns {model name in the report: pipeline folder}.
    build: Callable
    # {model name: steps to evaluate at} (each over the chain's guidance sweep).
    steps: Callable


def _distill_stage(chain, name: str, teacher: str, teacher_steps: int, student: str,
                   extra: list[str]) -> pathlib.Path:
    from snapjax.train.distill_chain import Stage
    from snapjax.train.world import run_distill
    workdir = chain.workdir / "ablations"
    run_distill(chain, workdir, [Stage(name, teacher, teacher_steps, student)], extra)
    return workdir / name / "model"


def _few(chain) -> int:
    return chain.config.distill_teacher_steps // 4


def _distilled(chain, stage: str) -> str:
    return str(chain.workdir / "distill" / stage / "model")


def build_direct_vs_progressive(chain) -> dict:
    from snapjax.train.distill_chain import plan
    from snapjax.train.world import run_distill
    # In the chain's distill folder, so its first stage is the chain's teacher_<N/2> (cached).
    stages = plan("progressive", str(chain.model("teacher")), chain.config.distill_teacher_steps)
    run_distill(chain, chain.workdir / "distill", stages)
    return {"progressive": chain.workdir / "distill" / stages[-1].name / "model"}


def build_cfg_aware_loss(chain) -> dict:
    half = chain.config.distill_teacher_steps // 2
    teacher, student = _distilled(chain, f"teacher_{half}"), _distilled(chain, f"student_{half}")
    return {name: _distill_stage(chain, f"{name}_{_few(chain)}", teacher, half, student,
                                 [f"--config.distill.cfg_prob={p}"])
            for name, p in (("vanilla", 0.0), ("cfg_aware", 1.0))}


def build_original_loss_gamma(chain) -> dict:
    half = chain.config.distill_teacher_steps // 2
    return {"gamma0": _distill_stage(chain, f"gamma0_{_few(chain)}",
                                     _distilled(chain, f"teacher_{half}"), half,
                                     _distilled(chain, f"student_{half}"),
                                     ["--config.distill.gamma=0"])}


def build_guidance_conditioned(chain) -> dict:
    n = chain.config.distill_teacher_steps
    return {"guided": _distill_stage(
        chain, f"guided_{n // 2}", str(chain.model("teacher")), n, str(chain.model("evolve")),
        ["--config.distill.guidance_embed_dim=64", "--config.distill.cfg_prob=1",
         "--config.distill.guidance_min=1"])}


def build_decoder_init(chain) -> dict:
    from snapjax.pipeline import assemble_pipeline
    from snapjax.train.loop import train_and_evaluate
    from snapjax.train.world import decoder_inputs
    folder = chain.workdir / "ablations" / "decoder_random"
    if not (folder / "model").exists():
        config = chain.stage_config("decoder", [*decoder_inputs(chain),
                                                "--config.decoder.init=random"])
        metrics = train_and_evaluate(config, folder)
        (folder / "metrics.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if k.startswith("eval/")}, indent=1))
    final = chain.workdir / "ablations" / "final_random_decoder" / "model"
    if not final.exists():
        assemble_pipeline(final, chain.model("distill"), {"vae": folder / "model" / "vae"})
    return {"final_random_decoder": final}


def build_robust_vs_plain(chain) -> dict:
    from snapjax.data.world import WorldSpec
    from snapjax.evolve.score import block_drop_scores
    from snapjax.pipeline import TextToImage
    from snapjax.train.loop import train_and_evaluate
    folder = chain.workdir / "ablations" / "plain"
    if not (folder / "model").exists():
        config = chain.stage_config("robust", [
            f"--config.teacher_pipeline={chain.model('teacher')}",
            "--config.robust.enabled=false"])
        train_and_evaluate(config, folder)
    evolve = chain.stage_config("evolve")
    scores = {}
    for name, model in (("plain", folder / "model"), ("robust", chain.model("robust"))):
        pipe = TextToImage.from_pretrained(model)
        side = pipe.sample_size * pipe.vae.spec.downsample_factor
        scores[name] = block_drop_scores(
            pipe, WorldSpec(resolution=side), quality="world",
            num_prompts=evolve.evolve.num_prompts, num_steps=evolve.evolve.sample_steps,
            guidance_scale=evolve.evolve.guidance_scale, seeds=(0,))
    (chain.workdir / "ablations" / "robust_vs_plain").mkdir(parents=True, exist_ok=True)
    (chain.workdir / "ablations" / "robust_vs_plain" / "block_scores.json").write_text(
        json.dumps(scores, indent=1))
    return {}


def build_evolution_vs_naive(chain) -> dict:
    from snapjax.evolve.run import run_evolution
    folder = chain.workdir / "ablations" / "evolve_cheapest"
    if not (folder / "model").exists():
        config = chain.stage_config("evolve", [
            f"--config.teacher_pipeline={chain.model('robust')}",
            "--config.evolve.rule=cheapest"])
        run_evolution(config, str(folder))
    return {"evolved_cheapest": folder / "model"}


def _at(*steps_of):
    return lambda chain: {name: [s(chain) for s in steps] for name, steps in steps_of}


FEW = _few
REFERENCE = lambda chain: int(chain.config.eval.reference_steps)  # noqa: E731
HALF = lambda chain: chain.config.distill_teacher_steps // 2      # noqa: E731

ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation("direct_vs_progressive", build_direct_vs_progressive,
             _at(("progressive", (FEW,)))),
    Ablation("cfg_aware_loss", build_cfg_aware_loss,
             _at(("vanilla", (FEW,)), ("cfg_aware", (FEW,)))),
    Ablation("original_loss_gamma", build_original_loss_gamma, _at(("gamma0", (FEW,)))),
    Ablation("guidance_conditioned", build_guidance_conditioned, _at(("guided", (HALF,)))),
    Ablation("decoder_init", build_decoder_init, _at(("final_random_decoder", (FEW,)))),
    Ablation("robust_vs_plain", build_robust_vs_plain, _at()),
    Ablation("evolution_vs_naive", build_evolution_vs_naive,
             _at(("evolved_cheapest", (REFERENCE,)))),
)}


def selected(chain) -> list[str]:
    names = list(chain.config.ablations.run)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"--config.ablations.run: unknown ablation(s) {unknown}; choose from "
                         f"{list(ABLATIONS)}")
    return names


def result_path(chain, name: str) -> pathlib.Path:
    return chain.workdir / "ablations" / name / "result.json"


def run_ablation(chain, name: str) -> dict:
    """Train and score one ablation (skipped if its result.json exists)."""
    from snapjax.eval.evaluate import Setting
    from snapjax.train.world import evaluate_folders
    path = result_path(chain, name)
    if path.is_file():
        return json.loads(path.read_text())
    ablation = ABLATIONS[name]
    folders = ablation.build(chain)
    out = {"ablation": name, "models": {k: str(v) for k, v in folders.items()}}
    if folders:
        steps, sweep = ablation.steps(chain), chain.config.eval.guidance
        settings = {m: [Setting(s, float(w)) for s in steps[m] for w in sweep] for m in folders}
        evaluate_folders(chain, folders, settings, path.parent, latency=False)
        out["eval"] = str(path.parent / "eval.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def run_ablations(chain) -> dict:
    return {name: run_ablation(chain, name) for name in selected(chain)}
