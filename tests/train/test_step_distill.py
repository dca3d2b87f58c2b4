"""``objective = "step_distill"``: the step's CFG-aware combination, its sharding, and bad inputs.

- CFG-aware loss: with a teacher and a student linear in the context, guiding with w is the
  same as conditioning on w c - (w - 1) u, so the CFG-aware loss at w must equal the vanilla
  loss on that context (same randomness).
- The step sharded over data=2 x fsdp=4 on 8 fake devices (the teacher sharded too, as a frozen
  input) equals the single-device step (tests/train/test_sharded_step.py's harness).
- A killed and resumed run gives the uninterrupted run's losses.
- Bad inputs name the key: odd teacher steps, grids that do not nest, w_min > w_max, p outside
  [0, 1], a student whose latents or contexts differ from the teacher's.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from snapjax import pretrained
from snapjax.config import ConfigError, load_config
from snapjax.diffusion import distill
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.train import objectives, optim, steps
from tests.export.tiny_models import random_params
from tests.train.conftest import REPO, preempt_and_resume, train_env
from tests.train.test_sharded_step import assert_sharded_matches_single_device, run_sharded


class LinearInContext(nn.Module):
    """out = a(t) z + (mean over tokens of ctx) @ W: linear in the context."""

    @nn.compact
    def __call__(self, z, t, ctx, block_mask=None):
        a = self.param("a", nn.initializers.constant(0.5), (z.shape[-1],))
        w = self.param("w", nn.initializers.normal(0.3), (ctx.shape[-1], z.shape[-1]))
        scale = (1.0 + t.astype(jnp.float32) / 1000.0)[:, None, None, None]
        return scale * a * z + (ctx.mean(axis=1) @ w)[:, None, None, :]


def _loss(ctx, empty, cfg_prob, w=3.0, cfg_mix="cond"):
    model = LinearInContext()
    z = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), z, jnp.zeros((4,), jnp.int32), ctx)["params"]
    teacher_params = jax.tree.map(lambda x: x * 1.1, params)
    schedule = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing")
    loss, metrics = steps.step_distill_loss(
        {"unet": params}, {"teacher": teacher_params, "empty_context": empty},
        {"latent": z, "context": ctx}, jax.random.key(7), student=model, teacher=model,
        inputs=functools.partial(steps.cached_inputs, caption_dropout=0.0),
        uncond=lambda fr: fr["empty_context"], schedule=schedule, teacher_schedule=schedule,
        grid=distill.student_grid(schedule, 8), space="x", cfg_prob=cfg_prob,
        guidance_range=(w, w), gamma=0.0, gamma_scaling="dynamic")
    return float(loss), metrics


def test_cfg_aware_loss_is_the_guided_combination():
    rng = np.random.default_rng(1)
    c = rng.normal(size=(4, 5, 6)).astype(np.float32)
    u = rng.normal(size=(1, 5, 6)).astype(np.float32)
    guided, metrics = _loss(c, u, cfg_prob=1.0)
    assert float(metrics["cfg_aware"]) == 1.0
    plain, _ = _loss(3.0 * c - 2.0 * u, u, cfg_prob=0.0)
    assert guided == pytest.approx(plain, rel=1e-5)
    assert _loss(c, u, cfg_prob=0.0)[0] != pytest.approx(plain, rel=1e-3)  # w matters


class GuidedLinearInContext(nn.Module):
    """A guidance-conditioned double of LinearInContext: given w, it returns the two-call guided
    output w f(c) - (w - 1) f(empty) itself, in one call."""

    empty: np.ndarray
    spec = dataclasses.make_dataclass("Spec", [("guidance_embed_dim", int, 8)])()

    @nn.compact
    def __call__(self, z, t, ctx, block_mask=None, guidance_B=None):
        f = LinearInContext(name="f")
        empty = jnp.broadcast_to(jnp.asarray(self.empty), ctx.shape)
        w = guidance_B[:, None, None, None]
        return w * f(z, t, ctx) - (w - 1) * f(z, t, empty)


def _conditioned_loss(ctx, empty, cfg_prob, w=3.0):
    model = GuidedLinearInContext(empty)
    z = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype(np.float32)
    plain = LinearInContext().init(jax.random.key(0), z, jnp.zeros((4,), jnp.int32),
                                   ctx)["params"]
    schedule = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing")
    loss, metrics = steps.step_distill_loss(
        {"unet": {"f": plain}}, {"teacher": jax.tree.map(lambda x: x * 1.1, plain),
                                 "empty_context": empty},
        {"latent": z, "context": ctx}, jax.random.key(7), student=model, teacher=LinearInContext(),
        inputs=functools.partial(steps.cached_inputs, caption_dropout=0.0),
        uncond=lambda fr: fr["empty_context"], schedule=schedule, teacher_schedule=schedule,
        grid=distill.student_grid(schedule, 8), space="x", cfg_prob=cfg_prob,
        guidance_range=(w, w), gamma=0.0, gamma_scaling="dynamic")
    return float(loss), metrics


def test_guidance_conditioned_student_learns_the_guided_teacher_in_one_call():
    """A student given w that computes the guided output itself has exactly the two-call
    student's CFG-aware loss at p = 1 (every example at the drawn w) and the vanilla loss at
    p = 0 (w = 1), with the same randomness."""
    rng = np.random.default_rng(1)
    ctx = rng.normal(size=(4, 5, 6)).astype(np.float32)
    empty = rng.normal(size=(1, 5, 6)).astype(np.float32)
    two_call_cfg, _ = _loss(ctx, empty, cfg_prob=1.0)
    two_call_plain, _ = _loss(ctx, empty, cfg_prob=0.0)
    one_call_cfg, metrics = _conditioned_loss(ctx, empty, cfg_prob=1.0)
    one_call_plain, plain_metrics = _conditioned_loss(ctx, empty, cfg_prob=0.0)
    np.testing.assert_allclose(one_call_cfg, two_call_cfg, rtol=1e-5)
    np.testing.assert_allclose(one_call_plain, two_call_plain, rtol=1e-5)
    assert abs(two_call_cfg - two_call_plain) > 1e-3 * two_call_plain  # w matters here
    assert float(metrics["cfg_aware"]) == 1.0 and float(plain_metrics["cfg_aware"]) == 0.0


def test_sharded_distillation_step_matches_single_device():
    step = """
        from snapjax.diffusion import distill as distill_lib
        from snapjax.models.unet_spec import UNetSpec as _Spec
        import optax
        sched = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing")
        # Adam with eps=1: updates stay linear in the gradients, so the summation-order rounding
        # of sharded gradients is not amplified by 1/sqrt(v) at near-zero entries (the x loss's
        # SNR weights reach ~1e3); a real sharding error still moves params by about lr * grad.
        opt = optax.adam(1e-2, eps=1.0)
        # direct distillation: the teacher has another spec (no attention in its first stage)
        teacher = UNet(_Spec(block_channels=(16, 32), down=(("R",), ("R",)),
                             up=(("R", "R"), ("R", "R")), mid="", num_heads=(2, 2),
                             context_dim=16, transformer_layers=(1, 1), norm_groups=8))
        teacher_params = teacher.init(jax.random.key(5), jnp.zeros((1, 8, 8, 4)),
                                      jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, 16)))["params"]
        frozen_np = {**frozen_np, "teacher": jax.tree.map(np.asarray, teacher_params)}
        step = functools.partial(
            steps.step_distill_step, optimizer=opt, ema_decay=0.9, microbatches=2, student=unet,
            teacher=teacher, inputs=functools.partial(steps.cached_inputs, caption_dropout=0.1),
            uncond=lambda fr: fr["empty_context"], schedule=sched, teacher_schedule=sched,
            grid=tuple(distill_lib.student_grid(sched, 8)), space="x", cfg_prob=0.5,
            guidance_range=(2.0, 14.0), gamma=0.2, gamma_scaling="dynamic", block_mask=BLOCK_MASK)
    """
    report = run_sharded(step=step)
    assert_sharded_matches_single_device(report)
    for one, many in zip(report["one_metrics"], report["many_metrics"]):
        assert one["cfg_aware"] == many["cfg_aware"]
        np.testing.assert_allclose(many["distill"], one["distill"], rtol=1e-5)
        np.testing.assert_allclose(many["orig"], one["orig"], rtol=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny snapjax teacher pipeline (diffusers' tiny SD layout, converted)."""
    from snapjax.pipeline import TextToImage
    from tests.tiny_pipeline import build_pipeline
    tmp = tmp_path_factory.mktemp("distill")
    build_pipeline(tmp / "sd")
    TextToImage.from_pretrained(tmp / "sd").save_pretrained(tmp / "teacher")
    return tmp


