"""SaLoRA's per-layer piece: a Hard-Concrete gate on each rank, `h = W x + s·B diag(g) A x`.

The gate `g` by phase (the controller in `model.py` tells the axis which phase it is in):
- before the window (and while no trainer resolved the window): `g = 1`, i.e. plain LoRA;
- inside the window, in training mode: one Hard-Concrete sample per forward call, shared by the
  micro-batch, drawn for all layers of the adapter at once (`GateSampler`) from torch's global RNG
  on the weights' device; activation checkpointing's recomputation sees the same sample;
- after the window, in training mode: the frozen gate (detached, so the logits get no gradient);
- in eval mode: `g = 1` before the window (the model has only ever been trained with it; the
  deterministic gate there, 0.5 at log_alpha = 0, would evaluate a half-strength adapter), then the
  deterministic gate `ĝ = clamp(sigmoid(log_alpha)·(ζ-γ) + γ, 0, 1)`, then the frozen gate.

The frozen gate is what `prune.select_gates` chose when the window ended (or when `prune` was
called): `ĝ` for `prune_budget="gate"`, the exact-budget selection for "exact". Merge and export use
the eval-mode gate, so the merged model and the exported stock adapter compute what the gated
model computes in eval mode.

Persisted per layer (keyed by adapter, saved by PEFT with the adapter and in Trainer checkpoints):
`lora_gate_logits` (log_alpha, trainable), `lora_gate_frozen` (the frozen gate values),
`lora_salora_window` (long: T_start, T_end, frozen code 0=no / 1=gate / 2=exact; -1 = unresolved)
and `lora_salora_lambda` (float32: λ of the squared term, λ1 of the linear term). The last two hold
the same values in every layer of an adapter, so any single layer describes the whole adapter.
All of it keeps its dtype (fp32 / long) through `model.to(dtype)` and PEFT's `autocast_adapter_dtype`
(core.layer: control state), on purpose: bf16 would round gate_lr steps and λ's increments away.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..core import sharding
from ..core.layer import STATE, TRAINABLE, Axis

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


def logistic_noise(shape, device) -> torch.Tensor:
    """log u - log(1 - u), u ~ U(0, 1) from torch's global RNG: the noise of a Hard-Concrete sample."""
    u = torch.rand(shape, device=device, dtype=torch.float32).clamp_(torch.finfo(torch.float32).tiny, 1.0 - 1e-7)
    return torch.log(u) - torch.log1p(-u)


def gate_from_noise(noise: torch.Tensor, log_alpha: torch.Tensor, temperature: float, gamma: float,
                    zeta: float) -> torch.Tensor:
    s = torch.sigmoid((noise + log_alpha.float()) / temperature)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def sample_gate(log_alpha: torch.Tensor, temperature: float, gamma: float, zeta: float) -> torch.Tensor:
    """One Hard-Concrete sample per entry of `log_alpha` (Eq. 7), differentiable w.r.t. `log_alpha`."""
    return gate_from_noise(logistic_noise(log_alpha.shape, log_alpha.device), log_alpha, temperature, gamma, zeta)


def _same(t):
    return t


