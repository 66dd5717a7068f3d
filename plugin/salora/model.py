"""SaLoRA's training dynamics (the controller) and its model-level functions (`prune`, `gate_summary`).

Objective: `L = L_task + β·R_orth + [inside the window] λ·(C - b)²`
(`lagrangian="linear_quadratic"`: `λ1·(C - b) + λ2·(C - b)²`), with
- `R_orth = Σ_i ||B_iᵀB_i - I||_F² + ||A_i A_iᵀ - I||_F²`, divided by the number of adapted layers K
  for `orth_reg_reduction="mean"` (default; METHODS.md) or summed ("sum", Eq. 10);
- `C` the parameter-weighted expected density (closed-form expected L0, Eq. 8/11).

Decisions the paper leaves open:
- The budget control (`budget_control`). Default "schedule": inside the window the target
  b_t falls cubically (as AdaLoRA's budget) from C at init (11/12 at the default γ, ζ) to b at 3/4 of
  the window and then holds at b. The task gradient alone reaches the logits through the optimizer
  (no λ term in the loss); after each optimizer step the logits move by -μ·∂C/∂logit with the
  multiplier μ solved (a two-level grid search with a secant step, on the device) so that C = b_t: the gradient step
  of the Lagrangian term μ·(C - b_t) whose μ is the one that satisfies the constraint, instead of
  an ascended one. `salora/lambda` logs Λ = Σμ (it rises while b_t falls and settles in the hold).
  Two more pieces make it independent of the run length: the optimizer's own move of the logits is
  scaled by max(1, min(10 / window steps, 0.1) / gate_lr) (Adam moves a logit by at most ~gate_lr a step, so
  with the paper's 0.01 a 60-step window, a 200-step run, cannot move them the ~2.4 units that
  C = 0.5 needs; from a 1,000-step window on the step is the paper's), and over the hold the
  logits' distances from the ĝ > 0 threshold grow 20× (C kept on b), so the gates end decisively
  on one side: the realised density (ĝ > 0) equals C, and the exact selection at the freeze keeps
  the ranks the gates chose. Without the sharpening C = b left the realised density 0.08-0.09
  under b (tiny MLP at 100 steps: 0.422 at b = 0.5; experiments/salora_budget.py at 2,000 steps:
  0.375 at b = 0.464).
  "paper" is Eq. 12: the term λ·(C - b)² in the loss, λ ascended after each optimizer step inside
  the window by the gradient of the loss w.r.t. λ at the parameters that loss was computed at
  (simultaneous gradient descent-ascent, Algorithm 1): `λ ← max(0, λ + η_c·(C_t - b)²)`. In the
  linear-quadratic form `λ1 ← λ1 + η_c·(C_t - b)` is not projected: it is the multiplier of an
  equality constraint, so its sign is free (as in the two-multiplier form of Wang et al. 2020).
  Measured (experiments/salora_budget.py, the note of issue 14): at T = 200 / 1,000 / 5,000 steps
  "paper" ends the window at C - b = +0.47 / +0.29 at T = 200 / 1,000 (3 seeds, b = 0.36-0.50: never
  reached), "schedule" at |C - b| < 1e-3 and |realised - b| <= 0.01 at T = 200 / 1,000 / 5,000.
  λ (and Λ, μ) are device tensors updated in place: no host sync per step.
- `η_c` is constant: no LR schedule scales the gate group (the optimizer pre-step hook resets groups
  that carry `loraforge_constant_lr`, core/driver.py), as Algorithm 1 writes it. Gates move only
  inside the window: outside it the forward does not use the logits (or uses them detached), there
  is no λ term, and after every step outside the window their `.grad` is set to None, so AdamW
  applies neither momentum nor weight decay to them.
- At the end of the window the gates freeze: `select_gates` with the config's `prune_budget` sets the
  gate every later forward, eval, merge and export uses, so the last part of training adapts to
  exactly the ranks the export keeps. "exact" keeps, over all modules, the ranks with the highest
  deterministic gate (ties broken by P(g > 0)) until the kept parameter count reaches b of the total
  (it overshoots by less than one rank of the widest module). A kept rank whose ĝ is 0 takes its
  expected gate E[g] (its average weight while the gates were sampled, so the model changes least).
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Optional

import torch

from ..core import sharding
from ..core.config import require
from ..core.driver import CONSTANT_LR, Controller
from ..core.layer import ForgeLinear
from .layer import BUDGET_CODES, GateSampler, HardConcreteGate, expected_gate, phase_at, prob_nonzero
from .orth import orth_penalty
from .report import ModuleGates, format_table, summarize, write_summary

logger = logging.getLogger("loraforge.salora")

#: How far the exported density may sit from target_density before training ends with a warning.
DENSITY_WARN_GAP = 0.1
#: Fewer window steps than this and train begin warns that the budget may not be reached (on the
#: quickstart, b = 0.5: a 12-step window ended with C = 0.42, an 18-step one with C = 0.500).
MIN_WINDOW_STEPS = 16
# The "schedule" budget control (see the module docstring for the measurements behind these):
#: share of the window after which the target b_t has fallen (cubically) from C at init to b and holds.
SCHEDULE_END = 0.75
#: over the hold (the last 1 - SCHEDULE_END of the window) the logits' distances from the ĝ > 0 threshold grow
#: by this factor, so the gates end decisively on either side of it (realised density = C = b).
SHARPEN = 20.0
#: logit units the gates can at least travel over the window (their step is scaled up to allow it).
GATE_TRAVEL = 10.0
#: ... but the scaled step stays <= this many logit units a step: a larger one lets the task's move outrun the
#: budget's (<= 1 unit a step) in windows under 100 steps (measured: an 18-step window ended at C = 0.53, b = 0.5).
GATE_STEP_MAX = 0.1
#: Points of each of the two grids that bracket the per-step multiplier μ in [-1, 1] (the second spans one
#: cell of the first, so μ is bracketed to 2 / 63² = 5e-4 before the secant step; C is then within ~1e-7 of b_t).
GRID_POINTS = 64


def gate_axes(layers: list[ForgeLinear], adapter: str) -> list[HardConcreteGate]:
    return [axis for layer in layers for axis in layer.forge_axes.get(adapter, []) if isinstance(axis, HardConcreteGate)]


def module_gates(axes: list[HardConcreteGate]) -> list[ModuleGates]:
    return [ModuleGates(a.layer.forge_name, a.logits().detach(), a.eval_gate().detach(),
                        a.layer.in_features, a.layer.out_features) for a in axes]


@torch.no_grad()
def select_gates(axes: list[HardConcreteGate], budget: str) -> list[torch.Tensor]:
    """The gate each module keeps after pruning with `budget` ("gate" or "exact"); 0 = pruned."""
    cfg = axes[0].config
    det = [a.deterministic().detach().float() for a in axes]
    if budget == "gate":
        return det
    if budget != "exact":
        raise ValueError(f"budget: must be 'gate' or 'exact', got {budget!r}")
    prob = torch.cat([prob_nonzero(a.logits().detach().float(), cfg.temperature, cfg.gamma, cfg.zeta) for a in axes]).cpu()
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
    for a, g in zip(axes, det):
        n = g.numel()
        k = keep[offset:offset + n].to(g.device)
        mean = expected_gate(a.logits().float(), cfg.temperature, cfg.gamma, cfg.zeta).clamp_min(torch.finfo(torch.float32).tiny)
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
        for c in getattr(driver, "controllers", []):
            if isinstance(c, SaLoRAController):
                c.sync()
    return ranks


def gate_summary(model: torch.nn.Module, adapter: str = "default") -> dict:
    """Densities (target, expected, realized, export) and per-module ranks of a SaLoRA adapter."""
    axes = _salora_groups(model, adapter).get(adapter)
    if not axes:
        raise ValueError(f"no SaLoRA adapter named {adapter!r} in the model")
    return summarize(module_gates(axes), axes[0].config)


class SaLoRAController(Controller):
    supports_sharded_weights = True  # it reads A, B and the logits through core/sharding.py
    salora = True  # marks the controller the gate axes re-sync after a load
    needs_trainer = (
        "SaLoRA adds its orthogonal regulariser and budget term λ·(C - b)² to the loss and trains its gates "
        "with their own learning rate gate_lr, which a plain trainer does not do"
    )
    leaves_parameters_unused = "its gate logits get no gradient outside the gate window"

    def __init__(self, driver) -> None:
        super().__init__(driver)
        self.config = driver.config
        self.axes = gate_axes(self.layers, self.adapter)
        self.rank_weight = torch.cat([
            torch.full((a.layer.r[self.adapter],), float(a.layer.in_features + a.layer.out_features)) for a in self.axes
        ])
        self.total_weight = float(self.rank_weight.sum())
        self._constants: dict = {}  # (name, device) -> tensor made once (`_constant`)
        self.sampler = GateSampler(self.axes)  # all layers' gates in one draw per forward
        self._last_density: Optional[torch.Tensor] = None
        self._snapshot: Optional[torch.Tensor] = None  # all logits before the step, flat ("schedule")
        self._snapshot_valid = False
        self.sync()

    # state -----------------------------------------------------------------------------------
    def sync(self) -> None:
        """Read the persisted state (window, freeze, λ, step) into Python and set the axes' phases."""
        axis = self.axes[0]
        self.start, self.end, self.frozen = axis.window_state()
        # λ (and λ1) live on the device, as one tensor the loss reads and `on_step_end` updates in place:
        # no host sync per step. The layers' buffers get a copy after each update (they are what is saved).
        self.lam_state = axis.layer.lora_salora_lambda[self.adapter].detach().clone().float()
        self.step = self.driver.step
        self.sampler.forget()
        self._set_phases()

    @property
    def lam(self) -> float:
        return float(self.lam_state[0])  # host sync: for logging and reports only

    @property
    def lam_linear(self) -> float:
        return float(self.lam_state[1])

    def _set_phases(self) -> None:
        phase = phase_at(self.step, self.start, self.end, self.frozen)
        for axis in self.axes:
            axis.phase = phase
        if phase != "sample":
            for axis in self.axes:
                axis.log_alpha.grad = None

    def _write(self, name: str, values: list, index: slice) -> None:
        src = None
        for axis in self.axes:
            buf = getattr(axis.layer, name)[self.adapter]
            if src is None or src.device != buf.device:
                src = torch.tensor(values, dtype=buf.dtype, device=buf.device)
            buf[index] = src

    def _write_lambda(self) -> None:
        bufs = [a.layer.lora_salora_lambda[self.adapter] for a in self.axes]
        src = self.lam_state
        torch._foreach_copy_(bufs, [src if b.device == src.device else src.to(b.device) for b in bufs])

    def in_window(self) -> bool:
        return not self.frozen and 0 <= self.start <= self.step < self.end

    # quantities ------------------------------------------------------------------------------
    def expected_density(self) -> torch.Tensor:
        """C = Σ_i P(g_i > 0)·(d_in + d_out) / Σ_i (d_in + d_out) over all ranks: one op chain."""
        cfg = self.config
        logits = self.sampler.logits(fresh=False)
        weight = self._constant("weight", logits.device, lambda: self.rank_weight.view(logits.shape))
        return (prob_nonzero(logits.float(), cfg.temperature, cfg.gamma, cfg.zeta) * weight).sum() / self.total_weight

    def factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(A_i for every layer, B_i for every layer): the one place the regulariser reads the factors;
        whole, with their gradients, under FSDP / ZeRO-3 (core/sharding.py)."""
        return ([sharding.whole(a.layer, "lora_A", self.adapter) for a in self.axes],
                [sharding.whole(a.layer, "lora_B", self.adapter) for a in self.axes])

    def orth_loss(self, scale: float = 1.0) -> torch.Tensor:
        """scale · Σ_i ||B_iᵀB_i - I||_F² + ||A_iA_iᵀ - I||_F² (float32), batched over same-shape factors."""
        return orth_penalty(*self.factors(), scale=scale)

    # protocol --------------------------------------------------------------------------------
    def begin(self, max_steps: Optional[int]) -> None:
        self.sync()
        if self.config.budget_control == "schedule":
            # The schedule control moves every logit after the step from C over ALL of them (`_land`):
            # on sharded logits each rank would solve for its own shard. Not built yet: refuse it.
            where = next((sharding.engine(a.log_alpha) for a in self.axes if sharding.engine(a.log_alpha)), None)
            require(where is None, "budget_control",
                    f"'schedule' does not run on {where}-sharded gate logits yet; set budget_control='paper' under "
                    "FSDP / ZeRO-3 (or train with DDP, where the schedule works). No parameter has been updated.")
        if self.start < 0:
            self.start, self.end = self.config.resolve_window(max_steps)
            self._write("lora_salora_window", [self.start, self.end], slice(0, 2))
            if self.end - self.start < MIN_WINDOW_STEPS:
                warnings.warn(f"SaLoRA: the gates train on {self.end - self.start} optimizer step(s) only (steps "
                      f"{self.start + 1}..{self.end} of {max_steps}); with fewer than {MIN_WINDOW_STEPS} the density "
                      f"may end away from target_density={self.config.target_density}. Train longer (the default window "
                      f"is 0.2-0.5 of max_steps) or give window_start / window_end as step counts", stacklevel=2)
        elif max_steps is not None and self.end > max_steps and not self.frozen:
            warnings.warn(f"SaLoRA: the saved window ends at step {self.end}, after this run's last step {max_steps}: "
                          "the gates will not freeze and the budget may not be met", stacklevel=2)
        self._set_phases()
        logger.info("SaLoRA: gates train on optimizer steps %d..%d of %s (target density %.3f, gate lr %g, "
                    "orthogonal term %s over %d layers, %s Lagrangian)", self.start + 1, self.end, max_steps,
                    self.config.target_density, self.config.gate_lr, self.config.orth_reg_reduction, len(self.axes),
                    self.config.lagrangian)

    def regularization_loss(self) -> Optional[torch.Tensor]:
        cfg = self.config
        loss = None
        if cfg.orth_reg_weight:
            k = len(self.axes) if cfg.orth_reg_reduction == "mean" else 1
            loss = self.orth_loss(scale=cfg.orth_reg_weight / k)  # β·R_orth (/ K): the scale applied inside
        if self.in_window():
            if cfg.budget_control == "paper":
                density = self.expected_density()
                self._last_density = density.detach()
                lam = self.lam_state.to(density.device, copy=True)  # on_step_end updates lam_state in place
                gap = density - cfg.target_density
                term = lam[0] * gap ** 2
                if cfg.lagrangian == "linear_quadratic":
                    term = term + lam[1] * gap
                loss = term if loss is None else loss + term
            else:
                # "schedule": no term in the loss, the budget step follows the optimizer's (`_step_schedule`)
                self._take_snapshot()
        return loss

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        """The logits before the optimizer step, into one flat buffer kept for the run (one op)."""
        self._snapshot, self._snapshot_valid = self._flat_logits(out=self._snapshot), True

    @torch.no_grad()
    def _flat_logits(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All logits of the adapter concatenated, float32, on the first layer's device; written into `out`
        when it fits (same size, dtype, device), so a buffer kept across steps costs no allocation."""
        logits = [a.log_alpha for a in self.axes]  # no_grad: no graph, and no per-layer detach op
        device = logits[0].device
        if any(x.device != device or x.dtype != torch.float32 for x in logits):
            return torch.cat([x.float().to(device) for x in logits])  # layers spread over devices, or not fp32
        n = sum(x.numel() for x in logits)
        if out is None or out.numel() != n or out.device != device or out.dtype != torch.float32:
            return torch.cat(logits)
        return torch.cat(logits, out=out)

    # the budget control ----------------------------------------------------------------------
    def target_at(self, step: int) -> float:
        """b_t, the density the "schedule" control holds at optimizer step `step` (1-based)."""
        cfg = self.config
        c0 = 1.0 / (1.0 + math.exp(cfg.temperature * math.log(-cfg.gamma / cfg.zeta)))  # P(g > 0) at logit 0
        u = min(1.0, max(0.0, (step - self.start) / ((self.end - self.start) * SCHEDULE_END)))
        return cfg.target_density + max(0.0, c0 - cfg.target_density) * (1.0 - u) ** 3

    def gate_gain(self) -> float:
        """How many times the optimizer's own gate step the "schedule" control applies (>= 1)."""
        lr = self.config.gate_lr
        return max(1.0, min(GATE_TRAVEL / (self.end - self.start), GATE_STEP_MAX) / lr)

    @torch.no_grad()
    def _step_schedule(self, step: int) -> None:
        """After the optimizer moved the logits (by the task's gradient alone): scale that move by
        `gate_gain`, then move the logits along -∂C/∂logit by the multiplier μ that lands C on b_t
        (the gradient step of μ·(C - b_t) whose μ is solved on the monotone C(μ) rather than
        ascended), and in the hold also sharpen them (away from the ĝ > 0 threshold, C kept on b_t).
        All of it runs on the logits concatenated into one float32 vector, written back to the layers by
        one multi-tensor copy: the op count does not grow with the number of layers."""
        cfg = self.config
        la = self._flat_logits()
        gain = self.gate_gain()
        if self._snapshot_valid and gain > 1.0:
            la = torch.lerp(self._snapshot, la, gain)  # snapshot + gain · (the optimizer's move)
        self._snapshot_valid = False
        target = self.target_at(step)
        la, mu = self._land(la, target)
        # Λ (the multiplier summed over the window: rises, then settles) and μ of this step, in one op.
        lam, mu = self.lam_state, mu.to(self.lam_state.device)
        lam.copy_(torch.stack((lam[0] + mu, mu)))
        window = self.end - self.start
        if step - self.start > window * SCHEDULE_END:
            threshold = math.log(-cfg.gamma / cfg.zeta)  # ĝ > 0 ⟺ logit > log(-γ/ζ)
            factor = SHARPEN ** (1.0 / max(1.0, window * (1.0 - SCHEDULE_END)))
            la = (la - threshold).mul_(factor).add_(threshold)
            la, _ = self._land(la, target)  # part of the sharpening, not of the multiplier's work
        sizes = self.sampler.sizes
        parts = la.view(len(sizes), sizes[0]).unbind(0) if self.sampler.same_rank else la.split(sizes)
        torch._foreach_copy_([a.log_alpha.data for a in self.axes], list(parts))

    def _land(self, la: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`la` (all logits, float32) moved by -μ·∂C/∂logit, scaled so the largest move is |μ| <= 1 logit
        unit, with μ such that C = target (or as near as one such step gets); returns (moved logits, μ).

        μ solves the monotone C(μ) = target on [-1, 1]: C is evaluated on a grid of μ at once (one outer
        product, one sigmoid, one matrix-vector product), the cell where it crosses the target is gridded
        again, and a secant step in that cell gives μ; a target out of reach ends at μ = ±1. About 30 ops
        whatever the number of layers, no host sync, and no iteration that can diverge where the sigmoids
        saturate (a plain Newton step does)."""
        cfg = self.config
        # (d_in + d_out) / Σ, so C = weight · P(g > 0)
        weight = self._constant("share", la.device, lambda: self.rank_weight / self.total_weight)
        shifted = la - cfg.temperature * math.log(-cfg.gamma / cfg.zeta)
        p = torch.sigmoid(shifted)
        direction = torch.addcmul(p, p, p, value=-1.0).mul_(weight)  # p (1 - p) w: -∂C/∂logit
        direction.div_(direction.max().clamp_min_(1e-30))
        n, step = GRID_POINTS, 2.0 / (GRID_POINTS - 1)
        cells = self._constant("cells", la.device, lambda: torch.arange(n, dtype=torch.float32))  # grid index 0..n-1

        def bracket(grid: torch.Tensor, width: float):
            """The first point of `grid` (spacing `width`) where C <= target, C at it and at the point before."""
            density = torch.sigmoid(torch.addr(shifted, grid, direction, alpha=-1.0)) @ weight  # C(μ) on the grid
            k = (density > target).sum().clamp_(1, n - 1)  # C decreases along the grid
            pair = density[torch.stack((k - 1, k))]
            return grid[0] + (k - 1) * width, pair

        lo, _ = bracket(cells * step - 1.0, step)
        fine = step / (n - 1)
        a, (c_a, c_b) = bracket(cells * fine + lo, fine)
        share = ((c_a - target) / (c_a - c_b).clamp_min(1e-30)).clamp_(0.0, 1.0)  # secant inside the cell
        mu = a + share * fine
        return torch.addcmul(la, mu, direction, value=-1.0), mu

    def _constant(self, name: str, device: torch.device, make) -> torch.Tensor:
        """`make()` (a CPU tensor) moved to `device`, made once per name and device."""
        key = (name, device)
        if key not in self._constants:
            self._constants[key] = make().to(device)
        return self._constants[key]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": [a.log_alpha for a in self.axes], "lr": self.config.gate_lr, "weight_decay": 0.0,
                 CONSTANT_LR: self.config.gate_lr, "name": "salora_gates"}]

    def before_step(self) -> None:
        # Outside the window the logits must take no step: FSDP1 hands every parameter a gradient
        # (zeros where none flowed), which AdamW would turn into momentum and a step count.
        if not self.in_window():
            for axis in self.axes:
                axis.log_alpha.grad = None

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: Optional[int]) -> None:
        was_inside = self.in_window()  # the step just taken (number `step`) ran inside the window
        self.step = step
        self.sampler.forget()  # the logits moved (in place; a fused optimizer does not bump their versions)
        if was_inside:
            if self.config.budget_control == "paper":
                density = self._last_density if self._last_density is not None else self.expected_density().detach()
                lam, gap = self.lam_state, density.to(self.lam_state.device) - self.config.target_density
                lam[0] = (lam[0] + self.config.gate_lr * gap ** 2).clamp_min(0.0)
                if self.config.lagrangian == "linear_quadratic":
                    lam[1] = lam[1] + self.config.gate_lr * gap
            else:
                self._step_schedule(step)
            self._write_lambda()
        self._last_density = None
        self._snapshot_valid = False
        if not self.frozen and self.start >= 0 and step >= self.end:
            freeze_gates(self.axes, self.config.prune_budget)
            self.frozen = self.config.prune_budget
            s = self.summary()
            logger.info("SaLoRA: gates frozen after step %d with prune_budget=%r: export density %.3f (target %.3f, "
                        "expected %.3f, ĝ>0 %.3f)", step, self.frozen, s["export_density"], s["target_density"],
                        s["expected_density"], s["realized_density"])
        self._set_phases()

    @torch.no_grad()
    def summary(self) -> dict:
        return summarize(module_gates(self.axes), self.config)

    @torch.no_grad()
    def log_values(self) -> dict[str, float]:
        s = self.summary()
        out = {
            "salora/expected_density": s["expected_density"],
            "salora/realized_density": s["realized_density"],
            "salora/export_density": s["export_density"],
            "salora/lambda": self.lam,
            **({"salora/target_density_now": self.target_at(max(self.step, self.start)) if self.start >= 0 else 0.0}
               if self.config.budget_control == "schedule" else {}),
            "salora/orth_loss": float(self.orth_loss()) / len(self.axes),
            "salora/live_ranks": float(s["live_ranks"]),
        }
        if self.config.lagrangian == "linear_quadratic":
            out["salora/lambda_linear"] = self.lam_linear
        return out

    def on_train_end(self, output_dir: Optional[str]) -> None:
        s = self.summary()
        table = format_table(s)
        logger.info("SaLoRA ranks after training:\n%s", table)
        if output_dir and _main_process():
            from .plot import heatmap_title, rank_heatmap

            os.makedirs(output_dir, exist_ok=True)
            write_summary(s, os.path.join(output_dir, "salora_ranks.json"))
            with open(os.path.join(output_dir, "salora_ranks.txt"), "w") as f:
                f.write(table + "\n")
            rank_heatmap({r["module"]: r["export_rank"] for r in s["modules"]}, os.path.join(output_dir, "salora_ranks.png"),
                         r_max=max(r["r"] for r in s["modules"]),
                         title=heatmap_title(s))
        if not self.frozen:
            _warn(f"SaLoRA: training ended at step {self.step}, before the gates froze at the end of the window "
                  f"(step {self.end}); merge and export use the deterministic gates. Call "
                  "loraforge.salora.prune(model) to freeze them with prune_budget.")
        if abs(s["export_density"] - s["target_density"]) > DENSITY_WARN_GAP:
            _warn(f"SaLoRA: the adapter keeps {s['export_density']:.3f} of its parameters (realized density: ranks "
                  f"with deterministic gate > 0: {s['realized_density']:.3f}) but target_density is "
                  f"{s['target_density']:.3f} (expected density C = {s['expected_density']:.3f}). To export exactly "
                  "the budget, train with SaLoRAConfig(prune_budget='exact') or call "
                  "loraforge.salora.prune(model, budget='exact') before export.")

    def export_metadata(self) -> dict:
        s = self.summary()
        return {"salora": {
            "target_density": s["target_density"], "expected_density": s["expected_density"],
            "realized_density": s["realized_density"], "export_density": s["export_density"],
            "prune_budget": self.frozen or "unfrozen (deterministic gates)", "lambda": self.lam,
            "lambda_linear": self.lam_linear, "window": [self.start, self.end], "step": self.step,
            "orth_reg_reduction": self.config.orth_reg_reduction, "lagrangian": self.config.lagrangian,
        }}


def _main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
