"""Architecture evolution: the round's decision against a quality whose answer is known, and
``snapjax evolve`` end to end on a tiny random world teacher, killed and resumed."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from snapjax.config import load_config
from snapjax.evolve import evolution
from snapjax.evolve.evolution import EvolveConfig
from snapjax.evolve.latency import latency_table, unet_cost
from snapjax.models.unet_spec import TINY
from tests.evolve.tiny_world import tiny_world_pipeline
from tests.train.conftest import REPO


class KnownQuality:
    """quality = -(sum of the importance of the dropped blocks): dQuality_b = importance_b."""

    key = "q"

    def __init__(self, spec, importance):
        self.names, self.importance = spec.block_names(), importance

    def __call__(self, unet, params, mask):
        del unet, params
        return {"q": -sum(self.importance[n] for n, m in zip(self.names, mask) if m == 0)}


def decide(spec, importance, target_fraction, **cfg):
    table = latency_table(spec, 64, "macs")
    target = target_fraction * unet_cost(spec, table)
    return evolution.evolution_round(0, spec, None, unet=None,
                                     measure=KnownQuality(spec, importance), table=table,
                                     target=target, cfg=EvolveConfig(**cfg)), table


def test_over_target_removes_the_lowest_quality_per_latency():
    importance = {n: 1.0 for n in TINY.block_names()}
    importance["up_0_1_attn"] = 0.01  # nearly useless and not cheap: the lowest value
    result, table = decide(TINY, importance, 0.5, group_size=2)
    values = sorted(TINY.block_names(), key=lambda n: importance[n] / table[n])
    assert [a[:2] for a in result.actions] == [("remove", values[0]), ("remove", values[1])]
    assert values[0] == "up_0_1_attn"
    assert result.latency_after == pytest.approx(
        result.latency - table[values[0]] - table[values[1]])
    assert result.spec_after.num_blocks == TINY.num_blocks - 2
    row = result.rows()[0]
    assert row["action"] == "remove" and row["d_quality"] == pytest.approx(0.01)


def test_under_target_duplicates_the_most_valuable_that_fit():
    importance = {n: 0.1 for n in TINY.block_names()}
    importance["mid_attn"] = 5.0
    result, table = decide(TINY, importance, 1.0 + 1e-9, group_size=1)  # no room at all
    assert result.actions == []
    assert result.rows()[0]["action"] == "stop"
    room = (table.total + table["mid_attn"]) / table.total
    result, _ = decide(TINY, importance, room * (1 + 1e-9))
    assert result.actions == [("duplicate", "mid_attn", "mid_attn")]
    result, _ = decide(TINY, importance, room, duplicate=False)
    assert result.actions == []


def test_a_group_follows_the_names_earlier_actions_shift():
    spec = dataclasses.replace(TINY, down=(("RAA",), ("R",)))
    importance = {n: 1.0 for n in spec.block_names()}
    importance["down_0_0_attn"] = importance["down_0_0_attn_1"] = 1e-6
    result, _ = decide(spec, importance, 0.3, group_size=2)
    # Removing down_0_0_attn renames down_0_0_attn_1 to down_0_0_attn: the second action
    # must name it so.
    assert result.actions == [("remove", "down_0_0_attn", "down_0_0_attn"),
                              ("remove", "down_0_0_attn", "down_0_0_attn_1")]
    assert result.spec_after.down[0] == ("R",)


def test_unreachable_target_names_the_best_latency():
    table = latency_table(TINY, 64, "macs")
    best = evolution.best_reachable(TINY, table)
    evolution.check_target(TINY, table, best)
    with pytest.raises(ValueError, match=r"unreachable: removing every block.*leaves"):
        evolution.check_target(TINY, table, 0.99 * best)


@pytest.mark.parametrize("key, value, message", [
    ("target_latency", 0.0, "target_latency"), ("target_latency", 1.5, "target_latency"),
    ("quality", "fid", "evolve.quality"), ("duplicate_init", "noise", "duplicate_init"),
    ("rounds", 0, "rounds"),
])
def test_bad_evolve_config(key, value, message):
    with pytest.raises(ValueError, match=message):
        EvolveConfig(**{key: value})


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random-weight world pipeline folder at 8x8 images (latents 4x4), built from shapes."""
    folder = tmp_path_factory.mktemp("teacher") / "model"
    tiny_world_pipeline().save_pretrained(folder)
    return folder