class GateSampler:
    """The Hard-Concrete samples of all layers of one adapter, drawn together: one noise tensor and one
    chain of ops per forward call instead of one per layer.

    The first layer that asks for its gate draws the noise of every rank of every layer and computes
    all gates from the stacked logits; each layer takes its row. A layer that asks again starts the
    next sample (its next forward call), so every forward call gets a fresh sample shared by its
    micro-batch, exactly as per-layer sampling gives. The chain runs under pass-through saved-tensor
    hooks: non-reentrant activation checkpointing must not take its saved tensors for its own (they
    belong to every layer, not to the checkpointed block the first layer sits in).

    Activation checkpointing recomputes a block inside backward: there a layer's gate is recomputed
    from the noise of the latest draw and the layer's own logits (same values), and the layer that
    drew repeats its `torch.rand`, so the RNG stream that checkpointing restored stays in step for the
    ops after it (dropout). This holds when each forward's backward runs before the next forward,
    which is what every trainer does.
    """

    def __init__(self, axes: list["HardConcreteGate"]) -> None:
        self.axes = axes
        self.sizes = [a.layer.r[a.adapter] for a in axes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(axes))]
        self.same_rank = len(set(self.sizes)) == 1
        self.noise: Optional[torch.Tensor] = None
        self.parts: Optional[tuple] = None
        self.used: set[int] = set()
        self.drawer = -1
        self.per_layer = False
        self._stacked: Optional[tuple] = None  # (logits tensor, the parameters' versions, grad mode)
        for i, axis in enumerate(axes):
            axis.sampler, axis.slot = self, i

    def logits(self, fresh: bool = True, params: Optional[list] = None) -> torch.Tensor:
        """All logits, (layers, r) when the ranks agree (stacked), else one flat vector (of `params`, each
        layer's whole logits, when the caller read them already).

        `fresh=False` (the loss's expected L0) reuses the stack of the latest draw while it is valid:
        the parameters keep their versions and no optimizer step came since (`forget`; fused optimizers
        update in place without bumping versions). The forward's sample and the loss's expected L0 then
        share one stack, so backward splits the logits' gradient once, not twice."""
        if params is None:
            params = [a.logits() for a in self.axes]  # whole under FSDP / ZeRO-3, with their gradients
        key = (tuple(p._version for p in params), torch.is_grad_enabled())
        cached = self._stacked
        if not fresh and cached is not None and cached[1] == key and all(a is b for a, b in zip(cached[2], params)):
            return cached[0]
        logits = torch.stack(params) if self.same_rank else torch.cat(params)
        self._stacked = (logits, key, params)
        return logits

    def forget(self) -> None:
        """The parameters changed (an optimizer step, a load): the next forward draws afresh and the next
        use restacks them. Also drops the autograd graph the last sample holds."""
        self.noise, self.parts, self.used, self.drawer, self._stacked = None, None, set(), -1, None

    def __getstate__(self) -> dict:
        # A copied or pickled model starts without the in-flight sample (its tensors carry a graph,
        # which deepcopy refuses).
        state = dict(self.__dict__)
        state.update(noise=None, parts=None, used=set(), drawer=-1, _stacked=None)
        return state

    def _noise_of(self, i: int) -> torch.Tensor:
        return self.noise[i] if self.same_rank else self.noise[self.offsets[i]:self.offsets[i] + self.sizes[i]]

    def gate(self, i: int) -> Optional[torch.Tensor]:
        cfg = self.axes[0].config
        args = (cfg.temperature, cfg.gamma, cfg.zeta)
        if torch._C._current_graph_task_id() != -1 and self.noise is not None:  # checkpoint recomputation
            with torch.autograd.graph.saved_tensors_hooks(_same, _same):
                if i == self.drawer:
                    torch.rand(self.noise.shape, device=self.noise.device, dtype=torch.float32)
                return gate_from_noise(self._noise_of(i), self.axes[i].log_alpha, *args)
        if self.noise is None or i in self.used:
            logits = [a.log_alpha for a in self.axes]
            if len({(t.device, t.dtype) for t in logits}) > 1:
                return None  # layers spread over devices: the caller samples its own gate
            shape = (len(self.sizes), self.sizes[0]) if self.same_rank else (sum(self.sizes),)
            self.noise, self.parts, self.used, self.drawer = logistic_noise(shape, logits[0].device), None, set(), i
            # Sharded (FSDP / ZeRO-3): only the running layer's logits are whole, and only its own
            # gradient is averaged by the engine, so each layer gates itself from its row of the noise.
            self.per_layer = any(sharding.engine(t) is not None for t in logits)
        self.used.add(i)
        if self.per_layer:
            return gate_from_noise(self._noise_of(i), self.axes[i].log_alpha, *args)
        if self.parts is None or (torch.is_grad_enabled() and self.parts[i].grad_fn is None
                                  and self.axes[i].log_alpha.requires_grad):
            with torch.autograd.graph.saved_tensors_hooks(_same, _same):
                gates = gate_from_noise(self.noise, self.logits(), *args)
            self.parts = gates.unbind(0) if self.same_rank else gates.split(self.sizes)
        return self.parts[i]


