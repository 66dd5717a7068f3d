"""loraforge: structure-aware LoRA variants for PEFT, TRL and Axolotl.

`import loraforge` registers the shipped methods (one folder each: salora/, delta_lora/, cora/,
each registering itself with `registry.register_method`) and installs the process-wide hooks
listed in core/integration.py. A method's public names (its config class) are exported here from
the registry.
"""
from __future__ import annotations

from . import cora, delta_lora, salora  # noqa: F401  (the shipped methods: each folder registers itself)
from .core import integration
from .core.config import ForgeConfig
from .core.controller import Controller
from .core.driver import Driver, driver, drivers
from .core.export import export_lora
from .core.io import load_adapter
from .core.layer import Axis
from .core.trainer import LoraForgeTrainer, LoraForgeTrainerMixin
from .registry import Method, methods, register_method

integration.install()

__version__ = "0.1.0"

_METHOD_EXPORTS = {name: obj for m in methods().values() for name, obj in m.exports.items()}
globals().update(_METHOD_EXPORTS)

__all__ = [
    *_METHOD_EXPORTS,
    "LoraForgeTrainer", "LoraForgeTrainerMixin", "LoraForgeSFTTrainer",
    "load_adapter", "export_lora", "driver", "drivers", "Driver", "Controller",
    "ForgeConfig", "Axis", "Method", "register_method", "methods",
]


def __getattr__(name: str):
    # trl is slow to import; only pay for it when the SFT trainer is asked for.
    if name == "LoraForgeSFTTrainer":
        from .core.sft import LoraForgeSFTTrainer

        return LoraForgeSFTTrainer
    raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
