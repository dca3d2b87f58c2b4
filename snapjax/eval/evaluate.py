"""Evaluate pipelines: samples over a grid of step counts and guidance scales, scored.

One :class:`Setting` is a (steps, guidance) pair; every model is sampled at every setting with
the same prompts and the same noise (seeded per image, :func:`snapjax.sampling.initial_noise`),
through the one sampling path (:class:`snapjax.pipeline.TextToImage`). Per model and setting:
  * quality: the world's metrics with bootstrap intervals (:mod:`snapjax.eval.world_scores`),
    or at real scale the CLIP score and FID (:mod:`snapjax.eval.clip_score`,
    :mod:`snapjax.eval.fid`) on a prompt set (:mod:`snapjax.eval.prompts`);
  * cost: UNet calls per image, GFLOPs per image (text encoder + UNet calls + decoder, from
    :mod:`snapjax.summary`'s traced counts) and the latency per image measured on the current
    backend (batch 1, median of repeats after a compile).
Several seeds pool their images (N = prompts x seeds) for the per-image metrics (accuracy,
CLIP score: bootstrap intervals over the N images); the distribution metrics (Fréchet
distance, FID) are one value per seed, reported as their mean with the t interval over seeds
(:mod:`snapjax.eval.intervals` says why). Every setting also keeps each seed's values.

Legend: N images.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from snapjax.eval import intervals

log = logging.getLogger(__name__)

# Metrics of a whole image set (refitted Gaussians): their spread comes from seeds.
DISTRIBUTION_METRICS = ("frechet_distance", "fid")


@dataclasses.dataclass(frozen=True)
class Setting:
    steps: int
    guidance: float

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: a sampler takes at least 1 step")
        if self.guidance < 1:
            raise ValueError(f"guidance={self.guidance}: classifier-free guidance scales are "
                             ">= 1 (1 = none)")

    @property
    def tag(self) -> str:
        return f"s{self.steps}_g{self.guidance:g}"


def check_same_latents(pipes: Mapping[str, object]) -> tuple[int, int, int]:
    """(latent side, latent channels, VAE factor) shared by every pipeline, else an error that
    names the models: one plot and one grid compare images of one shape and one prompt set."""
    shapes = {name: (p.sample_size, p.unet.spec.in_channels, p.vae.spec.downsample_factor)
              for name, p in pipes.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{n}: latents {s[0]}x{s[0]}x{s[1]}, VAE factor {s[2]}"
                           for n, s in shapes.items())
        raise ValueError("pipelines of different latent shapes cannot be compared in one "
                         f"evaluation ({listed}); evaluate them separately")
    return next(iter(shapes.values()))


def unet_calls_per_image(pipe, setting: Setting) -> int:
    per_step = 1 if pipe.guidance_conditioned or setting.guidance == 1 else 2
    return setting.steps * per_step


def component_costs(pipe) -> tuple[dict[str, float], dict[str, int]]:
    """GFLOPs of one call and parameter counts of the UNet, decoder and text encoder at the
    pipeline's resolution (batch 1), as ``snapjax summary`` counts them."""
    from snapjax.summary import summarize
    side = pipe.sample_size * pipe.vae.spec.downsample_factor
    rows = [r for r in summarize({"unet": ("unet", pipe.unet.spec), "vae": ("vae", pipe.vae.spec),
                                  "text_encoder": ("text_encoder", pipe.text_encoder.spec)}, side)
            if r.name != "vae_encoder"]
    return {r.name: r.gflops for r in rows}, {r.name: r.params for r in rows}


def cost_per_image(pipe, setting: Setting, gflops: Mapping[str, float]) -> dict:
    """UNet calls and GFLOPs of one image: the prompt's text encoding (and the empty prompt's
    once per batch, not counted), every UNet call, one decode."""
    calls = unet_calls_per_image(pipe, setting)
    return {"unet_calls": calls, "unet_gflop": calls * gflops["unet"],
            "gflop": gflops["text_encoder"] + calls * gflops["unet"] + gflops["vae_decoder"]}


def measure_latency(pipe, setting: Setting, *, repeats: int = 3, prompt: str = "a photo") -> float:
    """Seconds per image at batch 1 on the current backend: the median of ``repeats`` timed
    calls after one untimed call (the compile)."""
    run = lambda: pipe([prompt], num_steps=setting.steps, guidance_scale=setting.guidance)  # noqa: E731
    np.asarray(run())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.asarray(run())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def sample(pipe, prompts: Sequence[str], setting: Setting, seed: int, batch_size: int
           ) -> np.ndarray:
    """uint8 images (N, H, W, 3), image i from noise (seed, i) whatever the batching."""
    out = []
    for i in range(0, len(prompts), batch_size):
        out.append(np.asarray(pipe(list(prompts[i:i + batch_size]), num_steps=setting.steps,
                                   guidance_scale=setting.guidance, seed=seed, first_index=i)))
    return np.concatenate(out)


