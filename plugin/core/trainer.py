"""Trainer classes that drive loraforge adapters: a mixin and ready `Trainer` / `SFTTrainer` classes.

The mixin adds the methods' loss terms in `compute_loss` (TRL's `SFTTrainer` computes its loss
itself and ignores the model's `outputs.loss`, so a term added inside the forward would be lost),
builds the optimizer with the methods' own param groups, tells the methods the total number of
steps when training begins, and merges their values into the trainer's logs. The work after each
optimizer step runs from the optimizer hook that every loraforge adapter shares (optimizer_hooks.py), so it
happens exactly once per optimizer step whatever the gradient accumulation. The same hook's pre-step
part holds the learning rate of groups marked `loraforge_constant_lr` (SaLoRA's gates) under any
scheduler (optimizer_hooks.py: `pin_constant_lr`), so `create_scheduler` is the trainer's own; the callback
also pins right after each scheduler step, so the group shows its true lr between steps too.
"""
from __future__ import annotations

import logging

import torch
from transformers import Trainer, TrainerCallback

from . import finite, sharding
from .driver import Driver, drivers
from .errors import ForgeConfigError, require
from .optimizer_hooks import mark_idle, pin_constant_lr

logger = logging.getLogger(__name__)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class _ForgeCallback(TrainerCallback):
    def __init__(self, trainer: "LoraForgeTrainerMixin") -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        refuse_ddp_without_unused_parameters(self.trainer.model_wrapped, self.trainer.forge_drivers())
        finite.note_output_dir(args.output_dir)
        if optimizer is not None:  # the scheduler's first value (0 in a warmup) must not reach the gates
            pin_constant_lr(optimizer)
        if state.global_step > 0 and getattr(self.trainer, "is_deepspeed_enabled", False):
            # DeepSpeed's resume loads the module (the adapter's buffers) before its optimizer writes the
            # trainable weights back from the fp32 partitions: re-read the adapter's state with both in place
            # (in-place Delta-LoRA rebuilds W from the restored factors; ZeRO-3 saves no frozen weight).
            for layer in {id(x): x for d in self.trainer.forge_drivers() for x in d.layers}.values():
                layer.refresh_axes()
        for d in self.trainer.forge_drivers():
            if d.step != state.global_step:
                raise RuntimeError(
                    f"the adapter has taken {d.step} optimizer steps but the trainer resumes at step "
                    f"{state.global_step}: resume from the checkpoint folder that holds this adapter state"
                )
            d.begin(state.max_steps)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            mark_idle(optimizer, {n for d in self.trainer.forge_drivers() for n in d.idle_groups()})

    @torch.no_grad()
    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # after the scheduler's step: the group shows the lr it will step at
            pin_constant_lr(optimizer)
            mark_idle(optimizer, set())  # the flags hold for one step only (a checkpoint saves none set)
        # DeepSpeed ZeRO (1, 2, 3) steps a torch optimizer over flat fp32 master partitions, not over the
        # adapter's parameters, so the optimizer hook never sees this adapter: drive its post-step
        # work here, once per optimizer step (a driver the hook already advanced is at global_step).
        for d in self.trainer.forge_drivers():
            if d.step == state.global_step - 1:
                d.on_step_end()

    def on_train_end(self, args, state, control, **kwargs):
        for d in self.trainer.forge_drivers():
            d.on_train_end(args.output_dir)


def refuse_ddp_without_unused_parameters(wrapped: torch.nn.Module, forge_drivers: list[Driver]) -> None:
    """DDP with find_unused_parameters=False fails on the second step when a trainable parameter got no
    gradient (DDP's own error, after one update); refuse before the first one instead."""
    if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) or wrapped.find_unused_parameters:
        return
    for d in forge_drivers:
        reasons = [c.leaves_parameters_unused for c in d.controllers if c.leaves_parameters_unused]
        require(not reasons, "ddp_find_unused_parameters",
                f"{type(d.config).__name__} under DDP needs find_unused_parameters=True ({'; '.join(reasons)}), but "
                "the model was wrapped with False (transformers' default when gradient checkpointing is on): set "
                "TrainingArguments(ddp_find_unused_parameters=True) (Axolotl: ddp_find_unused_parameters: true). "
                "No parameter has been updated.")


