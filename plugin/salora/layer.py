"""SaLoRA's per-layer piece: a Hard-Concrete gate on each rank, `h = W x + s·B diag(g) A x`.

The gate `g` by phase (the controller in `model.py` tells the axis which phase it is in):
- before the window (and while no trainer resolved the window): `g = 1`, i.e. plain LoRA;
- inside the window, in training mode: one Hard-Concrete sample per forward call, shared by the
  micro-batch. It is drawn from torch's global RNG on the weights' device, so activation
  checkpointing (which restores the RNG state when it recomputes) sees the same sample;
- after the window, in training mode: the frozen gate (detached, so the logits get no gradient);
- in eval mode: the frozen gate once the gates froze, before that the deterministic gate
  `ĝ = clamp(sigmoid(log_alpha)·(ζ-γ) + γ, 0, 1)`.

The frozen gate is what `model.select_gates` chose when the window ended (or when `prune` was
called): `ĝ` for `prune_budget="gate"`, the exact-budget selection for "exact". Merge and export use
the eval-mode gate, so the merged model and the exported stock adapter compute what the gated
model computes in eval mode.

Persisted per layer (keyed by adapter, saved by PEFT with the adapter and in Trainer checkpoints):
`lora_gate_logits` (log_alpha, trainable), `lora_gate_frozen` (the frozen gate values),
`lora_salora_window` (long: T_start, T_end, frozen code 0=no / 1=gate / 2=exact; -1 = unresolved)
and `lora_salora_lambda` (float32: λ of the squared term, λ1 of the linear term). The last two hold
the same values in every layer of an adapter, so any single layer describes the whole adapter.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from peft.tuners.tuners_utils import BufferDict

from ..core import sharding
from ..core.layer import Axis

FROZEN_CODES = {0: None, 1: "gate", 2: "exact"}
BUDGET_CODES = {v: k for k, v in FROZEN_CODES.items()}

# Points of the midpoint rule for E[g].
_QUAD_POINTS = 2048


def deterministic_gate(log_alpha: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """ĝ = clamp(sigmoid(log_alpha)·(ζ-γ) + γ, 0, 1): the gate used at inference (paper, Sec. 3.5)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, temperature: float, gamma: float, zeta: float) -> torch.Tensor:
    """P(g > 0) = sigmoid(log_alpha - τ·log(-γ/ζ)): the expected L0 of one rank (Eq. 8)."""
    return torch.sigmoid(log_alpha - temperature * math.log(-gamma / zeta))


def prob_one(log_alpha: torch.Tensor, temperature: float, gamma: float, zeta: float) -> torch.Tensor:
    """P(g = 1) = sigmoid(log_alpha - τ·log((1-γ)/(ζ-1)))."""
    return torch.sigmoid(log_alpha - temperature * math.log((1 - gamma) / (zeta - 1)))


