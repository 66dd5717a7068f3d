"""Delta-LoRA: the frozen weight moves by the delta of the low-rank product."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ForgeConfig


@dataclass
class DeltaLoRAConfig(ForgeConfig):
    method = "delta_lora"