@dataclasses.dataclass
class WorldTask:
    """The world's held-out captions, their labels and real renders, and the reader."""

    prompts: list[str]
    labels: dict
    real_images: np.ndarray
    reader: object

    @classmethod
    def build(cls, world, num_prompts: int) -> "WorldTask":
        from snapjax.data.world import render_batch
        from snapjax.eval import reader as reader_lib
        if num_prompts < 2:
            raise ValueError(f"num_prompts={num_prompts}: the world's metrics need at least 2")
        eval_world = dataclasses.replace(world, seed=reader_lib.EVAL_WORLD_SEED)
        real, captions, labels = render_batch(np.arange(num_prompts), eval_world)
        return cls(list(captions), labels, real, reader_lib.get_reader(world))

    def score(self, images_NHWC: np.ndarray, num_seeds: int, *, resample_seed: int = 0) -> dict:
        from snapjax.eval.world_scores import score_with_intervals
        labels = {k: np.tile(v, num_seeds) for k, v in self.labels.items()}
        return score_with_intervals(self.reader, images_NHWC, labels, seed=resample_seed)

    def score_one_seed(self, images_NHWC: np.ndarray) -> dict[str, float]:
        from snapjax.eval import reader as reader_lib
        return reader_lib.score(self.reader, images_NHWC, self.labels, self.real_images)


@dataclasses.dataclass
class RealTask:
    """A prompt set scored by CLIP score (a local CLIP folder) and, given Inception weights and
    reference statistics, FID."""

    prompts: list[str]
    clip: object | None            # ClipScorer
    inception: object | None       # InceptionFeatures
    ref_stats: tuple | None        # (mu, sigma) of the reference images' features

    def _metrics(self, images_NHWC: np.ndarray, prompts: list[str], resample_seed: int,
                 with_intervals: bool) -> dict:
        from snapjax.eval import fid
        out = {}
        if self.clip is not None:
            scores = self.clip(images_NHWC, prompts) / 100.0    # the paper's scale
            out["clip_score"] = (intervals.mean_interval(scores, seed=resample_seed)
                                 if with_intervals else float(scores.mean()))
        if not with_intervals and self.inception is not None and self.ref_stats is not None:
            out["fid"] = fid.fid(self.inception, images_NHWC, *self.ref_stats)
        return out

    def score(self, images_NHWC: np.ndarray, num_seeds: int, *, resample_seed: int = 0) -> dict:
        return self._metrics(images_NHWC, self.prompts * num_seeds, resample_seed, True)

    def score_one_seed(self, images_NHWC: np.ndarray) -> dict[str, float]:
        return self._metrics(images_NHWC, self.prompts, 0, False)


def evaluate(pipes: Mapping[str, object], task, settings: Mapping[str, Sequence[Setting]], *,
             seeds: Sequence[int] = (0,), batch_size: int = 64, latency: bool = True,
             keep_images: int = 8, progress: bool = True) -> tuple[dict, dict]:
    """(results, images): results[model] = {"params", "gflop_per_call", "settings": [...]},
    each setting with its cost, latency, pooled metrics (intervals) and per-seed values;
    images[(model, setting.tag)] = the first ``keep_images`` images of the first seed."""
    from tqdm import tqdm
    check_same_latents(pipes)
    if not seeds:
        raise ValueError("no seeds: give at least one")
    total = sum(len(settings[name]) * len(seeds) for name in pipes)
    bar = tqdm(total=total, desc="eval", unit="run", disable=not progress)
    results, images = {}, {}
    for name, pipe in pipes.items():
        gflops, params = component_costs(pipe)
        rows = []
        for setting in settings[name]:
            per_seed, pooled = {}, []
            for seed in seeds:
                bar.set_postfix_str(f"{name} {setting.steps} steps, w={setting.guidance:g}, "
                                    f"seed {seed}")
                imgs = sample(pipe, task.prompts, setting, seed, batch_size)
                for k, v in task.score_one_seed(imgs).items():
                    per_seed.setdefault(k, []).append(v)
                pooled.append(imgs)
                if seed == seeds[0]:
                    images[(name, setting.tag)] = imgs[:keep_images]
                bar.update()
            metrics = task.score(np.concatenate(pooled), len(seeds))
            for k in DISTRIBUTION_METRICS:
                if k in per_seed:
                    metrics[k] = intervals.seed_interval(per_seed[k],
                                                         samples_per_seed=len(task.prompts))
            row = {"steps": setting.steps, "guidance": setting.guidance,
                   **cost_per_image(pipe, setting, gflops), "metrics": metrics,
                   "per_seed": per_seed}
            if latency:
                row["latency_s"] = measure_latency(pipe, setting)
            rows.append(row)
        results[name] = {"params": params, "gflop_per_call": gflops,
                         "guidance_conditioned": pipe.guidance_conditioned,
                         "default_steps": pipe.num_steps,
                         "default_guidance": pipe.guidance_scale, "settings": rows}
    bar.close()
    return results, images


def run_info(num_prompts: int, seeds: Sequence[int]) -> dict:
    """What every result file records about how it was measured."""
    import flax
    dev = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": jax.default_backend(), "device": dev.device_kind,
            "jax": jax.__version__, "flax": flax.__version__,
            "num_prompts": num_prompts, "seeds": list(seeds),
            "samples_per_setting": num_prompts * len(seeds)}
