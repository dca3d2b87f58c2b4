"""snapjax.storage against a local GCS emulator: the path layer, the folder writer, bad inputs."""

from __future__ import annotations

import pytest

from snapjax import storage


def test_local_and_bucket_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.path("runs/x")) == str(tmp_path / "runs" / "x")
    assert str(storage.path("gs://b/x/")) == "gs://b/x"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/b/x")
    with pytest.raises(ValueError, match="s3://b/x: unsupported scheme"):
        storage.path("s3://b/x")
    with pytest.raises(ValueError, match="no bucket name"):
        storage.path("gs:///x")


def test_write_folder_round_trip_and_overwrite(bucket):
    folder = bucket.url("model")

    def write(tmp):
        (tmp / "params").mkdir()
        (tmp / "params" / "weights.bin").write_bytes(b"w" * 1000)
        (tmp / "meta.json").write_text('{"v": 1}')

    storage.write_folder(folder, write)
    p = storage.path(folder)
    assert (p / "params" / "weights.bin").read_bytes() == b"w" * 1000
    assert (p / "meta.json").read_text() == '{"v": 1}'
    with pytest.raises(FileExistsError, match=f"{folder} exists; pass --overwrite"):
        storage.write_folder(folder, write)
    storage.write_folder(folder, lambda tmp: (tmp / "meta.json").write_text('{"v": 2}'),
                         overwrite=True)
    assert (p / "meta.json").read_text() == '{"v": 2}'
    assert not (p / "params").exists()  # replaced, not merged


def test_killed_upload_leaves_no_marker(bucket, monkeypatch):
    """Each folder's JSON goes last: an upload that dies part-way leaves a folder without it."""
    sent = []
    real = storage._copy_file

    def copy(src, dst):
        if dst.name == "meta.json":
            raise KeyboardInterrupt  # the process is killed just before the marker
        sent.append(dst.name)
        real(src, dst)

    monkeypatch.setattr(storage, "_copy_file", copy)

    def write(tmp):
        (tmp / "meta.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "sub.json").write_text("{}")
        (tmp / "sub" / "a.bin").write_bytes(b"a")
        (tmp / "z.bin").write_bytes(b"z")

    with pytest.raises(KeyboardInterrupt):
        storage.write_folder(bucket.url("half"), write)
    assert sent == ["a.bin", "sub.json", "z.bin"]
    assert not (storage.path(bucket.url("half")) / "meta.json").exists()


def test_missing_bucket_and_no_permission(gcs_emulator):
    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        storage.check_writable("gs://no-such-bucket/run")
    with pytest.raises(FileNotFoundError, match="bucket gs://no-such-bucket does not exist"):
        storage.check_readable("gs://no-such-bucket/model")
    with pytest.raises(PermissionError, match="gs://locked/run: no permission to write"):
        storage.check_writable("gs://locked/run")
    with pytest.raises(PermissionError, match="gs://locked/model: no permission to read"):
        storage.check_readable("gs://locked/model")
    with pytest.raises(FileNotFoundError,
                       match=r"gs://snapjax-test/nothing/here: not a folder \(no such model folder"):
        storage.check_readable("gs://snapjax-test/nothing/here", "model folder")


def test_world_chain_refuses_a_bucket():
    from snapjax.train.world import run_world
    with pytest.raises(ValueError, match="gs://b/world: the world chain runs on local folders"):
        run_world("gs://b/world")


def test_logs_and_plots_into_a_bucket(bucket):
    """What evolution writes besides checkpoints and folders: an appended log and its plot."""
    import json

    from snapjax.evolve.run import plot_rounds
    rows = storage.path(bucket.url("evolve")) / "evolution.jsonl"
    for r in range(2):
        storage.append_text(rows, json.dumps({"round": r, "action": "remove", "block": f"b{r}",
                                              "latency": 1.0 - r / 4, "latency_after": 0.9 - r / 4,
                                              "quality/neg_loss": -r}) + "\n")
    assert [json.loads(line)["round"] for line in rows.read_text().splitlines()] == [0, 1]
    png = storage.path(bucket.url("evolve")) / "evolution.png"
    plot_rounds(rows, png, "neg_loss", "ms")
    assert png.read_bytes()[:4] == b"\x89PNG"
