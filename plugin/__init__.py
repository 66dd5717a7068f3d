"""loraforge: structure-aware LoRA variants (SaLoRA, Delta-LoRA, CoRA) for PEFT, TRL and Axolotl."""
from __future__ import annotations

from .quiet import install_library_filters

install_library_filters()  # before the imports below import bitsandbytes (through PEFT)
from . import registry  # noqa: E402,F401  (registers the configs with PEFT and installs the optimizer hooks)
from .core.driver import Controller, Driver, driver, drivers
from .core.export import export_lora
from .core.io import load_adapter
from .core.trainer import LoraForgeTrainer, LoraForgeTrainerMixin
from .cora.config import CoRAConfig
from .delta_lora.config import DeltaLoRAConfig
from .salora.config import SaLoRAConfig

__version__ = "0.1.0"

__all__ = [
    "SaLoRAConfig", "DeltaLoRAConfig", "CoRAConfig",
    "LoraForgeTrainer", "LoraForgeTrainerMixin", "LoraForgeSFTTrainer",
    "load_adapter", "export_lora", "driver", "drivers", "Driver", "Controller",
]


def __getattr__(name: str):
    # trl is slow to import; only pay for it when the SFT trainer is asked for.
    if name == "LoraForgeSFTTrainer":
        from .core.sft import LoraForgeSFTTrainer

        return LoraForgeSFTTrainer
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
