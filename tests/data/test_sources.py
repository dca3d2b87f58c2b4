"""Random-access sources: real PNG/JPEG files, tars and a fake TFDS module, checked against
independently built references (PIL resize of the same pixels, the world's own renderer)."""

from __future__ import annotations

import io
import json
import pickle
import sys
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from snapjax.data import images, sources
from snapjax.data.world import WorldSpec, render

R = 8


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _bands() -> np.ndarray:
    """16 x 32: red | green | blue columns 0-3 | 4-27 | 28-31. Resized to 8 x 16 and
    center-cropped to 8 x 8, only green survives (the crop is 2 px inside the green band)."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :4] = (255, 0, 0)
    a[:, 4:28] = (0, 255, 0)
    a[:, 28:] = (0, 0, 255)
    return a


def _exact(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (R, R, 3), dtype=np.uint8)


FLAT = np.full((24, 20, 3), (200, 40, 90), np.uint8)


# ---------------------------------------------------------------- images.load_image


def test_load_image_exact_size_is_lossless_and_crop_is_centered():
    a = _exact(0)
    np.testing.assert_array_equal(images.load_image(_png(a), R, "a.png"), a)
    banded = images.load_image(_png(_bands()), R, "bands.png")
    assert banded.shape == (R, R, 3) and banded.dtype == np.uint8
    np.testing.assert_allclose(banded, np.broadcast_to((0, 255, 0), (R, R, 3)), atol=1)
    # Tall image: the crop is vertical and also centered.
    np.testing.assert_allclose(images.load_image(_png(_bands().transpose(1, 0, 2)), R, "t"),
                               np.broadcast_to((0, 255, 0), (R, R, 3)), atol=1)


def test_load_image_modes_and_jpeg():
    gray = np.full((R, R), 77, np.uint8)
    np.testing.assert_array_equal(images.load_image(_png(gray), R, "g"), np.full((R, R, 3), 77))
    rgba = np.concatenate([_exact(1), np.full((R, R, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(images.load_image(_png(rgba), R, "rgba"), _exact(1))
    # A flat JPEG decodes to its colour within JPEG error (upscaled from 20 px wide to 8: draft).
    np.testing.assert_allclose(images.load_image(_jpeg(FLAT), R, "f.jpg"),
                               np.broadcast_to((200, 40, 90), (R, R, 3)), atol=4)


@pytest.mark.parametrize("data", [b"", b"not an image", _png(_exact(2))[:60]])
def test_load_image_unreadable(data):
    with pytest.raises(images.UnreadableImage, match="bad.png"):
        images.load_image(data, R, "bad.png")


def test_to_model_range():
    x = images.to_model_range(np.array([0, 128, 255], np.uint8))
    np.testing.assert_allclose(x, [-1.0, 128 / 127.5 - 1, 1.0], atol=1e-6)
    assert x.dtype == np.float32


# ---------------------------------------------------------------- world


def test_world_source_is_the_renderer():
    spec = WorldSpec(resolution=16, seed=3)
    src = sources.WorldSource(spec, size=10)
    assert len(src) == 10
    for i in (0, 7):
        image, caption, labels = render(i, spec)
        rec = src[i]
        np.testing.assert_array_equal(rec["image"], image)
        assert rec["caption"] == caption
        assert {k: int(v) for k, v in rec["attributes"].items()} == labels


# ---------------------------------------------------------------- image folder


def _write_folder(root, lines):
    root.mkdir(exist_ok=True)
    (root / "bands.png").write_bytes(_png(_bands()))
    (root / "exact.png").write_bytes(_png(_exact(3)))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "flat.jpg").write_bytes(_jpeg(FLAT))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "truncated.jpg").write_bytes(_jpeg(_exact(4))[:100])
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


GOOD_LINES = [
    json.dumps({"file_name": "bands.png", "text": "green"}),
    json.dumps({"file_name": "exact.png", "text": "noise", "extra": 1}),
    "",
    json.dumps({"file_name": "sub/flat.jpg", "text": "pink"}),
    json.dumps({"file_name": "corrupt.png", "text": "bad"}),
    json.dumps({"file_name": "truncated.jpg", "text": "cut"}),
    json.dumps({"file_name": "missing.png", "text": "gone"}),
    json.dumps({"file_name": "exact.png", "text": "second caption"}),
]


def test_imagefolder_reads_and_skips(tmp_path):
    _write_folder(tmp_path / "ds", GOOD_LINES)
    src = sources.ImageFolderSource(tmp_path / "ds", R)
    assert len(src) == 7
    np.testing.assert_allclose(src[0]["image"], np.broadcast_to((0, 255, 0), (R, R, 3)), atol=1)
    assert src[0]["caption"] == "green"
    np.testing.assert_array_equal(src[1]["image"], _exact(3))
    np.testing.assert_allclose(src[2]["image"], np.broadcast_to((200, 40, 90), (R, R, 3)), atol=4)
    assert src[6]["caption"] == "second caption"
    for i, name in ((3, "corrupt.png"), (4, "truncated.jpg"), (5, "missing.png")):
        rec = src[i]
        assert set(rec) == {"skip"} and name in rec["skip"], rec


def test_imagefolder_caption_key(tmp_path):
    root = tmp_path / "ds"
    _write_folder(root, [json.dumps({"file_name": "exact.png", "caption": "c"})])
    assert sources.ImageFolderSource(root, R, caption_key="caption")[0]["caption"] == "c"
    with pytest.raises(sources.DataError, match=r"line 1: missing 'text'"):
        sources.ImageFolderSource(root, R)


def test_imagefolder_malformed_metadata_names_file_and_lines(tmp_path):
    lines = list(GOOD_LINES)
    lines[1] = '{"file_name": "exact.png", "text": "unterminated'
    lines[4] = json.dumps({"file_name": "corrupt.png"})
    lines[6] = json.dumps(["file_name", "x"])
    lines[7] = json.dumps({"file_name": 3, "text": "x"})
    _write_folder(tmp_path / "ds", lines)
    with pytest.raises(sources.DataError) as e:
        sources.ImageFolderSource(tmp_path / "ds", R)
    msg = str(e.value)
    assert str(tmp_path / "ds" / "metadata.jsonl") in msg and "4 malformed line(s)" in msg
    for expected in ("line 2: not valid JSON", "line 5: missing 'text'",
                     "line 7: expected a JSON object", "line 8: 'file_name' must be a string"):
        assert expected in msg, msg


def test_imagefolder_missing_folder_and_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        sources.ImageFolderSource(tmp_path / "nope", R)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no metadata.jsonl"):
        sources.ImageFolderSource(tmp_path / "empty", R)


# ---------------------------------------------------------------- webdataset


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder):
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as t:
        _add(t, "000000000.jpg", _jpeg(FLAT))
        _add(t, "000000000.txt", b"a flat pink picture\n")
        _add(t, "000000000.json", b"{}")
        _add(t, "000000001.png", _png(_exact(5)))
        _add(t, "000000001.txt", "noise \u00e9".encode())
        _add(t, "000000002.json", b"{}")          # failed download: no image, not a sample
    with tarfile.open(folder / "00001.tar", "w") as t:
        _add(t, "sub/000000003.png", b"corrupt")
        _add(t, "sub/000000003.txt", b"bad")
        _add(t, "000000004.PNG", _png(_bands()))   # no caption, upper-case extension
    (folder / "notes.md").write_text("not a shard")


def test_webdataset_reads_by_offset(tmp_path):
    _write_shards(tmp_path / "wds")
    src = sources.WebDatasetSource(tmp_path / "wds", R)
    assert len(src) == 4
    np.testing.assert_allclose(src[0]["image"], np.broadcast_to((200, 40, 90), (R, R, 3)), atol=4)
    assert src[0]["caption"] == "a flat pink picture"
    np.testing.assert_array_equal(src[1]["image"], _exact(5))
    assert src[1]["caption"] == "noise \u00e9"
    assert set(src[2]) == {"skip"} and "00001.tar:sub/000000003.png" in src[2]["skip"]
    assert src[3]["caption"] == ""
    # Pickles without its open file descriptors (for grain worker processes), reads the same.
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[1]["image"], src[1]["image"])
    # One shard file works too.
    assert len(sources.WebDatasetSource(tmp_path / "wds" / "00001.tar", R)) == 2


def test_webdataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        sources.WebDatasetSource(tmp_path / "nope", R)
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.DataError, match="no .tar shards"):
        sources.WebDatasetSource(tmp_path / "empty", R)
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz" / "00000.tar", "w:gz") as t:
        _add(t, "0.png", _png(_exact(0)))
    with pytest.raises(sources.DataError, match="uncompressed tar"):
        sources.WebDatasetSource(tmp_path / "gz", R)


def test_webdataset_truncated_shard_keeps_complete_samples(tmp_path):
    _write_shards(tmp_path / "wds")
    shard = tmp_path / "wds" / "00000.tar"
    data = shard.read_bytes()
    png_at = data.index(b"\x89PNG")
    shard.write_bytes(data[:png_at + 50])  # cut inside sample 1's image
    src = sources.WebDatasetSource(shard, R)
    assert len(src) == 1 and src[0]["caption"] == "a flat pink picture"


# ---------------------------------------------------------------- TFDS


class _FakeTFDS(types.ModuleType):
    """The slice of tensorflow_datasets that TFDSSource uses, recording how it is called."""

    def __init__(self, examples):
        super().__init__("tensorflow_datasets")
        self.examples, self.calls = examples, []
        self.decode = types.SimpleNamespace(SkipDecoding=type("SkipDecoding", (), {}))

    def data_source(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if name != "tiny":
            raise AssertionError(f"Dataset {name} not found")
        return _FakeSource(self.examples)


class _FakeSource(list):
    """A list of examples with tfds's ``dataset_info.features``."""

    dataset_info = types.SimpleNamespace(features={"image": None, "meta": {"text": None}})


