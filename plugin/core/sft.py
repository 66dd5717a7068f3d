"""`LoraForgeSFTTrainer`: TRL's `SFTTrainer` with loraforge's driving (kept apart: importing trl is slow)."""
from __future__ import annotations

from trl import SFTTrainer

from .trainer import LoraForgeTrainerMixin


class LoraForgeSFTTrainer(LoraForgeTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` that drives loraforge adapters (same arguments)."""
