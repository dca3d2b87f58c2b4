"""``objective = "step_distill"``: a student that takes half the teacher's DDIM steps
(Salimans & Ho's progressive distillation; SnapFusion section 4, with its CFG-aware loss).

The teacher is a pipeline folder (its UNet, text encoder, VAE, tokenizer and schedule); the
student starts from ``distill.student_init`` (a pipeline or UNet folder; "" is the teacher's own
UNet, progressive distillation) and may have another UNet spec (direct, cross-architecture
distillation). Only the student's UNet trains; the teacher's UNet is a frozen, non-donated input
of the step (:func:`steps.step_distill_step`), never in the checkpoint. Data is what the UNet
objective takes (raw world images encoded by the teacher's VAE in the step, or prepared latents
+ contexts). At the end ``<workdir>/model`` is a pipeline folder that records the student's
steps, its grid's spacing and the guidance it is sampled with.

Legend: B batch, L tokens, D context width.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import numpy as np

from snapjax import storage
from snapjax import pretrained
from snapjax.config import ConfigError, from_config
from snapjax.diffusion import distill
from snapjax.diffusion.schedule import NoiseSchedule
from snapjax.models import attention as attention_lib
from snapjax.models.unet import UNet, abstract_unet_params, with_guidance_input
from snapjax.models.unet_spec import UNetSpec
from snapjax.train import steps
from snapjax.train.objectives import Objective, data_config, register
from snapjax.train.objectives import diffusion as diffusion_lib
from snapjax.train.objectives.components import load_component

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepDistillConfig:
    """``config.distill``: teacher, student, and the loss (every choice is an ablation).

    teacher: the teacher's pipeline folder. student_init: the student's start, a pipeline or UNet
      folder ("": the teacher's UNet).
    teacher_steps: N, the teacher's DDIM steps; the student learns N / 2 on the grid sampling
      uses for ``timestep_spacing`` ("trailing": the grids nest, see snapjax.diffusion.distill).
    loss_space: "x" (truncated-SNR weight, Salimans & Ho), "v" or "eps".
    cfg_prob: the probability per step of the CFG-aware loss (w ~ U[guidance_min, guidance_max]);
      0 is vanilla distillation, 1 CFG-aware only.
    gamma, gamma_scaling: the original denoising loss's weight and its scaling ("dynamic": to
      the distillation loss's size; "constant"); gamma 0 turns it off.
    caption_dropout: as in training, so the student also learns the unconditional output.
    guidance_scale: what the student is sampled with (previews, the exported folder); None:
      the teacher pipeline's.
    guidance_embed_dim: > 0 gives the student a guidance input of this many sinusoidal features
      (a zero-initialised projection, so it starts as its init) and it learns the guided teacher
      in one call: sampling then costs one UNet call per step instead of two. Each example is
      guided at w ~ U[guidance_min, guidance_max] with probability cfg_prob, else at w = 1, so
      such a student wants cfg_prob near 1. 0: the usual two-call student (or keep the init's
      guidance input, if it has one).
    unet_remat, attention: how the student (and, for attention, the teacher) UNet runs, as
      ``diffusion.unet_remat`` and ``diffusion.attention`` (never what it computes).

    An empty ``teacher`` is only for ahead-of-time compiles (launch/aot_check.py): the teacher
    is then ``config.unet``'s shape, the student ``config.student_unet``'s (else
    ``config.unet``'s; a ``student_init`` folder still gives its own), the text encoder
    ``config.text_encoder``'s and the schedule ``config.schedule``.
    """

    teacher: str = ""
    student_init: str = ""
    teacher_steps: int = 32
    timestep_spacing: str = "trailing"
    loss_space: str = "x"
    cfg_prob: float = 0.1
    guidance_min: float = 2.0
    guidance_max: float = 14.0
    gamma: float = 0.2
    gamma_scaling: str = "dynamic"
    caption_dropout: float = 0.1
    guidance_scale: float | None = None
    num_samples: int = 16
    eval_samples: int = 64
    guidance_embed_dim: int = 0
    unet_remat: bool = False
    attention: str = "xla"

    def __post_init__(self):
        if self.attention not in attention_lib.IMPLEMENTATIONS:
            raise ValueError(f"distill.attention={self.attention!r}: expected one of "
                             f"{', '.join(attention_lib.IMPLEMENTATIONS)}")
        if self.loss_space not in distill.LOSS_SPACES:
            raise ValueError(f"distill.loss_space={self.loss_space!r}: expected one of "
                             f"{distill.LOSS_SPACES}")
        if not 0.0 <= self.cfg_prob <= 1.0:
            raise ValueError(f"distill.cfg_prob={self.cfg_prob} must be in [0, 1]")
        if not 1.0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"distill.guidance_min={self.guidance_min} and guidance_max="
                             f"{self.guidance_max}: need 1 <= guidance_min <= guidance_max")
        if self.gamma < 0:
            raise ValueError(f"distill.gamma={self.gamma} must be >= 0")
        if self.gamma_scaling not in steps.GAMMA_SCALINGS:
            raise ValueError(f"distill.gamma_scaling={self.gamma_scaling!r}: expected one of "
                             f"{steps.GAMMA_SCALINGS}")
        if self.guidance_embed_dim < 0:
            raise ValueError(f"distill.guidance_embed_dim={self.guidance_embed_dim} must be >= 0 "
                             "(0: no guidance input)")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"distill.caption_dropout={self.caption_dropout} must be in [0, 1)")


def _unet_folder(path: str, what: str) -> str:
    folder = storage.path(path)
    if (folder / "unet").is_dir():
        return str(folder / "unet")
    if pretrained.is_snapjax_model(folder) or (folder / "config.json").is_file():
        return str(folder)
    raise ConfigError(f"distill.{what}={path}: neither a pipeline folder (with unet/) nor a UNet "
                      "model folder")


def _schedule(folder: str) -> NoiseSchedule | None:
    """The schedule a pipeline folder records (None for a bare model folder)."""
    from snapjax.pipeline import PIPELINE_FILE, read_pipeline_file
    path = storage.path(folder)
    if (path / PIPELINE_FILE).is_file():
        return read_pipeline_file(path).schedule
    config = path / "scheduler" / "scheduler_config.json"
    return NoiseSchedule.from_diffusers_config(config) if config.is_file() else None


def _grid_options(cfg: StepDistillConfig) -> dict:
    """The teacher's and student's grid: ``distill.timestep_spacing``, each DDIM step landing on
    the grid's next timestep, so that 32 -> 16 -> 8 nest on 1000 training timesteps (with
    diffusers' landing t - 1000 // 32 they do not); where the count divides 1000 (the world's
    8 -> 4 -> 2) the two landings are the same. The student's folder records it."""
    return {"timestep_spacing": cfg.timestep_spacing, "ddim_landing": "next"}


def _same_noise(a: NoiseSchedule, b: NoiseSchedule) -> bool:
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "set_alpha_to_one")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def _pipeline_meta(cfg: StepDistillConfig):
    """(teacher schedule, student schedule, teacher's guidance scale)."""
    from snapjax.pipeline import PIPELINE_FILE, read_pipeline_file
    teacher_folder = storage.path(cfg.teacher)
    if not teacher_folder.is_dir():
        raise ConfigError(f"distill.teacher={cfg.teacher}: not a folder (expected the teacher's "
                          "pipeline folder)")
    teacher_schedule = _schedule(cfg.teacher)
    if teacher_schedule is None:
        raise ConfigError(f"distill.teacher={cfg.teacher}: not a pipeline folder (no "
                          f"{PIPELINE_FILE} or scheduler/); the teacher's schedule is needed")
    guidance = (read_pipeline_file(teacher_folder).guidance_scale
                if (teacher_folder / PIPELINE_FILE).is_file() else None)
    student_schedule = (_schedule(cfg.student_init) if cfg.student_init else None) \
        or teacher_schedule
    if not _same_noise(teacher_schedule, student_schedule):
        raise ConfigError(f"distill.student_init={cfg.student_init}: its noise schedule differs "
                          "from the teacher's (betas, timesteps); distillation needs one")
    spacing = _grid_options(cfg)
    return (dataclasses.replace(teacher_schedule, **spacing),
            dataclasses.replace(student_schedule, **spacing), guidance or 7.5)


