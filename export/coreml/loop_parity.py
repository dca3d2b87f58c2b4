"""Does the manifest's loop sample like snapjax? PSNR of its images against ``snapjax sample``'s.

    python -m export.coreml.loop_parity --model runs/world/distill/direct_2/model \\
        --torch exports/direct_2_torch --coreml exports/direct_2_coreml \\
        --prompt "a small red circle on the left" --prompt "a big blue square" --seeds 0 1

runs :func:`export.coreml.reference_app.generate` (the recipe an app follows, here on the
``snapjax export torch`` mirrors behind the Core ML packages' I/O) and
:class:`snapjax.pipeline.TextToImage` on the same prompts and initial noise, at the manifest's
steps and guidance, and prints one PSNR per image (inf: identical) and the minimum. Exit code 1
if the minimum is under ``--min-psnr`` (default 40 dB). The three folders may be local or
``gs://``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from snapjax import storage


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def loop_parity(model: str, torch_dir: str, coreml_dir: str, prompts: list[str],
                seeds: list[int]) -> list[dict]:
    from export.coreml.manifest import MANIFEST_FILE
    from export.coreml.reference_app import generate, mirror_predictors, tokenize
    from snapjax import sampling
    from snapjax.pipeline import TextToImage

    manifest_path = storage.path(coreml_dir) / MANIFEST_FILE
    with storage.clear_errors(coreml_dir, "read"):
        found = manifest_path.is_file()
    if not found:
        raise FileNotFoundError(f"{manifest_path}: no manifest (run snapjax export coreml first)")
    manifest = json.loads(manifest_path.read_text())
    pipe = TextToImage.from_pretrained(model)
    predict = mirror_predictors(torch_dir, manifest)
    missing = {"TextEncoder", "Unet", "VAEDecoder"} - set(predict)
    if missing:
        raise FileNotFoundError(f"{torch_dir}: no mirror for {sorted(missing)} (run snapjax "
                                "export torch with every component)")
    steps, w = manifest["schedule"]["num_steps"], float(manifest["guidance_scale"])
    length = manifest["tokenizer"]["max_length"]
    rows = []
    for seed in seeds:
        for prompt in prompts:
            noise = np.asarray(sampling.initial_noise(seed, 1, (pipe.sample_size,) * 2,
                                                      pipe.unet.spec.in_channels))
            ours = pipe([prompt], num_steps=steps, guidance_scale=w, latents=noise)[0]
            cond = tokenize(coreml_dir, prompt, length)
            uncond = tokenize(coreml_dir, "", length)
            theirs = generate(predict, manifest, cond, uncond, noise.transpose(0, 3, 1, 2))
            rows.append({"prompt": prompt, "seed": seed, "psnr": psnr(ours, theirs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the snapjax pipeline folder")
    parser.add_argument("--torch", required=True, help="its snapjax export torch folder")
    parser.add_argument("--coreml", required=True, help="its snapjax export coreml folder")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--min-psnr", type=float, default=40.0)
    args = parser.parse_args(argv)
    rows = loop_parity(args.model, args.torch, args.coreml, args.prompt, args.seeds)
    for r in rows:
        print(f"seed {r['seed']}  {r['psnr']:7.2f} dB  {r['prompt']}")
    worst = min(r["psnr"] for r in rows)
    print(f"minimum PSNR {worst:.2f} dB over {len(rows)} images")
    return 0 if worst >= args.min_psnr else 1


if __name__ == "__main__":
    sys.exit(main())
