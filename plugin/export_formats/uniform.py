"""One rank and one alpha for every module: the LoRA that engines reading only `r` / `lora_alpha` serve.

SGLang, LoRAX and TGI (and vLLM before 0.32) apply one `lora_alpha / r` per adapter and expect every
weight to have `r` rows: they drop `rank_pattern` / `alpha_pattern`. Here every module is zero-padded
to the largest rank R (zero rows of A, zero columns of B add nothing to `B A`) and each module's own
scaling is already in its B, so `r = lora_alpha = R` (scaling 1) reproduces the trained model.
"""
from __future__ import annotations

import os

import torch
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file


def pad_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, A)` zero-padded to `rank` (B gains zero columns, A zero rows): the same `B @ A`."""
    extra = rank - b.shape[1]
    return torch.nn.functional.pad(b, (0, extra)), torch.nn.functional.pad(a, (0, 0, 0, extra))


def write_uniform(config: LoraConfig, factors: dict, extra: dict, out_dir: str) -> str:
    """Write `factors` (module -> (B, A), scaling folded in) as a PEFT LoRA with one rank; see `write`."""
    rank = max(b.shape[1] for b, _ in factors.values())
    tensors, padded, minimal, itemsize = dict(extra), 0, 0, 0
    for name, (b, a) in factors.items():
        prefix = f"base_model.model.{name}"
        b_r, a_r = pad_rank(b, a, rank)
        tensors[f"{prefix}.lora_A.weight"] = a_r.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b_r.contiguous()
        padded += b_r.numel() + a_r.numel()
        minimal += b.numel() + a.numel()
        itemsize = b.element_size()
    uniform = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(factors),
        lora_dropout=0.0,
        bias="none",
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    os.makedirs(out_dir, exist_ok=True)
    uniform.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    mib = lambda n: n * itemsize / 2**20  # noqa: E731
    return (f"uniform rank {rank} (r = lora_alpha = {rank}, no rank/alpha patterns) over {len(factors)} modules: "
            f"{padded:,} LoRA parameters ({mib(padded):.2f} MiB) where the per-module ranks need {minimal:,} "
            f"({mib(minimal):.2f} MiB), +{100 * (padded - minimal) / minimal:.0f}% for the zero padding")