def evolve_config(teacher, rounds):
    return load_config(f"{REPO}/configs/world_evolve.py", [
        f"--config.teacher_pipeline={teacher}", "--config.data.resolution=8",
        "--config.data.num_threads=1", "--config.train.batch_size=4",
        "--config.train.progress_bar=false", "--config.evolve.train_steps_per_round=2",
        # No final phase: a run that finished it takes no more rounds, and the resume below
        # asks the one-round run for a second.
        "--config.evolve.final_train_steps=0",
        f"--config.evolve.rounds={rounds}", "--config.evolve.num_prompts=8",
        "--config.evolve.target_latency=0.75", "--config.opt.warmup_steps=0",
        # The denoising-loss measure: no attribute reader to train for a random teacher.
        "--config.evolve.quality=denoise"])


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent XLA cache for this test only: the resumed run compiles the programs the
    uninterrupted one did (the same specs), and on a 2-core CPU compiling is the cost."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    compilation_cache.reset_cache()  # earlier tests may have initialised it without a folder
    jax.config.update(keys[0], str(tmp_path / "xla_cache"))
    jax.config.update(keys[1], 0)
    jax.config.update(keys[2], 0)
    yield
    compilation_cache.reset_cache()
    for k, v in saved.items():
        jax.config.update(k, v)


def test_evolve_end_to_end_resume_and_preemption(tiny_teacher, tmp_path, compile_cache,
                                                  monkeypatch):
    from snapjax.evolve.run import run_evolution
    from snapjax.pipeline import TextToImage

    whole = tmp_path / "whole"
    summary = run_evolution(evolve_config(tiny_teacher, 2), str(whole))
    rows = [json.loads(line) for line in (whole / "evolution.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["action"] == "remove" for r in rows)  # 0.75 needs several removals
    assert summary["blocks"] == summary["start_blocks"] - 2
    assert summary["latency_ratio"] < 1
    assert summary["final_latency"] == pytest.approx(rows[-1]["latency_after"])
    assert (whole / "evolution.png").stat().st_size > 0
    pipe = TextToImage.from_pretrained(whole / "model")
    assert pipe.unet.spec.num_blocks == summary["blocks"]
    images = pipe(["a red circle"], num_steps=2, seed=0)
    assert images.shape == (1, 8, 8, 3)

    # One round, then the same command asked for two: the second round starts from the
    # checkpointed spec and state and takes the uninterrupted run's action.
    parts = tmp_path / "parts"
    run_evolution(evolve_config(tiny_teacher, 1), str(parts))
    resumed = run_evolution(evolve_config(tiny_teacher, 2), str(parts))
    again = [json.loads(line) for line in (parts / "evolution.jsonl").read_text().splitlines()]
    assert [(r["round"], r["action"], r["block"]) for r in again] == \
        [(r["round"], r["action"], r["block"]) for r in rows]
    assert again[-1]["quality/neg_loss"] == pytest.approx(rows[-1]["quality/neg_loss"], rel=1e-5)
    assert resumed["blocks"] == summary["blocks"]

    # A SIGTERM during round 1's training (step 3 of 4): the run saves and stops; the same
    # command then finishes that round's training and ends where the uninterrupted run does.
    from snapjax.evolve import run as evolve_run

    real_step = evolve_run._SpecTrainer.step
    sent = []

    def step(self, state, batch, rng):
        out = real_step(self, state, batch, rng)
        if int(out[0].step) == 3 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run's PreemptionWatch
        return out

    monkeypatch.setattr(evolve_run._SpecTrainer, "step", step)
    cut = tmp_path / "preempted"
    assert evolve_run.run_evolution(evolve_config(tiny_teacher, 2), str(cut)) == \
        {"preempted": True}
    assert sent and not (cut / "model").exists()
    resumed = evolve_run.run_evolution(evolve_config(tiny_teacher, 2), str(cut))
    again = [json.loads(line) for line in (cut / "evolution.jsonl").read_text().splitlines()]
    assert [(r["round"], r["action"], r["block"]) for r in again] == \
        [(r["round"], r["action"], r["block"]) for r in rows]
    assert resumed["blocks"] == summary["blocks"]
    a = TextToImage.from_pretrained(whole / "model").unet_params
    b = TextToImage.from_pretrained(cut / "model").unet_params
    same = jax.tree.map(lambda x, y: np.allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    assert all(jax.tree.leaves(same))  # the same training steps after the resume


def test_score_blocks_reports_every_block_over_seeds(tiny_teacher, tmp_path, capsys):
    from snapjax import cli
    out = tmp_path / "scores.json"
    assert cli.main(["score-blocks", "--model", str(tiny_teacher), "--quality", "denoise",
                     "--num-prompts", "8", "--seeds", "0", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    from snapjax.pipeline import TextToImage
    names = TextToImage.from_pretrained(tiny_teacher).unet.spec.block_names()
    assert list(result["drop"]) == list(names)
    assert all(len(v) == 2 and np.isfinite(v).all() for v in result["drop"].values())
    assert len(set(result["full"]["neg_loss"])) == 2  # two seeds, two validation batches
    assert any(abs(np.mean(v)) > 0 for v in result["drop"].values())
    printed = capsys.readouterr().out
    assert "neg_loss of the full UNet" in printed and all(n in printed for n in names)
    assert cli.main(["score-blocks", "--model", str(tiny_teacher), "--quality", "denoise",
                     "--num-prompts", "8", "--seeds", "0", "--no-blocks", "--json",
                     str(out)]) == 0
    assert json.loads(out.read_text())["drop"] == {}
