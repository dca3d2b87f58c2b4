"""Bootstrap and seed intervals against closed-form ones."""

import numpy as np
import pytest

from snapjax.eval import intervals


def test_mean_interval_matches_the_normal_approximation():
    # For a Bernoulli sample of n = 2000 the bootstrap interval of the mean is the Wald
    # interval p +- 1.96 sqrt(p (1 - p) / n) up to resampling noise.
    rng = np.random.default_rng(0)
    x = (rng.random(2000) < 0.8).astype(float)
    r = intervals.mean_interval(x, num_resamples=4000)
    p, half = x.mean(), 1.959964 * np.sqrt(x.mean() * (1 - x.mean()) / x.size)
    assert r["value"] == p and r["n"] == 2000
    assert abs(r["low"] - (p - half)) < 0.003 and abs(r["high"] - (p + half)) < 0.003


def test_mean_interval_is_seeded_and_covers_about_95_percent():
    same = np.random.default_rng(1).random(50)
    assert intervals.mean_interval(same, seed=3) == intervals.mean_interval(same, seed=3)
    covered = 0
    for k in range(200):
        x = np.random.default_rng(100 + k).normal(1.0, 1.0, 60)
        r = intervals.mean_interval(x, num_resamples=500, seed=k)
        covered += r["low"] <= 1.0 <= r["high"]
    assert 0.88 <= covered / 200 <= 0.99, covered


def test_seed_interval_is_the_t_interval():
    r = intervals.seed_interval([20.0, 21.0, 23.0], samples_per_seed=256)
    mean, sd = 64 / 3, np.std([20.0, 21.0, 23.0], ddof=1)
    half = 4.302653 * sd / np.sqrt(3)            # t_{0.975, 2}
    assert r["value"] == pytest.approx(mean) and r["sd"] == pytest.approx(sd)
    assert r["low"] == pytest.approx(mean - half, rel=1e-6)
    assert r["high"] == pytest.approx(mean + half, rel=1e-6)
    assert (r["n"], r["seeds"]) == (256, 3)
    one = intervals.seed_interval([5.0], samples_per_seed=10)
    assert one["low"] == one["high"] == 5.0 and one["seeds"] == 1
    assert "3 seeds x n=256" in intervals.format_interval(r)


@pytest.mark.parametrize("call, message", [
    (lambda: intervals.mean_interval([1.0]), "at least 2 samples"),
    (lambda: intervals.mean_interval([[1.0, 2.0]]), "1-D"),
    (lambda: intervals.mean_interval([1.0, 2.0], level=1.5), "level"),
    (lambda: intervals.mean_interval([1.0, 2.0], num_resamples=1), "num_resamples"),
    (lambda: intervals.seed_interval([], samples_per_seed=1), "at least one"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
