"""``snapjax distill``: SnapFusion's step-distillation schedule as one command.

    snapjax distill --config configs/world_distill.py --workdir runs/world/distill \\
        --teacher runs/world/teacher/model --teacher-steps 8 \\
        --schedule direct --student runs/world/evolve/model

Each stage is one ``step_distill`` training run of ``--config`` (its own workdir under
``--workdir``, its pipeline folder in ``<stage>/model``), and a stage's student is a later
stage's teacher:

* ``progressive`` (Salimans & Ho): the teacher N -> N/2 (``teacher_<N/2>``) -> N/4
  (``progressive_<N/4>``) ... -> N/2^k (``--stages k``, default 2), each student starting as its
  teacher's UNet.
* ``direct`` (SnapFusion section 4): the teacher N -> N/2 (``teacher_<N/2>``); the efficient
  ``--student`` N -> N/2 on itself (``student_<N/2>``); then the N/2-step teacher teaches that
  student N/2 -> N/4 (``direct_<N/4>``): cross-architecture distillation.

Stages whose model folder exists are skipped (a folder is written atomically, so it is
complete); an interrupted stage resumes from its checkpoint; run the same command again after
a kill. ``--config.KEY=VALUE`` overrides reach every stage (``--last.KEY=VALUE`` only the
last, e.g. ``--last.distill.guidance_embed_dim=64`` for a guidance-conditioned final
student). ``<workdir>/chain_<schedule>.json`` lists the stages, their folders and times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import time

from snapjax import storage
from snapjax.config import ConfigError, load_config

log = logging.getLogger(__name__)

SCHEDULES = ("progressive", "direct")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One distillation run: ``teacher`` (a folder or the name of an earlier stage) at
    ``teacher_steps`` teaches a student started from ``student_init`` ("" = the teacher's UNet;
    a folder or an earlier stage's name)."""

    name: str
    teacher: str
    teacher_steps: int
    student_init: str = ""


