"""`add_weighted_adapter` for loraforge adapters: weighted combinations of each source's WHOLE update.

PEFT's LoRA version combines the sources' `lora_A` / `lora_B` (linear family, cat) or their
`get_delta_weight` (svd family), and creates the result with the first source's config. For a
loraforge adapter the factors are not the whole update (a SaLoRA gate scales the ranks, a folded
Delta-LoRA adds `λ·s·(B A - B_K A_K)`), and a new adapter of the source's config would bring fresh
gates or its own snapshot. Here each source contributes `(B', A')` whose product is its whole update
on the base weights, in its eval-mode function (`factors.stock_factors`, what `export_lora` writes:
the eval gate folded into B', pruned ranks dropped, the snapshot appended, the scaling in B'):
- `cat`: `B = [B'_1 … B'_n]`, `A = [w_1·A'_1; …; w_n·A'_n]`, exactly `Σ w_i·B'_i A'_i`;
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`: PEFT's rule applied to B' and A'
  (`√|w|` on each side, the sign on A), which pairs rank j of one source with rank j of another and
  so needs every source's whole update to have the same rank in a module (refused otherwise: use
  `cat` or an svd type). With one source PEFT turns every type into `linear`, which is then exact;
- svd types: PEFT's rule on the exact deltas `B'_i A'_i`, truncated to `svd_rank` (default: the
  largest whole-update rank of any source in any module, so a rank-2r Delta-LoRA keeps its rank).

Decision: the result is a plain PEFT LoRA adapter (a `LoraConfig` with scaling exactly 1, saved with
`peft_type` LORA, loadable by stock PEFT without loraforge). A combination has no gate, snapshot or
basis of its own; it evaluates, merges, saves and trains as the plain LoRA its config says it is.
Refused, with the field named: an in-place Delta-LoRA source after its snapshot (its share of the
update is written into W, which every adapter shares, so no weight can scale it), `lora_bias`
sources, unequal `weights`, and modules adapted by a PEFT layer loraforge does not wrap.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils

from .errors import ForgeConfigError, require
from .factors import stock_factors
from .layer import ForgeLinear

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


def _merge(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density, majority_sign_method) -> torch.Tensor:
    if kind == "linear":
        return merge_utils.task_arithmetic(tensors, weights)
    if kind == "ties":
        return merge_utils.ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return merge_utils.dare_linear(tensors, weights, density)
    if kind == "dare_ties":
        return merge_utils.dare_ties(tensors, weights, density, majority_sign_method)
    return merge_utils.magnitude_prune(tensors, weights, density)


def _svd_factors(delta: torch.Tensor, rank: int, clamp, full_matrices: bool, driver) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of rank <= `rank` with `B A` the best approximation of `delta` (PEFT's recipe)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.numel())
    b, a = u[:, :k] * s[:k], vh[:k, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-hi, hi), a.clamp(-hi, hi)
    return b, a


def _combined_config(source, rank: int, target_modules) -> LoraConfig:
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(LoraConfig) if hasattr(source, f.name)}
    fields.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  target_modules=target_modules, init_lora_weights=True, use_dora=False, peft_type=None)
    return LoraConfig(**fields)


@torch.no_grad()
def add_weighted(model, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
                 svd_rank: Optional[int] = None, svd_clamp=None, svd_full_matrices: bool = True, svd_driver=None,
                 density: Optional[float] = None, majority_sign_method: str = "total") -> None:
    """`LoraModel.add_weighted_adapter` when a source is a loraforge adapter (see the module docstring)."""
    if adapter_name in model.peft_config:
        return  # PEFT's behaviour: an existing name is left as it is
    require(len(adapters) == len(weights), "weights",
            f"add_weighted_adapter got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    # PEFT's own checks (names exist, modules_to_save, target_parameters, target_modules types) and its rule
    # that one source means "linear".
    combination_type, _, target_modules = model._check_add_weighted_adapter(adapters, combination_type, svd_rank)
    require(combination_type in ("cat", *FACTOR_TYPES, *SVD_TYPES), "combination_type",
            f"unknown combination type {combination_type!r}")
    for name in adapters:
        require(not model.peft_config[name].lora_bias, "lora_bias",
                f"adapter {name!r} has lora_bias=True, whose bias add_weighted_adapter cannot combine; combine adapters "
                "trained with lora_bias=False")

    plan = []  # (layer, B, A) of the new adapter, B A = the combined update
    for module_name, layer in model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        present = [(a, float(w)) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if not present:
            continue
        if not isinstance(layer, ForgeLinear):
            raise ForgeConfigError(
                f"target_modules: {module_name} is a {type(layer).__name__}, not a loraforge layer; add_weighted_adapter "
                "with a loraforge source combines nn.Linear modules only: drop that module from the plain sources")
        for name, _ in present:
            for axis in layer.forge_axes.get(name, []):
                reason = axis.weighting_refusal()
                if reason:
                    raise ForgeConfigError(f"{reason} (adapter {name!r}, {layer.forge_name})")
        pairs = [stock_factors(layer, name) for name, _ in present]
        ws = [w for _, w in present]
        if combination_type == "cat":
            b = torch.cat([b for b, _ in pairs], 1)
            a = torch.cat([w * a for (_, a), w in zip(pairs, ws)], 0)
        elif combination_type in FACTOR_TYPES:
            ranks = sorted({a.shape[0] for _, a in pairs})
            require(len(ranks) == 1, "combination_type",
                    f"{combination_type!r} combines A and B rank by rank, but in {layer.forge_name} the sources' whole "
                    f"updates have ranks {ranks} (a frozen SaLoRA gate drops ranks, a folded Delta-LoRA appends its "
                    "snapshot's r): use combination_type='cat' (exact) or an svd type")
            wa = torch.tensor([math.copysign(math.sqrt(abs(w)), w) for w in ws], dtype=pairs[0][0].dtype)
            wb = torch.tensor([math.sqrt(abs(w)) for w in ws], dtype=pairs[0][0].dtype)
            a = _merge(combination_type, [a for _, a in pairs], wa.to(pairs[0][1].device), density, majority_sign_method)
            b = _merge(combination_type, [b for b, _ in pairs], wb.to(pairs[0][0].device), density, majority_sign_method)
        else:
            rank = svd_rank or max(a.shape[0] for _, a in pairs)
            deltas = [b @ a for b, a in pairs]
            kind = combination_type[: -len("_svd")] if combination_type != "svd" else "linear"
            delta = _merge(kind, deltas, torch.tensor(ws, dtype=deltas[0].dtype, device=deltas[0].device), density,
                           majority_sign_method)
            b, a = _svd_factors(delta, rank, svd_clamp, svd_full_matrices, svd_driver)
        plan.append((layer, b, a))

    rank = max([svd_rank or 0] + [a.shape[0] for _, _, a in plan]) if combination_type in SVD_TYPES else \
        max(a.shape[0] for _, _, a in plan)
    model.peft_config[adapter_name] = _combined_config(model.peft_config[adapters[0]], max(rank, 1), target_modules)
    model.inject_adapter(model.model, adapter_name)
    from peft.tuners.lora.model import _freeze_adapter

    _freeze_adapter(model.model, adapter_name)
    for module in model.model.modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].weight.zero_()
            module.lora_B[adapter_name].weight.zero_()
    for layer, b, a in plan:
        # Zero-padded to the adapter's rank: the extra ranks contribute nothing.
        tb, ta = layer.lora_B[adapter_name].weight, layer.lora_A[adapter_name].weight
        tb[:, : b.shape[1]] = b.to(tb.dtype)
        ta[: a.shape[0]] = a.to(ta.dtype)
