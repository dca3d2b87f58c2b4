"""Bad inputs get clear errors that name the problem, before any expensive work."""

from __future__ import annotations

import json
import shutil

import pytest

from export.checkpoint import load_source
from export.coreml.export import CoreMLOptions
from export.torch.export import export_torch
from snapjax import pretrained
from snapjax.cli import main as snapjax_main
from tests.export.tiny_models import VAE_FULL, random_params


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    pretrained.save_model(folder, "vae", VAE_FULL, random_params("vae", VAE_FULL))
    return folder


def test_model_folder_of_another_kind(vae_folder):
    with pytest.raises(ValueError, match="holds a 'vae' model.*unet"):
        load_source(vae_folder, components=("unet",))


def test_pipeline_component_folder_holding_another_kind(student_pipeline, vae_folder, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(student_pipeline, pipe)
    shutil.rmtree(pipe / "unet")
    shutil.copytree(vae_folder, pipe / "unet")
    with pytest.raises(ValueError, match=r"unet holds a 'vae' model, expected 'unet'"):
        load_source(pipe)


def test_foreign_model_and_pipeline_classes(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="'UNet2DModel'"):
        load_source(tmp_path / "m")
    (tmp_path / "p" / "unet").mkdir(parents=True)
    (tmp_path / "p" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline"):
        load_source(tmp_path / "p")


def test_training_checkpoint_and_empty_folder(tmp_path):
    (tmp_path / "run" / "1000" / "state").mkdir(parents=True)
    with pytest.raises(ValueError, match="training checkpoint"):
        load_source(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a pipeline folder"):
        load_source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_source(tmp_path / "missing")


def test_existing_output_is_refused_unless_overwrite(vae_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = snapjax_main(["export", "torch", "--checkpoint", str(vae_folder), "--out", str(out)])
    assert rc == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").is_file()
    with pytest.raises(FileExistsError):
        export_torch(load_source(vae_folder), out, log=lambda _: None)
    rc = snapjax_main(["export", "torch", "--checkpoint", str(vae_folder), "--out", str(out),
                       "--overwrite"])
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "vae_decoder").is_dir()


def test_unsupported_quantization_bits_and_options(vae_folder, tmp_path, capsys):
    rc = snapjax_main(["export", "coreml", "--checkpoint", str(vae_folder), "--out",
                       str(tmp_path / "o"), "--quantize-bits", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "--quantize-bits 3 is not supported" in err and "6 or 4" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="attention='flash'"):
        CoreMLOptions(attention="flash")
    with pytest.raises(ValueError, match="unet batch 3"):
        CoreMLOptions(unet_batch=3)


def test_single_component_has_no_diffusers_folder(vae_folder, tmp_path):
    report = export_torch(load_source(vae_folder), tmp_path / "out", log=lambda _: None)
    assert report["diffusers"] is None
    assert any("single component" in m for m in report["diffusers_misfits"])
