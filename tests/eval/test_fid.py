"""FID: ours against torchmetrics' own computation, with a random-weight TorchScript stand-in
for the Inception file (same calling convention: uint8 NCHW in, pool features out)."""

import logging
import warnings

import numpy as np
import pytest
import torch

from snapjax.eval import fid
from snapjax.eval.frechet import gaussian_stats


class TinyInception(torch.nn.Module):
    """Resize to 299 like the real file, a few random convolutions, global average pool."""

    def __init__(self, features: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(),
            torch.nn.Conv2d(8, features, 3, stride=2), torch.nn.ReLU())

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.float() / 127.5 - 1, size=(299, 299),
                                            mode="bilinear", align_corners=False)
        feats = self.body(x).mean(dim=(2, 3))
        return feats if return_features else feats.sum(-1, keepdim=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    with warnings.catch_warnings():       # TorchScript is the real file's format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyInception()).save(str(path))
    return path


def _images(seed, n=40, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 32, 32, 3))
    return np.clip(base + shift, 0, 255).astype(np.uint8)


def test_fid_equals_torchmetrics(weights):
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = fid.InceptionFeatures.from_file(weights)
    real, fake = _images(0), _images(1, shift=30)
    ours = fid.fid(extractor, fake, *gaussian_stats(extractor(real)))

    class Features(torch.nn.Module):       # torchmetrics calls feature(imgs) -> (N, F)
        def __init__(self):
            super().__init__()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(weights))

        def forward(self, x):
            return self.net(x, return_features=True)

    metric = FrechetInceptionDistance(feature=Features())
    metric.update(torch.from_numpy(real.transpose(0, 3, 1, 2).copy()), real=True)
    metric.update(torch.from_numpy(fake.transpose(0, 3, 1, 2).copy()), real=False)
    theirs = float(metric.compute())
    assert ours > 1e-3
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_fid_of_a_set_with_itself_is_zero(weights):
    extractor = fid.InceptionFeatures.from_file(weights)
    stats = gaussian_stats(extractor(_images(2)))
    shifted = fid.fid(extractor, _images(3, shift=40), *stats)
    assert fid.fid(extractor, _images(2), *stats) < 1e-6 * shifted


def test_reference_stats_are_cached_per_set_and_weights(weights, tmp_path, monkeypatch):
    extractor = fid.InceptionFeatures.from_file(weights)
    calls = []
    real_call = fid.InceptionFeatures.__call__
    monkeypatch.setattr(fid.InceptionFeatures, "__call__",
                        lambda self, x: calls.append(len(x)) or real_call(self, x))
    cache = tmp_path / "ref.npz"
    mu, sigma = fid.reference_stats(extractor, _images(0), cache, key="set-a")
    again = fid.reference_stats(extractor, _images(0), cache, key="set-a")
    assert len(calls) == 1 and np.array_equal(mu, again[0]) and np.array_equal(sigma, again[1])
    fid.reference_stats(extractor, _images(5), cache, key="set-b")     # another set: recomputed
    assert len(calls) == 2
    assert fid.fid(extractor, _images(0), mu, sigma) < 1e-8


def test_weights_file_checks(weights, tmp_path, caplog):
    digest = fid.sha256(weights)
    assert fid.InceptionFeatures.from_file(weights, expected_sha256=digest).sha256 == digest
    with caplog.at_level(logging.WARNING, logger="snapjax.eval.fid"):
        fid.InceptionFeatures.from_file(weights, expected_sha256="0" * 64)
    assert str(weights) in caplog.text and digest in caplog.text and "not comparable" in caplog.text
    with pytest.raises(ValueError, match="inception-2015-12-05.pt.*never downloads"):
        fid.InceptionFeatures.from_file(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        fid.InceptionFeatures.from_file(junk)
    with pytest.raises(ValueError, match="uint8 RGB"):
        fid.InceptionFeatures.from_file(weights)(np.zeros((2, 8, 8, 3), np.float32))
