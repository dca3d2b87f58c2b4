"""The attribute reader: accuracy vs chance, features, Fréchet distance, saving and caching."""

import dataclasses

import numpy as np
import pytest

from snapjax.data.world import WorldSpec, caption_labels, render_batch
from snapjax.eval import reader as R
from snapjax.eval.frechet import frechet_distance as fd_features

SPEC = WorldSpec()
FRESH = dataclasses.replace(SPEC, seed=30_000)   # neither the reader's seed nor the eval seed
FAST_STEPS, FAST_BATCH = 160, 32


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fast_reader(cache_dir):
    # A briefly trained reader, through the cache path the stages use.
    return R.get_reader(SPEC, cache_dir, steps=FAST_STEPS, batch=FAST_BATCH)


@pytest.fixture(scope="module")
def fresh():
    return render_batch(np.arange(600), FRESH)


def _chance(spec, attr):
    return 1.0 / len(spec.attributes[attr])


def test_fast_reader_beats_chance_and_shuffled_labels(fast_reader, fresh):
    images, _, labels = fresh
    acc = R.attribute_accuracy(fast_reader, images, labels)
    assert set(acc) == set(SPEC.attributes)
    # Measured after 160 steps of 32: colour 0.96, size 1.0, position 1.0, shape 0.56 (chance 0.25).
    for attr in ("colour", "size", "position"):
        assert acc[attr] > 0.8, (attr, acc)
    assert acc["shape"] > _chance(SPEC, "shape") + 0.1, acc
    # Independent chance reference: the same predictions scored against shuffled labels.
    rng = np.random.default_rng(0)
    shuffled = {k: rng.permutation(v) for k, v in labels.items()}
    acc_shuffled = R.attribute_accuracy(fast_reader, images, shuffled)
    for attr in ("colour", "shape", "position"):
        # 600 samples: the binomial std is at most 0.02, so 0.08 is four of them.
        assert acc_shuffled[attr] < _chance(SPEC, attr) + 0.08, (attr, acc_shuffled)
        assert acc[attr] > acc_shuffled[attr] + 0.1


def test_noise_images_read_at_chance(fast_reader, fresh):
    _, _, labels = fresh
    noise = np.random.default_rng(1).integers(0, 256, (600, 32, 32, 3), dtype=np.uint8)
    acc = R.attribute_accuracy(fast_reader, noise, labels)
    for attr in ("colour", "shape", "position"):
        assert acc[attr] < _chance(SPEC, attr) + 0.08, (attr, acc)