def test_tfds_source_with_fake_module(tmp_path, monkeypatch):
    fake = _FakeTFDS([
        {"image": _png(_exact(6)), "meta": {"text": b"first"}},
        {"image": b"broken", "meta": {"text": b"second"}},
        {"image": _exact(7), "meta": {"text": np.array(b"decoded already")}},
        {"image": _exact(8), "meta": {"text": [b"one", b"two"]}},
    ])
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    src = sources.TFDSSource("tiny", tmp_path, R, split="train", caption_key="meta/text")
    name, kwargs = fake.calls[0]
    assert name == "tiny" and kwargs["download"] is False and kwargs["split"] == "train"
    assert kwargs["data_dir"] == str(tmp_path)
    assert isinstance(kwargs["decoders"]["image"], fake.decode.SkipDecoding)
    assert len(src) == 4
    np.testing.assert_array_equal(src[0]["image"], _exact(6))
    assert src[0]["caption"] == "first"
    assert set(src[1]) == {"skip"} and "tfds tiny[train] #1" in src[1]["skip"]
    np.testing.assert_array_equal(src[2]["image"], _exact(7))
    assert src[2]["caption"] == "decoded already"
    with pytest.raises(sources.DataError, match="'meta/text' is a list, not one caption"):
        src[3]
    clone = pickle.loads(pickle.dumps(src))  # reopens lazily in a worker process
    assert clone[0]["caption"] == "first"
    with pytest.raises(sources.DataError, match="no feature 'caption'"):
        sources.TFDSSource("tiny", tmp_path, R)
    with pytest.raises(sources.DataError, match="cannot open TFDS dataset 'other'"):
        sources.TFDSSource("other", tmp_path, R, caption_key="meta/text")
    with pytest.raises(FileNotFoundError, match="nope"):
        sources.TFDSSource("tiny", tmp_path / "nope", R)


def test_tfds_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        sources.TFDSSource("tiny", tmp_path, R)


def test_tfds_source_real_package(tmp_path):
    """Against the real tensorflow-datasets (no TensorFlow needed) when it is installed."""
    tfds = pytest.importorskip("tensorflow_datasets")
    pixels = [_exact(10 + i) for i in range(4)]

    class SnapjaxTiny(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, p in enumerate(pixels):  # encoded bytes: encoding arrays would need TensorFlow
                yield i, {"image": io.BytesIO(_png(p)), "caption": f"item {i}"}

    SnapjaxTiny(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    src = sources.TFDSSource("snapjax_tiny", tmp_path, R)
    assert len(src) == 4
    for i in range(4):
        rec = src[i]
        k = int(rec["caption"].split()[1])  # TFDS shuffles examples when preparing
        np.testing.assert_array_equal(rec["image"], pixels[k])
