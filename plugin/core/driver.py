"""The one mechanism that drives loraforge's training dynamics.

Every method plugs into the same protocol (`Controller`): an extra loss term, optimizer param
groups of its own, a schedule that knows the step and the total steps, work right after each
optimizer step, values to log, and a hook at the end of training. A `Driver` composes the
controllers of one adapter of one model.

Two things drive a `Driver`:
- `LoraForgeTrainerMixin` (trainer.py): adds the loss term in `compute_loss`, builds the optimizer
  with the param groups, tells the total steps, logs.
- The optimizer step hooks (optimizer_hooks.py, installed by integration.py): after every `step()`
  of an optimizer that holds a loraforge adapter's parameters, the driver's `on_step_end` runs. That
  makes methods that need only post-step work complete under a plain `Trainer`, `SFTTrainer` or a
  hand-written loop. A method that needs more (a loss term, a learning rate of its own) declares it
  in `Controller.needs_trainer`, and the pre-step hook refuses the first update, before any
  parameter has moved, unless a trainer or `Driver.begin` took charge.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import sharding
from .controller import Controller
from .layer import ADAPTER_GENERATION, LIVE_LAYERS, ForgeLinear, module_order


class Driver:
    """All controllers of one adapter of one model, behind one protocol.

    Get it with `loraforge.driver(model)`; trainers drive it themselves. In a hand-written loop, call
    `begin(max_steps)` once, add `regularization_loss()` to the loss and build the optimizer from
    `param_groups(lr, weight_decay)` plus the other trainable parameters; the work after each step runs
    from the optimizer hook.

    Args:
        config (`ForgeConfig`): the adapter's config.
        adapter (`str`): the adapter name.
        layers (`list[ForgeLinear]`): the loraforge layers holding the adapter.

    Example:

        ```py
        >>> d = loraforge.driver(model).begin(max_steps=100)
        >>> special = d.param_groups(lr=1e-4, weight_decay=0.0)
        >>> taken = {id(p) for g in special for p in g["params"]}
        >>> rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        >>> opt = torch.optim.AdamW([{"params": rest}, *special], lr=1e-4)
        >>> for batch in batches:
        ...     loss = model(**batch).loss
        ...     reg = d.regularization_loss()
        ...     (loss if reg is None else loss + reg).backward()
        ...     opt.step(); opt.zero_grad()
        ```
    """

    def __init__(self, config, adapter: str, layers: list[ForgeLinear]) -> None:
        self.config = config
        self.adapter = adapter
        self.layers = sorted(layers, key=lambda layer: module_order(layer.forge_name))
        self.max_steps: Optional[int] = None
        self.managed = False  # a trainer (or the user) called `begin`
        # The step counters live in every layer's `lora_forge_step` (saved with the adapter); reading one
        # is a device sync, so the count is mirrored here and re-read only after a load (`forget_step`).
        self._step: Optional[int] = None
        self.refuse_sharded()  # before the controllers: some read weights when they are created
        self.controllers = [cls(self) for cls in config.controllers()]

    # state -----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        if self._step is None:
            self._step = self.layers[0].step_count(self.adapter) if self.layers else 0
        return self._step

    def forget_step(self) -> None:
        """The persisted counters may have changed (a load): read them again at the next `step`."""
        self._step = None

    def refresh(self) -> None:
        """The persisted state changed (a load, a prune): re-read the step and the controllers' state."""
        self.forget_step()
        self.refresh_controllers()

    def refresh_controllers(self) -> None:
        for c in getattr(self, "controllers", []):
            c.refresh()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers for p in adapter_parameters(layer, self.adapter)]

    # protocol --------------------------------------------------------------------------------
    def begin(self, max_steps: Optional[int] = None) -> "Driver":
        self.refuse_sharded()  # the model may have been sharded since the driver was made
        self.max_steps = max_steps
        self.managed = True
        self.plan(max_steps)
        for c in self.controllers:
            c.begin(max_steps)
        return self

    def plan(self, max_steps: Optional[int]) -> None:
        """The controllers' warnings about a run of `max_steps`, once per run length (a loraforge trainer
        reaches it twice: from the callback every Trainer gets and from `begin`)."""
        if getattr(self, "_planned", None) == max_steps:
            return
        self._planned = max_steps
        for c in self.controllers:
            c.plan(max_steps)

    def regularization_loss(self) -> Optional[torch.Tensor]:
        terms = [t for t in (c.regularization_loss() for c in self.controllers) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [g for c in self.controllers for g in c.param_groups(lr, weight_decay)]

    def before_step(self) -> None:
        for c in self.controllers:
            c.before_step()

    def idle_groups(self) -> set[str]:
        return {name for c in self.controllers for name in c.idle_groups()}

    def on_step_end(self) -> None:
        sharding.stepped()  # what earlier forwards captured is stale now
        step = self.step + 1
        # One multi-tensor op for all the counters (one kernel on a GPU), no read back.
        torch._foreach_add_([layer.lora_forge_step[self.adapter] for layer in self.layers], 1)
        self._step = step
        for c in self.controllers:
            c.on_step_end(step, self.max_steps)

    def log_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.controllers:
            out.update(c.log_values())
        return out

    def on_train_end(self, output_dir: Optional[str] = None) -> None:
        for c in self.controllers:
            c.on_train_end(output_dir)

    def export_metadata(self) -> dict:
        out: dict = {}
        for c in self.controllers:
            out.update(c.export_metadata())
        return out

    def refuse_sharded(self) -> None:
        """Refuse, before any update, sharding that loraforge cannot read whole weights from (core/sharding.py)."""
        needing = [cls for cls in self.config.controllers() if _reads_whole_weights(cls)]
        where = sharding.unsupported(self.layers, self.adapter) if needing else None
        if where is None:
            return
        raise RuntimeError(
            f"{type(self.config).__name__} cannot train with these sharded weights: {where}. Its "
            f"{', '.join(cls.__name__ for cls in needing)} reads whole adapter or base weights outside the model's "
            "forward. No parameter has been updated."
        )

    def refuse_unmanaged(self) -> None:
        if self.managed:
            return
        reasons = [c.needs_trainer for c in self.controllers if c.needs_trainer]
        if reasons:
            name = type(self.config).__name__
            raise RuntimeError(
                f"{name} cannot be trained by this trainer: {'; '.join(reasons)}. Use "
                "loraforge.LoraForgeSFTTrainer in place of trl.SFTTrainer, or loraforge.LoraForgeTrainer in "
                "place of transformers.Trainer (same arguments). In a hand-written loop call "
                "loraforge.driver(model).begin(max_steps), add its regularization_loss() to the loss and build "
                "the optimizer from its param_groups(lr, weight_decay). No parameter has been updated."
            )


def adapter_parameters(layer: ForgeLinear, adapter: str) -> list[torch.nn.Parameter]:
    params = []
    for name in layer.adapter_layer_names:
        holder = getattr(layer, name, None)
        if holder is not None and adapter in holder:
            item = holder[adapter]
            params.extend([item] if isinstance(item, torch.Tensor) else item.parameters())
    return params


def _reads_whole_weights(cls: type) -> bool:
    if cls.supports_sharded_weights is not None:
        return not cls.supports_sharded_weights
    hooks = ("__init__", "begin", "regularization_loss", "on_step_end")
    return any(getattr(cls, h) is not getattr(Controller, h) for h in hooks)


def driver_for(config, adapter: str, layers: list[ForgeLinear]) -> Driver:
    """The trainer and the optimizer hook must share one Driver; the layers hold it, so it lives
    exactly as long as the adapter does."""
    driver = layers[0].forge_drivers.get(adapter)
    if driver is None or driver.config is not config or {id(x) for x in driver.layers} != {id(x) for x in layers}:
        driver = Driver(config, adapter, layers)
        for layer in layers:
            layer.forge_drivers[adapter] = driver
    return driver


def group_layers(layers) -> dict[tuple[int, str], tuple]:
    groups: dict[tuple[int, str], tuple] = {}
    for layer in layers:
        for adapter, config in layer.forge_config.items():
            key = (id(config), adapter)
            groups.setdefault(key, (config, adapter, []))[2].append(layer)
    return groups


_DRIVERS_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def drivers(model: torch.nn.Module) -> list[Driver]:
    """The drivers of the trainable (active) loraforge adapters in `model`.

    Trainers ask on every micro-batch; the walk over `model.modules()` is cached until an adapter is
    added, deleted, activated or unloaded anywhere (`core.layer.adapters_changed`) or a loraforge layer
    is created or collected.

    Args:
        model (`torch.nn.Module`): a model holding loraforge layers (a `PeftModel`, or wrapped by DDP / FSDP).

    Returns:
        `list[Driver]`: one per active loraforge adapter (empty when there is none).
    """
    key = (ADAPTER_GENERATION[0], len(LIVE_LAYERS))
    cached = _DRIVERS_CACHE.get(model)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    sharding.register(model)  # FSDP1 units, when `model` is the wrapped model
    layers = [m for m in model.modules() if isinstance(m, ForgeLinear)]
    out = []
    for config, adapter, group in group_layers(layers).values():
        if adapter in group[0].active_adapters:
            out.append(driver_for(config, adapter, group))
    _DRIVERS_CACHE[model] = (key, out)
    return list(out)


def driver(model: torch.nn.Module) -> Driver:
    """The driver of the model's active loraforge adapter (exactly one is expected).

    Args:
        model (`torch.nn.Module`): a model holding one active loraforge adapter.

    Returns:
        `Driver`: the adapter's driver (the same object the trainers and the optimizer hook use).

    Raises:
        ValueError: when the model has no active loraforge adapter or several.

    Example:

        ```py
        >>> model = get_peft_model(base, loraforge.DeltaLoRAConfig(target_modules=["q_proj"], start_step=10))
        >>> loraforge.driver(model).begin(max_steps=200)
        ```
    """
    found = drivers(model)
    if len(found) != 1:
        raise ValueError(f"expected one active loraforge adapter in the model, found {len(found)}")
    return found[0]
