"""Delta-LoRA: the frozen weight moves by the delta of the low-rank product. See docs/methods.md, "Delta-LoRA".

After optimizer step t > K: `W ← W + λ·s·(B_{t+1} A_{t+1} - B_t A_t)`, which telescopes to
`W_T = W_0 + λ·s·(B_T A_T - B_K A_K)`; `(B_K, A_K)` are the factors right after optimizer step K
(for K = 0: the initial factors), so nothing is propagated before or at step K.

Decisions the paper leaves open (measured with benchmarks/bench_delta_lora.py, CPU, 4-layer
hidden-512 Llama, seq 128, r=16):
- `propagation="folded"` is the default. It never writes `W`, so `disable_adapter()`, `unload()`,
  other adapters on the same base and half-precision bases keep PEFT's meaning; its fused rank-2r
  branch took 0.96-0.98x LoRA's CPU time per step and 1.003-1.007x its peak memory (the snapshot
  B_K, A_K). `"in_place"` (the paper's algorithm: writes `W` after every step) took 1.00-1.04x and
  1.003-1.015x (a copy of B, A to form each step's delta, plus the snapshot).
- In place on a bf16/fp16 `W`, each layer keeps an fp32 buffer of what `W` could not represent (a
  compensated sum): adding each step's delta to a bf16 `W` kept only 17% of a 100-step update at
  lr 1e-4 (93% at lr 1e-3); with the buffer `W_T` is the rounding of the exact value. It costs 4
  bytes per adapted base weight; a warning says so once.
- Defaults `update_ratio=0.5` (the paper's GLUE setting) and `start_step=500` (its E2E setting);
  a trainer run whose max_steps <= start_step warns that W never moves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..core.config import ForgeConfig, require
from .in_place import InPlacePropagation
from .layer import FoldedPropagation
from .model import DeltaLoRAController

PROPAGATIONS = ("folded", "in_place")


@dataclass
class DeltaLoRAConfig(ForgeConfig):
    """Delta-LoRA: after each optimizer step t > K the base weight moves by λ times the change of s·B·A.

    Completes under any trainer (its work follows each optimizer step), including a plain
    `SFTTrainer(..., peft_config=DeltaLoRAConfig(...))`. Every `peft.LoraConfig` field keeps PEFT's
    meaning; `lora_dropout` must be 0.

    Args:
        update_ratio (`float`, defaults to 0.5): λ (paper: 0.5 GLUE, 2 E2E); 0 is plain LoRA.
        start_step (`int`, defaults to 500): K, the optimizer steps before W starts to move.
        propagation (`str`, defaults to `"folded"`): "folded" never writes W (a rank-2r branch);
            "in_place" writes W after every step (the paper's algorithm; full-precision bases only).

    Example:

        ```py
        >>> config = loraforge.DeltaLoRAConfig(r=8, update_ratio=2.0, start_step=100, lora_dropout=0.0)
        >>> model = get_peft_model(AutoModelForCausalLM.from_pretrained("base"), config)
        ```
    """

    method = "delta_lora"

    update_ratio: float = field(
        default=0.5,
        metadata={"help": "λ: W moves λ times as much as the adapter's own term s·B·A moved "
                          "(paper: 0.5 GLUE, 2 E2E)."},
    )
    start_step: int = field(
        default=500,
        metadata={"help": "K: W moves after optimizer steps t > K; the snapshot (B_K, A_K) is taken after step K."},
    )
    propagation: str = field(
        default="folded",
        metadata={"help": "'folded': never write W, add λ·s·(B A - B_K A_K) x from detached factors; "
                          "'in_place': write W after every optimizer step (the paper's algorithm)."},
    )

    def validate(self) -> None:
        super().validate()
        require(
            not self.lora_dropout,
            "lora_dropout",
            f"Delta-LoRA needs lora_dropout=0.0, got {self.lora_dropout!r}: dropout in the low-rank branch "
            "makes the gradient of B·A differ from that of W, which breaks the identity the propagation "
            "relies on (the paper removes it). Set lora_dropout=0.0 and, if you need regularisation, use "
            "the base model's own dropout.",
        )
        require(
            isinstance(self.update_ratio, (int, float)) and self.update_ratio >= 0,
            "update_ratio",
            f"must be a number >= 0 (0 is plain LoRA), got {self.update_ratio!r}",
        )
        require(
            isinstance(self.start_step, int) and not isinstance(self.start_step, bool) and self.start_step >= 0,
            "start_step",
            f"must be an integer >= 0 (optimizer steps before W starts to move), got {self.start_step!r}",
        )
        require(
            self.propagation in PROPAGATIONS,
            "propagation",
            f"must be one of {PROPAGATIONS}, got {self.propagation!r}",
        )
        require(not self.use_dora, "use_dora", "Delta-LoRA cannot be combined with DoRA; set use_dora=False")

    def axes(self) -> list[type]:
        return [InPlacePropagation if self.propagation == "in_place" else FoldedPropagation]

    def controllers(self) -> list[type]:
        return [DeltaLoRAController]