def _objective(tmp, *overrides):
    config = load_config(str(REPO / "configs" / "world_distill.py"), [
        "--config.data.source=prepared", f"--config.data.path={tmp}", "--config.data.resolution=16",
        f"--config.distill.teacher={tmp / 'teacher'}", *overrides])
    return objectives.build_objective(
        config, optimizer=optim.make_optimizer(optim.OptimConfig(), 10), ema_decay=0.99,
        microbatches=1, compute_dtype=jnp.float32)


def test_builds_with_the_teacher_frozen_and_the_student_trained(teacher):
    objective = _objective(teacher)
    assert set(objective.pretrained) == {"unet"} and "teacher" in objective.frozen
    assert objective.step.keywords["grid"][0].tolist() == [999, 749, 499, 249]
    assert objective.step.keywords["schedule"].timestep_spacing == "trailing"


def test_the_papers_32_teacher_steps_build(teacher):
    """32 -> 16 on 1000 timesteps: the grids nest because each step lands on the next grid
    timestep (ddim_landing='next'), which the student's schedule carries into its folder."""
    kw = _objective(teacher, "--config.distill.teacher_steps=32").step.keywords
    t, mid, s = (a.tolist() for a in kw["grid"])
    assert len(t) == 16 and s == t[1:] + [-1] and t[:2] == [999, 937] and mid[0] == 968
    assert kw["schedule"].ddim_landing == "next"


