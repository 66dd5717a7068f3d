"""Axolotl plugin: `adapter: salora | delta_lora | cora` in an Axolotl YAML.

    plugins:
      - loraforge.integrations.axolotl.LoraForgePlugin
    adapter: salora
    salora: {target_density: 0.5}

Axolotl >= 0.21 also loads the plugin through the `axolotl.plugins` entry point that loraforge
declares, for every run; it then does nothing unless `adapter` names a loraforge method.
`args` (the YAML keys and their checks) imports no Axolotl, so configs can be checked without it.
"""
from __future__ import annotations

__all__ = ["LoraForgePlugin", "LoraForgeArgs", "METHODS"]


def __getattr__(name: str):
    if name == "LoraForgePlugin":
        from .plugin import LoraForgePlugin

        return LoraForgePlugin
    if name in ("LoraForgeArgs", "METHODS"):
        from . import args

        return getattr(args, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
