"""The Axolotl config keys of the loraforge plugin, and the method config they build.

One nested block per registered method (`salora:`, `delta_lora:`, `cora:`, ...: the names of
`loraforge.methods()`) holds that method's own fields (those its config class adds to PEFT's
`LoraConfig`; the list grows with the classes, nothing is copied here). The schema is built from
the registry when this module is imported, so a method registered before Axolotl builds its config
schema gets its `adapter:` value and its block too. The LoRA part comes from Axolotl's own keys (`lora_r`, `lora_alpha`,
`lora_dropout`, `lora_target_modules`, `lora_target_linear`, ...); a key left out keeps the
method's default (SaLoRA: lora_alpha=16 and every attention/MLP linear, as in the paper).

Everything is checked when Axolotl validates the YAML, before a model is loaded: an unknown key,
a value the method refuses, or an Axolotl option that would bypass loraforge's layers fails with a
message that starts with the key to change (`salora.target_density: ...`, `lora_qkv_kernel: ...`).

Decisions:
- A method block without `adapter:` naming that method is refused rather than ignored: it is
  almost always a forgotten `adapter:` line, and silently training plain LoRA would waste the run.
- Quantised bases: `adapter: salora | delta_lora | cora` with `load_in_4bit: true` (or
  `load_in_8bit: true`), as a QLoRA user writes `adapter: qlora` + `load_in_4bit: true`. Axolotl
  builds its bitsandbytes config only for `adapter: qlora` (4-bit) / `lora` (8-bit), so the plugin
  passes the same config through Axolotl's `model_kwargs` (4-bit: Axolotl's QLoRA recipe, NF4,
  double quantisation, bf16 quant storage, compute in the run's dtype; `bnb_config_kwargs`
  overrides it as for qlora), and runs `prepare_model_for_kbit_training` itself before wrapping the
  model, which Axolotl does only for lora/qlora. GPTQ bases are refused (bitsandbytes only).
- Axolotl's fused LoRA kernels (`lora_*_kernel`) compute `B A x` themselves and would skip the
  gates and the folded Delta-LoRA term, so they are refused (Axolotl only auto-enables them for
  `adapter: lora|qlora`).
- Axolotl's default `merge_method: memory_efficient` merges from the adapter file with stock LoRA
  arithmetic; with a loraforge adapter the plugin makes `legacy` the default (PEFT's
  `merge_and_unload`, through loraforge's layers) and refuses an explicit `memory_efficient`.
- LoRA+ / embedding learning rates / `lr_groups` are refused for methods with param groups of their
  own (SaLoRA's gates): loraforge's trainer builds that optimizer and would silently drop them. It
  does use the optimizer class Axolotl picks (`optimizer_cls_and_kwargs`: optimi, CAME, ADOPT, ...)
  and refuses, when the trainer builds it, one that groups the parameters itself (Muon, Dion, GaLore).
- With `lora_model_dir` the saved adapter's config governs (as Axolotl does for LoRA patterns);
  the block's keys are still checked, its values are not used.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pydantic import BaseModel, Field, create_model, model_validator

from loraforge.registry import methods


def method_names() -> tuple[str, ...]:
    """The `adapter:` values the plugin trains: every registered method, now."""
    return tuple(methods())


#: The registered methods when this module was imported (the schema's blocks).
METHODS = method_names()

#: Axolotl key -> the PEFT `LoraConfig` field it sets. Keys left unset keep the method's default.
LORA_KEYS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "lora_fan_in_fan_out": "fan_in_fan_out",
    "lora_modules_to_save": "modules_to_save",
    "lora_exclude_modules": "exclude_modules",
    "lora_rank_pattern": "rank_pattern",
    "lora_alpha_pattern": "alpha_pattern",
    "peft_layers_to_transform": "layers_to_transform",
    "peft_layers_pattern": "layers_pattern",
    "peft_use_rslora": "use_rslora",
    "peft_use_dora": "use_dora",
    "peft_init_lora_weights": "init_lora_weights",
}
_AXOLOTL_KEY = {field: key for key, field in LORA_KEYS.items()}

_KERNELS = "Axolotl's fused LoRA kernels compute B·A·x themselves and skip loraforge's layer (gates, folded deltas); set it to false"
#: Axolotl options that would bypass or break loraforge's layers, with the fix.
REFUSED = {
    "gptq": ("loraforge adapters support bitsandbytes bases (load_in_4bit: true / load_in_8bit: true) and "
             "full-precision ones, not GPTQ; remove it and load the full-precision model with load_in_4bit"),
    "lora_mlp_kernel": _KERNELS,
    "lora_qkv_kernel": _KERNELS,
    "lora_o_kernel": _KERNELS,
    "relora": "ReLoRA's restarts would reset loraforge's adapter state (gates, snapshots); remove it",
}
#: Axolotl options refused only at one value.
REFUSED_VALUES = {
    ("merge_method", "memory_efficient"): (
        "Axolotl's memory-efficient merge adds s·B·A read from the adapter file itself and would drop "
        "SaLoRA's gates and Delta-LoRA's snapshot term; use `merge_method: legacy` (the default with the "
        "loraforge plugin), which merges through loraforge's layers"),
}


class _LoraForgeChecks(BaseModel):
    """The checks of the keys the loraforge plugin adds to an Axolotl config (the blocks: `LoraForgeArgs`)."""

    @model_validator(mode="before")
    @classmethod
    def check_loraforge(cls, data):
        if isinstance(data, dict):
            check_config(data)
            ours = data.get("adapter") in method_names()
            if ours and data.get("merge_method") is None:
                data["merge_method"] = "legacy"  # merges through loraforge's layers (see REFUSED_VALUES)
            if ours and (data.get("load_in_4bit") or data.get("load_in_8bit")):
                kwargs = dict(data.get("model_kwargs") or data.get("overrides_of_model_kwargs") or {})
                kwargs["quantization_config"] = bnb_config(data)
                data["model_kwargs"] = kwargs
                data.pop("overrides_of_model_kwargs", None)
        return data


def _block_field(method):
    text = f"{method.title} fields with `adapter: {method.name}`" + (f", e.g. {method.example}" if method.example else "")
    return (Optional[dict[str, Any]], Field(default=None, json_schema_extra={"description": text}))


#: Keys the loraforge plugin adds to an Axolotl config: one optional block per registered method.
LoraForgeArgs = create_model("LoraForgeArgs", __base__=_LoraForgeChecks, __module__=__name__,
                             **{name: _block_field(m) for name, m in methods().items()})


def bnb_config(cfg) -> dict:
    """The bitsandbytes config (a dict `from_pretrained` accepts) for `load_in_4bit` / `load_in_8bit`:
    the one Axolotl builds for `adapter: qlora` / `adapter: lora` + `load_in_8bit`."""
    if cfg.get("load_in_4bit") and cfg.get("load_in_8bit"):
        raise ValueError("load_in_8bit: set one of load_in_4bit / load_in_8bit, not both")
    given = cfg.get("model_kwargs") or cfg.get("overrides_of_model_kwargs") or {}
    if "quantization_config" in given:
        raise ValueError("model_kwargs.quantization_config: with load_in_4bit / load_in_8bit the loraforge plugin "
                         "builds the bitsandbytes config (tune it with bnb_config_kwargs); remove one of them")
    if cfg.get("load_in_8bit"):
        return {"quant_method": "bitsandbytes", "load_in_8bit": True}
    bf16, fp16 = cfg.get("bf16"), cfg.get("fp16")
    dtype = "bfloat16" if bf16 in (True, "auto") else "float16" if fp16 else "float32"
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "bnb_4bit_compute_dtype": dtype, "bnb_4bit_use_double_quant": True,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_quant_storage": "bfloat16", **(cfg.get("bnb_config_kwargs") or {})}


def config_class(method: str):
    return methods()[method].config


def method_fields(config_cls) -> dict[str, str]:
    """The fields a method's config adds to `LoraConfig` (the keys of its YAML block) -> help text."""
    from peft import LoraConfig

    lora = {f.name for f in dataclasses.fields(LoraConfig)}
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_cls) if f.init and f.name not in lora}


