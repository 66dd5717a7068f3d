"""The propagation axis of Delta-LoRA: what one adapted layer does with `λ·s·(B A - B_K A_K)`.

`P = B·diag(ĝ)·A` is the layer's low-rank product with the eval-mode gate of any gating axis
folded in (no gate: `B A`); the snapshot stores `B_K·diag(ĝ_K)` as `B_K`. The part of the update
that stands for the moved `W` is `D = λ·s·(P - P_K)`, zero until the snapshot exists.

- folded: `W` is never written; the forward adds `D x` with the gradients of plain LoRA (the λ part
  stands for `W`, which takes no gradient), `extra_delta() = D` for merge. When Delta-LoRA is the
  only axis that changes the forward, `lora_branch` computes `s·B A x + D x` as ONE autograd
  function of rank 2r (`[(1+λ)s·B, -λs·B_K] [A; A_K] x`) whose backward gives A and B the
  gradients of `s·B A x`: it costs about what PEFT's LoRA branch costs (benchmarks/). Otherwise
  (a gate from another axis) `extra_output` adds `D x` from detached factors.
- in_place: `W` holds `W_0 + D`. The axis remembers (in memory) which factors the `D` inside `W`
  was built from, so any later load writes only the difference: a second `load_state_dict` or a
  resume onto the same object never applies `D` twice. A fingerprint `W_0 v` (v a fixed ±1/√d_in
  vector) is saved with the adapter; on load it tells a pristine base from one that already carries
  `D` (refused) or a different base (warned). On a bf16/fp16 `W` an fp32 buffer keeps what `W`
  cannot represent (compensated summation), so `W + residual` is the fp32 sum of the updates.

Persisted per adapter (PEFT saves `lora_*` dicts with the adapter): `lora_delta_BK`,
`lora_delta_AK` (snapshot, at least fp32), `lora_delta_steps` = [K, snapshot step or -1],
`lora_delta_coef` = [λ, s], `lora_delta_w0_print`; the step counter is core's `lora_forge_step`.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BufferDict

from ..core import sharding
from ..core.config import ForgeConfigError
from ..core.layer import Axis
from ..core.quantized import dense_weight, is_quantized, quantization_name

_HALF = (torch.float16, torch.bfloat16)
_PRINT_SEED = 20230901  # any fixed seed: the probe must be the same at save and at load


def _probe(d_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_PRINT_SEED)
    signs = torch.randint(0, 2, (d_in,), generator=gen).to(dtype) * 2 - 1
    return (signs / d_in ** 0.5).to(device)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


class DeltaPropagation(Axis):
    """Per (layer, adapter): snapshot, propagation into `W` (in place) or the folded term."""

    def __init__(self, layer, adapter: str, config) -> None:
        super().__init__(layer, adapter, config)
        self.ratio = float(config.update_ratio)
        self.start_step = int(config.start_step)
        self.in_place = config.propagation == "in_place"
        if self.in_place and is_quantized(layer.get_base_layer()):
            raise ForgeConfigError(
                f"propagation: 'in_place' writes W after every optimizer step, but {layer.forge_name or 'this layer'} "
                f"has a {quantization_name(layer.get_base_layer())} W, which cannot hold a small update (requantising "
                "each step rounds it away); use propagation='folded', which never writes W and trains the same model")
        self.taken = False
        # In place: W = W_0 + λ·s·(B_a A_a - B_Ka A_Ka) with (B_a, A_a) = `applied` (copies: the optimizer
        # changes B, A in place) and (B_Ka, A_Ka) = the snapshot buffers, or `applied_snapshot` once a
        # load is about to overwrite them (copied then, not kept all along: it saves memory).
        self.applied: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.applied_snapshot: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.residual: Optional[torch.Tensor] = None  # in place, half W: what W could not represent
        self._gated: Optional[bool] = None
        self._sole: Optional[bool] = None
        if not hasattr(layer, "lora_delta_BK"):
            for name in ("lora_delta_BK", "lora_delta_AK", "lora_delta_steps", "lora_delta_coef",
                         "lora_delta_w0_print"):
                setattr(layer, name, BufferDict({}, persistent=True))
        b, a, w = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, self.weight
        # On the base weight's device: with low_cpu_mem_usage PEFT builds A, B on "meta" and then
        # moves every adapter module without parameters to the base weight's device.
        dtype, dev = _state_dtype(b.dtype), w.device
        layer.lora_delta_BK[adapter] = torch.zeros(b.shape, dtype=dtype, device=dev)
        layer.lora_delta_AK[adapter] = torch.zeros(a.shape, dtype=dtype, device=dev)
        layer.lora_delta_steps[adapter] = torch.tensor([self.start_step, -1], dtype=torch.long, device=dev)
        layer.lora_delta_coef[adapter] = torch.tensor([self.ratio, self.scaling], dtype=torch.float64, device=dev)
        layer.lora_delta_w0_print[adapter] = self._print_of(w) if dev.type != "meta" else torch.full(
            (w.shape[0],), float("nan"), dtype=_state_dtype(w.dtype), device=dev)
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

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B·diag(ĝ), A) now; the eval gate only when another axis gates this adapter."""
        if self._gated is None:
            self._gated = any(type(ax).rank_gate is not Axis.rank_gate for ax in self.layer.forge_axes[self.adapter])
        if self._gated:
            return self.layer.factors(self.adapter)
        return sharding.whole(self.layer, "lora_B", self.adapter), sharding.whole(self.layer, "lora_A", self.adapter)

    def _print_of(self, w: torch.Tensor) -> torch.Tensor:
        dtype = _state_dtype(w.dtype)
        return sharding.matvec(w, _probe(self.layer.in_features, dtype, w.device), transposed=self.layer.fan_in_fan_out)

    def _terms(self, b, a, bk, ak, sign: float = 1.0) -> list[tuple[float, torch.Tensor, torch.Tensor]]:
        return [(sign, b, a), (-sign, bk, ak)]

    def _dense(self, terms) -> torch.Tensor:
        """coef · Σ sign·B A (d_out × d_in) in at least fp32, as one matmul of the stacked factors."""
        dtype = _state_dtype(self.weight.dtype)
        bs = torch.cat([sign * b.detach().to(dtype) for sign, b, _ in terms], dim=1)
        as_ = torch.cat([a.detach().to(dtype) for _, _, a in terms], dim=0)
        return (bs @ as_) * self.coef

    def _projected(self, terms, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.layer.out_features, dtype=v.dtype, device=v.device)
        for sign, b, a in terms:
            out += sign * (b.detach().to(v.dtype) @ (a.detach().to(v.dtype) @ v))
        return out * self.coef

    def target(self) -> Optional[tuple[torch.Tensor, ...]]:
        """The factors whose D the trained function holds now (None before the snapshot)."""
        if not self.taken:
            return None
        return (*self.factors(), *self.snapshot_factors())

    # training -------------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, step: int) -> None:
        """Take (B_K, A_K) = the factors right after optimizer step `step` (= K)."""
        b, a = self.factors()
        bk, ak = self.snapshot_factors()
        bk.copy_(b)
        ak.copy_(a)
        self.layer.lora_delta_steps[self.adapter][1] = step
        self.taken = True
        if self.in_place:
            self.applied, self.applied_snapshot = (b.detach().clone(), a.detach().clone()), None  # D = 0 is in W

    @torch.no_grad()
    def propagate(self) -> None:
        """In place, after an optimizer step t > K: `W += λ·s·(P_{t+1} - P_t)`."""
        if self.applied is None or self.applied_snapshot is not None:
            return self._write_difference(self.target())  # after an interrupted load: the general path
        b, a = self.factors()
        w, (b_old, a_old) = self.layer.get_base_layer().weight, self.applied
        if sharding.engine(w) is None and w.dtype not in _HALF and w.dtype == b.dtype == a.dtype == b_old.dtype:
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
        rows of the stacked B times the whole stacked A (core/sharding.py), never a whole sharded W."""
        w, dtype = self.weight, _state_dtype(self.weight.dtype)
        left = torch.cat([sign * self.coef * b.detach().to(dtype) for sign, b, _ in terms], dim=1)
        right = torch.cat([a.detach().to(dtype) for _, _, a in terms], dim=0)
        if self.layer.fan_in_fan_out:  # W is stored as (B A)ᵀ = Aᵀ Bᵀ
            left, right = right.T, left.T
        local, delta = sharding.local_product(w, left, right)
        if w.dtype not in _HALF:
            local.add_(delta.to(w.dtype))
            return
        if self.residual is None:
            self.residual = torch.zeros(local.shape, dtype=torch.float32, device=w.device)
            _warn_half_once(w.dtype)
        exact = local.float().add_(self.residual).add_(delta.float())
        local.copy_(exact)
        self.residual = exact.sub_(local.float())

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
        if self.in_place or not self.taken or self.ratio == 0 or not self._fusable():
            return None
        bk, ak = self.snapshot_factors()
        return _FoldedBranch.apply(x, self.layer.lora_A[self.adapter].weight, self.layer.lora_B[self.adapter].weight,
                                   ak, bk, self.scaling, self.ratio)

    def extra_output(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.in_place or not self.taken or self.ratio == 0 or self._fusable():
            return None
        b, a = self.factors()
        bk, ak = self.snapshot_factors()
        # Detached B, A: the λ part stands for W, which takes no gradient (x still gets its gradient).
        a2 = torch.cat([a.detach(), ak.to(a.dtype)], dim=0).to(x.dtype)
        b2 = (torch.cat([b.detach(), -bk.to(b.dtype)], dim=1) * self.coef).to(x.dtype)
        return F.linear(F.linear(x, a2), b2)

    def extra_delta(self) -> Optional[torch.Tensor]:
        if self.in_place or not self.taken:
            return None  # in place: W already holds the λ part
        return self._dense(self._terms(*self.target()))

    def export_factors(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stock rank-2r form on the ORIGINAL W_0: `B' = [(1+λ)·s·B, -λ·s·B_K]`, `A' = [A; A_K]`."""
        if not self.taken:
            return b, a
        bk, ak = self.snapshot_factors()
        b2 = torch.cat([(1 + self.ratio) * b, -self.coef * bk.to(b.dtype)], dim=1)
        return b2, torch.cat([a, ak.to(a.dtype)], dim=0)

    def shift_sq_norm(self) -> float:
        """||D||_F² from 2r × 2r Gram matrices (no dense d_out × d_in product)."""
        target = self.target()
        if target is None:
            return 0.0
        b, a, bk, ak = (t.detach().double() for t in target)
        bs, as_ = torch.cat([b, -bk], 1), torch.cat([a, ak], 0)
        return float(((bs.T @ bs) * (as_ @ as_.T)).sum()) * self.coef ** 2

    @torch.no_grad()
    def remove(self) -> None:
        """delete_adapter: in place, take `D` back out of `W` (the base is W_0 again, as for any deleted adapter)."""
        if self.in_place and self.applied is not None:
            self._write_difference(None)
        self.residual = None

    def weighting_refusal(self) -> Optional[str]:
        if self.in_place and self.taken:
            return ("propagation: an in_place Delta-LoRA adapter has written λ·s·(B A - B_K A_K) into the base weights, "
                    "which every adapter shares, so add_weighted_adapter cannot weight it; combine adapters trained with "
                    "propagation='folded', or merge_and_unload() this one first")
        return None

    # checkpoints ----------------------------------------------------------------------------
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """In place: W and the fp32 residual, saved with trainer checkpoints. Rebuilding W from the
        factors on resume rounds differently from the step-by-step writes (1 ulp of W), and Adam turns
        that into 1e-6 differences in A within a few steps; a resume from these is exact."""
        w = self.layer.get_base_layer().weight
        if not self.in_place or self.applied is None or sharding.engine(w) is not None:
            return {}
        out = {"weight": w.detach()}
        if self.residual is not None:
            out["residual"] = self.residual
        return out

    @torch.no_grad()
    def restore_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """After the adapter's state was loaded from a checkpoint: W (and the residual) as they were saved."""
        if not tensors or not self.in_place:
            return
        self.layer.get_base_layer().weight.data.copy_(tensors["weight"])
        self.residual = tensors["residual"].to(torch.float32).clone() if "residual" in tensors else None
        target = self.target()
        self.applied = None if target is None else (target[0].detach().clone(), target[1].detach().clone())
        self.applied_snapshot = None

    # load -----------------------------------------------------------------------------------
    def _before_load(self, module, state_dict, prefix, *args, **kwargs) -> None:
        # A whole-model state dict (an FSDP / ZeRO-3 checkpoint) carries W with the factors it was built from.
        self._loads_weight = f"{prefix}base_layer.weight" in state_dict
        if self.applied is not None and self.applied_snapshot is None:
            self.applied_snapshot = tuple(t.detach().clone() for t in self.snapshot_factors())

    def refresh(self) -> None:
        """After a load: re-read the state and make W match it (in place) or check the base (folded)."""
        steps = self.layer.lora_delta_steps[self.adapter]
        self.taken = int(steps[1]) >= 0
        self._check_saved_settings(int(steps[0]), self.layer.lora_delta_coef[self.adapter])
        if self.layer.merged:
            raise RuntimeError(
                f"{self.layer.forge_name}: Delta-LoRA state was loaded into a layer whose adapter is merged into W; "
                "call model.unmerge_adapter() before loading, then merge again if you need to.")
        if getattr(self, "_loads_weight", False):
            self._loads_weight = False
            if self.in_place:  # W came with these factors: it holds D(target), nothing to write
                target = self.target()
                self.applied = None if target is None else (target[0].detach().clone(), target[1].detach().clone())
                self.applied_snapshot = None
            return
        status = self._classify_base()
        if not self.in_place:
            return
        with torch.no_grad():
            if status == "pristine":
                self.applied, self.applied_snapshot, self.residual = None, None, None
            self._write_difference(self.target())

    def _check_saved_settings(self, start_step: int, coef: torch.Tensor) -> None:
        saved = {"start_step": start_step, "update_ratio": float(coef[0]), "scaling s": float(coef[1])}
        now = {"start_step": self.start_step, "update_ratio": self.ratio, "scaling s": self.scaling}
        for key in saved:
            if abs(saved[key] - now[key]) > 1e-2 * max(abs(now[key]), 1e-12):
                raise ForgeConfigError(
                    f"{self.layer.forge_name}: the loaded Delta-LoRA state was trained with {key}={saved[key]:g} but "
                    f"this adapter's config says {now[key]:g}; load it with the config saved beside it "
                    "(PeftModel.from_pretrained / loraforge.load_adapter read it) or continue with the same values.")

    @torch.no_grad()
    def _classify_base(self) -> str:
        """'consistent' (W holds what this axis wrote), 'pristine' (W = W_0) or refuse/warn."""
        f0 = self.layer.lora_delta_w0_print[self.adapter]
        if torch.isnan(f0).any() or self.weight.device.type == "meta":
            return "consistent"
        v = _probe(self.layer.in_features, f0.dtype, f0.device)
        c = self._print_of(self.weight)
        target = self.target()
        candidates = {"consistent": f0.clone(), "pristine": f0, "carries": f0.clone(), "merged": None}
        if self.in_place and self.applied is not None:
            candidates["consistent"] += self._projected(self._applied_terms(sign=1.0), v)
        if target is not None:
            candidates["carries"] += self._projected(self._terms(*target), v)
        b, a = (t.detach().to(v.dtype) for t in self.factors())  # a merged adapter: W_0 + D + s·B A
        candidates["merged"] = candidates["carries"] + self.scaling * (b @ (a @ v))
        dist = {k: float((c - e).norm()) for k, e in candidates.items()}
        scale = float(f0.norm()) + 1e-30
        eps = max(torch.finfo(self.weight.dtype).eps, torch.finfo(f0.dtype).eps)
        tol = 4 * eps * scale
        best = min(dist, key=lambda k: (dist[k], list(candidates).index(k)))
        separable = float((candidates[best] - candidates["consistent"]).norm()) > tol
        if best in ("carries", "merged") and separable and dist[best] <= 1e-2 * scale:
            what = ("the adapter's Delta-LoRA update λ·s·(B A - B_K A_K)" if best == "carries"
                    else "this adapter, merged")
            raise RuntimeError(
                f"{self.layer.forge_name}: this base weight already carries {what} (a merged model, or an "
                "in-place-trained base after unload()); loading the adapter on it would apply the update twice. "
                "Load the adapter onto the ORIGINAL base model (e.g. a fresh from_pretrained of the base checkpoint).")
        if dist[best] > 1e-2 * scale:
            warnings.warn(
                f"{self.layer.forge_name}: the base weight differs from the one this Delta-LoRA adapter was trained on "
                f"(fingerprint off by {dist[best] / scale:.1%}); outputs will not reproduce the trained model. Load it "
                "onto the original base model.", stacklevel=2)
        return "pristine" if best == "pristine" else "consistent"