def sample_gate(log_alpha: torch.Tensor, temperature: float, gamma: float, zeta: float) -> torch.Tensor:
    """One Hard-Concrete sample per entry of `log_alpha` (Eq. 7), differentiable w.r.t. `log_alpha`."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.rand(log_alpha.shape, device=log_alpha.device, dtype=torch.float32).clamp(tiny, 1.0 - 1e-7)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / temperature)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def expected_gate(log_alpha: torch.Tensor, temperature: float, gamma: float, zeta: float) -> torch.Tensor:
    """E[g] = ∫₀¹ P(g > t) dt = ∫₀¹ sigmoid(log_alpha - τ·logit((t-γ)/(ζ-γ))) dt, by the midpoint rule.

    The integrand is smooth on [0, 1] (the logit's argument stays in [-γ/(ζ-γ), (1-γ)/(ζ-γ)]), so the
    rule is accurate to ~1e-7 and, unlike a Monte-Carlo or noise-space rule, never rounds a small
    positive mean to 0."""
    t = (torch.arange(_QUAD_POINTS, dtype=torch.float64, device=log_alpha.device) + 0.5) / _QUAD_POINTS
    q = (t - gamma) / (zeta - gamma)
    p = torch.sigmoid(log_alpha.detach().double().unsqueeze(-1) - temperature * torch.log(q / (1 - q)))
    return p.mean(-1).to(log_alpha.dtype)


def _ensure(layer, name: str, factory):
    if not hasattr(layer, name):
        setattr(layer, name, factory())
    return getattr(layer, name)


class HardConcreteGate(Axis):
    """The rank gate of one (layer, adapter)."""

    def __init__(self, layer, adapter: str, config) -> None:
        super().__init__(layer, adapter, config)
        for name in ("lora_gate_frozen", "lora_salora_window", "lora_salora_lambda"):
            _ensure(layer, name, lambda: BufferDict({}, persistent=True))
        # Training-mode phase: "ones", "sample", "frozen" or "deterministic" (set by the controller).
        self.phase = "ones"

    # state ----------------------------------------------------------------------------------
    @property
    def log_alpha(self) -> torch.nn.Parameter:
        return self.layer.lora_gate_logits[self.adapter]

    def logits(self) -> torch.Tensor:
        """log_alpha whole (under FSDP / ZeRO-3 outside the forward `log_alpha` is this rank's shard)."""
        return sharding.whole(self.layer, "lora_gate_logits", self.adapter)

    @property
    def frozen_gate(self) -> torch.Tensor:
        return self.layer.lora_gate_frozen[self.adapter]

    def window_state(self) -> tuple[int, int, Optional[str]]:
        start, end, code = (int(v) for v in self.layer.lora_salora_window[self.adapter].tolist())
        return start, end, FROZEN_CODES[code]

    def init_factors(self) -> None:
        r = self.layer.r[self.adapter]
        device = self.layer.lora_A[self.adapter].weight.device
        self.layer.lora_gate_logits[self.adapter] = torch.nn.Parameter(torch.zeros(r, device=device))
        self.layer.lora_gate_frozen[self.adapter] = torch.zeros(r, device=device)
        self.layer.lora_salora_window[self.adapter] = torch.tensor([-1, -1, 0], dtype=torch.long, device=device)
        self.layer.lora_salora_lambda[self.adapter] = torch.zeros(2, device=device)

    def refresh(self) -> None:
        """After a load: derive the phase from the persisted window, freeze flag and step."""
        start, end, frozen = self.window_state()
        self.phase = phase_at(self.layer.step_count(self.adapter), start, end, frozen)
        driver = self.layer.forge_drivers.get(self.adapter)
        for controller in getattr(driver, "controllers", []):
            if getattr(controller, "salora", False):
                controller.sync()  # its cached window, λ and step came from the state before the load

    # the gate --------------------------------------------------------------------------------
    def deterministic(self) -> torch.Tensor:
        return deterministic_gate(self.logits(), self.config.gamma, self.config.zeta)

    def eval_gate(self) -> torch.Tensor:
        """The gate of eval mode, merge and export."""
        if self.phase == "frozen":
            return self.frozen_gate
        return self.deterministic().detach()

    def rank_gate(self) -> Optional[torch.Tensor]:
        if not self.layer.training:
            return self.eval_gate()
        if self.phase == "ones":
            return None
        if self.phase == "sample":
            return sample_gate(self.log_alpha, self.config.temperature, self.config.gamma, self.config.zeta)
        if self.phase == "frozen":
            return self.frozen_gate
        return self.deterministic().detach()

    def export_factors(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the ranks whose eval gate is 0 (the gate itself is already folded into `b`).

        Only this axis's own r columns are considered, so an axis that appends columns composes."""
        live = self.eval_gate() > 0
        keep = torch.cat([live.to(b.device), torch.ones(b.shape[1] - live.numel(), dtype=torch.bool, device=b.device)])
        return b[:, keep], a[keep]

    def trainable_names(self) -> dict[str, bool]:
        # The logits stay in the optimizer all run long; outside the window they get no gradient.
        return {"lora_gate_logits": True}


def phase_at(step: int, start: int, end: int, frozen: Optional[str]) -> str:
    """Training-mode phase before optimizer step `step + 1` (`step` steps done)."""
    if frozen:
        return "frozen"
    if start < 0:
        return "ones"  # the window is not resolved yet: nothing told us the total steps
    if step < start:
        return "ones"
    if step < end:
        return "sample"
    return "deterministic"
