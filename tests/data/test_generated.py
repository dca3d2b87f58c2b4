"""``snapjax generate-latents``: a teacher pipeline's samples cached as prepared shards.

Reference: the pipeline itself (``TextToImage(..., return_latents=True)``, the path ``snapjax
sample`` takes), one prompt at a time with the record's seed index and guidance scale.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from snapjax.cli import main
from snapjax.data import generated
from snapjax.data.pipeline import DataConfig, make_train_iterator
from snapjax.data.sources import PreparedSource
from snapjax.pipeline import TextToImage
from tests.conftest import max_rel_err
from tests.tiny_pipeline import build_pipeline

PROMPTS = ["a red circle", "a blue square on the left", "a green circle on the right"]
STEPS = 3


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generated") / "sd"
    build_pipeline(folder)
    return folder, TextToImage.from_pretrained(folder)


def _generate(pipe, out, **kwargs):
    options = dict(count=5, num_steps=STEPS, guidance_range=(2.0, 6.0), seed=3, batch_size=2,
                   progress=False)
    return generated.generate_latents(pipe, PROMPTS, out, **{**options, **kwargs})


def test_records_are_the_pipelines_own_samples(teacher, tmp_path):
    _, pipe = teacher
    index = _generate(pipe, tmp_path / "out")
    assert index["latents"] == "generated" and index["count"] == 5
    assert index["resolution"] == pipe.sample_size * pipe.vae.spec.downsample_factor
    source = PreparedSource(tmp_path / "out")
    scales = []
    for i in range(5):
        rec = source[i]
        assert "latent_logvar" not in rec and rec["caption"] == PROMPTS[i % 3]
        assert 2.0 <= rec["guidance_scale"] <= 6.0
        scales.append(rec["guidance_scale"])
        ref = pipe(rec["caption"], num_steps=STEPS, guidance_scale=rec["guidance_scale"],
                   seed=3, first_index=i, return_latents=True)[0]
        stored = rec["latent_mean"] * source.scaling_factor
        # float16 storage: relative error about 1e-3
        np.testing.assert_allclose(stored, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
        assert rec["context"].shape == (pipe.text_encoder.spec.max_length,
                                        pipe.text_encoder.spec.width)
    assert len(set(scales)) == 5  # drawn per latent, not per batch


def test_records_do_not_depend_on_the_batch_size(teacher, tmp_path):
    _, pipe = teacher
    _generate(pipe, tmp_path / "a", batch_size=2, dtype="float32")
    _generate(pipe, tmp_path / "b", batch_size=4, dtype="float32")
    a, b = PreparedSource(tmp_path / "a"), PreparedSource(tmp_path / "b")
    for i in range(5):
        assert a[i]["guidance_scale"] == b[i]["guidance_scale"]
        # float32 storage; batches of another size sum in another order (XLA:CPU)
        assert max_rel_err(a[i]["latent_mean"], b[i]["latent_mean"]) < 1e-5


def test_training_reads_them_and_refuses_to_draw_a_posterior(teacher, tmp_path):
    _, pipe = teacher
    _generate(pipe, tmp_path / "out")
    side = pipe.sample_size * pipe.vae.spec.downsample_factor
    it = make_train_iterator(DataConfig(source="prepared", path=str(tmp_path / "out"),
                                        resolution=side, num_threads=1),
                             global_batch_size=4, seed=0)
    batch = next(it)
    it.close()
    assert batch["latent"].shape == (4, pipe.sample_size, pipe.sample_size, 4)
    with pytest.raises(ValueError, match="no VAE posterior"):
        make_train_iterator(DataConfig(source="prepared", path=str(tmp_path / "out"),
                                       resolution=side, sample_latents=True),
                            global_batch_size=4, seed=0)


def test_an_interrupted_run_leaves_nothing(teacher, tmp_path, monkeypatch):
    _, pipe = teacher
    calls = []
    real = generated.sources.encode_record

    def fail_on_the_fourth(record):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(record)

    monkeypatch.setattr(generated.sources, "encode_record", fail_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        _generate(pipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize("content, message", [
    (b"", "holds no prompts"),
    (b"\n  \n\n", "holds no prompts"),
    (b"a red circle\n\x00\x01\x02", "not text"),
    (b"\xff\xfe\xfa caption", "not UTF-8"),
])
def test_bad_prompts_files_are_named(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        generated.read_prompts(path)
    assert str(path) in str(e.value)


def test_prompts_file_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  a blue square  \n")
    assert generated.read_prompts(path) == ["a red circle", "a blue square"]


def test_cli_writes_shards_and_answers_bad_input(teacher, tmp_path, capsys):
    folder, _ = teacher
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "out"
    args = ["generate-latents", "--pipeline", str(folder), "--prompts", str(prompts),
            "--count", "3", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 3 and index["generator"]["prompts"] == str(prompts)
    assert index["generator"]["guidance_range"] == list(generated.DEFAULT_GUIDANCE_RANGE)
    capsys.readouterr()
    assert main(args) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main([*args[:4], str(empty), *args[5:-1], str(tmp_path / "o2")]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "o3"), "--guidance-range", "5", "2"]) == 2
    assert "min <= max" in capsys.readouterr().err
    no_vae = tmp_path / "no_vae"
    no_vae.mkdir()
    (no_vae / "model_index.json").write_text("{}")
    for part in ("unet", "text_encoder", "tokenizer"):
        (no_vae / part).mkdir()
    assert main([args[0], "--pipeline", str(no_vae), *args[3:-1], str(tmp_path / "o4")]) == 2
    assert "without vae/" in capsys.readouterr().err
