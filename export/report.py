"""The summary table both exporters print: component, params, size on disk, parity error."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass
class Row:
    component: str
    params: int
    size_bytes: int
    parity: float | None = None      # fp32 mirror vs snapjax, max rel err
    precision: str = ""
    fp16_err: float | None = None    # fp16 mirror vs fp32 mirror, max rel err
    size_before_bytes: int | None = None  # before weight compression
    note: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def folder_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a file or of every file under a local folder (the exporters measure
    their staging folder, before any upload)."""
    path = Path(path)  # local: the staging folder of replace_folder (rglob walks local disks)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def format_table(rows: list[Row]) -> str:
    head = ["component", "params", "precision", "size", "before compression", "parity (fp32)",
            "fp16 err", "note"]
    body = [[r.component, human_count(r.params), r.precision or "-", human_size(r.size_bytes),
             human_size(r.size_before_bytes),
             "-" if r.parity is None else f"{r.parity:.1e}",
             "-" if r.fp16_err is None else f"{r.fp16_err:.1e}", r.note] for r in rows]
    keep = [i for i in range(len(head)) if any(row[i] not in ("-", "") for row in body)]
    head = [head[i] for i in keep]
    body = [[row[i] for i in keep] for row in body]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])
