"""Fréchet distance against closed forms and scipy's general matrix square root."""

import numpy as np
import pytest
import scipy.linalg

from snapjax.eval.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats


def _random_cov(rng, f):
    a = rng.normal(size=(f, f))
    return a @ a.T / f + 0.1 * np.eye(f)


def _scipy_reference(mu1, s1, mu2, s2):
    # The textbook FID formula with a general (non-symmetric) matrix square root.
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_diagonal_gaussians_closed_form():
    # For diagonal covariances the distance is |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_one_dimensional():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    got = frechet_distance_from_stats(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert got == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_full_covariance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    f = 12
    mu1, mu2 = rng.normal(size=f), rng.normal(size=f)
    s1, s2 = _random_cov(rng, f), _random_cov(rng, f)
    expected = _scipy_reference(mu1, s1, mu2, s2)
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    # Symmetric in its arguments.
    assert frechet_distance_from_stats(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_same_set_is_zero_and_shift_adds_squared_norm():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    # Translating one set by delta changes only the mean term: d = |delta|^2 exactly.
    delta = np.arange(8) * 0.1
    assert frechet_distance(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-8)


def test_samples_converge_to_population_distance():
    rng = np.random.default_rng(3)
    f, n = 4, 200_000
    mu1, mu2 = np.zeros(f), np.full(f, 0.5)
    s1, s2 = _random_cov(rng, f), _random_cov(rng, f)
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    expected = _scipy_reference(mu1, s1, mu2, s2)
    # Sampling error of a moment estimate ~ 1/sqrt(n) = 0.2%; allow 3%.
    assert frechet_distance(x1, x2) == pytest.approx(expected, rel=3e-2)


def test_singular_covariance_fewer_samples_than_features():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 1.0
    d = frechet_distance(x, y)
    mu_x, s_x = gaussian_stats(x)
    mu_y, s_y = gaussian_stats(y)
    assert np.isfinite(d) and d > 0
    assert d == pytest.approx(_scipy_reference(mu_x, s_x, mu_y, s_y), rel=1e-5)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="same F"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
