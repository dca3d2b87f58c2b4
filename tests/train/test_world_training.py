"""The README's main command, end to end: ``snapjax world`` runs the whole SnapFusion chain on
the embedded world (VAE, teacher, robust training, evolution, pruned decoder, step
distillation, the final model, evaluation, export) and writes the report.

The default run has the chain shortened (the same code, a few steps per stage, a few prompts):
it checks that every stage writes a folder that loads and samples, that the evaluation scores
samples with numbers in range, that the report names every claim, and that a second run skips
every finished stage. The full chain (about 40 minutes on a 2-core CPU) is slow-marked:
``python -m pytest -m slow tests/train/test_world_training.py``; its bar is the teacher's
colour and shape accuracy (at least 0.8 each, against chance 1/6 and 1/4).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train.conftest import REPO

SHORT = ["--config.train.batch_size=8", "--config.train.log_every=5",
         "--config.train.progress_bar=false", "--config.checkpoint.every_steps=10"]
FEW_SAMPLES = ["--config.diffusion.sample_steps=4", "--config.diffusion.num_samples=4",
               "--config.diffusion.eval_samples=16"]
STAGE_OVERRIDES = {
    "vae": [*SHORT, "--config.train.steps=10"],
    # A teacher UNet of 10 blocks instead of 15 (every later stage takes its spec from the
    # folder it starts from): on this CPU, compiling is most of the chain's time.
    "teacher": [*SHORT, *FEW_SAMPLES, "--config.train.steps=10",
                '--config.unet.down=(("R",), ("RA",))', "--config.unet.mid=R",
                '--config.unet.up=(("R", "R"), ("RA", "RA"))'],
    "robust": [*SHORT, *FEW_SAMPLES, "--config.train.steps=4"],
    "evolve": [*SHORT, *FEW_SAMPLES, "--config.evolve.rounds=1",
               "--config.evolve.train_steps_per_round=2", "--config.evolve.final_train_steps=2",
               "--config.evolve.num_prompts=8", "--config.evolve.sample_steps=2"],
    "decoder": [*SHORT, "--config.train.steps=4", "--config.decoder.num_samples=4"],
    "distill": [*SHORT, "--config.train.steps=4", "--config.distill.num_samples=4",
                "--config.distill.eval_samples=16"],
}
CHAIN_OVERRIDES = ["--config.latents.train_count=64", "--config.latents.heldout_count=16",
                   "--config.latents.steps=2", "--config.eval.num_prompts=16",
                   "--config.eval.seeds=(0,1)", "--config.eval.guidance=(4.0,)",
                   "--config.eval.reference_steps=8",
                   # batch-1 timing compiles each sampler again; tests/eval covers it
                   "--config.eval.latency=False"]
PIPELINE_STAGES = ("teacher", "robust", "evolve", "decoder", "distill/teacher_4",
                   "distill/student_4", "distill/direct_2", "final")


def _chain_config():
    from snapjax.config import load_config
    return load_config(f"{REPO}/configs/world_chain.py", CHAIN_OVERRIDES)


def test_shortened_chain_writes_loadable_stages_and_a_report_naming_every_claim(tmp_path):
    from snapjax import pretrained
    from snapjax.eval.report import CLAIM_IDS, FAILS, HOLDS, NOT_MEASURED, PARTLY
    from snapjax.pipeline import TextToImage
    from snapjax.train.world import DEFAULT_STAGES, run_world

    workdir = tmp_path / "world"
    records = run_world(workdir, config=_chain_config(), overrides=STAGE_OVERRIDES)
    assert list(records) == list(DEFAULT_STAGES)
    assert all(r["ran_now"] and r["seconds"] >= 0 for r in records.values()), records

    # Every stage's folder loads and samples (what `snapjax sample` does with it).
    pretrained.load_model(workdir / "vae" / "model", expect_kind="vae")
    for stage in PIPELINE_STAGES:
        pipe = TextToImage.from_pretrained(workdir / stage / "model")
        image = np.asarray(pipe(["a small red circle"], num_steps=1, seed=0))
        assert image.shape == (1, 32, 32, 3) and image.dtype == np.uint8, stage
    final = TextToImage.from_pretrained(workdir / "final" / "model")
    student = TextToImage.from_pretrained(workdir / "distill" / "direct_2" / "model")
    decoder = TextToImage.from_pretrained(workdir / "decoder" / "model")
    assert final.unet.spec == student.unet.spec and final.num_steps == student.num_steps == 2
    assert final.vae.spec == decoder.vae.spec != student.vae.spec   # the pruned decoder
    evolved = TextToImage.from_pretrained(workdir / "evolve" / "model")
    assert final.unet.spec.num_blocks == evolved.unet.spec.num_blocks

    # The evaluation scored samples of every model: numbers in range, same prompts and seeds.
    ev = json.loads((workdir / "eval" / "eval.json").read_text())
    assert ev["samples_per_setting"] == 32 and set(ev["models"]) == {
        "teacher", "evolved", "student", "final"}
    for name, res in ev["models"].items():
        for row in res["settings"]:
            m = row["metrics"]
            assert 0 <= m["accuracy/all"]["value"] <= m["accuracy/mean"]["value"] <= 1, name
            assert 0 < m["frechet_distance"]["value"] < 1e6, name
    assert (workdir / "eval" / "curves.png").stat().st_size > 0

    # The exports: PyTorch mirrors that load, Core ML packages with the 2-step manifest.
    from export.torch.mirror import load_mirror
    for component in ("unet", "vae_decoder", "text_encoder"):
        load_mirror(workdir / "export" / "torch" / component)
    manifest = json.loads((workdir / "export" / "coreml" /
                           "snapjax_coreml_manifest.json").read_text())
    assert manifest["schedule"]["num_steps"] == 2
    assert manifest["schedule"]["timesteps"] == [999, 499]
    best = max(ev["models"]["final"]["settings"],
               key=lambda r: r["metrics"]["accuracy/all"]["value"])
    assert manifest["guidance_scale"] == best["guidance"]      # the eval's best for it
    for package in ("Unet", "VAEDecoder", "TextEncoder"):
        assert (workdir / "export" / "coreml" / f"{package}.mlpackage").is_dir()

    # The report names every claim with a verdict, and has a row per model and step count.
    report = json.loads((workdir / "report.json").read_text())
    assert [c["id"] for c in report["claims"]] == list(CLAIM_IDS)
    assert all(c["verdict"] in (HOLDS, FAILS, NOT_MEASURED, *PARTLY) for c in report["claims"])
    measured = {c["id"] for c in report["claims"] if c["verdict"] != NOT_MEASURED}
    assert {"evolution_cost", "decoder_size", "headline_flops"} <= measured
    assert "headline_latency" not in measured                        # eval.latency=False
    # The verdicts follow the numbers: here the reference is the teacher at 8 steps, so 2 steps
    # of the evolved UNet cost about a quarter of it, not a tenth.
    rows = {(r["model"], r["steps"]): r for r in report["models"]}
    ratio = rows["final", 2]["gflop_per_image"] / rows["teacher", 8]["gflop_per_image"]
    flops = next(c for c in report["claims"] if c["id"] == "headline_flops")
    assert flops["verdict"] == (HOLDS if ratio <= 0.1 else FAILS), (ratio, flops)
    decoder = next(c for c in report["claims"] if c["id"] == "decoder_size")
    assert decoder["verdict"] == HOLDS, decoder      # half of every width: about 4x fewer
    assert {(r["model"], r["steps"]) for r in report["models"]} == {
        ("teacher", 8), ("teacher", 2), ("evolved", 8), ("evolved", 2), ("student", 2),
        ("final", 2)}
    assert "holds" in report["headroom"]
    markdown = (workdir / "REPORT.md").read_text()
    for claim in report["claims"]:
        assert claim["paper"] in markdown
    assert set(report["stages"]) >= set(DEFAULT_STAGES) - {"report"}
    ablations = [c for c in report["claims"] if c["rule"].startswith("an ablation")]
    assert len(ablations) == 7 and all(c["verdict"] == NOT_MEASURED for c in ablations)

    # Again: every stage is cached (the report is rewritten).
    t0 = time.perf_counter()
    again = run_world(workdir, config=_chain_config(), overrides=STAGE_OVERRIDES)
    assert [s for s, r in again.items() if r["ran_now"]] == ["report"]
    assert again["teacher"]["seconds"] == records["teacher"]["seconds"]
    assert time.perf_counter() - t0 < 60

    # One ablation extends the same report: the decoder from a random init.
    config = _chain_config()
    with config.unlocked():
        config.ablations.run = ("decoder_init",)
    run_world(workdir, stages=["ablations", "report"], config=config,
              overrides=STAGE_OVERRIDES)
    report = json.loads((workdir / "report.json").read_text())
    claim = next(c for c in report["claims"] if c["id"] == "decoder_init_and_data")
    assert claim["verdict"] in (HOLDS, FAILS, *PARTLY) and "random init" in claim["world"], claim
    assert [r["model"] for r in report["ablation_models"]] == ["final_random_decoder"]
    random_final = TextToImage.from_pretrained(
        workdir / "ablations" / "final_random_decoder" / "model")
    assert random_final.vae.spec == final.vae.spec                  # same pruned architecture
    assert sum(c["verdict"] == NOT_MEASURED for c in report["claims"]) == 7   # + latency


def test_stages_subset_and_bad_inputs(tmp_path, capsys):
    from snapjax.cli import main
    from snapjax.train.world import parse_stages, run_world, split_overrides

    assert parse_stages("report,eval") == ["eval", "report"]       # chain order
    with pytest.raises(ValueError, match="unknown stage.*'bogus'"):
        parse_stages("eval,bogus")
    with pytest.raises(FileNotFoundError, match=r"teacher/model is missing.*'teacher' stage"):
        run_world(tmp_path / "w", stages=["robust"], config=_chain_config())
    assert split_overrides(["--teacher.train.steps=5", "--config.eval.seeds", "(0,)"]) == (
        ["--config.eval.seeds=(0,)"], {"teacher": ["--config.train.steps=5"]})
    with pytest.raises(ValueError, match="'final' is not 'config' or a stage with a config"):
        split_overrides(["--final.x=1"])
    with pytest.raises(ValueError, match="only .* have a config"):
        run_world(tmp_path / "w", stages=["vae"], config=_chain_config(),
                  overrides={"report": ["--config.x=1"]})
    assert main(["world", "--workdir", str(tmp_path / "w"), "--stages", "evl"]) == 2
    assert "unknown stage(s) ['evl']" in capsys.readouterr().err


def test_assemble_pipeline_refuses_a_vae_of_other_latents(tmp_path):
    import dataclasses

    import jax

    from snapjax import pretrained
    from snapjax.pipeline import TextToImage, assemble_pipeline
    from tests.evolve.tiny_world import tiny_world_pipeline

    base = tiny_world_pipeline().save_pretrained(tmp_path / "base")
    other = dataclasses.replace(TextToImage.from_pretrained(base).vae.spec, latent_channels=8)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                         pretrained.abstract_params("vae", other))
    pretrained.save_model(tmp_path / "vae8", "vae", other, zeros)
    with pytest.raises(ValueError, match="VAE latents have 8 channels.*takes 4"):
        assemble_pipeline(tmp_path / "out", base, {"vae": tmp_path / "vae8"})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="cannot replace \\['tokenizer'\\]"):
        assemble_pipeline(tmp_path / "out", base, {"tokenizer": base / "tokenizer"})


@pytest.mark.slow
def test_world_command_trains_a_teacher_that_follows_captions(tmp_path):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "snapjax.cli", "world", "--workdir",
                          str(tmp_path / "world")], cwd=REPO, capture_output=True, text=True,
                         timeout=3 * 3600)
    minutes = (time.monotonic() - t0) / 60
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((tmp_path / "world" / "report.json").read_text())
    teacher = next(r for r in report["models"] if r["model"] == "teacher" and r["steps"] == 50)
    sweep = report["sweep"]["teacher"]
    best = max(sweep, key=lambda s: s["metrics"]["accuracy/all"]["value"])
    assert best["metrics"]["accuracy/colour"]["value"] >= 0.8, teacher
    assert best["metrics"]["accuracy/shape"]["value"] >= 0.8, teacher
    print(f"snapjax world: {minutes:.1f} min")
