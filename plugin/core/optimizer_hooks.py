"""What runs around an optimizer step: the post-step work of the adapters an optimizer trains.

`pre_step` / `post_step` are registered as torch's global optimizer step hooks by integration.py, so
they see every optimizer in the process. They return at once while no loraforge layer is alive, and
for an optimizer holding no loraforge adapter's parameters they find no driver (cached per
optimizer), so code that uses no loraforge adapter runs as without them.
"""
from __future__ import annotations

import weakref

import torch

from . import finite
from .controller import CONSTANT_LR, IDLE
from .driver import Driver, adapter_parameters, driver_for, group_layers
from .layer import ADAPTER_GENERATION, LIVE_LAYERS

_OPT_CACHE: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()


def _drivers_of_optimizer(optimizer: torch.optim.Optimizer) -> list[Driver]:
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    cached = _OPT_CACHE.get(optimizer)
    key = (n_params, len(LIVE_LAYERS), ADAPTER_GENERATION[0])
    if cached is not None and cached[0] == key:
        return cached[1]
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    found = []
    for config, adapter, group in group_layers(list(LIVE_LAYERS)).values():
        # Drivers only for adapters this optimizer trains: any other live model is none of its business.
        if any(id(p) in ids for layer in group for p in adapter_parameters(layer, adapter)):
            found.append(driver_for(config, adapter, group))
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


def mark_idle(optimizer, names: set[str]) -> None:
    """Flag the param groups named in `names` idle for the coming step, the others not (`IDLE`)."""
    for group in optimizer.param_groups:
        if group.get("name") is not None:
            group[IDLE] = group["name"] in names


def drop_idle_grads(optimizer) -> None:
    """An idle group takes no step: torch optimizers skip a parameter whose gradient is None. Under DeepSpeed
    ZeRO the step runs over flat fp32 master partitions, one per group, that hold no model parameter: the flag
    on the group (the same dict) is what reaches them."""
    for group in optimizer.param_groups:
        if group.get(IDLE):
            for p in group["params"]:
                p.grad = None


def pre_step(optimizer, args, kwargs) -> None:
    """Before any optimizer's step: hold constant learning rates, refuse what cannot be driven, let
    the controllers see the complete gradients. Returns at once while no loraforge layer is alive."""
    if not LIVE_LAYERS:
        return
    optimizer._loraforge_skip = _state_init_step(optimizer)
    if optimizer._loraforge_skip:
        return
    pin_constant_lr(optimizer)
    drop_idle_grads(optimizer)
    found = _drivers_of_optimizer(optimizer)
    if found:  # a non-finite loss or gradient: the step is skipped (counted, grads dropped)
        finite.guard_step(optimizer, found[0].step + 1, found)
    for d in found:
        if d.step == 0:  # the first update; later, `begin` (trainers, resumes) and new drivers check
            d.refuse_sharded()
        d.refuse_unmanaged()
        d.before_step()


@torch.no_grad()
def post_step(optimizer, args, kwargs) -> None:
    """After any optimizer's step: each driver of an adapter it trains runs its post-step work."""
    if not LIVE_LAYERS:
        return
    if getattr(optimizer, "_loraforge_skip", False):
        return
    for d in _drivers_of_optimizer(optimizer):
        if not getattr(d, "step_skipped", False):
            finite.check_parameters(d, d.step + 1)
        d.on_step_end()