@register("step_distill")
def build(config, *, optimizer, ema_decay, microbatches, compute_dtype, abstract,
          platform) -> Objective:
    cfg = from_config(StepDistillConfig, config.distill, "distill")
    data = data_config(config)
    prepared = data.source == "prepared"
    from_specs = not cfg.teacher
    if from_specs:
        _check_spec_mode(config, abstract, prepared)
        teacher_schedule, schedule, teacher_guidance = _spec_meta(config, cfg)
    else:
        teacher_schedule, schedule, teacher_guidance = _pipeline_meta(cfg)
    try:
        grid = distill.student_grid(schedule, cfg.teacher_steps)
    except ValueError as e:
        raise ConfigError(f"distill.teacher_steps / distill.timestep_spacing: {e}") from None
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else teacher_guidance
    # The UNet objective's loaders: the student's UNet with the teacher's text encoder and VAE.
    dcfg = diffusion_lib.DiffusionConfig(
        caption_dropout=cfg.caption_dropout, **_model_paths(cfg),
        sample_steps=cfg.teacher_steps // 2, guidance_scale=guidance,
        num_samples=cfg.num_samples, eval_samples=cfg.eval_samples,
        unet_remat=cfg.unet_remat, attention=cfg.attention)
    models = diffusion_lib.load_models(config, dcfg, prepared, compute_dtype, abstract, platform)
    if from_specs:
        teacher, teacher_params = _spec_teacher(config, compute_dtype)
        models = _spec_student(config, cfg, models)
    else:
        teacher, teacher_params = load_component(_unet_folder(cfg.teacher, "teacher"), "unet",
                                                 compute_dtype, abstract)
    # No backward pass through the teacher, so remat would change nothing; its kernel matters.
    teacher = teacher.clone(attention_impl=cfg.attention)
    models = _with_guidance_input(models, cfg.guidance_embed_dim, abstract)
    # Without a teacher folder there is no teacher text encoder to compare a student_init's with.
    _check_pair(cfg if cfg.teacher else dataclasses.replace(cfg, student_init=""), teacher.spec,
                models)
    block_mask = diffusion_lib.robust_mask_sampler(config, models.spec)
    tokenizer, empty_ids = diffusion_lib.load_text_tokenizer(dcfg, models.text_encoder.spec,
                                                             abstract)
    make_inputs = diffusion_lib.prepared_inputs if prepared else diffusion_lib.raw_inputs
    inputs, frozen, batch_shapes = make_inputs(dcfg, data, models, empty_ids, abstract)
    frozen = {**frozen, "teacher": teacher_params}
    if prepared:
        uncond = lambda fr: fr["empty_context"]  # noqa: E731
    else:
        text = models.text_encoder
        uncond = lambda fr: text.apply({"params": fr["text_encoder"]}, fr["empty_ids"])  # noqa: E731

    step = functools.partial(
        steps.step_distill_step, optimizer=optimizer, ema_decay=ema_decay,
        microbatches=microbatches, student=models.unet, teacher=teacher, inputs=inputs,
        uncond=uncond, schedule=schedule, teacher_schedule=teacher_schedule,
        grid=tuple(np.asarray(a) for a in grid), space=cfg.loss_space, cfg_prob=cfg.cfg_prob,
        guidance_range=(cfg.guidance_min, cfg.guidance_max), gamma=cfg.gamma,
        gamma_scaling=cfg.gamma_scaling, block_mask=block_mask,
        # XLA:CPU's conditional costs more than the unconditional calls it saves (measured in
        # docs/distill.md); accelerators branch cheaply.
        cfg_mix="w_one" if platform == "cpu" else "cond")

    def init_params(rng, pretrained_params):
        del rng
        return dict(pretrained_params)

    sample = None
    if not abstract and data.source == "world":
        sample = diffusion_lib.world_preview(data, dcfg, schedule, models, tokenizer, empty_ids)
    export = functools.partial(diffusion_lib.export_pipeline, dcfg=dcfg, schedule=schedule,
                               models=models, tokenizer=tokenizer, data=data)
    return Objective(init_params=init_params, pretrained={"unet": models.unet_params},
                     step=step, frozen=frozen, batch_shapes=batch_shapes, tokenizer=tokenizer,
                     sample=sample, export=export)


