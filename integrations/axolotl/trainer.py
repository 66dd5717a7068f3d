"""The trainer Axolotl runs for a loraforge adapter: `LoraForgeTrainerMixin` over Axolotl's own choice.

`get_trainer_cls` of the first plugin that answers replaces Axolotl's choice outright, so the base
class is picked the way Axolotl's causal builder would pick it (a `trainer_cls` from the YAML, the
model's support profile on Axolotl >= 0.21, Mamba on 0.19, else `AxolotlTrainer`) and the mixin is
put in front of it. Reward / PRM / RL trainers are left to Axolotl: `args.check_config` refuses
them for methods that need the trainer.
"""
from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer

from loraforge.core.trainer import LoraForgeTrainerMixin


class LoraForgeAxolotlTrainer(LoraForgeTrainerMixin, AxolotlTrainer):
    """`AxolotlTrainer` that drives loraforge adapters (loss terms, param groups, schedule, logs)."""


_MIXED: dict[type, type] = {AxolotlTrainer: LoraForgeAxolotlTrainer}


def _profile_trainer(cfg):
    try:  # Axolotl >= 0.21: per-architecture trainer classes
        from axolotl.model_support import get_model_support_for_cfg, resolve_model_support
    except ImportError:
        return None
    profile = resolve_model_support(get_model_support_for_cfg(cfg))
    factory = None if profile is None else profile.strategies.trainer_cls
    return factory(cfg) if factory is not None else None


def base_trainer_class(cfg) -> type:
    if cfg.trainer_cls:
        from axolotl.utils.import_helper import get_cls_from_module_str

        return get_cls_from_module_str(cfg.trainer_cls)
    profiled = _profile_trainer(cfg)
    if profiled is not None:
        return profiled
    if cfg.model_config_type == "mamba":
        from axolotl.core.trainers.mamba import AxolotlMambaTrainer

        return AxolotlMambaTrainer
    return AxolotlTrainer


def trainer_class(cfg) -> type:
    base = base_trainer_class(cfg)
    if issubclass(base, LoraForgeTrainerMixin):
        return base
    if base not in _MIXED:
        _MIXED[base] = type(f"LoraForge{base.__name__}", (LoraForgeTrainerMixin, base),
                            {"__module__": __name__, "__doc__": f"`{base.__name__}` that drives loraforge adapters."})
    return _MIXED[base]
