"""Quantised bases: loraforge's layer on bitsandbytes 4-bit (NF4 / FP4) and 8-bit (LLM.int8) linears.

`ForgeLinear4bit` / `ForgeLinear8bitLt` are `ForgeLinear` (the composed forward, the axes, the
delta with gates and folded terms) on top of PEFT's own `peft.tuners.lora.bnb.Linear4bit` /
`Linear8bitLt`, from which they take what only a quantised weight needs: merge and unmerge
(dequantise, add `get_delta_weight`, requantise, with PEFT's warning about rounding) and the LoRA
variant resolution. The forward stays `ForgeLinear.forward` (one place): it calls the bnb base
layer and adds our adapter term out of place, so PEFT's defensive `result.clone()` for 4-bit
(needed only for its in-place `+=`) is not needed.

Decisions:
- Dispatch goes through the same `_register_custom_module` entry as `nn.Linear` (core/dispatch.py):
  bnb's linears are `nn.Linear` subclasses, and `forge_linear` routes them to the bnb layers.
- Code that needs the base weight as numbers (Delta-LoRA's W_0 fingerprint, its merge term) asks
  `dense_weight`, which dequantises with PEFT's `dequantize_module_weight` (the weight itself for a
  full-precision layer, so nothing changes there); shapes come from the layer (`in_features`,
  `out_features`), never from the packed storage.
- `fan_in_fan_out` is forced to False as PEFT's bnb layers do: a bnb weight is always (out, in).
- bnb 0.50's CPU repacking of 4-bit weights for eval is turned off on our bases (see
  `_ForgeBnb.__init__`): it is undone lossily by every `state_dict()`, so saved adapters would stop
  reproducing the trained model. Merge and dequantisation first undo a repack done before wrapping
  (`standard_layout`), else PEFT's merge would read packed bytes as the standard layout.
- Trainable adapter tensors may be bf16 while a frozen one stays fp32 (TRL casts only trainable
  tensors on k-bit bases): the forward casts the rank-r hidden to B's dtype (core/layer.py).
- The other quantisation backends PEFT's LoRA dispatches (GPTQ, AWQ, AQLM, HQQ, EETQ, torchao,
  INC) are refused with one line naming the backend (core/dispatch.py): PEFT would otherwise build
  its plain LoRA layer for them and the method would silently train as LoRA.
"""
from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.utils.integrations import dequantize_module_weight

from .layer import ForgeLinear

#: Top-level package of a quantised layer's class -> the backend's name in messages.
BACKENDS = {
    "auto_gptq": "GPTQ", "gptqmodel": "GPTQ", "optimum": "GPTQ", "awq": "AWQ", "aqlm": "AQLM", "hqq": "HQQ",
    "eetq": "EETQ", "torchao": "torchao", "neural_compressor": "INC", "megatron": "Megatron",
    "transformer_engine": "Transformer Engine",
}


def is_quantized(base_layer: torch.nn.Module) -> bool:
    """Whether the layer's weight is stored quantised (bnb 4-bit / 8-bit, or any other backend)."""
    weight = getattr(base_layer, "weight", None)
    if weight is None or type(weight).__name__ in ("Params4bit", "Int8Params"):  # 4-bit may store in bf16
        return True
    return not weight.dtype.is_floating_point or backend(base_layer) is not None


def quantization_name(base_layer: torch.nn.Module) -> str:
    """'bitsandbytes 4-bit (nf4)', 'bitsandbytes 8-bit' or the backend's name, for messages."""
    weight = getattr(base_layer, "weight", None)
    if type(weight).__name__ == "Params4bit":
        return f"bitsandbytes 4-bit ({weight.quant_type})"
    if type(weight).__name__ == "Int8Params":
        return "bitsandbytes 8-bit"
    return backend(base_layer) or f"quantised ({type(base_layer).__name__})"


def dense_weight(base_layer: torch.nn.Module) -> torch.Tensor:
    """The base weight as a dense float (out, in) tensor: the weight itself when it is not quantised,
    else a dequantised copy (costs one weight-sized buffer; only used outside the training step)."""
    standard_layout(base_layer)
    return dequantize_module_weight(base_layer)


def standard_layout(base_layer: torch.nn.Module) -> None:
    """Undo bnb's CPU repacking of a 4-bit weight. On a CPU with AVX512-BF16, `Linear4bit.forward` in
    eval mode without grad repacks the weight for its CPU kernel (`quant_state.packing_format_for_cpu`);
    `dequantize_4bit`, and so PEFT's bnb merge, then read the packed bytes as if they were the standard
    layout and return wrong numbers. bnb's own state-dict save converts back the same way."""
    weight = getattr(base_layer, "weight", None)
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def backend(module: torch.nn.Module) -> Optional[str]:
    for obj in (module, getattr(module, "weight", None)):
        if obj is not None:
            root = type(obj).__module__.split(".")[0]
            if root in BACKENDS:
                return BACKENDS[root]
    return "HQQ" if hasattr(module, "W_q") else None


class _ForgeBnb:
    """What both bnb layers share: PEFT's bnb `__init__`, keeping the kwargs (`target_name`, which
    names the module in tables and messages) that PEFT's bnb `__init__` drops."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        torch.nn.Module.__init__(self)
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        # bnb 0.50's CPU eval forward repacks a 4-bit weight for its AVX512-BF16 kernel, and every
        # state_dict() (PEFT's save and export call it) converts it back, lossily: on the tiny test
        # Llama the logits drift by 0.02-0.03 after one save. A saved adapter must reproduce the
        # trained model, so our layers keep bnb's standard 4-bit path (CPU inference speed only).
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            standard_layout(base_layer)
            base_layer.support_avx512bf16_for_cpu = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)


_CLASSES: dict[str, type] = {}


def bnb_classes() -> dict[str, type]:
    """`ForgeLinear4bit` and `ForgeLinear8bitLt`, defined on first use (they subclass PEFT's bnb
    layers, which import bitsandbytes)."""
    if _CLASSES:
        return _CLASSES
    from peft.tuners.lora import bnb as peft_bnb

    class ForgeLinear4bit(_ForgeBnb, ForgeLinear, peft_bnb.Linear4bit):
        """loraforge's layer on a bitsandbytes `Linear4bit` (NF4 / FP4) base."""

        def merge(self, *args, **kwargs) -> None:
            standard_layout(self.get_base_layer())
            peft_bnb.Linear4bit.merge(self, *args, **kwargs)

        def unmerge(self) -> None:
            standard_layout(self.get_base_layer())
            peft_bnb.Linear4bit.unmerge(self)

        resolve_lora_variant = peft_bnb.Linear4bit.resolve_lora_variant

    class ForgeLinear8bitLt(_ForgeBnb, ForgeLinear, peft_bnb.Linear8bitLt):
        """loraforge's layer on a bitsandbytes `Linear8bitLt` (LLM.int8) base."""

        merge = peft_bnb.Linear8bitLt.merge
        unmerge = peft_bnb.Linear8bitLt.unmerge
        resolve_lora_variant = peft_bnb.Linear8bitLt.resolve_lora_variant

    for cls in (ForgeLinear4bit, ForgeLinear8bitLt):
        cls.__module__ = __name__
        _CLASSES[cls.__name__] = cls
    return _CLASSES


def __getattr__(name: str):
    if name in ("ForgeLinear4bit", "ForgeLinear8bitLt"):
        return bnb_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
