"""The one mechanism that drives loraforge's training dynamics.

Every method plugs into the same protocol (`Controller`): an extra loss term, optimizer param
groups of its own, a schedule that knows the step and the total steps, work right after each
optimizer step, values to log, and a hook at the end of training. A `Driver` composes the
controllers of one adapter of one model.

Two things drive a `Driver`:
- `LoraForgeTrainerMixin` (trainer.py): adds the loss term in `compute_loss`, builds the optimizer
  with the param groups, tells the total steps, logs.
- Global torch optimizer step hooks, installed on `import loraforge`: after every `step()` of any
  optimizer that holds a loraforge adapter's parameters, the driver's `on_step_end` runs. That makes
  methods that need only post-step work (Delta-LoRA, CoRA) complete under a plain `Trainer`,
  `SFTTrainer` or a hand-written loop. A method that needs more (SaLoRA's loss term and gate
  learning rate) declares it in `Controller.needs_trainer`, and the pre-step hook refuses the first
  update, before any parameter has moved, unless a trainer or `Driver.begin` took charge.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import finite, sharding
from .layer import ADAPTER_GENERATION, LIVE_LAYERS, ForgeLinear, module_order


class Controller:
    """Training dynamics of one axis for one adapter (the base class does nothing)."""

    #: Why a plain trainer cannot drive this controller, or None if the optimizer hook suffices.
    needs_trainer: Optional[str] = None
    #: Whether it works when FSDP / DeepSpeed ZeRO-3 keep only a shard of each weight on a rank. None:
    #: inferred: a controller with work of its own (`__init__`, `begin`, `regularization_loss`,
    #: `on_step_end`) reads whole adapter or base weights outside the model's forward, where sharded
    #: weights are shards; it works only with the layouts core/sharding.py reads (`unsupported`).
    supports_sharded_weights: Optional[bool] = None

    #: Why some of this controller's trainable parameters get no gradient in some steps (so DDP must be
    #: told to look for unused parameters), or None.
    leaves_parameters_unused: Optional[str] = None

    def __init__(self, driver: "Driver") -> None:
        self.driver = driver

    @property
    def layers(self) -> list[ForgeLinear]:
        return self.driver.layers

    @property
    def adapter(self) -> str:
        return self.driver.adapter

    def begin(self, max_steps: Optional[int]) -> None:
        """Training starts (or resumes at `driver.step`) with `max_steps` optimizer steps in all."""

    def plan(self, max_steps: Optional[int]) -> None:
        """A run of `max_steps` optimizer steps starts, under any trainer (plain ones too): warn about it."""

    def regularization_loss(self) -> Optional[torch.Tensor]:
        return None

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Param groups with settings of their own; their params leave the trainer's default groups."""
        return []

    def before_step(self) -> None:
        """Right before an optimizer step, the gradients complete (from the optimizer hook)."""

    def on_step_end(self, step: int, max_steps: Optional[int]) -> None:
        """After optimizer step number `step` (1-based) has been applied."""

    def log_values(self) -> dict[str, float]:
        return {}

    def on_train_end(self, output_dir: Optional[str]) -> None:
        pass

    def export_metadata(self) -> dict:
        """What an exported stock adapter should record about this controller's state."""
        return {}


class Driver:
    """All controllers of one adapter of one model, behind one protocol."""

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

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers for p in _adapter_parameters(layer, self.adapter)]

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


def _adapter_parameters(layer: ForgeLinear, adapter: str) -> list[torch.nn.Parameter]:
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


sharded_weight = sharding.sharded_weight  # where a rank holds a shard (kept importable from here)


def _driver_for(config, adapter: str, layers: list[ForgeLinear]) -> Driver:
    """The trainer and the optimizer hook must share one Driver; the layers hold it, so it lives
    exactly as long as the adapter does."""
    driver = layers[0].forge_drivers.get(adapter)
    if driver is None or driver.config is not config or {id(x) for x in driver.layers} != {id(x) for x in layers}:
        driver = Driver(config, adapter, layers)
        for layer in layers:
            layer.forge_drivers[adapter] = driver
    return driver


