"""loraforge: structure-aware LoRA variants for PEFT, TRL and Axolotl.

`import loraforge` registers the shipped methods (one folder each: salora/, delta_lora/, cora/,
each registering itself with `registry.register_method`) and installs the process-wide hooks
listed in core/integration.py. A method's public names (its config class) are exported here from
the registry.
"""
from __future__ import annotations

from .quiet import install_library_filters

install_library_filters()  # before the imports below import bitsandbytes (through PEFT): see quiet.py
from . import cora, delta_lora, salora  # noqa: E402,F401  (the shipped methods: each folder registers itself)
from .core import integration  # noqa: E402
from .core.config import ForgeConfig  # noqa: E402
from .core.controller import Controller  # noqa: E402
from .core.driver import Driver, driver, drivers  # noqa: E402
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
