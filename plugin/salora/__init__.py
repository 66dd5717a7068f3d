"""SaLoRA: LoRA with a learned Hard-Concrete gate per rank under a global parameter budget.

`SaLoRAConfig` (config.py), the gate axis (layer.py), the controller (model.py) with its budget
controls (budget.py) and orthogonal term (orth.py), pruning (`prune`, `gate_summary`: prune.py), the
rank table (report.py), the files a run writes (outputs.py, plot.py) and `loraforge ranks`
(commands.py, cli.py).
"""
from __future__ import annotations

from ..registry import register_method
from .config import SaLoRAConfig
from .outputs import describe_outputs
from .prune import gate_summary, prune

__all__ = ["SaLoRAConfig", "prune", "gate_summary", "METHOD"]

METHOD = register_method(SaLoRAConfig, title="SaLoRA", commands=("ranks",),
                         example="{target_density: 0.5, gate_lr: 0.01}", report=describe_outputs)