# ------------------------------------------------- distill.teacher="": shapes from the config

SPEC_SECTIONS = ("unet", "text_encoder", "schedule")


def _check_spec_mode(config, abstract: bool, prepared: bool) -> None:
    """An empty teacher is an ahead-of-time compile from the config's specs, nothing else."""
    if not abstract:
        raise ConfigError("distill.teacher is empty: give the teacher's pipeline folder (an empty "
                          "teacher is only for ahead-of-time compiles, launch/aot_check.py)")
    missing = [f"config.{name}" for name in SPEC_SECTIONS if name not in config]
    if missing:
        raise ConfigError(f"distill.teacher='' compiles from the config's specs, but "
                          f"{', '.join(missing)} is missing (the teacher UNet, the text encoder "
                          "and the noise schedule)")
    if not prepared:
        raise ConfigError("distill.teacher='' compiles from the config's specs, which give no "
                          "VAE: use data.source='prepared' (latents + contexts)")


def _spec_meta(config, cfg: StepDistillConfig):
    """(teacher schedule, student schedule, guidance scale) from ``config.schedule``."""
    schedule = dataclasses.replace(from_config(NoiseSchedule, config.schedule, "schedule"),
                                   **_grid_options(cfg))
    return schedule, schedule, 7.5


def _model_paths(cfg: StepDistillConfig) -> dict:
    """The DiffusionConfig paths: the teacher pipeline's text encoder, tokenizer and VAE, the
    student's init; all "" without a teacher folder (``load_models`` then builds from specs)."""
    student = cfg.student_init or cfg.teacher
    paths = {"unet_init": _unet_folder(student, "student_init") if student else ""}
    if not cfg.teacher:
        return {**paths, "vae": "", "text_encoder": "", "tokenizer": ""}
    teacher_dir = storage.path(cfg.teacher)
    return {**paths, "vae": str(teacher_dir / "vae"),
            "text_encoder": str(teacher_dir / "text_encoder"),
            "tokenizer": str(teacher_dir / "tokenizer")}


