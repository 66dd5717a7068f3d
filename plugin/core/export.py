"""Write any loraforge adapter as a stock PEFT LoRA adapter that plain `peft` loads.

Each layer's update on the ORIGINAL base weight is written as `B' A'` with the scaling folded
into `B'` and `lora_alpha = r'` per module (scaling exactly 1), so per-module ranks that differ
(pruned SaLoRA, rank-2r Delta-LoRA) are carried by `rank_pattern` / `alpha_pattern`.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from peft import LoraConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file

from ..export_formats import FORMATS, write
from .driver import drivers
from .factors import stock_factors
from .layer import ForgeLinear

logger = logging.getLogger("loraforge.export")


def export_lora(model, out_dir: str, adapter: str = "default", dtype: torch.dtype | None = None,
                format: str = "peft", **options) -> dict[str, int]:
    """Write `model`'s loraforge adapter to `out_dir` as a stock PEFT LoRA adapter that plain `peft` loads,
    or in another serving format (`format`).

    Each module's whole update on the original base weight (gates folded in, pruned ranks dropped,
    a Delta-LoRA snapshot appended, the scaling folded into B) is written as `B' A'` with scaling 1;
    `loraforge_export.json` beside it records the method's state (densities, snapshot step, basis).

    Args:
        model (`PeftModel`): a model holding the loraforge adapter, not merged.
        out_dir (`str`): the folder to write (created if missing).
        adapter (`str`, defaults to `"default"`): the adapter to export.
        dtype (`torch.dtype`, *optional*): the dtype of the written factors (default: that of `lora_A`).
        format (`str`, defaults to `"peft"`): `"peft"` (per-module ranks in `rank_pattern` / `alpha_pattern`),
            `"uniform"` (one rank and one alpha for every module) or `"gguf"` (a llama.cpp / Ollama adapter);
            see `loraforge.export_formats`.
        options: `gguf`: `base_gguf` (the base model's GGUF, for the Ollama Modelfile).

    Returns:
        `dict[str, int]`: module name -> the rank written for it.

    Example:

        ```py
        >>> ranks = loraforge.export_lora(model, "stock_adapter")
        >>> stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "stock_adapter")
        ```
    """
    if format not in FORMATS:
        raise ValueError(f"format: must be one of {FORMATS}, got {format!r}")
    layers = [m for m in model.modules() if isinstance(m, ForgeLinear) and adapter in m.lora_A]
    if not layers:
        raise ValueError(f"no loraforge layer holds adapter {adapter!r}: nothing to export")
    if adapter not in layers[0].forge_config:
        raise ValueError(f"adapter {adapter!r} is a plain PEFT LoRA adapter (e.g. made by add_weighted_adapter): save it with "
                         f"model.save_pretrained(dir, selected_adapters=[{adapter!r}]), which stock PEFT loads")
    config = layers[0].forge_config[adapter]
    if config.lora_bias:
        raise ValueError("lora_bias=True adapters cannot be exported as stock LoRA by loraforge yet")
    if any(layer.merged for layer in layers):
        raise ValueError("the adapter is merged into the base weights: call unmerge_adapter() before export")
    from .finite import refuse_non_finite

    refuse_non_finite(get_peft_model_state_dict(model, adapter_name=adapter), f"adapter {adapter!r}")
    tensors, ranks = {}, {}
    for layer in layers:
        b, a = stock_factors(layer, adapter)
        if b.shape[1] == 0:
            continue  # every rank pruned: the module keeps its base weight
        if layer.fan_in_fan_out:
            raise ValueError(f"{layer.forge_name}: fan_in_fan_out layers are not supported by export_lora")
        out_dtype = dtype or layer.lora_A[adapter].weight.dtype
        ranks[layer.forge_name] = b.shape[1]
        prefix = f"base_model.model.{layer.forge_name}"
        tensors[f"{prefix}.lora_A.weight"] = a.to(out_dtype).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = b.to(out_dtype).contiguous()
    # Modules trained in full (modules_to_save) travel unchanged.
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter).items():
        if "lora_" not in key:
            tensors[key] = value.contiguous()
    if not ranks:
        raise ValueError("every rank of every module was pruned: the adapter is the base model itself")
    default_r = max(set(ranks.values()), key=list(ranks.values()).count)
    stock = LoraConfig(
        r=default_r,
        lora_alpha=default_r,
        target_modules=sorted(ranks),
        rank_pattern={k: v for k, v in ranks.items() if v != default_r},
        alpha_pattern={k: v for k, v in ranks.items() if v != default_r},
        lora_dropout=0.0,
        bias="none",
        modules_to_save=config.modules_to_save,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    if format == "peft":
        os.makedirs(out_dir, exist_ok=True)
        stock.save_pretrained(out_dir)
        save_file(tensors, os.path.join(out_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    else:
        factors = {m: (tensors[f"base_model.model.{m}.lora_B.weight"], tensors[f"base_model.model.{m}.lora_A.weight"])
                   for m in ranks}
        extra = {k: v for k, v in tensors.items() if "lora_" not in k}
        logger.info(write(format, model, stock, factors, extra, out_dir, dtype=dtype, **options))
        if format == "uniform":
            ranks = dict.fromkeys(ranks, max(ranks.values()))
    meta = {"exported_from": type(config).__name__, "format": format, "module_ranks": ranks}
    for d in drivers(model):
        if d.adapter == adapter:
            meta.update(d.export_metadata())
    with open(os.path.join(out_dir, "loraforge_export.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return ranks