class _FoldedBranch(torch.autograd.Function):
    """`s·B A x + λ·s·(B A - B_K A_K) x` with the gradients of `s·B A x` for A and B (and the true
    gradient for x): one rank-2r product `[(1+λ)s·B, -λs·B_K] [A; A_K] x`. The stacked factors are
    saved for backward (2× the adapter's size, held from forward to backward: 80 MB for r = 8 on all
    linears of a 7B model in bf16) rather than rebuilt there, which would cost 2 concatenations and 2
    scalings per layer and step; under autocast backward casts them to the gradient's dtype."""

    @staticmethod
    def _stacked(a, b, ak, bk, s: float, lam: float, dtype):
        a2 = torch.cat([_as(a, dtype), _as(ak, dtype)], 0)
        b2 = torch.cat([_as(b, dtype) * ((1 + lam) * s), _as(bk, dtype) * (-lam * s)], 1)
        return a2, b2

    @staticmethod
    def forward(ctx, x, a, b, ak, bk, s: float, lam: float):
        a2, b2 = _FoldedBranch._stacked(a, b, ak, bk, s, lam, a.dtype)
        u2 = x.matmul(a2.t())
        ctx.save_for_backward(x, u2[..., : a.shape[0]].contiguous(), a2, b2)
        ctx.s, ctx.lam = s, lam
        return u2.matmul(b2.t())

    @staticmethod
    def backward(ctx, g):
        x, u, a2, b2 = ctx.saved_tensors
        dt = g.dtype  # under autocast the forward ran in lower precision; autograd casts the grads back
        a2, b2 = _as(a2, dt), _as(b2, dt)
        r = u.shape[-1]
        gu2 = g.matmul(b2)  # d out / d [A; A_K] x
        gx = gu2.matmul(a2) if ctx.needs_input_grad[0] else None
        # LoRA's own gradients, d(s·B A x)/dA and /dB; gu2[..., :r] = (1+λ)·s·g B.
        ga = (gu2[..., :r].reshape(-1, r) / (1 + ctx.lam)).t().matmul(_as(x.reshape(-1, x.shape[-1]), dt)) \
            if ctx.needs_input_grad[1] else None
        gb = g.reshape(-1, g.shape[-1]).t().matmul(_as(u.reshape(-1, r), dt)) * ctx.s if ctx.needs_input_grad[2] else None
        return gx, ga, gb, None, None, None, None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips the no-op dispatch: this runs per layer and step


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
