"""`Controller`: the protocol every method's training dynamics implement (see driver.py for who calls it)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .driver import Driver
    from .layer import ForgeLinear

#: Param-group key: the group's learning rate, held through any LR schedule (`optimizer_hooks.pin_constant_lr`).
CONSTANT_LR = "loraforge_constant_lr"
#: Param-group key: True while the group must take no step (`Controller.idle_groups`); the optimizer
#: hook drops the group's gradients, so an optimizer over flat master copies (DeepSpeed ZeRO) skips it too.
IDLE = "loraforge_idle"


class Controller:
    """Training dynamics of one method for one adapter; the base class does nothing.

    A method's config lists its controller classes (`ForgeConfig.controllers`); a `Driver` makes one of
    each per adapter and calls the hooks below. Override only what the method needs.

    Args:
        driver (`Driver`): the driver of the adapter (its config, layers, adapter name and step).

    Example:

        ```py
        >>> class L2(loraforge.Controller):
        ...     def regularization_loss(self):
        ...         return 1e-3 * sum((layer.lora_A[self.adapter].weight ** 2).sum() for layer in self.layers)
        ```
    """

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

    def refresh(self) -> None:
        """The adapter's persisted state changed (a load, a prune): re-read what this controller caches."""

    def before_step(self) -> None:
        """Right before an optimizer step, the gradients complete (from the optimizer hook)."""

    def idle_groups(self) -> set[str]:
        """Names of this controller's param groups that must take no step in the coming optimizer step
        (not even a zero-gradient one, which AdamW turns into momentum and a step count)."""
        return set()

    def on_step_end(self, step: int, max_steps: Optional[int]) -> None:
        """After optimizer step number `step` (1-based) has been applied."""

    def log_values(self) -> dict[str, float]:
        return {}

    def on_train_end(self, output_dir: Optional[str]) -> None:
        pass

    def export_metadata(self) -> dict:
        """What an exported stock adapter should record about this controller's state."""
        return {}