def test_a_guidance_conditioned_student_starts_as_its_init(teacher):
    objective = _objective(teacher, "--config.distill.guidance_embed_dim=8",
                           "--config.distill.cfg_prob=1")
    student = objective.step.keywords["student"]
    assert student.spec.guidance_embed_dim == 8
    assert objective.step.keywords["teacher"].spec.guidance_embed_dim == 0
    kernel = np.asarray(objective.pretrained["unet"]["time_embedding"]["cond_proj"]["kernel"])
    assert kernel.shape == (8, student.spec.block_channels[0]) and not kernel.any()
    with pytest.raises(ConfigError, match="guidance_embed_dim=-1 must be >= 0"):
        _objective(teacher, "--config.distill.guidance_embed_dim=-1")


def test_bad_inputs_are_named(teacher):
    with pytest.raises(ConfigError, match="even integer"):
        _objective(teacher, "--config.distill.teacher_steps=7")
    with pytest.raises(ConfigError, match="not every second step"):
        _objective(teacher, "--config.distill.timestep_spacing=leading")
    with pytest.raises(ConfigError, match="guidance_min <= guidance_max"):
        _objective(teacher, "--config.distill.guidance_min=9", "--config.distill.guidance_max=3")
    for p in ("-0.1", "1.5"):
        with pytest.raises(ConfigError, match=r"cfg_prob.*\[0, 1\]"):
            _objective(teacher, f"--config.distill.cfg_prob={p}")
    with pytest.raises(ConfigError, match="not a folder"):
        _objective(teacher, f"--config.distill.teacher={teacher / 'missing'}")
    spec = pretrained.read_spec(teacher / "teacher" / "unet", "unet")
    for field, value, message in (("in_channels", 3, "latent channels"),
                                  ("context_dim", 16, "context_dim=16 but the text encoder")):
        other = dataclasses.replace(spec, **{field: value})
        if field == "in_channels":
            other = dataclasses.replace(other, out_channels=3)
        folder = teacher / f"student_{field}"
        if not folder.exists():
            pretrained.save_model(folder, "unet", other, random_params("unet", other))
        with pytest.raises(ConfigError, match=message):
            _objective(teacher, f"--config.distill.student_init={folder}")


@pytest.fixture(scope="module")
def latents(teacher):
    """16 latents the tiny teacher generated (prepared-shard format)."""
    from snapjax.data import generated
    from snapjax.pipeline import TextToImage
    folder = teacher / "latents"
    generated.generate_latents(TextToImage.from_pretrained(teacher / "teacher"),
                               ["a red circle", "a blue square"], folder, count=16,
                               num_steps=2, batch_size=8, progress=False)
    return folder


def test_preempted_and_resumed_run_gives_the_same_losses(teacher, latents, jax_cache):
    steps = 16
    overrides = ["--config.data.source=prepared", f"--config.data.path={latents}",
                 "--config.data.resolution=16", "--config.data.num_threads=1",
                 f"--config.distill.teacher={teacher / 'teacher'}",
                 "--config.distill.cfg_prob=0.5", "--config.train.batch_size=4",
                 f"--config.train.steps={steps}", "--config.train.log_every=1",
                 "--config.train.progress_bar=false", "--config.train.export=false",
                 "--config.checkpoint.every_steps=1000", "--config.opt.warmup_steps=0"]
    run = preempt_and_resume(teacher / "preemption", overrides, train_env(jax_cache),
                             "configs/world_distill.py")
    assert run.returncode == 0 and "SIGTERM" in run.preempted_log, run.preempted_log[-3000:]
    assert len(run.saved) == 1 and 3 <= run.saved[0] < steps, run.saved  # the preemption's save
    assert f"resumed from step {run.saved[0]}" in run.resume_log
    assert sorted(run.resumed) == sorted(run.straight) == list(range(1, steps + 1))
    np.testing.assert_allclose([run.resumed[s] for s in range(1, steps + 1)],
                               [run.straight[s] for s in range(1, steps + 1)], rtol=1e-6)


