"""The files a SaLoRA run leaves beside its adapter: the rank table, its numbers and the heat map."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .plot import heatmap_title, rank_heatmap
from .report import format_table, write_summary


def write_outputs(summary: dict, output_dir: str) -> None:
    """`salora_ranks.{txt,json,png}` in `output_dir` (on the main process only)."""
    if not _main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    write_summary(summary, os.path.join(output_dir, "salora_ranks.json"))
    with open(os.path.join(output_dir, "salora_ranks.txt"), "w") as f:
        f.write(format_table(summary) + "\n")
    rank_heatmap({r["module"]: r["export_rank"] for r in summary["modules"]}, os.path.join(output_dir, "salora_ranks.png"),
                 r_max=max(r["r"] for r in summary["modules"]), title=heatmap_title(summary))


def describe_outputs(out_dir: Path) -> list[str]:
    """The lines `loraforge train` prints about the files a SaLoRA run left in `out_dir` (none: no lines)."""
    table = out_dir / "salora_ranks.txt"
    if not table.is_file():
        return []
    rows = table.read_text(encoding="utf-8").splitlines()
    lines = [rows[-1] if rows else "",  # the densities line
             f"rank table: {table} (numbers: {out_dir / 'salora_ranks.json'})"]
    if (out_dir / "salora_ranks.png").is_file():
        lines.append(f"heat map:   {out_dir / 'salora_ranks.png'}")
    return lines + [f"print it again with: loraforge ranks {out_dir}"]


def _main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0