def _spec_teacher(config, compute_dtype):
    spec = from_config(UNetSpec, config.unet, "unet")
    return UNet(spec, compute_dtype), abstract_unet_params(spec)


def _spec_student(config, cfg: StepDistillConfig, models):
    """The models ``load_models`` built from specs, given shapes: the text encoder's, and the
    student's (``config.student_unet``, else ``config.unet``) unless ``student_init`` gave one."""
    text_params = pretrained.abstract_params("text_encoder", models.text_encoder.spec)
    models = dataclasses.replace(models, text_params=text_params)
    if cfg.student_init:
        return models
    spec = (from_config(UNetSpec, config.student_unet, "student_unet")
            if "student_unet" in config else models.spec)
    return dataclasses.replace(models, unet=models.unet.clone(spec=spec),
                               unet_params=abstract_unet_params(spec))


def _with_guidance_input(models, dim: int, abstract: bool):
    """The student given a zero-initialised guidance input of ``dim`` features (0: as is)."""
    if not dim:
        return models
    spec = models.spec
    if spec.guidance_embed_dim:
        if spec.guidance_embed_dim != dim:
            raise ConfigError(f"distill.guidance_embed_dim={dim}, but distill.student_init already "
                              f"has a guidance input of {spec.guidance_embed_dim} features; set "
                              f"{spec.guidance_embed_dim} or 0 to keep it")
        return models
    if abstract:
        new_spec = dataclasses.replace(spec, guidance_embed_dim=dim)
        time_embedding = {**models.unet_params["time_embedding"], "cond_proj": {
            "kernel": jax.ShapeDtypeStruct((dim, spec.block_channels[0]), np.float32)}}
        params = {**models.unet_params, "time_embedding": time_embedding}
    else:
        new_spec, params = with_guidance_input(spec, models.unet_params, dim)
    log.info("student: a guidance input of %d features (zero projection) on the init's UNet", dim)
    return dataclasses.replace(models, unet=models.unet.clone(spec=new_spec), unet_params=params)


def _check_pair(cfg: StepDistillConfig, teacher_spec, models) -> None:
    """The teacher must read the student's latents and contexts, with the same text encoder."""
    student = models.spec
    if teacher_spec.in_channels != student.in_channels:
        raise ConfigError(f"the teacher UNet takes {teacher_spec.in_channels} latent channels "
                          f"and the student {student.in_channels}: they must share latents")
    if teacher_spec.context_dim != student.context_dim:
        raise ConfigError(f"the teacher UNet reads contexts of width {teacher_spec.context_dim} "
                          f"and the student {student.context_dim}: they must share a text encoder")
    if not cfg.student_init:
        return
    student_text = storage.path(cfg.student_init) / "text_encoder"
    teacher_text = storage.path(cfg.teacher) / "text_encoder"
    if student_text.is_dir() and str(student_text) != str(teacher_text):
        kind_a, spec_a = pretrained.read_model_spec(student_text) \
            if pretrained.is_snapjax_model(student_text) else (None, None)
        kind_b, spec_b = pretrained.read_model_spec(teacher_text) \
            if pretrained.is_snapjax_model(teacher_text) else (None, None)
        differs = spec_a != spec_b
        if not differs and spec_a is not None:
            _, a = pretrained.load_model(student_text)
            _, b = pretrained.load_model(teacher_text)
            differs = not all(jax.tree.leaves(jax.tree.map(
                lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))
        if differs:
            raise ConfigError(f"distill.student_init={cfg.student_init} has another text encoder "
                              f"than the teacher {cfg.teacher}: the student is trained and "
                              "sampled with the teacher's, so they must be the same")
