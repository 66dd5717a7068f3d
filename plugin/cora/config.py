"""CoRA: LoRA whose B starts from a common SVD subspace of several fine-tuned models.

Decisions the paper leaves open (see docs/methods.md, "CoRA: training with the basis"):
- `B` of a module starts as the first `r` columns of that module's basis `U` (key = the module's
  path in the base model, e.g. `model.layers.0.self_attn.q_proj`; written by `loraforge cora-extract`).
  `r` may be smaller than the basis rank, never larger (`rank_pattern` is honoured per module).
- `a_init="zeros"` (default): the output at step 0 equals the base model's. `"gaussian"` is the
  paper's random `A` (PEFT's gaussian init, std 1/r); `"kaiming"` is PEFT's default LoRA `A`.
- `freeze_b=True` is the paper's FB mode (only `A` trains; the optimizer never holds `B`);
  `False` is TB mode (`B` trains from the basis).
- The basis is read only when a NEW adapter is created. A saved adapter carries `B` in its weights
  and its config is written with `init_from_basis=False`, so loading never opens the basis file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from ..core.config import ForgeConfig, ForgeConfigError, require
from .layer import BasisAxis, basis_columns
from .model import CoRAProvenance

A_INITS = ("zeros", "gaussian", "kaiming")


@dataclass
class CoRAConfig(ForgeConfig):
    """CoRA: LoRA whose B starts from a common SVD subspace of fine-tuned models (`loraforge cora-extract`).

    Completes under any trainer, including a plain `SFTTrainer(..., peft_config=CoRAConfig(...))`.
    Every `peft.LoraConfig` field keeps PEFT's meaning.

    Args:
        basis_path (`str`): the safetensors file of bases written by `loraforge cora-extract` (new adapters).
        freeze_b (`bool`, defaults to `True`): FB mode (only A trains); False: TB mode (B trains too).
        a_init (`str`, defaults to `"zeros"`): how A starts: "zeros", "gaussian" (the paper) or "kaiming".
        init_from_basis (`bool`, defaults to `True`): read B from `basis_path`; saved adapters record False.

    Example:

        ```py
        >>> config = loraforge.CoRAConfig(r=8, basis_path="basis.safetensors", target_modules=["q_proj", "v_proj"])
        >>> model = get_peft_model(AutoModelForCausalLM.from_pretrained("base"), config)
        ```
    """

    method = "cora"

    basis_path: Optional[str] = field(
        default=None, metadata={"help": "safetensors file of bases written by `loraforge cora-extract`"})
    freeze_b: bool = field(default=True, metadata={"help": "True: FB mode (only A trains); False: TB mode"})
    a_init: str = field(default="zeros", metadata={"help": "how A starts: zeros | gaussian | kaiming"})
    init_from_basis: bool = field(
        default=True,
        metadata={"help": "read B from basis_path when the adapter is created; saved adapters record False "
                          "because their B travels in the adapter weights"})

    def validate(self) -> None:
        super().validate()
        require(isinstance(self.freeze_b, bool), "freeze_b", f"must be True (FB mode) or False (TB mode), got {self.freeze_b!r}")
        require(self.a_init in A_INITS, "a_init", f"must be one of {', '.join(A_INITS)}, got {self.a_init!r}")
        require(self.init_lora_weights in (True, False), "init_lora_weights",
                f"CoRA sets A from a_init and B from the basis; leave init_lora_weights at True "
                f"(for a random A use a_init='gaussian'), got {self.init_lora_weights!r}")
        require(not self.use_dora, "use_dora", "DoRA is not supported by loraforge layers; set use_dora=False")
        if self.init_from_basis:
            self._validate_basis_file()

    def _validate_basis_file(self) -> None:
        require(isinstance(self.basis_path, (str, os.PathLike)) and str(self.basis_path) != "", "basis_path",
                "a new CoRA adapter needs the basis file written by `loraforge cora-extract --models ... "
                "--rank R --targets ... --out basis.safetensors`; pass basis_path='basis.safetensors'")
        path = os.fspath(self.basis_path)
        require(os.path.isfile(path), "basis_path", f"no file at {path!r}; run `loraforge cora-extract` to write it")
        try:
            columns = basis_columns(path)
        except Exception as exc:  # a truncated or foreign file
            raise ForgeConfigError(f"basis_path: {path!r} is not a readable basis file: {exc}") from exc
        require(bool(columns), "basis_path", f"{path!r} holds no basis matrix")
        # Per-module ranks (rank_pattern) are checked per module when the layers are built.
        if not self.rank_pattern:
            widest = max(columns.values())
            require(self.r <= widest, "r", f"the basis in {path!r} has {widest} columns, fewer than r={self.r}; "
                    f"use r <= {widest} or extract a basis with --rank {self.r}")

    def axes(self) -> list[type]:
        from ..core.fingerprint import ForwardRecord  # late: core.fingerprint imports core.layer

        return [BasisAxis, ForwardRecord]

    def controllers(self) -> list[type]:
        return [CoRAProvenance]

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        keep = self.init_from_basis
        self.init_from_basis = False  # the saved weights hold B: loading must not need the basis
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.init_from_basis = keep