def plan(schedule: str, teacher: str, teacher_steps: int, student: str = "",
         stages: int = 2) -> list[Stage]:
    """The stages of ``schedule``; ValueError names a bad choice."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--schedule={schedule!r}: expected one of {SCHEDULES}")
    if schedule == "progressive":
        if student:
            raise ValueError("--student is for the direct schedule; progressive students start "
                             "as their teacher's UNet")
        if stages < 1:
            raise ValueError(f"--stages={stages} must be >= 1")
        if teacher_steps % 2 ** stages:
            raise ValueError(f"--teacher-steps={teacher_steps} cannot be halved {stages} times "
                             "into whole steps")
        # The first stage is the direct schedule's first stage too (same name, so one workdir
        # holding both schedules trains it once).
        out, previous, steps = [], teacher, teacher_steps
        for k in range(stages):
            name = f"{'teacher' if k == 0 else 'progressive'}_{steps // 2}"
            out.append(Stage(name, previous, steps))
            previous, steps = name, steps // 2
        return out
    if not student:
        raise ValueError("--schedule=direct needs --student, the efficient UNet's folder")
    if teacher_steps % 4:
        raise ValueError(f"--teacher-steps={teacher_steps}: the direct schedule halves it twice "
                         "(N -> N/2 on both models, then N/2 -> N/4), so it must divide by 4")
    half = teacher_steps // 2
    return [Stage(f"teacher_{half}", teacher, teacher_steps),
            Stage(f"student_{half}", student, teacher_steps),
            Stage(f"direct_{half // 2}", f"teacher_{half}", half, f"student_{half}")]


def run_chain(config_path: str, workdir: str | pathlib.Path, stages: list[Stage],
              overrides: list[str] = (), last_overrides: list[str] = ()) -> list[dict]:
    """Train the stages in order (skipping finished ones); returns one record per stage."""
    from snapjax.train.loop import train_and_evaluate

    workdir = storage.path(workdir)
    folders = {s.name: workdir / s.name / "model" for s in stages}
    records = []
    for i, stage in enumerate(stages):
        model = folders[stage.name]

        def resolve(ref: str) -> str:
            return str(folders[ref]) if ref in folders else ref

        args = [*overrides, f"--config.distill.teacher={resolve(stage.teacher)}",
                f"--config.distill.teacher_steps={stage.teacher_steps}",
                f"--config.distill.student_init={resolve(stage.student_init)}"]
        if i == len(stages) - 1:
            args += list(last_overrides)
        record = {"stage": stage.name, "teacher": resolve(stage.teacher),
                  "teacher_steps": stage.teacher_steps, "student_steps": stage.teacher_steps // 2,
                  "student_init": resolve(stage.student_init) or resolve(stage.teacher),
                  "model": str(model)}
        if model.is_dir():
            log.info("stage %s: %s exists, skipped", stage.name, model)
            records.append({**record, "seconds": None, "skipped": True})
            continue
        config = load_config(config_path, args)
        if config.get("objective") != "step_distill":
            raise ConfigError(f"{config_path}: objective={config.get('objective')!r}; snapjax "
                              "distill runs step_distill configs")
        log.info("stage %d/%d %s: %s at %d steps -> %d", i + 1, len(stages), stage.name,
                 record["teacher"], stage.teacher_steps, stage.teacher_steps // 2)
        t0 = time.perf_counter()
        metrics = train_and_evaluate(config, workdir / stage.name)
        records.append({**record, "seconds": round(time.perf_counter() - t0, 1),
                        "skipped": False,
                        **{k: v for k, v in metrics.items() if k.startswith("eval/")}})
    return records


def _split_overrides(extra: list[str]) -> tuple[list[str], list[str]]:
    every, last = [], []
    for arg in extra:
        if arg.startswith("--last."):
            last.append("--config." + arg[len("--last."):])
        elif arg.startswith("--config."):
            every.append(arg)
        else:
            raise ConfigError(f"unknown argument {arg!r}: overrides are --config.KEY=VALUE "
                              "(every stage) or --last.KEY=VALUE (the last stage)")
    return every, last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="a step_distill config (configs/world_distill.py[:variant])")
    parser.add_argument("--workdir", required=True, help="one subfolder per stage goes here")
    parser.add_argument("--teacher", required=True, help="the teacher's pipeline folder")
    parser.add_argument("--teacher-steps", type=int, required=True,
                        help="the teacher's DDIM steps N (the paper: 32)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="direct",
                        help="direct (default; needs --student) or progressive")
    parser.add_argument("--student", default="",
                        help="direct: the efficient UNet's pipeline or UNet folder")
    parser.add_argument("--stages", type=int, default=2,
                        help="progressive: how many halvings (default 2)")
    parser.set_defaults(_accepts_overrides=True)
    parser.epilog = ("--config.KEY=VALUE overrides a key in every stage, --last.KEY=VALUE in the "
                     "last stage only")


def run(args: argparse.Namespace) -> int:
    from snapjax.train.loop import initialize_distributed, setup_logging

    setup_logging()
    every, last = _split_overrides(getattr(args, "overrides", []) or [])
    try:
        stages = plan(args.schedule, args.teacher, args.teacher_steps, args.student, args.stages)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    initialize_distributed()
    records = run_chain(args.config, args.workdir, stages, every, last)
    import jax
    if jax.process_index() == 0:
        workdir = storage.path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / f"chain_{args.schedule}.json").write_text(json.dumps(
            {"schedule": args.schedule, "config": args.config, "stages": records}, indent=1) + "\n")
        for r in records:
            took = "cached" if r["skipped"] else f"{r['seconds']:.0f} s"
            print(f"{r['stage']:<16} {r['teacher_steps']:>3} -> {r['student_steps']:<3} steps  "
                  f"{took:>8}  {r['model']}")
        print(f"final student: {records[-1]['model']}")
    return 0
