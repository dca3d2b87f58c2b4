"""Session fixtures for the export tests: tiny snapjax pipeline folders (see tiny_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.export.tiny_models import STUDENT_SCHEDULE, UNET_REMOVED, VAE_HALF, write_pipeline


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models run fastest single-threaded on a shared, oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def student_pipeline(tmp_path_factory) -> Path:
    """SD-shaped tiny pipeline with the student's schedule, sampling defaults recorded."""
    return write_pipeline(tmp_path_factory.mktemp("student") / "pipe", schedule=STUDENT_SCHEDULE,
                          sampling={"num_steps": 8, "guidance_scale": 4.0})


@pytest.fixture(scope="session")
def removed_pipeline(tmp_path_factory) -> Path:
    """A pipeline whose UNet has removed blocks and whose decoder is pruned: no diffusers fit."""
    return write_pipeline(tmp_path_factory.mktemp("evolved") / "pipe", unet=UNET_REMOVED,
                          vae_spec=VAE_HALF, schedule=STUDENT_SCHEDULE, seed=10)
