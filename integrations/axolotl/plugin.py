"""`LoraForgePlugin`: Axolotl trains `adapter: salora | delta_lora | cora`.

Hooks used (checked against Axolotl 0.21.0's `integrations/base.py`, `loaders/`, `core/builders/`;
tests/integrations/test_axolotl_end_to_end.py compares the signatures with the installed BasePlugin):
- `get_input_args` / `get_adapter_capabilities`: the YAML keys (args.py) and the adapter names;
- `load_adapter`: builds the method's config from the YAML and wraps the model with PEFT (or
  restores a saved adapter from `lora_model_dir`). Not `get_lora_config_kwargs`: 0.21 calls it only
  for `lora_like` adapters, for which it builds a stock `LoraConfig`;
- `post_model_load`: Axolotl >= 0.21 re-draws every `lora_A` after loading when
  `init_lora_weights is True` (`ModelLoader._reinit_lora_from_seed`, for layout-independent
  seeds; 0.21 has no hook to opt out). That would undo CoRA's `A = 0` start (and any init an axis
  makes), so the A that `load_adapter` produced is put back here, the first hook after the re-draw;
- `get_trainer_cls` / `post_trainer_create`: the trainer carries `LoraForgeTrainerMixin`, which
  adds the methods' loss terms, param groups, schedule and log values (`salora/lambda`, ...).
Not `create_optimizer`: 0.21 never calls the plugin hook (no caller of
`PluginManager.create_optimizer`), so the mixin's `create_optimizer` builds the param groups with
the optimizer class Axolotl picked. Not `create_lr_scheduler`: it would replace Axolotl's choice;
SaLoRA's constant gate lr is held by loraforge's optimizer pre-step hook under any scheduler.
Every hook returns at once unless `adapter` names a loraforge method, because Axolotl >= 0.21
loads entry-point plugins into every run.
"""
from __future__ import annotations

import logging

import torch
from axolotl.integrations.base import BasePlugin

from .args import check_config, method_config, method_fields, method_names

try:
    from axolotl.integrations.base import AdapterCapabilities
except ImportError:  # Axolotl < 0.19 has no plugin adapters
    AdapterCapabilities = None
# Axolotl's logging setup shows INFO only from loggers named "axolotl...".
LOG = logging.getLogger("axolotl.integrations.loraforge")


def _ours(cfg) -> bool:
    return cfg is not None and cfg.get("adapter") in method_names()


def _forge_layers(model):
    from loraforge.core.layer import ForgeLinear

    return [m for m in model.modules() if isinstance(m, ForgeLinear)]


def _prepare_quantized(model, cfg):
    """A bitsandbytes base gets PEFT's k-bit preparation (frozen base, fp32 norms, input grads for
    checkpointing), which Axolotl applies only for lora/qlora; a requested quantisation that did not
    happen is refused rather than trained in full precision."""
    for bits in ("4bit", "8bit"):
        if cfg.get(f"load_in_{bits}") and not getattr(model, f"is_loaded_in_{bits}", False):
            raise ValueError(f"load_in_{bits}: the base model was not loaded in {bits} (is bitsandbytes installed, and "
                             "did the plugin's config validation run?); refusing to train it in full precision")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.get("gradient_checkpointing")))
    return model


