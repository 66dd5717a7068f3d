"""SaLoRA's training dynamics: the controller of one adapter's gates, budget and orthogonal term.

Objective: `L = L_task + β·R_orth + [inside the window] λ·(C - b)²`
(`lagrangian="linear_quadratic"`: `λ1·(C - b) + λ2·(C - b)²`), with
- `R_orth = Σ_i ||B_iᵀB_i - I||_F² + ||A_i A_iᵀ - I||_F²`, divided by the number of adapted layers K
  for `orth_reg_reduction="mean"` (default; docs/methods.md, "SaLoRA: the orthogonal term and its
  reduction") or summed ("sum", Eq. 10);
- `C` the parameter-weighted expected density (closed-form expected L0, Eq. 8/11).

Decisions the paper leaves open:
- The budget control (`budget_control`): how C is driven to b inside the window, one strategy
  object per value (budget.py: "paper", Eq. 12, the default, and "schedule").
- `η_c` is constant: no LR schedule scales the gate group (the optimizer pre-step hook resets groups
  that carry `loraforge_constant_lr`, core/optimizer_hooks.py), as Algorithm 1 writes it. Gates move only
  inside the window: outside it the forward does not use the logits (or uses them detached), there
  is no λ term, and after every step outside the window their `.grad` is set to None, so AdamW
  applies neither momentum nor weight decay to them.
- At the end of the window the gates freeze to the ranks `prune_budget` keeps (prune.py).
"""
from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch

from ..core import sharding
from ..core.controller import CONSTANT_LR, Controller
from ..core.errors import require
from .budget import BUDGETS
from .layer import GateSampler, phase_at, prob_nonzero
from .orth import orth_penalty
from .outputs import write_outputs
from .prune import freeze_gates, gate_axes, module_gates
from .report import format_table, summarize

logger = logging.getLogger("loraforge.salora")

#: How far the exported density may sit from target_density before training ends with a warning.
DENSITY_WARN_GAP = 0.1
#: Fewer window steps than this and train begin warns that the budget may not be reached (on the
#: quickstart, b = 0.5: a 12-step window ended with C = 0.42, an 18-step one with C = 0.500).
MIN_WINDOW_STEPS = 16


