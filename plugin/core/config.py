"""Base config of every loraforge method.

Route chosen for PEFT 0.21, whose `PeftType` is a closed enum: every loraforge config is a
`LoraConfig` subclass. At run time its `peft_type` is `LORA`, so every PEFT code path (injection,
state-dict filtering, save, merge, `set_adapter`) treats it as LoRA, and our layer is dispatched
through `LoraConfig._register_custom_module`, re-registered in `__post_init__` because PEFT does not
persist that mapping. On disk the config is written with `peft_type = "LORAFORGE_<METHOD>"`, and
`import loraforge` maps that string to the config class in PEFT's config table: with loraforge
imported, `PeftModel.from_pretrained` rebuilds the right class with all its fields; without it,
PEFT fails loudly on the unknown type instead of loading the adapter as a plain LoRA.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

from peft import LoraConfig
from peft.utils import CONFIG_NAME


class ForgeConfigError(ValueError):
    """A config field has a value the method cannot use; the message names the field and the fix."""


def require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ForgeConfigError(f"{field}: {message}")


@dataclass
class ForgeConfig(LoraConfig):
    """A LoRA config whose layers are composed from loraforge's axes (gate, basis, propagation)."""

    method: ClassVar[str] = ""

    @classmethod
    def saved_peft_type(cls) -> str:
        return f"LORAFORGE_{cls.method.upper()}"

    def __post_init__(self):
        super().__post_init__()
        import torch.nn as nn

        from .quantized import forge_linear, refuse_backend  # late: it imports this module

        # nn.Linear (and bnb's 4-bit / 8-bit linears, its subclasses) -> loraforge's layers; any other
        # targeted module (GPTQ, AWQ, HQQ, ... layers) is refused rather than left to PEFT's plain LoRA.
        self._register_custom_module({nn.Linear: forge_linear, **{cls: _refuse_layer for cls in _unsupported_layers()},
                                      nn.Module: refuse_backend})
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
        """The per-layer pieces (classes from each method's `layer.py`) this config composes."""
        return []

    def controllers(self) -> list[type]:
        """The training-dynamics pieces (classes from each method's `model.py`) this config composes."""
        return []

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path) as f:
            data = json.load(f)
        data["peft_type"] = self.saved_peft_type()
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)


def register_config(config_cls: type[ForgeConfig]) -> type[ForgeConfig]:
    """Make PEFT's loaders map the saved type string back to `config_cls`."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[config_cls.saved_peft_type()] = config_cls
    return config_cls


def install_target_error_naming() -> None:
    """Make PEFT's "target modules not found" error name the config field when a loraforge config
    matched nothing (PEFT's own message says "Target modules", not `target_modules`)."""
    from peft.tuners.lora import LoraModel
    try:
        from peft.utils.error import NoMatchingPeftModuleError
    except ImportError:  # peft < 0.21 (Axolotl 0.19 pins 0.20) raises a plain ValueError ("Target modules ...")
        NoMatchingPeftModuleError = ValueError

    original = LoraModel.inject_adapter
    if getattr(original, "_loraforge", False):
        return

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        try:
            return original(self, model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as error:
            config = self.peft_config.get(adapter_name)
            if not isinstance(config, ForgeConfig) or not str(error).startswith("Target modules"):
                raise
            raise NoMatchingPeftModuleError(
                f"target_modules: {error} {type(config).__name__} adapts nn.Linear modules; set target_modules to "
                "names of linear modules of this model (see model.named_modules())."
            ) from error

    inject_adapter._loraforge = True
    LoraModel.inject_adapter = inject_adapter


def _unsupported_layers() -> list[type]:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return [nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D]


def _refuse_layer(target, adapter_name, config=None, target_name="", **kwargs):
    """Dispatched for layer types loraforge has no layer for, so they never train as plain LoRA."""
    raise ForgeConfigError(
        f"target_modules: {target_name or adapter_name} is a {type(target).__name__}; "
        f"{type(config).__name__} adapts nn.Linear layers only: remove it from target_modules"
    )
