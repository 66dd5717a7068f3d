"""The propagation axes of Delta-LoRA: what one adapted layer does with `λ·s·(B A - B_K A_K)`.

`P = B·diag(ĝ)·A` is the layer's low-rank product with the eval-mode gate of any gating axis
folded in (no gate: `B A`); the snapshot stores `B_K·diag(ĝ_K)` as `B_K`. The part of the update
that stands for the moved `W` is `D = λ·s·(P - P_K)`, zero until the snapshot exists.

Two axes share the snapshot, the state and the load checks (`DeltaPropagation`); the config picks one
by `propagation`:
- folded (`FoldedPropagation`, here): `W` is never written; the forward adds `D x` with the gradients of plain LoRA (the λ part
  stands for `W`, which takes no gradient), `extra_delta() = D` for merge. When Delta-LoRA is the
  only axis that changes the forward, `lora_branch` computes `s·B A x + D x` as ONE autograd
  function of rank 2r (`[(1+λ)s·B, -λs·B_K] [A; A_K] x`) whose backward gives A and B the
  gradients of `s·B A x` (fused.py): it costs about what PEFT's LoRA branch costs (benchmarks/). Otherwise
  (a gate from another axis) `extra_output` adds `D x` from detached factors.
- in_place (`InPlacePropagation`, in_place.py): `W` holds `W_0 + D`. The axis remembers (in memory)
  which factors the `D` inside `W`
  was built from, so any later load writes only the difference: a second `load_state_dict` or a
  resume onto the same object never applies `D` twice. A fingerprint `W_0 v` (v a fixed ±1/√d_in
  vector) is saved with the adapter; on load it tells a pristine base from one that already carries
  `D` (refused) or a different base (warned). On a bf16/fp16 `W` an fp32 buffer keeps what `W`
  cannot represent (compensated summation), so `W + residual` is the fp32 sum of the updates.

Persisted per adapter (PEFT saves `lora_*` dicts with the adapter): `lora_delta_BK`,
`lora_delta_AK` (snapshot, at least fp32), `lora_delta_steps` = [K, snapshot step or -1],
`lora_delta_coef` = [λ, s], `lora_delta_w0_print` (fingerprint.py); the step counter is core's
`lora_forge_step`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..core import sharding
from ..core.errors import ForgeConfigError
from ..core.layer import STATE, Axis
from ..core.quantized import dense_weight
from .fingerprint import classify_base, print_of, state_dtype
from .fused import FoldedBranch


class DeltaPropagation(Axis):
    """Per (layer, adapter): the snapshot (B_K, A_K), the state and the load checks of both propagations."""

    tensors = {name: STATE for name in ("lora_delta_BK", "lora_delta_AK", "lora_delta_steps", "lora_delta_coef",
                                        "lora_delta_w0_print")}

    def __init__(self, layer, adapter: str, config) -> None:
        super().__init__(layer, adapter, config)
        self.ratio = float(config.update_ratio)
        self.start_step = int(config.start_step)
        self.taken = False
        self._gated: Optional[bool] = None
        b, a, w = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, self.weight
        # On the base weight's device: with low_cpu_mem_usage PEFT builds A, B on "meta" and then
        # moves every adapter module without parameters to the base weight's device.
        dtype, dev = state_dtype(b.dtype), w.device
        layer.lora_delta_BK[adapter] = torch.zeros(b.shape, dtype=dtype, device=dev)
        layer.lora_delta_AK[adapter] = torch.zeros(a.shape, dtype=dtype, device=dev)
        layer.lora_delta_steps[adapter] = torch.tensor([self.start_step, -1], dtype=torch.long, device=dev)
        layer.lora_delta_coef[adapter] = torch.tensor([self.ratio, self.scaling], dtype=torch.float64, device=dev)
        layer.lora_delta_w0_print[adapter] = print_of(layer, w) if dev.type != "meta" else torch.full(
            (w.shape[0],), float("nan"), dtype=state_dtype(w.dtype), device=dev)
        layer.register_load_state_dict_pre_hook(self._before_load)

    # state ----------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """W as dense numbers (a dequantised copy on a bnb base: read only at init, merge and load)."""
        return dense_weight(self.layer.get_base_layer())

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def coef(self) -> float:
        return self.ratio * self.scaling

    def snapshot_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.lora_delta_BK[self.adapter], self.layer.lora_delta_AK[self.adapter]

    def gated(self) -> bool:
        """Whether another axis gates this adapter (then `factors` folds its eval gate into B)."""
        if self._gated is None:
            self._gated = any(type(ax).rank_gate is not Axis.rank_gate for ax in self.layer.forge_axes[self.adapter])
        return self._gated

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B·diag(ĝ), A) now; the eval gate only when another axis gates this adapter."""
        if self.gated():
            return self.layer.factors(self.adapter)
        return sharding.whole(self.layer, "lora_B", self.adapter), sharding.whole(self.layer, "lora_A", self.adapter)

    def _terms(self, b, a, bk, ak, sign: float = 1.0) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        return [(sign, b, a), (-sign, bk, ak)]

    def _dense(self, terms) -> torch.Tensor:
        """coef · Σ sign·B A (d_out × d_in) in at least fp32, as one matmul of the stacked factors."""
        dtype = state_dtype(self.weight.dtype)
        bs = torch.cat([sign * b.detach().to(dtype) for sign, b, _ in terms], dim=1)
        as_ = torch.cat([a.detach().to(dtype) for _, _, a in terms], dim=0)
        return (bs @ as_) * self.coef

    def _projected(self, terms, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.layer.out_features, dtype=v.dtype, device=v.device)
        for sign, b, a in terms:
            out += sign * (b.detach().to(v.dtype) @ (a.detach().to(v.dtype) @ v))
        return out * self.coef

    def target(self, factors: Optional[tuple] = None) -> Optional[tuple[torch.Tensor, ...]]:
        """The factors whose D the trained function holds now (None before the snapshot); `factors`: this
        axis's (B, A) read already (`DeltaLoRAController.whole_factors`)."""
        if not self.taken:
            return None
        return (*(factors or self.factors()), *self.snapshot_factors())

    # training -------------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, step: int, factors: Optional[tuple] = None) -> None:
        """Take (B_K, A_K) = the factors right after optimizer step `step` (= K) (`factors`: read already)."""
        b, a = factors or self.factors()
        bk, ak = self.snapshot_factors()
        bk.copy_(b)
        ak.copy_(a)
        self.layer.lora_delta_steps[self.adapter][1] = step
        self.taken = True

    def after_step(self, factors: Optional[tuple] = None) -> None:
        """After an optimizer step t > K (the controller calls it; `factors`: (B, A) read already)."""

    def written_terms(self) -> list:
        """The terms of what this axis has written into W beyond W_0 (none: it never writes W)."""
        return []

    def export_factors(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock rank-2r form on the ORIGINAL W_0: `B' = [(1+λ)·s·B, -λ·s·B_K]`, `A' = [A; A_K]`."""
        if not self.taken:
            return b, a
        bk, ak = self.snapshot_factors()
        b2 = torch.cat([(1 + self.ratio) * b, -self.coef * bk.to(b.dtype)], dim=1)
        return b2, torch.cat([a, ak.to(a.dtype)], dim=0)

    def shift_sq_norm(self, factors: Optional[tuple] = None) -> float:
        """||D||_F² from 2r × 2r Gram matrices (no dense d_out × d_in product)."""
        target = self.target(factors)
        if target is None:
            return 0.0
        b, a, bk, ak = (t.detach().double() for t in target)
        bs, as_ = torch.cat([b, -bk], 1), torch.cat([a, ak], 0)
        return float(((bs.T @ bs) * (as_ @ as_.T)).sum()) * self.coef ** 2

    # load -----------------------------------------------------------------------------------
    def _before_load(self, module, state_dict, prefix, *args, **kwargs) -> None:
        # A whole-model state dict (an FSDP / ZeRO-3 checkpoint) carries W with the factors it was built from.
        self._loads_weight = f"{prefix}base_layer.weight" in state_dict

    def refresh(self) -> None:
        """After a load: re-read the state, check the base (`fingerprint.classify_base`) and make W match it."""
        steps = self.layer.lora_delta_steps[self.adapter]
        self.taken = int(steps[1]) >= 0
        self._check_saved_settings(int(steps[0]), self.layer.lora_delta_coef[self.adapter])
        if self.layer.merged:
            raise RuntimeError(
                f"{self.layer.forge_name}: Delta-LoRA state was loaded into a layer whose adapter is merged into W; "
                "call model.unmerge_adapter() before loading, then merge again if you need to.")
        if getattr(self, "_loads_weight", False):
            self._loads_weight = False
            self.loaded_with_weight()
            return
        self.reconcile(classify_base(self))

    def loaded_with_weight(self) -> None:
        """The load brought W too, built from the loaded factors."""

    def reconcile(self, status: str) -> None:
        """Make W hold what the loaded state says, given what `classify_base` found ("pristine" / "consistent")."""

    def _check_saved_settings(self, start_step: int, coef: torch.Tensor) -> None:
        saved = {"start_step": start_step, "update_ratio": float(coef[0]), "scaling s": float(coef[1])}
        now = {"start_step": self.start_step, "update_ratio": self.ratio, "scaling s": self.scaling}
        for key in saved:
            if abs(saved[key] - now[key]) > 1e-2 * max(abs(now[key]), 1e-12):
                raise ForgeConfigError(
                    f"{self.layer.forge_name}: the loaded Delta-LoRA state was trained with {key}={saved[key]:g} but "
                    f"this adapter's config says {now[key]:g}; load it with the config saved beside it "
                    "(PeftModel.from_pretrained / loraforge.load_adapter read it) or continue with the same values.")



class FoldedPropagation(DeltaPropagation):
    """`W` is never written: the forward adds `D x`, merge and export add `D` (see the module docstring)."""

    def __init__(self, layer, adapter: str, config) -> None:
        super().__init__(layer, adapter, config)
        self._sole: Optional[bool] = None

    # forward / merge / export ---------------------------------------------------------------
    def _fusable(self) -> bool:
        if self._sole is None:
            others = [ax for ax in self.layer.forge_axes[self.adapter] if ax is not self]
            overrides = ("rank_gate", "extra_output", "lora_branch")
            self._sole = (not any(getattr(type(ax), n) is not getattr(Axis, n) for ax in others for n in overrides)
                          and self.layer.lora_B[self.adapter].bias is None
                          and isinstance(self.layer.lora_dropout[self.adapter], torch.nn.Identity))
        return self._sole

    def lora_branch(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.taken or self.ratio == 0 or not self._fusable():
            return None
        bk, ak = self.snapshot_factors()
        return FoldedBranch.apply(x, self.layer.lora_A[self.adapter].weight, self.layer.lora_B[self.adapter].weight,
                                   ak, bk, self.scaling, self.ratio)

    def extra_output(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.taken or self.ratio == 0 or self._fusable():
            return None
        b, a = self.factors()
        bk, ak = self.snapshot_factors()
        # Detached B, A: the λ part stands for W, which takes no gradient (x still gets its gradient).
        a2 = torch.cat([a.detach(), ak.to(a.dtype)], dim=0).to(x.dtype)
        b2 = (torch.cat([b.detach(), -bk.to(b.dtype)], dim=1) * self.coef).to(x.dtype)
        return F.linear(F.linear(x, a2), b2)

    def extra_delta(self) -> Optional[torch.Tensor]:
        if not self.taken:
            return None
        return self._dense(self._terms(*self.target()))