def test_inputs_features_and_partial_labels(fast_reader, fresh):
    images, captions, labels = fresh
    feats = R.features(fast_reader, images)
    assert feats.shape == (600, fast_reader.hidden) and np.isfinite(feats).all()
    # float [-1, 1] inputs read like uint8 ones; N not a multiple of the chunk works.
    as_float = images[:37].astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(R.features(fast_reader, as_float), feats[:37], rtol=1e-5, atol=1e-5)
    preds = R.predict(fast_reader, images)
    # Labels parsed from captions equal the world's, and -1 (unsaid) is left out.
    parsed = caption_labels(captions)
    assert R.attribute_accuracy(fast_reader, images, parsed) == R.attribute_accuracy(fast_reader, images, labels)
    partial = {"colour": np.where(np.arange(600) % 2 == 0, labels["colour"], -1)}
    expected = float((preds["colour"][::2] == labels["colour"][::2]).mean())
    assert R.attribute_accuracy(fast_reader, images, partial) == {"colour": pytest.approx(expected)}
    with pytest.raises(ValueError, match="relation"):
        R.attribute_accuracy(fast_reader, images, {"relation": labels["colour"]})
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        R.features(fast_reader, images[0])
    scores = R.score(fast_reader, images, labels, reference_images=images)
    assert scores["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
    assert scores["accuracy/all"] <= min(v for k, v in scores.items() if k.startswith("accuracy/"))


def test_frechet_distance_orders_distributions(fast_reader, fresh):
    images = fresh[0]
    other, _, _ = render_batch(np.arange(600, 1200), FRESH)
    # Same set: zero. Two samples of the world: small. Degraded or other-world images: larger.
    assert R.frechet_distance(fast_reader, images, images) == pytest.approx(0.0, abs=1e-6)
    same_world = R.frechet_distance(fast_reader, images, other)
    noisy = np.clip(other + np.random.default_rng(2).normal(0, 40, other.shape), 0, 255).astype(np.uint8)
    shifted_world = WorldSpec(seed=31_000, colours=("red", "green", "blue"), positions=("center",))
    shifted, _, _ = render_batch(np.arange(600), shifted_world)
    for name, imgs in (("noisy", noisy), ("shifted", shifted)):
        d = R.frechet_distance(fast_reader, images, imgs)
        assert d > 3 * same_world, (name, d, same_world)
    # The reader's wrapper is exactly the feature-space distance.
    direct = fd_features(R.features(fast_reader, images), R.features(fast_reader, other))
    assert same_world == pytest.approx(direct, rel=1e-9)


def test_save_load_and_cache(fast_reader, cache_dir, fresh, tmp_path, monkeypatch):
    images = fresh[0][:50]
    folder = R.save_reader(fast_reader, tmp_path / "r")
    loaded = R.load_reader(folder)
    assert loaded.spec == fast_reader.spec and loaded.widths == fast_reader.widths
    np.testing.assert_array_equal(R.features(loaded, images), R.features(fast_reader, images))
    # A cached reader is loaded, never retrained (the world's seed does not matter, only its values).
    monkeypatch.setattr(R, "train_reader", lambda *a, **k: pytest.fail("retrained a cached reader"))
    again = R.get_reader(dataclasses.replace(SPEC, seed=5), cache_dir, steps=FAST_STEPS, batch=FAST_BATCH)
    np.testing.assert_array_equal(R.features(again, images), R.features(fast_reader, images))
    assert again.metrics == fast_reader.metrics and again.spec.seed == 5
    assert [p.name for p in cache_dir.iterdir()] == [f"reader-{R.reader_key(SPEC, FAST_STEPS, FAST_BATCH, 0)}"]
    # Other settings are another reader.
    assert R.reader_key(SPEC, FAST_STEPS + 1, FAST_BATCH, 0) != R.reader_key(SPEC, FAST_STEPS, FAST_BATCH, 0)
    (folder / "params.msgpack").unlink()
    with pytest.raises(FileNotFoundError, match="params.msgpack"):
        R.load_reader(folder)


def test_two_object_labels_are_scored_in_canonical_form():
    # "A right of B" and "B left of A" are the same picture, so both descriptions must score
    # alike; the swap below is written independently of world.canonical_labels.
    spec = WorldSpec(max_objects=2)
    reader = R.ReaderState(spec=spec, params=R.init_params(R.reader_net(spec), 0))  # untrained is fine
    images, _, labels = render_batch(np.arange(300), spec)
    rel = labels["relation"]
    two = rel > 0
    other = {1: 2, 2: 1, 3: 4, 4: 3}
    swapped = {k: v.copy() for k, v in labels.items()}
    swapped["relation"] = np.array([other.get(r, r) for r in rel], np.int32)
    for a in ("colour", "shape", "size"):
        swapped[a] = np.where(two, labels[a + "2"] - 1, labels[a])
        swapped[a + "2"] = np.where(two, labels[a] + 1, labels[a + "2"])
    side = {1: "left", 2: "right", 3: "top", 4: "bottom"}
    swapped["position"] = np.array([spec.positions.index(side[r]) if r else p
                                    for r, p in zip(swapped["relation"], labels["position"])], np.int32)
    assert R.attribute_accuracy(reader, images, labels) == R.attribute_accuracy(reader, images, swapped)
    preds = R.predict(reader, images)
    assert preds["relation"].dtype == np.int32 and preds["relation"].shape == (300,)


def test_held_out_seed():
    assert R.reader_world_seed(SPEC) != SPEC.seed
    assert R.reader_world_seed(dataclasses.replace(SPEC, seed=R.READER_WORLD_SEED)) != R.READER_WORLD_SEED


@pytest.mark.slow
@pytest.mark.parametrize("spec", [WorldSpec(), WorldSpec(max_objects=2)], ids=["one", "two"])
def test_default_reader_reads_the_world(spec):
    # Full training (a few minutes on 2 busy cores), cached in ~/.cache/snapjax for later runs.
    reader = R.get_reader(spec)
    images, _, labels = render_batch(np.arange(2000), dataclasses.replace(spec, seed=30_000))
    acc = R.attribute_accuracy(reader, images, labels)
    assert min(acc.values()) > 0.97, acc
