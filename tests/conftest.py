"""Fixtures shared across the test tree (keep this file small)."""

from __future__ import annotations

import numpy as np
import pytest


def max_rel_err(actual, ref) -> float:
    """max |actual - ref| / max |ref|: the error measure the parity tests state tolerances in."""
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    return float(np.abs(actual - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture
def rel_err():
    """The :func:`max_rel_err` function, for tests that compare against a reference."""
    return max_rel_err


class Bucket:
    """A bucket on the test's GCS emulator: ``url("a/b")`` is ``gs://BUCKET/<prefix>/a/b``."""

    def __init__(self, name: str, endpoint: str, prefix: str):
        self.name, self.endpoint, self.prefix = name, endpoint, prefix

    def url(self, rel: str = "") -> str:
        return f"gs://{self.name}/{self.prefix}/{rel}".rstrip("/")

    def env(self) -> dict[str, str]:
        """What a subprocess needs to reach the emulator (snapjax.storage maps the rest)."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint}


@pytest.fixture(scope="session")
def gcs_emulator():
    """A local GCS API (tests/gcs_emulator.py) for the session; skips only if it cannot start."""
    import os
    import pathlib
    import socket
    import subprocess
    import sys
    import time

    try:
        import gcp_storage_emulator  # noqa: F401
        import gcsfs  # noqa: F401
    except ImportError as e:
        pytest.skip(f"GCS emulator not installed ({e}); pip install -r requirements.txt")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = pathlib.Path(__file__).with_name("gcs_emulator.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), "snapjax-test"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        if line.strip() == "ready":
            break
    if line.strip() != "ready":
        proc.kill()
        pytest.skip(f"the GCS emulator did not start: {proc.stderr.read()[-2000:]}")
    endpoint = f"http://localhost:{port}"
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    from snapjax import storage
    storage.configure_emulator()
    try:
        yield endpoint
    finally:
        proc.kill()
        proc.wait()
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture
def bucket(gcs_emulator, request) -> Bucket:
    """A fresh prefix of the emulator's bucket for one test."""
    import re
    return Bucket("snapjax-test", gcs_emulator, re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name))
