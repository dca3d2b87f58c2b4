"""The grain training pipeline: determinism, epochs, per-process sharding, checkpoint round
trips and skipped images, checked against hand-computed element orders (an index source whose
images carry their own index) and against the world's renderer and tokenizer."""

from __future__ import annotations

import itertools
import json
import logging

import grain
import ml_collections
import numpy as np
import pytest

from snapjax.data import sources
from snapjax.data.pipeline import MAX_CONSECUTIVE_SKIPS, DataConfig, make_train_iterator
from snapjax.data.world import WorldSpec, render_batch, world_tokenizer_folder
from snapjax.models.tokenizer import Tokenizer


class IndexSource:
    """Item i is a 1x1 image whose pixel spells i; items in ``bad`` are unreadable."""

    def __init__(self, n: int, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = int(i)
        if i in self.bad:
            return sources.skip(f"item {i} is corrupt")
        return {"image": np.array([[[i // 256, i % 256, 7]]], np.uint8), "caption": f"item {i}"}


def ids(batch) -> list[int]:
    px = batch["image"][:, 0, 0].astype(int)
    return list(px[:, 0] * 256 + px[:, 1])


U8 = DataConfig(image_dtype="uint8", num_threads=2, prefetch_buffer_size=8)


def take(it, n):
    return [next(it) for _ in range(n)]


def index_iter(n=12, bad=(), cfg=U8, **kw):
    kw = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1, **kw}
    return make_train_iterator(cfg, source=IndexSource(n, bad), **kw)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], dict):
                assert_batches_equal([x[k]], [y[k]])
            else:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------- order


def test_epochs_are_reshuffled_permutations():
    order = [i for b in take(index_iter(12), 6) for i in ids(b)]
    first, second = order[:12], order[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second and first != list(range(12))
    unshuffled = [i for b in take(index_iter(12, cfg=DataConfig(image_dtype="uint8", shuffle=False)), 6)
                  for i in ids(b)]
    assert unshuffled == list(range(12)) * 2


def test_deterministic_by_seed():
    a, b, c = (take(index_iter(40, seed=s), 5) for s in (5, 5, 6))
    assert_batches_equal(a, b)
    assert [ids(x) for x in a] != [ids(x) for x in c]


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_each_global_batch(process_count):
    """Process p's batch n is block p of global batch n: concatenated in process order, the
    per-process batches are exactly the single-process global batches (disjoint, covering)."""
    single = [ids(b) for b in take(index_iter(50, global_batch_size=8), 10)]  # crosses epochs
    per_process = [[ids(b) for b in take(index_iter(50, global_batch_size=8, process_index=p,
                                                     process_count=process_count), 10)]
                   for p in range(process_count)]
    for n in range(10):
        parts = [per_process[p][n] for p in range(process_count)]
        assert all(len(part) == 8 // process_count for part in parts)
        assert sum(parts, []) == single[n]


def test_batch_size_must_split_over_processes():
    with pytest.raises(ValueError, match="global batch size 6 cannot be split evenly over 4"):
        index_iter(global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index=2"):
        index_iter(process_index=2, process_count=2)


# ---------------------------------------------------------------- checkpointing


def test_world_state_round_trip_with_tokenizer():
    cfg = DataConfig(resolution=16, world_size=20, num_threads=2)
    tok = Tokenizer.from_folder(world_tokenizer_folder())
    kw = dict(global_batch_size=8, seed=3, process_index=0, process_count=1, tokenizer=tok)
    it = make_train_iterator(cfg, **kw)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = take(it, 4)                          # crosses the epoch boundary at element 20
    resumed = make_train_iterator(cfg, **kw)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)
    assert expected[0]["input_ids"].shape == (8, 77) and expected[0]["input_ids"].dtype == np.int32


def test_grain_orbax_handler_round_trip(tmp_path):
    it = index_iter(30)
    take(it, 2)
    grain.checkpoint.CheckpointHandler().save(tmp_path, item=it)
    expected = take(it, 3)
    resumed = grain.checkpoint.CheckpointHandler().restore(tmp_path, item=index_iter(30))
    assert [ids(b) for b in take(resumed, 3)] == [ids(b) for b in expected]


def test_state_from_another_layout_resumes_at_same_global_batch():
    single = index_iter(50, global_batch_size=8)
    take(single, 3)
    state = single.get_state()
    expected = ids(next(single))
    for p in range(2):
        it = index_iter(50, global_batch_size=8, process_index=p, process_count=2)
        it.set_state(state)
        assert ids(next(it)) == expected[4 * p:4 * p + 4]


def test_state_errors():
    it = index_iter(seed=1)
    with pytest.raises(ValueError, match="saved with seed 0"):
        it.set_state(index_iter(seed=0).get_state())
    with pytest.raises(ValueError, match="lacks"):
        it.set_state({"next_index": 3})


# ---------------------------------------------------------------- unreadable images


def _expected_with_skips(n, bad, batch, batches):
    """Unshuffled reference: batches of the good items of 0..n-1, 0..n-1, ..., and after each
    batch how many bad items were passed over."""
    stream = itertools.cycle(range(n))
    out, skipped = [], 0
    for _ in range(batches):
        b = []
        while len(b) < batch:
            i = next(stream)
            if i in bad:
                skipped += 1
            else:
                b.append(i)
        out.append((b, skipped))
    return out


def test_skipped_images_are_dropped_counted_and_checkpointed(caplog):
    bad = {3, 7, 8, 20}
    cfg = DataConfig(image_dtype="uint8", shuffle=False, num_threads=2)
    want = _expected_with_skips(30, bad, 4, 20)     # 80 good items: three epochs and more
    with caplog.at_level(logging.WARNING, logger="snapjax.data.pipeline"):
        it = index_iter(30, bad, cfg)
        for k in range(5):
            assert (ids(next(it)), it.skipped) == want[k]
    assert "item 3 is corrupt" in caplog.text and "item 20 is corrupt" in caplog.text
    state = it.get_state()
    for k in range(5, 20):
        assert (ids(next(it)), it.skipped) == want[k]
    assert it.skipped == 12                         # 80 good = 3 epochs of 26 + 2; 4 bad per epoch
    resumed = index_iter(30, bad, cfg)
    resumed.set_state(state)
    for k in range(5, 20):
        assert (ids(next(resumed)), resumed.skipped) == want[k]


def test_only_unreadable_images_is_an_error():
    it = index_iter(5, bad=range(5), cfg=DataConfig(shuffle=False))  # grain shuffles tiny sets slowly
    with pytest.raises(sources.DataError, match=f"{MAX_CONSECUTIVE_SKIPS} unreadable images in a row"):
        next(it)


# ---------------------------------------------------------------- the world, end to end


def test_world_batches_are_the_renderer():
    spec = WorldSpec(seed=2)
    cfg = DataConfig(resolution=16, world=spec, shuffle=False, num_threads=2)
    tok = Tokenizer.from_folder(world_tokenizer_folder())
    batch = next(make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=1,
                                     process_count=2, tokenizer=tok))
    imgs, captions, labels = render_batch([2, 3], WorldSpec(resolution=16, seed=2))
    np.testing.assert_allclose(batch["image"], imgs / 127.5 - 1, atol=1e-6)
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(batch["input_ids"], tok(captions))
    assert batch["attributes"].keys() == labels.keys()
    for k in labels:
        np.testing.assert_array_equal(batch["attributes"][k], labels[k])


def test_worker_processes_give_the_same_batches():
    base = dict(resolution=16, world_size=30, num_threads=2)
    kw = dict(global_batch_size=4, seed=1, process_index=0, process_count=1)
    threads = take(make_train_iterator(DataConfig(**base), **kw), 3)
    it = make_train_iterator(DataConfig(**base, num_workers=2), **kw)
    try:
        assert_batches_equal(take(it, 3), threads)
    finally:
        it.close()


# ---------------------------------------------------------------- config


def test_data_config_from_config():
    c = ml_collections.ConfigDict({"source": "world", "resolution": 24,
                                   "world": {"seed": 4, "colours": ["red", "blue"]}})
    cfg = DataConfig.from_config(c)
    assert cfg.world == WorldSpec(resolution=24, seed=4, colours=("red", "blue"))
    assert DataConfig.from_config(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['shuffle_buffer'\]"):
        DataConfig.from_config({"shuffle_buffer": 10})
    with pytest.raises(ValueError, match="unknown fields"):
        DataConfig.from_config({"world": {"colour": ["red"]}})
    assert DataConfig.from_config({"resolution": 64, "world": {"resolution": 64}}).world.resolution == 64
    with pytest.raises(ValueError, match="differs from data.resolution=32"):
        DataConfig.from_config({"world": {"resolution": 64}})


@pytest.mark.parametrize("kwargs, match", [
    ({"source": "coco"}, "choose one of"),
    ({"source": "imagefolder"}, "needs data.path"),
    ({"source": "tfds", "path": "/x"}, "tfds_name"),
    ({"image_dtype": "float16"}, "image_dtype"),
    ({"resolution": 0}, "resolution"),
    ({"sample_latents": True}, "needs data.source='prepared'"),
])
def test_data_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_missing_data_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_dir"
    for source in ("imagefolder", "webdataset", "prepared"):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            make_train_iterator(DataConfig(source=source, path=str(missing)), global_batch_size=2,
                                seed=0, process_index=0, process_count=1)
