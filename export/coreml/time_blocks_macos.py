"""Time the per-block Core ML packages of ``snapjax export latency-blocks`` (macOS only) and write
a latency table.

    python -m export.coreml.time_blocks_macos --blocks DIR --out latency.json \
        [--device "M2 Pro"] [--compute-units CPU_AND_NE] [--warmup 5] [--repeats 50]

Each package is loaded once, run ``--warmup`` times, then timed ``--repeats`` times; its figure
is the median in milliseconds. A ResNet's entry is its package's time minus its shortcut
package's (the shortcut stays in the fixed part when the block is removed), clamped at 0::

  {"format": "snapjax-latency-v1", "unit": "ms", "device": "...", "latent_side": 64,
   "blocks": {"res:320->320@64x64": 1.9, "attn:320@64x64:...": 7.5, ...}, "fixed": 3.2}

Core ML prediction needs macOS; elsewhere this script says so and exits with 2. ``--blocks`` and
``--out`` may be local or ``gs://`` (a bucket's packages are copied locally to be timed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath

from snapjax import storage

FORMAT = "snapjax-latency-v1"

Predictor = Callable[[dict[str, np.ndarray]], Any]
Loader = Callable[[epath.Path], Predictor]  # local package path -> predict(inputs)


def median_ms(predict: Predictor, inputs: dict[str, np.ndarray], *, warmup: int, repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median wall time of ``predict(inputs)`` in ms, after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one timed call")
    for _ in range(warmup):
        predict(inputs)
    times = []
    for _ in range(repeats):
        start = clock()
        predict(inputs)
        times.append(clock() - start)
    return 1000.0 * float(np.median(times))


def latency_table(folder: str | os.PathLike, load: Loader, *, device: str, warmup: int = 5,
                  repeats: int = 50, clock: Callable[[], float] = time.perf_counter,
                  log: Callable[[str], None] = print) -> dict:
    """The latency table of the packages in ``folder`` (see the module docstring)."""
    from export.coreml.latency_blocks import BLOCKS_FILE
    from export.coreml.latency_blocks import FORMAT as BLOCKS_FORMAT

    blocks_file = storage.path(folder) / BLOCKS_FILE
    with storage.clear_errors(folder, "read"):
        meta = json.loads(blocks_file.read_text())
    if meta.get("format") != BLOCKS_FORMAT:
        raise ValueError(f"{blocks_file}: format {meta.get('format')!r}, expected "
                         f"{BLOCKS_FORMAT!r} (written by snapjax export latency-blocks)")
    with storage.local_folder(folder) as local:  # Core ML loads local packages only
        return _time_packages(meta, local, load, device=device, warmup=warmup, repeats=repeats,
                              clock=clock, log=log)


def _time_packages(meta: dict, folder: epath.Path, load: Loader, *, device: str, warmup: int,
                   repeats: int, clock: Callable[[], float], log: Callable[[str], None]) -> dict:
    rng = np.random.default_rng(0)

    def time_package(package: dict) -> float:
        predict = load(folder / package["file"])
        inputs = {name: rng.standard_normal(shape).astype(np.float32)
                  for name, shape in package["inputs"].items()}
        ms = median_ms(predict, inputs, warmup=warmup, repeats=repeats, clock=clock)
        log(f"{package['file']}: {ms:.3f} ms")
        return ms

    blocks = {}
    for entry in meta["blocks"]:
        ms = time_package(entry["package"])
        if entry["shortcut"] is not None:
            ms = max(0.0, ms - time_package(entry["shortcut"]))
        blocks[entry["signature"]] = ms
    return {"format": FORMAT, "unit": "ms", "device": device, "latent_side": meta["latent_side"],
            "blocks": blocks, "fixed": time_package(meta["fixed"])}


def write_latency_table(folder: str | os.PathLike, out: str | os.PathLike, load: Loader,
                        **kwargs) -> dict:
    """:func:`latency_table`, written to ``out`` (a local or ``gs://`` file) as JSON."""
    table = latency_table(folder, load, **kwargs)
    with storage.clear_errors(out, "write"):
        storage.path(out).write_text(json.dumps(table, indent=1))
    return table


def coreml_loader(compute_units: str) -> Loader:
    import coremltools as ct

    units = ct.ComputeUnit[compute_units]

    def load(path: epath.Path) -> Predictor:
        return ct.models.MLModel(str(path), compute_units=units).predict

    return load


def default_device(compute_units: str) -> str:
    import platform

    return f"{platform.machine()} macOS {platform.mac_ver()[0]} ({compute_units})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", required=True,
                        help="snapjax export latency-blocks output (local or gs://)")
    parser.add_argument("--out", required=True,
                        help="latency table to write (JSON; local or gs://)")
    parser.add_argument("--device", default=None,
                        help="device name for the table (default: machine, macOS version, "
                             "compute units)")
    parser.add_argument("--compute-units", default="ALL",
                        choices=("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if sys.platform != "darwin":
        print("time_blocks_macos: Core ML prediction runs only on macOS (this is "
              f"{sys.platform}). Copy {args.blocks} to a Mac with snapjax installed and run this "
              "script there; on Linux the test suite checks the packages' specs.", file=sys.stderr)
        return 2
    table = write_latency_table(args.blocks, args.out, coreml_loader(args.compute_units),
                                device=args.device or default_device(args.compute_units),
                                warmup=args.warmup, repeats=args.repeats)
    print(f"{len(table['blocks'])} blocks, fixed {table['fixed']:.2f} ms: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
