"""`LoraForgeSFTTrainer`: TRL's `SFTTrainer` with loraforge's driving (kept apart: importing trl is slow)."""
from __future__ import annotations

from trl import SFTTrainer

from .trainer import LoraForgeTrainerMixin


class LoraForgeSFTTrainer(LoraForgeTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` that drives loraforge adapters; takes the same arguments.

    On a k-bit base TRL casts every trainable tensor to bf16 (the QLoRA recipe for A and B); the
    trainable control tensors the axes declare (`Axis.tensors`, e.g. gate logits) are put back to
    fp32: a step of a small learning rate (0.01) is below bf16's spacing at |x| >= 2, so in bf16 they
    would stall or move by rounding.

    Args:
        *args, **kwargs: those of `trl.SFTTrainer` (`model`, `args`, `train_dataset`, `peft_config`, ...).

    Example:

        ```py
        >>> trainer = loraforge.LoraForgeSFTTrainer(model=model, args=SFTConfig(max_steps=200), train_dataset=ds,
        ...                                         peft_config=loraforge.SaLoRAConfig(target_density=0.5))
        >>> trainer.train()
        ```
    """

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
                for name in layer.trainable_control:
                    for p in getattr(layer, name).values():
                        if p.dtype in (torch.bfloat16, torch.float16):
                            p.data = p.data.float()