def _block(cfg, method: str, config_cls) -> dict:
    block = cfg.get(method)
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError(f"{method}: must be a mapping of {config_cls.__name__} fields, got {block!r}")
    own = method_fields(config_cls)
    for key in block:
        if key in _AXOLOTL_KEY:
            raise ValueError(f"{method}.{key}: set it with Axolotl's top-level `{_AXOLOTL_KEY[key]}` key")
        if key not in own:
            raise ValueError(f"{method}.{key}: unknown key for {config_cls.__name__}; valid keys: {', '.join(sorted(own))}")
    return dict(block)


def _renamed(message: str, method: str, config_cls) -> str:
    """Point a config error at the YAML key: `target_density: ...` -> `salora.target_density: ...`."""
    field, sep, rest = message.partition(":")
    if not sep:
        return f"{method}: {message}"
    if field in method_fields(config_cls):
        return f"{method}.{field}:{rest}"
    if field in _AXOLOTL_KEY:
        return f"{_AXOLOTL_KEY[field]}:{rest}"
    return f"{method}: {message}"


def method_config(cfg, linear_names: Optional[list[str]] = None):
    """Build the config of `cfg["adapter"]` from the YAML; errors name the YAML key.

    `linear_names` (the model's linear module names) resolves Axolotl's `lora_target_linear`.
    """
    from loraforge.core.errors import ForgeConfigError

    method = cfg.get("adapter")
    config_cls = config_class(method)
    kwargs = {field: cfg.get(key) for key, field in LORA_KEYS.items() if cfg.get(key) is not None}
    if cfg.get("lora_target_linear") and linear_names:
        given = kwargs.get("target_modules") or []
        given = [given] if isinstance(given, str) else list(given)
        kwargs["target_modules"] = sorted(set(given) | set(linear_names))
    kwargs.update(_block(cfg, method, config_cls))
    kwargs.setdefault("task_type", "CAUSAL_LM")
    try:
        return config_cls(**kwargs)
    except ForgeConfigError as exc:
        raise ValueError(_renamed(str(exc), method, config_cls)) from exc
    except (TypeError, ValueError) as exc:  # PEFT's own LoraConfig checks
        raise ValueError(f"{method}: {exc}") from exc