class SaLoRAController(Controller):
    supports_sharded_weights = True  # it reads A, B and the logits through core/sharding.py
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
        self._constants: dict = {}  # (name, device) -> tensor made once (`constant`)
        self.sampler = GateSampler(self.axes)  # all layers' gates in one draw per forward
        self._budgets: dict = {}  # budget_control -> its strategy object (budget.py)
        self.sync()

    @property
    def budget(self):
        """The strategy of the config's `budget_control` (budget.py), made once per value."""
        name = self.config.budget_control
        if name not in self._budgets:
            self._budgets[name] = BUDGETS[name](self)
        return self._budgets[name]

    # state -----------------------------------------------------------------------------------
    def refresh(self) -> None:
        self.sync()

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
    def expected_density(self, whole_logits: Optional[list] = None) -> torch.Tensor:
        """C = Σ_i P(g_i > 0)·(d_in + d_out) / Σ_i (d_in + d_out) over all ranks: one op chain (from
        `whole_logits`, each layer's whole logits, when the caller read them already)."""
        cfg = self.config
        logits = self.sampler.logits(fresh=False, params=whole_logits)
        weight = self.constant("weight", logits.device, lambda: self.rank_weight.view(logits.shape))
        return (prob_nonzero(logits.float(), cfg.temperature, cfg.gamma, cfg.zeta) * weight).sum() / self.total_weight

    def read(self, factors: bool = True, logits: bool = False) -> tuple[list, list, list]:
        """(A_i, B_i, logits_i for every layer; [] for what is not asked): the one place the loss terms and
        the logs read them. Whole, with their gradients in grad mode, under FSDP / ZeRO-3: all of them
        in one call, one collective when they must be gathered (core/sharding.py)."""
        names = (["lora_A", "lora_B"] if factors else []) + (["lora_gate_logits"] if logits else [])
        values = sharding.whole_many([(a.layer, name, self.adapter) for name in names for a in self.axes])
        k = len(self.axes)  # `values` is [A…, B…] if factors, then [logits…] if logits
        return (values[:k] if factors else [], values[k:2 * k] if factors else [],
                values[len(values) - k:] if logits else [])

    def factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(A_i for every layer, B_i for every layer), whole (see `read`)."""
        return self.read()[:2]

    def orth_loss(self, scale: float = 1.0, factors: Optional[tuple] = None) -> torch.Tensor:
        """scale · Σ_i ||B_iᵀB_i - I||_F² + ||A_iA_iᵀ - I||_F² (float32), batched over same-shape factors
        (`factors`: (A list, B list) read already)."""
        return orth_penalty(*(factors or self.factors()), scale=scale)

    # protocol --------------------------------------------------------------------------------
    def begin(self, max_steps: Optional[int]) -> None:
        self.sync()
        self.budget.begin()
        # Measured on DeepSpeed 0.19.8 (2 CPU ranks): the first step after such a resume fails in backward,
        # the orthogonal term's gradient meeting a lora_B that ZeRO-3 holds partitioned.
        require(self.step == 0 or not any(getattr(p, "ds_persist", False) for p in self.driver.parameters()),
                "stage3_param_persistence_threshold",
                "SaLoRA does not resume under DeepSpeed ZeRO-3 while adapter tensors stay whole under the persistence "
                "threshold; set zero_optimization.stage3_param_persistence_threshold: 0 in the DeepSpeed config to "
                "resume (every tensor partitioned). No parameter has been updated.")
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
        window = self.in_window()
        a, b, logits = self.read(factors=bool(cfg.orth_reg_weight), logits=window and self.budget.reads_logits)
        if cfg.orth_reg_weight:
            k = len(self.axes) if cfg.orth_reg_reduction == "mean" else 1
            loss = self.orth_loss(cfg.orth_reg_weight / k, (a, b))  # β·R_orth (/ K): the scale applied inside
        if window:
            term = self.budget.loss(logits or None)
            if term is not None:
                loss = term if loss is None else loss + term
        return loss

    def constant(self, name: str, device: torch.device, make) -> torch.Tensor:
        """`make()` (a CPU tensor) moved to `device`, made once per name and device."""
        key = (name, device)
        if key not in self._constants:
            self._constants[key] = make().to(device)
        return self._constants[key]

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": [a.log_alpha for a in self.axes], "lr": self.config.gate_lr, "weight_decay": 0.0,
                 CONSTANT_LR: self.config.gate_lr, "name": "salora_gates"}]

    def idle_groups(self) -> set[str]:
        return set() if self.in_window() else {"salora_gates"}

    def before_step(self) -> None:
        # Outside the window the logits must take no step: FSDP1 hands every parameter a gradient
        # (zeros where none flowed), which AdamW would turn into momentum and a step count.
        if not self.in_window():
            for axis in self.axes:
                axis.log_alpha.grad = None
        else:
            self.budget.before_step()

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: Optional[int]) -> None:
        was_inside = self.in_window()  # the step just taken (number `step`) ran inside the window
        self.step = step
        self.sampler.forget()  # the logits moved (in place; a fused optimizer does not bump their versions)
        if was_inside and not getattr(self.driver, "step_skipped", False):  # a skipped (non-finite) step moves nothing
            self.budget.after_step(step)
            self._write_lambda()
        self.budget.stepped()
        if not self.frozen and self.start >= 0 and step >= self.end:
            freeze_gates(self.axes, self.config.prune_budget)
            self.frozen = self.config.prune_budget
            s = self.summary()
            logger.info("SaLoRA: gates frozen after step %d with prune_budget=%r: export density %.3f (target %.3f, "
                        "expected %.3f, ĝ>0 %.3f)", step, self.frozen, s["export_density"], s["target_density"],
                        s["expected_density"], s["realized_density"])
        self._set_phases()

    @torch.no_grad()
    def summary(self, whole_logits: Optional[list] = None) -> dict:
        return summarize(module_gates(self.axes, whole_logits), self.config)

    @torch.no_grad()
    def log_values(self) -> dict[str, float]:
        a, b, logits = self.read(factors=True, logits=True)
        s = self.summary(logits)
        out = {
            "salora/expected_density": s["expected_density"],
            "salora/realized_density": s["realized_density"],
            "salora/export_density": s["export_density"],
            "salora/lambda": self.lam,
            **self.budget.log_values(),
            "salora/orth_loss": float(self.orth_loss(factors=(a, b))) / len(self.axes),
            "salora/live_ranks": float(s["live_ranks"]),
        }
        if self.config.lagrangian == "linear_quadratic":
            out["salora/lambda_linear"] = self.lam_linear
        return out

    def on_train_end(self, output_dir: Optional[str]) -> None:
        s = self.summary()
        logger.info("SaLoRA ranks after training:\n%s", format_table(s))
        if output_dir:
            write_outputs(s, output_dir)
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


def _warn(message: str) -> None:
    logger.warning(message)
    warnings.warn(message, stacklevel=3)