def test_a_student_with_another_text_encoder_is_refused(teacher, tmp_path):
    import shutil
    student = tmp_path / "student"
    shutil.copytree(teacher / "teacher", student)
    module, params = pretrained.load_model(student / "text_encoder")
    shutil.rmtree(student / "text_encoder")
    pretrained.save_model(student / "text_encoder", "text_encoder", module.spec,
                          jax.tree.map(lambda x: np.asarray(x) + 0.01, params))
    with pytest.raises(ConfigError, match="another text encoder"):
        _objective(teacher, f"--config.distill.student_init={student}")
    shutil.rmtree(student / "text_encoder")
    shutil.copytree(teacher / "teacher" / "text_encoder", student / "text_encoder")
    assert "teacher" in _objective(teacher, f"--config.distill.student_init={student}").frozen


def test_chain_plans_name_each_stage_and_its_teacher():
    from snapjax.train.distill_chain import Stage, plan
    assert plan("progressive", "T", 32, stages=3) == [
        Stage("teacher_16", "T", 32), Stage("progressive_8", "teacher_16", 16),
        Stage("progressive_4", "progressive_8", 8)]
    assert plan("direct", "T", 32, "E") == [
        Stage("teacher_16", "T", 32), Stage("student_16", "E", 32),
        Stage("direct_8", "teacher_16", 16, "student_16")]
    for args, message in ((("direct", "T", 32), "needs --student"),
                          (("direct", "T", 6, "E"), "must divide by 4"),
                          (("progressive", "T", 12, "", 3), "cannot be halved 3 times"),
                          (("progressive", "T", 8, "E"), "--student is for the direct"),
                          (("distilled", "T", 8), "expected one of")):
        with pytest.raises(ValueError, match=message):
            plan(*args)


def test_chain_runs_each_stage_on_the_previous_student_and_skips_finished_ones(
        teacher, latents, tmp_path):
    """Progressive 4 -> 2 -> 1 in one call: each stage's folder loads and samples at its step
    count; the second stage was taught by the first stage's student; a rerun trains nothing."""
    from snapjax.pipeline import TextToImage
    from snapjax.train.distill_chain import plan, run_chain
    overrides = ["--config.data.source=prepared", f"--config.data.path={latents}",
                 "--config.data.resolution=16", "--config.data.num_threads=1",
                 "--config.train.batch_size=4", "--config.train.steps=2",
                 "--config.train.progress_bar=false", "--config.train.sample_every=0",
                 "--config.checkpoint.every_steps=2", "--config.opt.warmup_steps=0"]
    stages = plan("progressive", str(teacher / "teacher"), 4, stages=2)
    config = str(REPO / "configs" / "world_distill.py")
    records = run_chain(config, tmp_path, stages, overrides,
                        ["--config.distill.guidance_embed_dim=8"])
    assert [r["stage"] for r in records] == ["teacher_2", "progressive_1"]
    assert records[1]["teacher"] == str(tmp_path / "teacher_2" / "model")
    first = TextToImage.from_pretrained(tmp_path / "teacher_2" / "model")
    last = TextToImage.from_pretrained(tmp_path / "progressive_1" / "model")
    assert (first.num_steps, last.num_steps) == (2, 1)
    assert not first.guidance_conditioned and last.guidance_conditioned  # --last. overrides
    assert last(["a red circle"], seed=0).shape[0] == 1
    again = run_chain(config, tmp_path, stages, overrides)
    assert all(r["skipped"] for r in again)


def _sd15_config(variant: str, *overrides):
    return load_config(str(REPO / "configs" / f"sd15_distill.py:{variant}"), list(overrides))


