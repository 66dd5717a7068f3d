"""Pruning SaLoRA's ranks: the gates chosen when the window ends (`select_gates`, `freeze_gates`),
`prune` (the same on demand) and `gate_summary` (the densities of an adapter).

At the end of the window the gates freeze: `select_gates` with the config's `prune_budget` sets the
gate every later forward, eval, merge and export uses, so the last part of training adapts to
exactly the ranks the export keeps. "exact" keeps, over all modules, the ranks with the highest
deterministic gate (ties broken by P(g > 0)) until the kept parameter count reaches b of the total
(it overshoots by less than one rank of the widest module). A kept rank whose ĝ is 0 takes its
expected gate E[g] (its average weight while the gates were sampled, so the model changes least).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core import sharding
from ..core.layer import ForgeLinear
from .layer import BUDGET_CODES, HardConcreteGate, expected_gate, prob_nonzero
from .report import ModuleGates, summarize


def gate_axes(layers: list[ForgeLinear], adapter: str) -> list[HardConcreteGate]:
    return [axis for layer in layers for axis in layer.forge_axes.get(adapter, []) if isinstance(axis, HardConcreteGate)]


def module_gates(axes: list[HardConcreteGate], whole_logits: Optional[list] = None) -> list[ModuleGates]:
    """Each module's gates (`whole_logits`: each axis's whole logits, read already; None: read here, in one
    call for all of them)."""
    if whole_logits is None:
        whole_logits = sharding.gather_many([a.log_alpha for a in axes])
    return [ModuleGates(a.layer.forge_name, la.detach(), a.eval_gate(la).detach(), a.layer.in_features,
                        a.layer.out_features) for a, la in zip(axes, whole_logits)]


@torch.no_grad()
def select_gates(axes: list[HardConcreteGate], budget: str) -> list[torch.Tensor]:
    """The gate each module keeps after pruning with `budget` ("gate" or "exact"); 0 = pruned."""
    cfg = axes[0].config
    whole = sharding.gather_many([a.log_alpha for a in axes])  # one call (one collective when sharded)
    det = [a.deterministic(la).detach().float() for a, la in zip(axes, whole)]
    if budget == "gate":
        return det
    if budget != "exact":
        raise ValueError(f"budget: must be 'gate' or 'exact', got {budget!r}")
    prob = torch.cat([prob_nonzero(la.float(), cfg.temperature, cfg.gamma, cfg.zeta) for la in whole]).cpu()
    gate = torch.cat(det).cpu()
    weight = torch.cat([torch.full((a.layer.r[a.adapter],), float(a.layer.in_features + a.layer.out_features),
                                   dtype=torch.float64) for a in axes])
    # Order by ĝ, then P(g>0), both descending; stable, so full ties keep module/rank order.
    order = torch.argsort(prob, descending=True, stable=True)
    order = order[torch.argsort(gate[order], descending=True, stable=True)]
    before = torch.cumsum(weight[order], 0) - weight[order]
    keep = torch.zeros_like(gate, dtype=torch.bool)
    keep[order[before < cfg.target_density * float(weight.sum()) - 1e-6]] = True
    out, offset = [], 0
    for la, g in zip(whole, det):
        n = g.numel()
        k = keep[offset:offset + n].to(g.device)
        mean = expected_gate(la.float(), cfg.temperature, cfg.gamma, cfg.zeta).clamp_min(torch.finfo(torch.float32).tiny)
        out.append(torch.where(k, torch.where(g > 0, g, mean), torch.zeros_like(g)))
        offset += n
    return out


@torch.no_grad()
def freeze_gates(axes: list[HardConcreteGate], budget: str) -> None:
    """Fix every later gate (training and eval, merge, export) to the selection of `budget`."""
    for axis, gate in zip(axes, select_gates(axes, budget)):
        axis.frozen_gate.copy_(gate.to(axis.frozen_gate))
        axis.layer.lora_salora_window[axis.adapter][2] = BUDGET_CODES[budget]
        axis.phase = "frozen"
        axis.log_alpha.grad = None


def _salora_groups(model: torch.nn.Module, adapter: Optional[str]) -> dict[str, list[HardConcreteGate]]:
    layers = [m for m in model.modules() if isinstance(m, ForgeLinear)]
    names = {adapter} if adapter else {a for layer in layers for a in layer.forge_axes}
    groups = {name: gate_axes(layers, name) for name in sorted(names)}
    return {name: axes for name, axes in groups.items() if axes}


def prune(model: torch.nn.Module, budget: Optional[str] = None, adapter: Optional[str] = None) -> dict[str, int]:
    """Freeze the gates of `model`'s SaLoRA adapter(s) to the ranks `budget` keeps; return module -> rank.

    `budget`: "gate" (ranks with ĝ > 0, the paper), "exact" (the best ranks up to target_density of
    the parameters) or None (the config's `prune_budget`). Afterwards the model in eval mode, its
    merge and `loraforge.export_lora` (a stock PEFT LoRA adapter with the pruned ranks dropped and the
    gates folded into B) all compute the same function. Training normally freezes the gates itself
    at the end of the window; call this to export an adapter that never reached it, or to re-prune
    with another budget (which changes the model: the kept ranks were trained under the other one).
    """
    groups = _salora_groups(model, adapter)
    if not groups:
        raise ValueError(f"no SaLoRA adapter{'' if adapter is None else f' named {adapter!r}'} in the model")
    ranks: dict[str, int] = {}
    for axes in groups.values():
        freeze_gates(axes, budget or axes[0].config.prune_budget)
        ranks.update({a.layer.forge_name: int((a.frozen_gate > 0).sum()) for a in axes})
        driver = axes[0].layer.forge_drivers.get(axes[0].adapter)
        if driver is not None:
            driver.refresh()  # the controller re-reads the frozen state
    return ranks


def gate_summary(model: torch.nn.Module, adapter: str = "default") -> dict:
    """Densities (target, expected, realized, export) and per-module ranks of a SaLoRA adapter."""
    axes = _salora_groups(model, adapter).get(adapter)
    if not axes:
        raise ValueError(f"no SaLoRA adapter named {adapter!r} in the model")
    return summarize(module_gates(axes), axes[0].config)
