"""Which layer PEFT builds for a module a loraforge config targets (registered by core/config.py).

`nn.Linear` (and bitsandbytes' 4-bit / 8-bit linears, its subclasses) get loraforge's layers; every
other module type (embeddings, convolutions, layers of another quantisation backend) is refused with
one line naming it, so that PEFT's own dispatchers never build a plain LoRA layer for it and a
method never trains as plain LoRA.
"""
from __future__ import annotations

from .errors import ForgeConfigError
from .layer import ForgeLinear
from .quantized import backend, bnb_classes


def layer_mapping() -> dict:
    """`LoraConfig._register_custom_module`'s mapping: module type -> the function that builds its layer."""
    import torch.nn as nn

    return {nn.Linear: forge_linear, **{cls: refuse_layer for cls in unsupported_layers()}, nn.Module: refuse_backend}


def unsupported_layers() -> list[type]:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    return [nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D]


def refuse_layer(target, adapter_name, config=None, target_name="", **kwargs):
    """Dispatched for layer types loraforge has no layer for, so they never train as plain LoRA."""
    raise ForgeConfigError(
        f"target_modules: {target_name or adapter_name} is a {type(target).__name__}; "
        f"{type(config).__name__} adapts nn.Linear layers only: remove it from target_modules"
    )


def refuse_backend(target, adapter_name, config=None, target_name="", **kwargs):
    """Dispatched (last) for any targeted module no loraforge layer adapts, so that PEFT's own
    dispatchers never build a plain LoRA layer for it; names the quantisation backend if any."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    found = backend(base)
    name = target_name or adapter_name
    what = type(config).__name__
    if found is not None:
        raise ForgeConfigError(
            f"target_modules: {name} is a {found}-quantised {type(base).__name__}; {what} supports bitsandbytes "
            "4-bit / 8-bit bases (BitsAndBytesConfig(load_in_4bit=True) or load_in_8bit=True) and full-precision "
            f"ones, not {found}: load the base with bitsandbytes or unquantised")
    raise ForgeConfigError(
        f"target_modules: {name} is a {type(base).__name__}; {what} adapts nn.Linear layers (full precision or "
        "bitsandbytes 4-bit / 8-bit) only: remove it from target_modules")


def forge_linear(target, adapter_name, config=None, **kwargs):
    """`nn.Linear` dispatch (bnb's linears are `nn.Linear` subclasses): a bnb base gets
    `ForgeLinear4bit` / `ForgeLinear8bitLt`, a weight quantised by another backend is refused
    (torchao keeps `nn.Linear` and swaps the weight for a tensor subclass), else `ForgeLinear`.
    Routing here rather than by extra mapping keys keeps `import loraforge` free of bitsandbytes
    (a model with bnb layers has imported it already)."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    if type(base).__module__.startswith("bitsandbytes"):
        import bitsandbytes as bnb

        classes = bnb_classes()
        for bnb_cls, name in ((bnb.nn.Linear4bit, "ForgeLinear4bit"), (bnb.nn.Linear8bitLt, "ForgeLinear8bitLt")):
            if isinstance(base, bnb_cls):
                return classes[name](target, adapter_name, config=config, **kwargs)
        refuse_backend(target, adapter_name, config=config, **kwargs)
    if backend(base) is not None:
        refuse_backend(target, adapter_name, config=config, **kwargs)
    return ForgeLinear(target, adapter_name, config=config, **kwargs)
