"""SaLoRA (structure-aware LoRA): Hard-Concrete rank gates under an L0 budget. See METHODS.md."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ForgeConfig


@dataclass
class SaLoRAConfig(ForgeConfig):
    method = "salora"
