"""``snapjax export torch``: PyTorch mirrors (+ a diffusers pipeline folder where the specs fit).

Output folder::

  unet/ vae_decoder/ text_encoder/   mirror folders (snapjax_mirror.json + model.safetensors)
  tokenizer/                         the tokenizer, with vocab.json and merges.txt
  scheduler/scheduler_config.json    DDIMScheduler config of the snapjax schedule
  diffusers/                         StableDiffusionPipeline folder (only where everything fits)
  export_report.json                 the summary table and why diffusers/ is absent, if it is

``out`` may be local or ``gs://``: the folder is written locally, then put into place
(:func:`snapjax.pretrained.replace_folder`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from etils import epath

from export.checkpoint import ExportSource
from export.parity import parity_error
from export.report import Row, folder_size
from export.tokenizer_files import write_clip_tokenizer_files
from export.torch.mirror import mirror_from_params, save_mirror
from snapjax.pretrained import replace_folder

# snapjax model kind -> mirror kind
MIRROR_KIND = {"unet": "unet", "vae": "vae_decoder", "text_encoder": "text_encoder"}


def export_torch(source: ExportSource, out: str | os.PathLike, *, overwrite: bool = False,
                 diffusers: bool = True, log: Callable[[str], None] = print) -> dict:
    """Write the torch export of ``source`` to ``out``; returns the report (also saved as JSON)."""
    from export.torch.diffusers_folder import diffusers_misfits, write_diffusers_pipeline

    report: dict = {"source": str(source.path), "components": [], "diffusers": None}

    def write(tmp: epath.Path) -> None:
        rows = []
        for i, (kind, comp) in enumerate(source.components.items(), 1):
            mkind = MIRROR_KIND[kind]
            log(f"[{i}/{len(source.components)}] {mkind}: mirror + parity check")
            mirror = mirror_from_params(mkind, comp.spec, comp.params)
            err = parity_error(mkind, comp.spec, comp.params, mirror)
            folder = save_mirror(tmp / mkind, mkind, comp.spec, comp.params)
            rows.append(Row(mkind, sum(p.numel() for p in mirror.parameters()), folder_size(folder),
                            parity=err, precision="float32"))
        if source.tokenizer_dir is not None:
            write_clip_tokenizer_files(source.tokenizer_dir, tmp / "tokenizer")
        if source.schedule is not None:
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(
                json.dumps(source.schedule.to_diffusers_config(), indent=1))
        misfits = diffusers_misfits(source)
        if diffusers and not misfits:
            log("diffusers: writing a StableDiffusionPipeline folder")
            write_diffusers_pipeline(tmp / "diffusers", source, source.schedule)
            report["diffusers"] = "diffusers"
        elif diffusers:
            log("diffusers: not written, " + "; ".join(misfits) + " (mirrors only)")
            report["diffusers_misfits"] = misfits
        report["components"] = [r.as_dict() for r in rows]
        (tmp / "export_report.json").write_text(json.dumps(report, indent=1))

    replace_folder(out, write, overwrite=overwrite)
    return report