def expected_gate(log_alpha: torch.Tensor, temperature: float, gamma: float, zeta: float) -> torch.Tensor:
    """E[g] = ∫₀¹ P(g > t) dt = ∫₀¹ sigmoid(log_alpha - τ·logit((t-γ)/(ζ-γ))) dt, by the midpoint rule.

    The integrand is smooth on [0, 1] (the logit's argument stays in [-γ/(ζ-γ), (1-γ)/(ζ-γ)]), so the
    rule is accurate to ~1e-7 and, unlike a Monte-Carlo or noise-space rule, never rounds a small
    positive mean to 0."""
    t = (torch.arange(_QUAD_POINTS, dtype=torch.float64, device=log_alpha.device) + 0.5) / _QUAD_POINTS
    q = (t - gamma) / (zeta - gamma)
    p = torch.sigmoid(log_alpha.detach().double().unsqueeze(-1) - temperature * torch.log(q / (1 - q)))
    return p.mean(-1).to(log_alpha.dtype)


class HardConcreteGate(Axis):
    """The rank gate of one (layer, adapter)."""

    tensors = {"lora_gate_logits": TRAINABLE, "lora_gate_frozen": STATE, "lora_salora_window": STATE,
               "lora_salora_lambda": STATE}

    def __init__(self, layer, adapter: str, config) -> None:
        super().__init__(layer, adapter, config)
        # Training-mode phase: "ones", "sample", "frozen" or "deterministic" (set by the controller).
        self.phase = "ones"
        self.sampler: Optional[GateSampler] = None  # set by the controller: samples all layers together
        self.slot = -1

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
        # The logits on A's device ("meta" under low_cpu_mem_usage: PEFT assigns them from the loaded
        # state); the buffers on the base weight's, since PEFT moves parameter-less adapter modules
        # there, which fails from "meta".
        meta = self.layer.lora_A[self.adapter].weight.device
        self.layer.lora_gate_logits[self.adapter] = torch.nn.Parameter(torch.zeros(r, device=meta))
        device = self.layer.get_base_layer().weight.device
        self.layer.lora_gate_frozen[self.adapter] = torch.zeros(r, device=device)
        self.layer.lora_salora_window[self.adapter] = torch.tensor([-1, -1, 0], dtype=torch.long, device=device)
        self.layer.lora_salora_lambda[self.adapter] = torch.zeros(2, device=device)

    def refresh(self) -> None:
        """After a load: derive the phase from the persisted window, freeze flag and step."""
        start, end, frozen = self.window_state()
        self.phase = phase_at(self.layer.step_count(self.adapter), start, end, frozen)

    # the gate --------------------------------------------------------------------------------
    def deterministic(self, whole_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ĝ from the whole logits (`whole_logits`, when read already)."""
        logits = self.logits() if whole_logits is None else whole_logits
        return deterministic_gate(logits, self.config.gamma, self.config.zeta)

    def eval_gate(self, whole_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gate of eval mode, merge and export."""
        if self.phase == "frozen":
            return self.frozen_gate
        if self.phase == "ones":
            return torch.ones_like(self.frozen_gate)
        return self.deterministic(whole_logits).detach()

    def rank_gate(self) -> Optional[torch.Tensor]:
        if self.phase == "ones":
            return None  # before the window: g = 1 in training and eval mode alike
        if not self.layer.training:
            return self.eval_gate()
        if self.phase == "sample":
            gate = self.sampler.gate(self.slot) if self.sampler is not None else None
            if gate is None:
                gate = sample_gate(self.log_alpha, self.config.temperature, self.config.gamma, self.config.zeta)
            return gate
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
