"""CoRA: LoRA whose B starts from a common SVD subspace of several fine-tuned models."""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import ForgeConfig


@dataclass
class CoRAConfig(ForgeConfig):
    method = "cora"