def _group(layers) -> dict[tuple[int, str], tuple]:
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
    is created or collected."""
    key = (ADAPTER_GENERATION[0], len(LIVE_LAYERS))
    cached = _DRIVERS_CACHE.get(model)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    sharding.register(model)  # FSDP1 units, when `model` is the wrapped model
    layers = [m for m in model.modules() if isinstance(m, ForgeLinear)]
    out = []
    for config, adapter, group in _group(layers).values():
        if adapter in group[0].active_adapters:
            out.append(_driver_for(config, adapter, group))
    _DRIVERS_CACHE[model] = (key, out)
    return list(out)


def driver(model: torch.nn.Module) -> Driver:
    """The driver of the model's active loraforge adapter (exactly one is expected)."""
    found = drivers(model)
    if len(found) != 1:
        raise ValueError(f"expected one active loraforge adapter in the model, found {len(found)}")
    return found[0]


# optimizer hooks -------------------------------------------------------------------------------
#: Param-group key: the group's learning rate, held through any LR schedule (`pin_constant_lr`).
CONSTANT_LR = "loraforge_constant_lr"
_OPT_CACHE: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()


def _drivers_of_optimizer(optimizer: torch.optim.Optimizer) -> list[Driver]:
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    cached = _OPT_CACHE.get(optimizer)
    key = (n_params, len(LIVE_LAYERS), ADAPTER_GENERATION[0])
    if cached is not None and cached[0] == key:
        return cached[1]
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    found = []
    for config, adapter, group in _group(list(LIVE_LAYERS)).values():
        # Drivers only for adapters this optimizer trains: any other live model is none of its business.
        if any(id(p) in ids for layer in group for p in _adapter_parameters(layer, adapter)):
            found.append(_driver_for(config, adapter, group))
    _OPT_CACHE[optimizer] = (key, found)
    return found


def _state_init_step(optimizer: torch.optim.Optimizer) -> bool:
    """torch.distributed.checkpoint creates a fresh optimizer's state by a step with lr 0 and zero
    gradients (`_init_optim_state`; accelerate's FSDP2 optimizer loading runs it on resume). It is
    no training step: counting it would put the adapter one step ahead of the trainer."""
    if any(float(g.get("lr", 0.0)) != 0.0 for g in optimizer.param_groups):
        return False
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return all(not (t.to_local() if hasattr(t, "to_local") else t).any() for t in grads)


def pin_constant_lr(optimizer: torch.optim.Optimizer) -> None:
    """Param groups that carry `loraforge_constant_lr: <lr>` (SaLoRA's gates) step at that lr.

    Runs before every optimizer step, so it holds whatever scheduler wrote `group["lr"]` after the
    last one: LambdaLR scales each group's initial lr, but RexLR and OneCycleLR (Axolotl's `rex`,
    `one_cycle`) write one value into every group, JaggedLR wraps another scheduler,
    ReduceLROnPlateau chains, and a plugin's or a hand loop's scheduler is unknown here. Only the
    lr is held: `one_cycle` still cycles the gate group's betas, as for every other group.
    """
    for group in optimizer.param_groups:
        lr = group.get(CONSTANT_LR)
        if lr is True:  # optimizer state saved before the marker carried its value
            lr = group.get("initial_lr")
        if lr is None or lr is False:
            continue
        if isinstance(group["lr"], torch.Tensor):  # capturable / fused optimizers keep lr as a tensor
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _pre_step(optimizer, args, kwargs) -> None:
    optimizer._loraforge_skip = _state_init_step(optimizer)
    if optimizer._loraforge_skip:
        return
    pin_constant_lr(optimizer)
    found = _drivers_of_optimizer(optimizer)
    if found:  # a non-finite loss or gradient: the step is skipped (counted, grads dropped)
        finite.guard_step(optimizer, found[0].step + 1, found)
    for d in found:
        if d.step == 0:  # the first update; later, `begin` (trainers, resumes) and new drivers check
            d.refuse_sharded()
        d.refuse_unmanaged()
        d.before_step()


@torch.no_grad()
def _post_step(optimizer, args, kwargs) -> None:
    if getattr(optimizer, "_loraforge_skip", False):
        return
    for d in _drivers_of_optimizer(optimizer):
        if not getattr(d, "step_skipped", False):
            finite.check_parameters(d, d.step + 1)
        d.on_step_end()


_HOOKS: list = []


def install_optimizer_hooks() -> None:
    if not _HOOKS:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _HOOKS.append(register_optimizer_step_pre_hook(_pre_step))
        _HOOKS.append(register_optimizer_step_post_hook(_post_step))
