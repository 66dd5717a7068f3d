"""Base config of every loraforge method.

Route chosen for PEFT 0.21, whose `PeftType` is a closed enum: every loraforge config is a
`LoraConfig` subclass. At run time its `peft_type` is `LORA`, so every PEFT code path (injection,
state-dict filtering, save, merge, `set_adapter`) treats it as LoRA, and our layer is dispatched
through `LoraConfig._register_custom_module`, re-registered in `__post_init__` because PEFT does not
persist that mapping. On disk the config is written with `peft_type = "LORAFORGE_<METHOD>"`, and
registering the method (`registry.register_method`) maps that string to the config class in PEFT's
config table: with loraforge imported, `PeftModel.from_pretrained` rebuilds the right class with all
its fields; without it, PEFT fails loudly on the unknown type instead of loading a plain LoRA.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from peft import LoraConfig
from peft.utils import CONFIG_NAME

from .dispatch import layer_mapping
from .errors import ForgeConfigError, require

__all__ = ["ForgeConfig", "ForgeConfigError", "require"]


@dataclass
class ForgeConfig(LoraConfig):
    """A LoRA config whose layers are composed from loraforge's axes; the base of every method's config.

    A method's config adds its fields (dataclass fields with `metadata={"help": ...}`, which become
    the keys of its YAML / Axolotl block), extends `validate`, and names its per-layer pieces (`axes`)
    and its training dynamics (`controllers`). Every `LoraConfig` field keeps PEFT's meaning.

    Args:
        method (`ClassVar[str]`): the method's name, e.g. `"salora"`: saved as `LORAFORGE_SALORA`.
    """

    method: ClassVar[str] = ""

    @classmethod
    def saved_peft_type(cls) -> str:
        return f"LORAFORGE_{cls.method.upper()}"

    def __post_init__(self):
        super().__post_init__()
        # nn.Linear (and bnb's 4-bit / 8-bit linears, its subclasses) -> loraforge's layers; any other
        # targeted module (GPTQ, AWQ, HQQ, ... layers) is refused rather than left to PEFT's plain LoRA.
        self._register_custom_module(layer_mapping())
        self.validate()

    def validate(self) -> None:
        """Refuse unusable values; subclasses extend it."""
        require(isinstance(self.r, int) and self.r >= 1, "r", f"must be an integer >= 1, got {self.r!r}")
        require(not self.use_dora, "use_dora", "DoRA is not composed with loraforge's layers; set use_dora=False")
        require(not getattr(self, "target_parameters", None), "target_parameters",
                f"{type(self).__name__} adapts nn.Linear modules only; PEFT's target_parameters wraps bare parameters "
                "(e.g. MoE experts) in its plain LoRA ParamWrapper, which has no gate, propagation or basis: remove "
                "target_parameters and list the Linear modules to adapt in target_modules")

    def axes(self) -> list[type]:
        """The per-layer pieces (`core.layer.Axis` subclasses) this config composes, in order."""
        return []

    def controllers(self) -> list[type]:
        """The training-dynamics pieces (`core.controller.Controller` subclasses) this config composes."""
        return []

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path) as f:
            data = json.load(f)
        data["peft_type"] = self.saved_peft_type()
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
