"""Run exported Core ML packages (macOS only) and compare them with the PyTorch mirrors.

    python -m export.coreml.verify_macos --coreml OUT_COREML --mirrors OUT_TORCH \
        [--compute-units ALL]

``OUT_COREML`` is what ``snapjax export coreml`` wrote, ``OUT_TORCH`` what ``snapjax export torch``
wrote for the same checkpoint (the mirrors are the fp32 reference). For each package: the PSNR
and max relative error of Core ML against the mirror on the same inputs (Apple's converter asks
for at least 35 dB). With a full pipeline it also samples the manifest's schedule end to end
(Core ML TextEncoder -> Unet steps -> VAEDecoder vs the same loop on the mirrors) and writes both
images. Core ML prediction needs macOS; on Linux this script explains so and exits with 2 (the
Linux test suite checks conversion and the package specs instead). Both folders may be local or
``gs://`` (a bucket's Core ML folder is copied locally to be run; the images are written back).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from etils import epath

from snapjax import storage

MIN_PSNR_DB = 35.0  # Apple's converter's threshold for fp16 models (torch2coreml.py)
SWIFT_LATENT_SCALE = 0.18215


def psnr(a: np.ndarray, ref: np.ndarray) -> float:
    """Apple's measure: 20 log10(max |ref| / rms(a - ref))."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    rms = np.sqrt(np.mean((a - ref) ** 2))
    return float(20 * np.log10((np.abs(ref).max() + 1e-5) / (rms + 1e-10)))


def coreml_predictors(coreml_dir: epath.Path, manifest: dict, compute_units: str) -> dict:
    """Core ML callables with the same contract as reference_app.mirror_predictors; ``coreml_dir``
    is local (Core ML loads local packages only)."""
    import coremltools as ct

    units = ct.ComputeUnit[compute_units]
    predict = {}
    for name, packages in manifest["models"].items():
        chunks = [ct.models.MLModel(str(coreml_dir / p), compute_units=units) for p in packages]

        def run(inputs: dict, chunks=chunks) -> dict:
            # Chunks run in sequence; each gets the original inputs and the previous outputs.
            features, out = dict(inputs), {}
            for model in chunks:
                names = {f.name for f in model.get_spec().description.input}
                out = model.predict({k: np.asarray(v, np.float32) for k, v in features.items()
                                     if k in names})
                features.update(out)
            return out

        predict[name] = run
    return predict


def example_inputs(io: dict, manifest: dict, rng) -> dict:
    """Random inputs for a package from its spec's {name: (shape, dtype)} table (a guidance-
    conditioned Unet's guidance input: the features of the manifest's scale)."""
    from export.coreml.reference_app import guidance_features

    inputs = {}
    guidance_input = manifest.get("unet", {}).get("guidance_input")
    for name, (shape, _dtype) in io.items():
        if guidance_input and name == guidance_input:
            inputs[name] = guidance_features(np.full(shape[0], manifest["guidance_scale"]),
                                             shape[1])
        elif name == "input_ids":
            inputs[name] = rng.integers(0, manifest["tokenizer"]["vocab_size"], shape)
        elif name == "timestep":
            inputs[name] = np.full(shape, manifest["schedule"]["timesteps"][0])
        elif name == "z":  # a raw-latent-sized input, as Swift feeds latent / 0.18215
            inputs[name] = rng.standard_normal(shape) / SWIFT_LATENT_SCALE
        else:
            inputs[name] = rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in inputs.items()}


def verify(coreml_dir: str | os.PathLike, mirrors_dir: str | os.PathLike,
           compute_units: str = "ALL", prompt: str = "a red circle") -> list[dict]:
    with storage.local_folder(coreml_dir) as local:
        return _verify(local, storage.path(coreml_dir), storage.path(mirrors_dir), compute_units,
                       prompt)


def _verify(local: epath.Path, coreml_dir: epath.Path, mirrors_dir: epath.Path,
            compute_units: str, prompt: str) -> list[dict]:
    from export.coreml.export import package_io
    from export.coreml.manifest import MANIFEST_FILE
    from export.coreml.reference_app import generate, mirror_predictors, tokenize

    manifest = json.loads((local / MANIFEST_FILE).read_text())
    ours = coreml_predictors(local, manifest, compute_units)
    ref = mirror_predictors(mirrors_dir, manifest)
    rng = np.random.default_rng(0)
    results = []
    for name in ours:
        if name not in ref:
            raise FileNotFoundError(f"{mirrors_dir}: no mirror for {name}; export the same "
                                    "checkpoint with `snapjax export torch` first")
        io, _ = package_io(local / manifest["models"][name][0])
        inputs = example_inputs(io, manifest, rng)
        got, want = ours[name](inputs), ref[name](inputs)
        for key, value in want.items():
            results.append(_compare(name, key, got[key], value))
    if set(ours) == {"TextEncoder", "Unet", "VAEDecoder"} and (mirrors_dir / "tokenizer").is_dir():
        length = manifest["tokenizer"]["max_length"]
        ids = tokenize(mirrors_dir / "tokenizer", prompt, length)
        empty = tokenize(mirrors_dir / "tokenizer", "", length)
        lat = manifest["latent"]
        noise = rng.standard_normal((1, lat["channels"], lat["height"], lat["width"]))
        image = generate(ours, manifest, ids, empty, noise)
        reference = generate(ref, manifest, ids, empty, noise)
        from PIL import Image
        for file, pixels in (("verify_coreml.png", image), ("verify_mirror.png", reference)):
            with (coreml_dir / file).open("wb") as f:  # next to the packages, also in a bucket
                Image.fromarray(pixels).save(f, format="PNG")
        results.append(_compare("pipeline", f"image ({len(manifest['schedule']['timesteps'])} "
                                "steps)", image, reference))
    return results


def _compare(name: str, key: str, got, want) -> dict:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    return {"package": name, "output": key, "psnr_db": psnr(got, want), "max_rel_err": err}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coreml", required=True,
                        help="snapjax export coreml output (local or gs://)")
    parser.add_argument("--mirrors", required=True,
                        help="snapjax export torch output (local or gs://)")
    parser.add_argument("--compute-units", default="ALL",
                        choices=("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"))
    args = parser.parse_args(argv)
    if sys.platform != "darwin":
        print("verify_macos: Core ML prediction runs only on macOS (this is "
              f"{sys.platform}). Copy {args.coreml} and {args.mirrors} to a Mac with snapjax "
              "installed and run this script there; on Linux the test suite checks the "
              "conversion and the package specs (tests/export/).", file=sys.stderr)
        return 2
    results = verify(args.coreml, args.mirrors, args.compute_units)
    worst = min((r["psnr_db"] for r in results), default=float("inf"))
    for r in results:
        flag = "ok" if r["psnr_db"] >= MIN_PSNR_DB else "LOW"
        print(f"{r['package']:12s} {r['output']:18s} PSNR {r['psnr_db']:6.1f} dB  "
              f"max rel err {r['max_rel_err']:.2e}  {flag}")
    print(f"worst PSNR {worst:.1f} dB (threshold {MIN_PSNR_DB} dB)")
    return 0 if worst >= MIN_PSNR_DB else 1


if __name__ == "__main__":
    sys.exit(main())