class LoraForgePlugin(BasePlugin):
    """Axolotl plugin for loraforge's SaLoRA, Delta-LoRA and CoRA adapters."""

    def __init__(self):
        super().__init__()
        if AdapterCapabilities is None:
            raise ImportError("loraforge's Axolotl plugin needs axolotl >= 0.19 (plugin adapters: "
                              "get_adapter_capabilities / load_adapter); upgrade axolotl")
        self._initial_a: list = []

    def get_input_args(self) -> str:
        return "loraforge.integrations.axolotl.args.LoraForgeArgs"

    def get_adapter_capabilities(self):
        # Not lora_like: Axolotl must not build a stock LoraConfig for these; no ReLoRA restarts.
        return [AdapterCapabilities(name=method) for method in method_names()]

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        if not _ours(cfg):
            return None
        check_config(cfg)  # also for configs that reached the loader without Axolotl's validation
        from axolotl.loaders.adapter import find_all_linear_names
        from peft import get_peft_model

        import loraforge
        from loraforge.core.io import saved_method

        model = _prepare_quantized(model, cfg)
        linear = find_all_linear_names(model) if cfg.get("lora_target_linear") else None
        if cfg.get("lora_model_dir"):
            path = cfg["lora_model_dir"]
            saved = saved_method(path)
            if saved != cfg["adapter"]:
                raise ValueError(f"lora_model_dir: {path} holds {'a ' + saved if saved else 'a stock PEFT'} adapter, "
                                 f"not {cfg['adapter']}; point it at a {cfg['adapter']} adapter or change `adapter`")
            if config_only:
                from peft import PeftConfig

                return None, PeftConfig.from_pretrained(path)
            peft_model = loraforge.load_adapter(model, path, is_trainable=not inference)
            config = peft_model.peft_config["default"]
        else:
            config = method_config(cfg, linear)
            if config_only:
                return None, config
            if cfg.get("seed") is not None:
                from transformers.trainer_utils import set_seed

                set_seed(cfg["seed"])
            kwargs = {}
            if cfg.get("peft_autocast_adapter_dtype") is not None:
                kwargs["autocast_adapter_dtype"] = cfg["peft_autocast_adapter_dtype"]
            peft_model = get_peft_model(model, config, **kwargs)
        layers = _forge_layers(peft_model)
        self._initial_a = [(layer, name, layer.lora_A[name].weight.detach().to("cpu", copy=True))
                           for layer in layers for name in layer.lora_A]
        fields = {k: getattr(config, k) for k in sorted(method_fields(type(config)))}
        LOG.info("loraforge: %s adapter on %d modules (r=%s, lora_alpha=%s): %s", cfg["adapter"], len(layers),
                 config.r, config.lora_alpha, fields)
        peft_model.print_trainable_parameters()
        return peft_model, config

    def post_model_load(self, cfg, model):
        initial, self._initial_a = self._initial_a, []
        if not _ours(cfg):
            return
        restored = 0
        with torch.no_grad():
            for layer, name, a0 in initial:
                weight = layer.lora_A[name].weight
                if weight.is_meta or weight.shape != a0.shape:
                    continue
                a0 = a0.to(device=weight.device, dtype=weight.dtype)
                if not torch.equal(weight, a0):
                    weight.copy_(a0)
                    restored += 1
        if restored:
            LOG.info("loraforge: put back the initial lora_A of %d layers that were re-drawn after loading "
                     "(Axolotl's per-module LoRA re-seeding); %s keeps its own init", restored, cfg["adapter"])

    def get_trainer_cls(self, cfg):
        if not _ours(cfg) or cfg.get("rl") or cfg.get("reward_model") or cfg.get("process_reward_model"):
            return None
        from .trainer import trainer_class

        return trainer_class(cfg)

    def post_trainer_create(self, cfg, trainer):
        if not _ours(cfg):
            return
        from loraforge.core.trainer import LoraForgeTrainerMixin

        if isinstance(trainer, LoraForgeTrainerMixin):
            return
        from loraforge import drivers

        reasons = [c.needs_trainer for d in drivers(trainer.model) for c in d.controllers if c.needs_trainer]
        message = (f"loraforge: Axolotl built {type(trainer).__name__}, which is not a LoraForgeTrainerMixin "
                   "(another plugin's get_trainer_cls answered first?)")
        if reasons:
            raise RuntimeError(f"{message}; {cfg['adapter']} needs it: {'; '.join(reasons)}. Put "
                               "loraforge.integrations.axolotl.LoraForgePlugin first in `plugins:`")
        LOG.warning("%s; the optimizer hook still drives %s, but its values are not logged", message, cfg["adapter"])

