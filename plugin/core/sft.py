"""`LoraForgeSFTTrainer`: TRL's `SFTTrainer` with loraforge's driving (kept apart: importing trl is slow)."""
from __future__ import annotations

from trl import SFTTrainer

from .trainer import LoraForgeTrainerMixin


class LoraForgeSFTTrainer(LoraForgeTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` that drives loraforge adapters (same arguments).

    On a k-bit base TRL casts every trainable tensor to bf16 (the QLoRA recipe for A and B); SaLoRA's
    gate logits are put back to fp32: a step of the gate learning rate (0.01) is below bf16's spacing
    at |log_alpha| >= 2, so in bf16 the gates would stall or move by rounding."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import torch

        from .config import ForgeConfigError

        data = self.train_dataset
        if data is not None and hasattr(data, "__len__") and len(data) == 0:  # else torch's "num_samples ..." at train()
            raise ForgeConfigError(
                f"max_length: every training example lost its response to truncation at {self.args.max_length} tokens "
                "(or the data is empty); raise max_length or give shorter examples")

        from .layer import ForgeLinear

        for layer in self.model.modules():
            if isinstance(layer, ForgeLinear):
                for p in layer.lora_gate_logits.values():
                    if p.dtype in (torch.bfloat16, torch.float16):
                        p.data = p.data.float()