def check_config(cfg) -> None:
    """Refuse, naming the key, what the plugin cannot train; does nothing for other adapters."""
    adapter = cfg.get("adapter")
    names = method_names()
    given = [m for m in names if cfg.get(m) is not None]
    if adapter not in names:
        if given:
            raise ValueError(f"{given[0]}: this block configures the loraforge adapter {given[0]!r}, but adapter is "
                             f"{adapter!r}; set `adapter: {given[0]}` (or remove the block)")
        return
    for other in given:
        if other != adapter:
            raise ValueError(f"{other}: given, but adapter is {adapter!r}; one run trains one loraforge method, "
                             f"remove the `{other}` block")
    for key, why in REFUSED.items():
        if cfg.get(key):
            raise ValueError(f"{key}: {why}")
    for (key, value), why in REFUSED_VALUES.items():
        if cfg.get(key) == value:
            raise ValueError(f"{key}: {why}")
    config_cls = config_class(adapter)
    if cfg.get("lora_model_dir"):
        _block(cfg, adapter, config_cls)  # keys only: the saved adapter's config governs
        return
    config = method_config(cfg)
    _check_optimizer(cfg, config)
    special = [(k, cfg.get(k)) for k in ("rl", "reward_model", "process_reward_model") if cfg.get(k)]
    if special:
        reasons = [c.needs_trainer for c in config.controllers() if getattr(c, "needs_trainer", None)]
        if reasons:
            key, value = special[0]
            raise ValueError(f"{key}: {config_cls.__name__} needs loraforge's trainer ({'; '.join(reasons)}), which "
                             f"Axolotl's `{key}: {value}` trainer does not include; train it with plain SFT (no `{key}`)")


def _check_optimizer(cfg, config) -> None:
    """A method with param groups of its own (SaLoRA's gates) has `LoraForgeTrainerMixin` build the
    optimizer, which does not add Axolotl's LoRA+ / embedding-LR groups: refuse them rather than drop them."""
    from loraforge.core.controller import Controller

    if not any(c.param_groups is not Controller.param_groups for c in config.controllers()):
        return
    for key in ("loraplus_lr_ratio", "embedding_lr", "embedding_lr_scale", "lr_groups"):
        if cfg.get(key) is not None:
            raise ValueError(f"{key}: {type(config).__name__} builds the optimizer's param groups itself "
                             "(its own group for the gates), which do not include Axolotl's LoRA+ / embedding / "
                             "lr_groups learning-rate groups; remove it")