def test_abstract_build_without_a_teacher_folder_takes_the_config_specs():
    """distill.teacher="" (launch/aot_check.py): the teacher is config.unet's shape, the student
    config.student_unet's, the schedule config.schedule (tiny specs, shapes only)."""
    from snapjax.config import as_config
    from snapjax.models.text_encoder import TextEncoderSpec
    from snapjax.models.unet import abstract_unet_params
    from snapjax.models.unet_spec import TINY
    student_spec = dataclasses.replace(TINY, down=(("R",), ("R",)), up=(("R", "R"), ("R", "R")),
                                       mid="R")
    schedule = NoiseSchedule(prediction_type="v_prediction", beta_end=0.015)
    config = _sd15_config("pod_direct", "--config.distill.teacher=",
                          "--config.distill.teacher_steps=8", "--config.distill.attention=xla")
    with config.unlocked():
        config.unet = as_config(TINY)
        config.student_unet = as_config(student_spec)
        config.text_encoder = as_config(TextEncoderSpec(vocab_size=64, max_length=8, width=32,
                                                        layers=1, heads=2, mlp_dim=64))
        config.schedule = as_config(schedule)
    objective = objectives.build_objective(
        config, optimizer=optim.make_optimizer(optim.OptimConfig(), 10), ema_decay=0.99,
        microbatches=1, compute_dtype=jnp.bfloat16, abstract=True, platform="cpu")
    kw = objective.step.keywords
    assert kw["teacher"].spec == TINY and kw["student"].spec == student_spec
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    assert shapes(objective.frozen["teacher"]) == shapes(abstract_unet_params(TINY))
    assert shapes(objective.pretrained["unet"]) == shapes(abstract_unet_params(student_spec))
    assert all(isinstance(x, jax.ShapeDtypeStruct)
               for x in jax.tree.leaves((objective.frozen, objective.pretrained)))
    expected = dataclasses.replace(schedule, timestep_spacing="trailing", ddim_landing="next")
    assert kw["schedule"] == kw["teacher_schedule"] == expected
    assert kw["grid"][0].tolist() == [999, 749, 499, 249]
    assert objective.frozen["empty_context"].shape == (1, 8, 32)
    assert objective.batch_shapes(2)["latent"].shape == (2, 64, 64, 4)


def test_an_empty_teacher_outside_abstract_mode_is_a_config_error():
    build = functools.partial(objectives.build_objective,
                              optimizer=optim.make_optimizer(optim.OptimConfig(), 10),
                              ema_decay=0.99, microbatches=1, compute_dtype=jnp.float32)
    config = _sd15_config("pod", "--config.distill.teacher=", "--config.distill.attention=xla")
    with pytest.raises(ConfigError, match="distill.teacher is empty"):
        build(config)
    raw = _sd15_config("pod", "--config.distill.teacher=", "--config.distill.attention=xla",
                       "--config.data.source=world")
    with pytest.raises(ConfigError, match="data.source='prepared'"):
        build(raw, abstract=True, platform="cpu")
    world = load_config(str(REPO / "configs" / "world_distill.py"), ["--config.distill.teacher="])
    with pytest.raises(ConfigError, match=r"config.unet, config.text_encoder, config.schedule"):
        build(world, abstract=True, platform="cpu")


def test_sd15_distill_config_has_the_papers_defaults():
    from snapjax.config import from_config
    from snapjax.models.unet_spec import SD15, SNAPFUSION, UNetSpec
    from snapjax.train.objectives import StepDistillConfig
    for variant in ("pod", "pod_direct", "gpu", "gpu_direct"):
        config = _sd15_config(variant)
        cfg = from_config(StepDistillConfig, config.distill, "distill")
        assert (cfg.teacher_steps, cfg.cfg_prob, cfg.guidance_min, cfg.guidance_max) == \
            (32, 0.1, 2.0, 14.0)
        assert (cfg.gamma, cfg.gamma_scaling, cfg.loss_space, cfg.timestep_spacing) == \
            (0.2, "dynamic", "x", "trailing")
        assert from_config(NoiseSchedule, config.schedule, "schedule").prediction_type == \
            "v_prediction"
        assert from_config(UNetSpec, config.unet, "unet") == SD15
        assert config.opt.weight_decay == 0.01 and config.data.source == "prepared"
        assert ("student_unet" in config) == variant.endswith("_direct")
        if variant.endswith("_direct"):
            assert from_config(UNetSpec, config.student_unet, "student_unet") == SNAPFUSION
        assert config.train.batch_size == (2048 if variant.startswith("pod") else 256)
        assert cfg.attention == ("tpu_flash" if variant.startswith("pod") else "xla")
    with pytest.raises(ValueError, match="unknown variant"):
        _sd15_config("cpu")
