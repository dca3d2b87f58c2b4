"""The world's metrics as evaluation reports them: degradations rank in order, intervals cover
a rerun with another seed. Uses the default reader (the one every stage scores with; trained
once and cached)."""

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from snapjax.data.world import WorldSpec, render_batch
from snapjax.eval import intervals, reader as R, world_scores

SPEC = WorldSpec()
N = 256


@pytest.fixture(scope="module")
def reader():
    return R.get_reader(SPEC)


@pytest.fixture(scope="module")
def world():
    real, _, labels = render_batch(np.arange(N), dataclasses.replace(SPEC, seed=R.EVAL_WORLD_SEED))
    # the "generated" set: other renders of the same captions' attributes would be ideal; the
    # next N items of a fresh seed are the same distribution, which is what a perfect model gives
    fresh, _, fresh_labels = render_batch(np.arange(N), dataclasses.replace(SPEC, seed=40_000))
    return real, labels, fresh, fresh_labels


def _blur(images, radius):
    return np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(radius)))
                     for x in images])


def _noise(images, sd, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, sd, images.shape), 0, 255).astype(np.uint8)


def _colour_shift(images, amount):
    return np.clip(images.astype(int) + np.array([amount, -amount, amount // 2]), 0, 255
                   ).astype(np.uint8)


@pytest.mark.parametrize("degrade, strengths", [
    (_blur, (0.6, 1.2, 2.4)), (_noise, (15, 40, 90)), (_colour_shift, (20, 50, 110))],
    ids=["blur", "noise", "colour"])
def test_frechet_ranks_degradations_in_order(reader, world, degrade, strengths):
    real, _, fresh, fresh_labels = world
    fd = [R.score(reader, fresh if s == 0 else degrade(fresh, s), fresh_labels,
                  reference_images=real)["frechet_distance"] for s in (0, *strengths)]
    assert all(a < b for a, b in zip(fd, fd[1:])), fd


def test_intervals_cover_a_rerun_with_another_seed(reader, world):
    # The "model" is a fixed noisy sampler; its seeds are the noise draws.
    real, labels, fresh, fresh_labels = world
    per_seed = {}
    for seed in range(4):
        imgs = _noise(fresh, 45, seed)
        per_seed.setdefault("fd", []).append(
            R.score(reader, imgs, fresh_labels, reference_images=real)["frechet_distance"])
        per_seed.setdefault("acc", []).append(
            world_scores.score_with_intervals(reader, imgs, fresh_labels))
    acc0 = per_seed["acc"][0]
    for key in ("accuracy/all", "accuracy/mean", "accuracy/colour"):
        assert acc0[key]["n"] == N
        for rerun in per_seed["acc"][1:]:
            assert acc0[key]["low"] <= rerun[key]["value"] <= acc0[key]["high"], key
    fd = intervals.seed_interval(per_seed["fd"][:3], samples_per_seed=N)
    assert fd["low"] <= per_seed["fd"][3] <= fd["high"], (fd, per_seed["fd"])
    assert fd["high"] - fd["low"] > 0


def test_scores_agree_with_the_readers_own(reader, world):
    real, labels, fresh, fresh_labels = world
    imgs = _noise(fresh, 30)
    ours = {k: v["value"] for k, v in
            world_scores.score_with_intervals(reader, imgs, fresh_labels).items()}
    theirs = R.score(reader, imgs, fresh_labels)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], abs=1e-9), k