class PlanCallback(TrainerCallback):
    """In every Trainer's default callbacks (installed by integration.py) (a plain `Trainer` or `SFTTrainer` too): tells the
    adapters' controllers the run length, so that their warnings (e.g. Delta-LoRA's start_step past
    the last step) reach users of any trainer. It never takes charge of training (see `Driver.plan`)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        finite.note_output_dir(args.output_dir)  # the non-finite guard's counts start afresh
        if model is not None:
            for d in drivers(_unwrap(model)):
                d.plan(state.max_steps)


class LoraForgeTrainerMixin:
    """Makes any `transformers.Trainer` subclass drive loraforge adapters; put it first in the bases.

    It adds the controllers' loss terms in `compute_loss` (once per optimizer step whatever the
    gradient accumulation), builds the optimizer with their param groups (e.g. SaLoRA's gate group),
    tells them the total steps when training begins (refusing a resume whose adapter state does not
    match the trainer's step), and merges their values into the logs.

    Args:
        *args, **kwargs: those of the trainer class it is mixed into.

    Example:

        ```py
        >>> from trl import DPOTrainer
        >>> class LoraForgeDPOTrainer(loraforge.LoraForgeTrainerMixin, DPOTrainer):
        ...     pass
        ```
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(_ForgeCallback(self))

    def forge_drivers(self) -> list[Driver]:
        sharding.register(self.model)  # the wrapped model: FSDP1 units lie outside the unwrapped one
        return drivers(_unwrap(self.model))

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        special = [g for d in self.forge_drivers() for g in d.param_groups(self.args.learning_rate, self.args.weight_decay)]
        if not special:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        taken = {id(p) for g in special for p in g["params"]}
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in taken]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            *special,
        ]
        given = getattr(self, "optimizer_cls_and_kwargs", None)  # Trainer(optimizer_cls_and_kwargs=...), Axolotl's custom optimizers
        optimizer_cls, optimizer_kwargs = given if given is not None else self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        _refuse_own_grouping(optimizer_cls, optimizer_kwargs, special)
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        finite.note_loss(loss)
        for d in self.forge_drivers():
            reg = d.regularization_loss()
            if reg is not None:
                loss = loss + reg * self._per_micro_batch_weight(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _per_micro_batch_weight(self, num_items_in_batch) -> float:
        """Weight that makes the regulariser count once per optimizer step, not once per micro-batch.

        `training_step` divides the loss by the accumulation steps unless the loss was already
        normalised over the whole accumulated batch; in that case the division is ours to do.
        """
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
                getattr(self, "compute_loss_func", None) is not None
            )
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        return 1.0 / steps if scaled else 1.0

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the last COMPLETE checkpoint (transformers takes the last one)
            from .checkpoint import last_complete

            path, skipped = last_complete(self.args.output_dir)
            for folder, why in skipped:
                logger.warning("skipping the incomplete checkpoint %s (%s)", folder, why)
            resume_from_checkpoint = path or True  # none: transformers' own "no valid checkpoint" error
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        from .checkpoint import save_checkpoint_atomically  # staged, flushed and renamed: whole or absent

        save_checkpoint_atomically(self, super()._save_checkpoint, model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        from .checkpoint import restore_exact_state

        super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_exact_state(_unwrap(self.model), resume_from_checkpoint)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            for d in self.forge_drivers():
                logs.update({k: round(v, 6) for k, v in d.log_values().items()})
            logs.update(finite.log_values())
        super().log(logs, *args, **kwargs)


def _refuse_own_grouping(optimizer_cls, optimizer_kwargs: dict, special: list[dict]) -> None:
    """Factories (Muon, Dion, ...) and GaLore / LOMO / layer-wise optimizers group the parameters
    themselves and would leave the methods' groups (SaLoRA's gate lr) out: refuse, not drop them."""
    factory = not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer))
    own = [k for k in ("params", "model", "optimizer_dict") if k in optimizer_kwargs]
    if factory or own:
        names = ", ".join(g.get("name", "?") for g in special)
        raise ForgeConfigError(
            f"optim: {getattr(optimizer_cls, '__name__', optimizer_cls)} builds its own parameter groups "
            f"({'an optimizer factory' if factory else 'from ' + own[0]}) and would leave out the adapter's "
            f"param groups ({names}); use a torch optimizer class such as adamw_torch")


class LoraForgeTrainer(LoraForgeTrainerMixin, Trainer):
    """`transformers.Trainer` that drives loraforge adapters; takes the same arguments.

    Args:
        *args, **kwargs: those of `transformers.Trainer` (`model` holding a loraforge adapter, `args`, ...).

    Example:

        ```py
        >>> model = get_peft_model(base, loraforge.SaLoRAConfig(target_density=0.5))
        >>> trainer = loraforge.LoraForgeTrainer(model=model, args=TrainingArguments("out", max_steps=500),
        ...                                      train_dataset=ds)
        >>> trainer.train()
        ```
    """

