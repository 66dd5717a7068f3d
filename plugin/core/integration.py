"""Every process-wide effect of `import loraforge`, in one place.

Each effect below says why it is there, what it changes, and the library versions it was checked
against (torch 2.13, transformers 5.25, PEFT 0.21.2; PEFT 0.20 and transformers 4.57 under Axolotl
0.21). `PATCHES` names every library function replaced here with a hash of its source as checked;
tests/core/test_integration_patches.py fails when an installed library's function no longer
matches, so a changed upstream function is re-read before it is trusted. Each effect is installed
once (`install`, idempotent) and does nothing for code that uses no loraforge adapter: a plain
PEFT LoRA run is bit-identical with and without `import loraforge`
(tests/core/test_plain_peft_unchanged.py).

1. PEFT's config table (`register_peft_type`): `PEFT_TYPE_TO_CONFIG_MAPPING["LORAFORGE_<METHOD>"]`
   maps a saved adapter's type string back to its config class, so `PeftModel.from_pretrained`
   rebuilds it (PEFT's `PeftType` is a closed enum; see core/config.py). Adds keys only.
2. torch's global optimizer step hooks (`core/optimizer_hooks.py`): after each step of an optimizer
   that trains a loraforge adapter, the adapter's post-step work runs, so methods with only such
   work complete under a plain `Trainer`, `SFTTrainer` or a hand loop, and methods that need a
   loraforge trainer are refused before the first update. Global because those trainers build the
   optimizer themselves. Returns at once while no loraforge layer is alive.
3. `transformers.trainer.DEFAULT_CALLBACKS` gets `PlanCallback`, which tells the adapters' controllers
   the run length (their warnings, e.g. a start step past the last step, reach plain trainers too).
   It reads nothing and does nothing for a model without loraforge layers.
4. `peft.tuners.lora.LoraModel.inject_adapter`: PEFT's "Target modules ... not found" error is
   re-raised naming the `target_modules` field, only when the adapter's config is a loraforge one.
5. `peft.tuners.lora.LoraModel.add_weighted_adapter`: routed to core/weighted.py when a source is a
   loraforge adapter (its factors are not its whole update); PEFT's own otherwise. `help()` shows
   PEFT's docstring (`functools.wraps`).
6. `peft.tuners.tuners_utils._get_tuner_state_dict_key_prefixes` (private): FSDP1's auto-wrapping puts
   `_fsdp_wrapped_module.` into the tuner layers' names but not into a full state dict's keys, so
   `save_pretrained(state_dict=...)` (what `trainer.save_model()` does under FSDP1) wrote an empty
   adapter. The wrapper names are stripped from the prefixes; without FSDP1 there are none.
7. Message filters (`quiet.py`, installed first in `__init__`, before anything imports bitsandbytes):
   bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" log line is dropped on
   its own logger, and the FutureWarnings about `is_gradient_checkpointing` / `gradient_checkpointing`
   that PEFT and TRL (not the user) trigger are ignored. Nothing else is filtered.

Private library internals read, not replaced (checked in the same test): bitsandbytes'
`_convert_weight_packed_for_cpu_inverse` and `Linear4bit.support_avx512bf16_for_cpu`
(core/quantized.py), FSDP1's `FlatParameter` fields and DTensor's `compute_local_shape_and_global_offset`
(core/sharding.py), PEFT's `_freeze_adapter` (core/weighted.py).
"""
from __future__ import annotations

import functools

#: (module, attribute path) of every library function replaced here -> sha256 of its source as checked
#: (PEFT 0.21.2). A new PEFT that changes one fails tests/core/test_integration_patches.py: re-read the
#: function, adapt the wrapper if needed, and record the new hash.
PATCHES = {
    ("peft.tuners.lora.model", "LoraModel.inject_adapter"):
        "d7c229268c4a633e7d8f8c5cb0693982ffe26b93c897d9111a219f1fc586d6e4",
    ("peft.tuners.lora.model", "LoraModel.add_weighted_adapter"):
        "1fd8e1942caa0bdf09dd938bbc99b21d22e20b823d442588e6e6c65c178961b5",
    ("peft.tuners.tuners_utils", "_get_tuner_state_dict_key_prefixes"):
        "e490c6b528748c6cd46baedacdb3e21eb8ff93eb30bb07117b4d4fb4d12d30da",
}
_ORIGINALS: dict[tuple[str, str], object] = {}
_INSTALLED: list = []


def register_peft_type(config_cls) -> None:
    """Make PEFT's loaders map `config_cls.saved_peft_type()` back to `config_cls` (effect 1)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING[config_cls.saved_peft_type()] = config_cls


def original(module: str, path: str):
    """The library's own function that `install` replaced (for the patch test and for the wrappers)."""
    return _ORIGINALS[(module, path)]


def _replace(module: str, path: str, make) -> None:
    import importlib

    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    current = getattr(owner, name)
    _ORIGINALS[(module, path)] = current
    setattr(owner, name, make(current))


def _target_error_naming(inject_adapter):
    """Effect 4."""
    from .layer import is_forge_config
    try:
        from peft.utils.error import NoMatchingPeftModuleError
    except ImportError:  # peft < 0.21 (Axolotl 0.19 pins 0.20) raises a plain ValueError ("Target modules ...")
        NoMatchingPeftModuleError = ValueError

    @functools.wraps(inject_adapter)
    def wrapper(self, model, adapter_name, *args, **kwargs):
        try:
            return inject_adapter(self, model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as error:
            config = self.peft_config.get(adapter_name)
            if not is_forge_config(config) or not str(error).startswith("Target modules"):
                raise
            raise NoMatchingPeftModuleError(
                f"target_modules: {error} {type(config).__name__} adapts nn.Linear modules; set target_modules to "
                "names of linear modules of this model (see model.named_modules())."
            ) from error

    return wrapper


def _weighted_adapters(add_weighted_adapter):
    """Effect 5."""
    from .layer import is_forge_config
    from .weighted import add_weighted

    @functools.wraps(add_weighted_adapter)
    def wrapper(self, adapters, weights, adapter_name, combination_type="svd", **kwargs):
        if any(is_forge_config(self.peft_config.get(name)) for name in adapters):
            return add_weighted(self, adapters, weights, adapter_name, combination_type, **kwargs)
        return add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, **kwargs)

    return wrapper


def _fsdp1_names(prefixes_of):
    """Effect 6."""

    @functools.wraps(prefixes_of)
    def wrapper(model, *args, **kwargs):
        found = prefixes_of(model, *args, **kwargs)
        return {p.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "") for p in found}

    return wrapper


def install() -> None:
    """Install effects 2-6 (effect 1 comes with each `registry.register_method`); idempotent."""
    if _INSTALLED:
        return
    import transformers.trainer
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    from .optimizer_hooks import post_step, pre_step
    from .trainer import PlanCallback

    _INSTALLED.append(register_optimizer_step_pre_hook(pre_step))
    _INSTALLED.append(register_optimizer_step_post_hook(post_step))
    if PlanCallback not in transformers.trainer.DEFAULT_CALLBACKS:
        transformers.trainer.DEFAULT_CALLBACKS.append(PlanCallback)
    _replace("peft.tuners.lora.model", "LoraModel.inject_adapter", _target_error_naming)
    _replace("peft.tuners.lora.model", "LoraModel.add_weighted_adapter", _weighted_adapters)
    _replace("peft.tuners.tuners_utils", "_get_tuner_state_dict_key_prefixes", _fsdp1_names)
