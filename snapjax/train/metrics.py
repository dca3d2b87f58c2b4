"""Where training numbers go: ``metrics.jsonl``, TensorBoard event files, sample grids.

Also the throughput arithmetic: images/s, TFLOP/s from the compiled step's own FLOP count, and
MFU against the device's peak where the device is in :data:`PEAK_TFLOPS`.
Only process 0 writes; the other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from snapjax import storage

# Dense bf16 peak TFLOP/s per chip (vendor datasheets). MFU is always against this bf16 peak,
# whatever the compute dtype. Matched as substrings of ``device.device_kind``, first hit wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100", 989.0),   # SXM; the PCIe card is slower (756) but reports the same kind prefix
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)


def peak_tflops(device: jax.Device | None = None) -> float | None:
    """bf16 peak of one device, or None when unknown (CPU, other accelerators)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_TFLOPS:
        if name in kind:
            return peak
    return None


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled (per-device SPMD) program, from XLA's cost analysis."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    flops = float(analysis["flops"])
    return flops if flops > 0 else None


def throughput(*, steps: int, seconds: float, batch_size: int, flops_per_device_step: float | None,
               num_devices: int, peak: float | None) -> dict[str, float]:
    """images/s (global), TFLOP/s (per device) and MFU over an interval of ``steps`` steps."""
    if steps <= 0 or seconds <= 0:
        return {}
    out = {"perf/images_per_sec": batch_size * steps / seconds,
           "perf/sec_per_step": seconds / steps}
    if flops_per_device_step:
        tflops = flops_per_device_step * steps / seconds / 1e12
        out["perf/tflops_per_device"] = tflops
        if peak:
            out["perf/mfu"] = tflops / peak
    del num_devices  # the FLOP count is already per device
    return out


def to_float_dict(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def all_finite(metrics: Mapping[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


class MetricsWriter:
    """Appends ``{"step": n, ...}`` lines to ``workdir/metrics.jsonl`` and writes the same
    scalars (and sample grids) to TensorBoard event files under ``workdir/tensorboard``.

    A bucket's objects cannot be appended to: for a ``gs://`` workdir ``metrics.jsonl`` is
    rewritten at each write (:func:`snapjax.storage.append_text`; a small file), and the
    TensorBoard files are written locally and uploaded at each :meth:`flush` and at
    :meth:`close`."""

    def __init__(self, workdir: str | epath.Path, *, enabled: bool = True):
        self.enabled = enabled
        self.workdir = storage.path(workdir)
        self.remote = storage.is_remote(self.workdir)
        self._tb = None
        if enabled:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.path = self.workdir / "metrics.jsonl"
            if self.remote:
                self._tb_local = epath.Path(tempfile.mkdtemp(prefix="snapjax-tensorboard-"))

    def truncate_after(self, step: int) -> None:
        """Drops lines of steps after ``step``: a resumed run rewrites them."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        self.path.write_text("".join(k + "\n" for k in keep))

    def _writer(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self._tb_local if self.remote
                                         else self.workdir / "tensorboard"))
        return self._tb

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        storage.append_text(self.path, json.dumps(record) + "\n")
        tb = self._writer()
        for k, v in scalars.items():
            tb.add_scalar(k, float(v), int(step))

    def write_image(self, step: int, name: str, image_HWC: np.ndarray,
                    captions: list[str] | None = None) -> epath.Path | None:
        """Saves ``workdir/samples/{name}_{step}.png`` (+ captions JSON) and logs it to TB."""
        if not self.enabled:
            return None
        from PIL import Image
        folder = self.workdir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}_{step:07d}.png"
        with path.open("wb") as f:
            Image.fromarray(image_HWC).save(f, format="PNG")
        if captions:
            path.with_suffix(".json").write_text(json.dumps(captions, indent=1) + "\n")
        self._writer().add_image(name, image_HWC, int(step), dataformats="HWC")
        return path

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._upload_tensorboard()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            self._upload_tensorboard()
        if self.enabled and self.remote:
            shutil.rmtree(self._tb_local, ignore_errors=True)

    def _upload_tensorboard(self) -> None:
        if self.remote:
            storage.upload(self._tb_local, self.workdir / "tensorboard")
