"""SaLoRA: LoRA with a learned Hard-Concrete gate per rank under a global parameter budget.

`SaLoRAConfig` (config.py), the gate axis (layer.py), the controller and `prune` / `gate_summary`
(model.py), the rank table (report.py), the heat map (plot.py) and `loraforge ranks` (cli.py).
"""
from __future__ import annotations

from .config import SaLoRAConfig

__all__ = ["SaLoRAConfig", "prune", "gate_summary"]


def __getattr__(name: str):
    if name in ("prune", "gate_summary"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'loraforge.salora' has no attribute {name!r}")
