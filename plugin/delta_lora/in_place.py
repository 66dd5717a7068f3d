"""Delta-LoRA's in-place propagation (the paper's algorithm): `W` holds `W_0 + λ·s·(B A - B_K A_K)`.

The axis remembers (in memory) which factors the `D` inside `W` was built from, so any later load
writes only the difference: a second `load_state_dict` or a resume onto the same object never
applies `D` twice. On a bf16/fp16 `W` an fp32 buffer keeps what `W` cannot represent (compensated
summation), so `W + residual` is the fp32 sum of the updates.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..core import shard_math, sharding
from ..core.errors import ForgeConfigError
from ..core.quantized import is_quantized, quantization_name
from .fingerprint import HALF, state_dtype
from .layer import DeltaPropagation


class InPlacePropagation(DeltaPropagation):
    """Writes `W += λ·s·(P_{t+1} - P_t)` after every optimizer step t > K."""

    def __init__(self, layer, adapter: str, config) -> None:
        if is_quantized(layer.get_base_layer()):
            raise ForgeConfigError(
                f"propagation: 'in_place' writes W after every optimizer step, but {layer.forge_name or 'this layer'} "
                f"has a {quantization_name(layer.get_base_layer())} W, which cannot hold a small update (requantising "
                "each step rounds it away); use propagation='folded', which never writes W and trains the same model")
        # W = W_0 + λ·s·(B_a A_a - B_Ka A_Ka) with (B_a, A_a) = `applied` (copies: the optimizer changes B, A
        # in place) and (B_Ka, A_Ka) = the snapshot buffers, or `applied_snapshot` once a load is about to
        # overwrite them (copied then, not kept all along: it saves memory).
        self.applied: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.applied_snapshot: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.residual: Optional[torch.Tensor] = None  # half W: what W could not represent
        super().__init__(layer, adapter, config)

    @torch.no_grad()
    def snapshot(self, step: int, factors: Optional[tuple] = None) -> None:
        factors = factors or self.factors()
        super().snapshot(step, factors)
        b, a = factors
        self.applied, self.applied_snapshot = (b.detach().clone(), a.detach().clone()), None  # D = 0 is in W

    def after_step(self, factors: Optional[tuple] = None) -> None:
        self.propagate(factors)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """W and the fp32 residual, saved with trainer checkpoints (core/checkpoint.py). Rebuilding W from
        the factors on resume rounds differently from the step-by-step writes (1 ulp of W), and Adam turns
        that into 1e-6 differences in A within a few steps; a resume from these is exact."""
        w = self.layer.get_base_layer().weight
        if self.applied is None or sharding.engine(w) is not None:
            return {}
        out = {"weight": w.detach()}
        if self.residual is not None:
            out["residual"] = self.residual
        return out

    @torch.no_grad()
    def restore_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """After the adapter's state was loaded from a checkpoint: W (and the residual) as they were saved."""
        if not tensors:
            return
        self.layer.get_base_layer().weight.data.copy_(tensors["weight"])
        self.residual = tensors["residual"].to(torch.float32).clone() if "residual" in tensors else None
        target = self.target()
        self.applied = None if target is None else (target[0].detach().clone(), target[1].detach().clone())
        self.applied_snapshot = None

    @torch.no_grad()
    def propagate(self, factors: Optional[tuple] = None) -> None:
        """After an optimizer step t > K: `W += λ·s·(P_{t+1} - P_t)` (`factors`: (B, A) now, read already)."""
        if self.applied is None or self.applied_snapshot is not None:
            return self._write_difference(self.target(factors))  # after an interrupted load: the general path
        b, a = factors or self.factors()
        w, (b_old, a_old) = self.layer.get_base_layer().weight, self.applied
        if sharding.engine(w) is None and w.dtype not in HALF and w.dtype == b.dtype == a.dtype == b_old.dtype:
            # W += coef·[B, B_old] [A; -A_old]: one rank-2r product accumulated into W (the difference is formed
            # inside the product, as in `_add_to_weight`, but with no d_out × d_in temporary).
            left, right = torch.cat([b, b_old], 1), torch.cat([a, a_old.neg()], 0)
            if self.layer.fan_in_fan_out:  # W is stored as (B A)ᵀ = Aᵀ Bᵀ
                left, right = right.T, left.T
            w.data.addmm_(left, right, alpha=self.coef)
        else:
            self._add_to_weight([(1.0, b, a), (-1.0, b_old, a_old)])
        torch._foreach_copy_([b_old, a_old], [b, a])

    def _applied_terms(self, sign: float = -1.0) -> list:
        if self.applied is None:
            return []
        return self._terms(*self.applied, *(self.applied_snapshot or self.snapshot_factors()), sign=sign)

    @torch.no_grad()
    def _write_difference(self, target) -> None:
        """W += D(target) - D(applied); equal factor pairs cancel exactly (a repeated load adds nothing)."""
        terms = _cancel_equal((self._terms(*target) if target is not None else []) + self._applied_terms())
        if terms:
            self._add_to_weight(terms)
        self.applied = None if target is None else (target[0].detach().clone(), target[1].detach().clone())
        self.applied_snapshot = None

    def _add_to_weight(self, terms) -> None:
        """W += coef · Σ sign·B A, on the elements of W this rank holds (all of W when unsharded): its
        rows of the stacked B times the whole stacked A (core/shard_math.py), never a whole sharded W."""
        w, dtype = self.weight, state_dtype(self.weight.dtype)
        left = torch.cat([sign * self.coef * b.detach().to(dtype) for sign, b, _ in terms], dim=1)
        right = torch.cat([a.detach().to(dtype) for _, _, a in terms], dim=0)
        if self.layer.fan_in_fan_out:  # W is stored as (B A)ᵀ = Aᵀ Bᵀ
            left, right = right.T, left.T
        local, delta = shard_math.local_product(w, left, right)
        if w.dtype not in HALF:
            local.add_(delta.to(w.dtype))
            return
        if self.residual is None:
            self.residual = torch.zeros(local.shape, dtype=torch.float32, device=w.device)
            _warn_half_once(w.dtype)
        exact = local.float().add_(self.residual).add_(delta.float())
        local.copy_(exact)
        self.residual = exact.sub_(local.float())

    def written_terms(self) -> list:
        return self._applied_terms(sign=1.0)

    @torch.no_grad()
    def remove(self) -> None:
        """delete_adapter: take `D` back out of `W` (the base is W_0 again, as for any deleted adapter)."""
        if self.applied is not None:
            self._write_difference(None)
        self.residual = None

    def weighting_refusal(self) -> Optional[str]:
        if self.taken:
            return ("propagation: an in_place Delta-LoRA adapter has written λ·s·(B A - B_K A_K) into the base weights, "
                    "which every adapter shares, so add_weighted_adapter cannot weight it; combine adapters trained with "
                    "propagation='folded', or merge_and_unload() this one first")
        return None

    # load -----------------------------------------------------------------------------------
    def _before_load(self, module, state_dict, prefix, *args, **kwargs) -> None:
        super()._before_load(module, state_dict, prefix, *args, **kwargs)
        if self.applied is not None and self.applied_snapshot is None:
            self.applied_snapshot = tuple(t.detach().clone() for t in self.snapshot_factors())

    def loaded_with_weight(self) -> None:
        target = self.target()  # W came with these factors: it holds D(target), nothing to write
        self.applied = None if target is None else (target[0].detach().clone(), target[1].detach().clone())
        self.applied_snapshot = None

    @torch.no_grad()
    def reconcile(self, status: str) -> None:
        if status == "pristine":
            self.applied, self.applied_snapshot, self.residual = None, None, None
        self._write_difference(self.target())


def _cancel_equal(terms):
    """Drop a +P and a -P built from equal factors (the unchanged snapshot), so the update is exact."""
    keep = [True] * len(terms)
    for i, (si, bi, ai) in enumerate(terms):
        for j in range(i + 1, len(terms)):
            sj, bj, aj = terms[j]
            if keep[i] and keep[j] and si == -sj and ((bi is bj and ai is aj) or (
                    bi.shape == bj.shape and ai.shape == aj.shape
                    and torch.equal(bi, bj.to(bi.dtype)) and torch.equal(ai, aj.to(ai.dtype)))):
                keep[i] = keep[j] = False
    return [t for t, k in zip(terms, keep) if k]


_WARNED_HALF: set = set()


def _warn_half_once(dtype: torch.dtype) -> None:
    if dtype not in _WARNED_HALF:
        _WARNED_HALF.add(dtype)
        warnings.warn(
            f"Delta-LoRA in_place on a {dtype} base weight: each adapted layer keeps an fp32 buffer of the update "
            "that the weight cannot represent (4 bytes per adapted weight), because without it rounding loses most "
            "of the update (benchmarks/bench_delta_lora.py). propagation='folded' needs no such buffer.",
            stacklevel=3)
