"""SaLoRA's budget controls: how the expected density C is driven to the target b inside the window.

One small strategy object per `budget_control` value, made by the controller (model.py) for its
adapter; the controller calls `loss()` when the loss is formed, `after_step(step)` after an optimizer
step taken inside the window, and `log_values()` when the trainer logs.

"schedule" (the default is "paper", below: on SmolLM2 the schedule's adapter trained worse,
see config.py): inside the window the target
b_t falls cubically (as AdaLoRA's budget) from C at init (11/12 at the default γ, ζ) to b at 3/4 of
the window and then holds at b. The task gradient alone reaches the logits through the optimizer
(no λ term in the loss); after each optimizer step the logits move by -μ·∂C/∂logit with the
multiplier μ solved (a two-level grid search with a secant step, on the device) so that C = b_t: the
gradient step of the Lagrangian term μ·(C - b_t) whose μ is the one that satisfies the constraint, instead of
an ascended one. `salora/lambda` logs Λ = Σμ (it rises while b_t falls and settles in the hold).
Two more pieces make it independent of the run length: the optimizer's own move of the logits is
scaled by max(1, min(10 / window steps, 0.1) / gate_lr) (Adam moves a logit by at most ~gate_lr a
step, so with the paper's 0.01 a 60-step window, a 200-step run, cannot move them the ~2.4 units that
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

Measured (experiments/salora_budget.py; docs/methods.md, "SaLoRA: budget control"): at T = 200 / 1,000 / 5,000 steps
"paper" ends the window at C - b = +0.47 / +0.29 at T = 200 / 1,000 (3 seeds, b = 0.36-0.50: never
reached), "schedule" at |C - b| < 1e-3 and |realised - b| <= 0.01 at T = 200 / 1,000 / 5,000.
λ (and Λ, μ) are device tensors updated in place: no host sync per step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..core import sharding
from ..core.errors import require

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


class PaperBudget:
    """Eq. 12: λ·(C - b)² in the loss (λ1·(C - b) + λ2·(C - b)² for "linear_quadratic"), λ ascended."""

    def __init__(self, controller) -> None:
        self.c = controller
        self._last_density: Optional[torch.Tensor] = None

    #: The loss term reads the whole logits (the controller reads them with the factors, one call).
    reads_logits = True

    def begin(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def loss(self, logits: Optional[list] = None) -> torch.Tensor:
        """λ·(C - b)² (+ λ1·(C - b)) at the whole `logits` of every layer (None: read them here)."""
        cfg = self.c.config
        density = self.c.expected_density(logits)
        self._last_density = density.detach()
        lam = self.c.lam_state.to(density.device, copy=True)  # after_step updates lam_state in place
        gap = density - cfg.target_density
        term = lam[0] * gap ** 2
        if cfg.lagrangian == "linear_quadratic":
            term = term + lam[1] * gap
        return term

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """λ ← max(0, λ + η_c·(C_t - b)²) at the C the step's loss was computed at (λ1 unprojected)."""
        cfg, c = self.c.config, self.c
        density = self._last_density if self._last_density is not None else c.expected_density().detach()
        lam, gap = c.lam_state, density.to(c.lam_state.device) - cfg.target_density
        lam[0] = (lam[0] + cfg.gate_lr * gap ** 2).clamp_min(0.0)
        if cfg.lagrangian == "linear_quadratic":
            lam[1] = lam[1] + cfg.gate_lr * gap

    def stepped(self) -> None:
        self._last_density = None

    def log_values(self) -> dict[str, float]:
        return {}


class ScheduleBudget:
    """A target b_t falling from C at init to b, on which C is landed after every step (see module doc)."""

    def __init__(self, controller) -> None:
        self.c = controller
        self._snapshot: Optional[torch.Tensor] = None  # all logits before the step, flat
        self._snapshot_valid = False

    reads_logits = False

    def begin(self) -> None:
        # On ZeRO-3 partitions the rank's writes would also have to reach DeepSpeed's fp32 master copies: not
        # verified, refused. (Logits under its persistence threshold stay whole on every rank: those it runs on.)
        where = [a for a in self.c.axes
                 if sharding.engine(a.log_alpha) == "zero3" and not getattr(a.log_alpha, "ds_persist", False)]
        require(not where, "budget_control",
                "'schedule' does not run on zero3-sharded gate logits yet; set budget_control='paper' under ZeRO-3 "
                "(FSDP and DDP run the schedule) or keep the logits whole (stage3_param_persistence_threshold above "
                "their size). No parameter has been updated.")

    def sharded(self) -> bool:
        """Whether this rank holds only shards of the logits (FSDP / ZeRO-3) outside the forward."""
        return any(sharding.engine(a.log_alpha) is not None for a in self.c.axes)

    def loss(self, logits: Optional[list] = None) -> None:
        # No term in the loss: the budget step follows the optimizer's (`after_step`). The logits before the
        # step: here in one op; sharded, in `before_step`, where every engine holds them as shards again.
        if not self.sharded():
            self._take_snapshot()
        return None

    @torch.no_grad()
    def before_step(self) -> None:
        if self.sharded():  # this rank's elements only: the lerp of `after_step` is elementwise
            self._snapshot, self._snapshot_valid = self._local_logits(), True

    def stepped(self) -> None:
        self._snapshot_valid = False

    def log_values(self) -> dict[str, float]:
        c = self.c
        return {"salora/target_density_now": self.target_at(max(c.step, c.start)) if c.start >= 0 else 0.0}

    @torch.no_grad()
    def _take_snapshot(self) -> None:
        """The logits before the optimizer step, into one flat buffer kept for the run (one op)."""
        self._snapshot, self._snapshot_valid = self._flat_logits(out=self._snapshot), True

    @torch.no_grad()
    def _flat_logits(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All logits of the adapter concatenated, float32, on the first layer's device; written into `out`
        when it fits (same size, dtype, device), so a buffer kept across steps costs no allocation."""
        logits = [a.log_alpha for a in self.c.axes]  # no_grad: no graph, and no per-layer detach op
        device = logits[0].device
        if any(x.device != device or x.dtype != torch.float32 for x in logits):
            return torch.cat([x.float().to(device) for x in logits])  # layers spread over devices, or not fp32
        n = sum(x.numel() for x in logits)
        if out is None or out.numel() != n or out.device != device or out.dtype != torch.float32:
            return torch.cat(logits)
        return torch.cat(logits, out=out)

    @torch.no_grad()
    def _local_logits(self) -> torch.Tensor:
        """The elements of the logits this rank holds (`sharding.local_flat`), concatenated, float32."""
        return torch.cat([sharding.local_flat(a.log_alpha)[0].float() for a in self.c.axes])

    @torch.no_grad()
    def _write_local(self, values: torch.Tensor, whole: bool) -> None:
        """Write this rank's elements of the logits from `values`: all logits concatenated (`whole`), or
        this rank's elements of them (as `_local_logits` orders them)."""
        views, parts, offset, mine = [], [], 0, 0
        for a, size in zip(self.c.axes, self.c.sampler.sizes):
            view, start = sharding.local_flat(a.log_alpha)
            if view.numel():
                first = offset + start if whole else mine
                views.append(view)
                parts.append(values[first:first + view.numel()])
            offset, mine = offset + size, mine + view.numel()
        if views:
            torch._foreach_copy_(views, parts)

    # the budget control ----------------------------------------------------------------------
    def target_at(self, step: int) -> float:
        """b_t, the density the "schedule" control holds at optimizer step `step` (1-based)."""
        cfg = self.c.config
        c0 = 1.0 / (1.0 + math.exp(cfg.temperature * math.log(-cfg.gamma / cfg.zeta)))  # P(g > 0) at logit 0
        u = min(1.0, max(0.0, (step - self.c.start) / ((self.c.end - self.c.start) * SCHEDULE_END)))
        return cfg.target_density + max(0.0, c0 - cfg.target_density) * (1.0 - u) ** 3

    def gate_gain(self) -> float:
        """How many times the optimizer's own gate step the "schedule" control applies (>= 1)."""
        lr = self.c.config.gate_lr
        return max(1.0, min(GATE_TRAVEL / (self.c.end - self.c.start), GATE_STEP_MAX) / lr)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After the optimizer moved the logits (by the task's gradient alone): scale that move by
        `gate_gain`, then move the logits along -∂C/∂logit by the multiplier μ that lands C on b_t
        (the gradient step of μ·(C - b_t) whose μ is solved on the monotone C(μ) rather than
        ascended), and in the hold also sharpen them (away from the ĝ > 0 threshold, C kept on b_t).
        All of it runs on the logits concatenated into one float32 vector, written back to the layers by
        one multi-tensor copy: the op count does not grow with the number of layers.

        Sharded (FSDP / ZeRO-3), each rank scales the move of the elements it holds, then all logits are
        gathered (one collective), every rank computes the same μ and sharpening from the whole vector
        and writes back the elements it holds: the ranks end where one process ends."""
        cfg = self.c.config
        sharded = self.sharded()
        la = self._local_logits() if sharded else self._flat_logits()
        gain = self.gate_gain()
        if self._snapshot_valid and gain > 1.0:
            la = torch.lerp(self._snapshot, la, gain)  # snapshot + gain · (the optimizer's move)
            if sharded:
                self._write_local(la, whole=False)
        self._snapshot_valid = False
        if sharded:
            la = torch.cat([x.reshape(-1).float() for x in sharding.gather_many([a.log_alpha for a in self.c.axes])])
        target = self.target_at(step)
        la, mu = self._land(la, target)
        # Λ (the multiplier summed over the window: rises, then settles) and μ of this step, in one op.
        lam, mu = self.c.lam_state, mu.to(self.c.lam_state.device)
        lam.copy_(torch.stack((lam[0] + mu, mu)))
        window = self.c.end - self.c.start
        if step - self.c.start > window * SCHEDULE_END:
            threshold = math.log(-cfg.gamma / cfg.zeta)  # ĝ > 0 ⟺ logit > log(-γ/ζ)
            factor = SHARPEN ** (1.0 / max(1.0, window * (1.0 - SCHEDULE_END)))
            la = (la - threshold).mul_(factor).add_(threshold)
            la, _ = self._land(la, target)  # part of the sharpening, not of the multiplier's work
        if sharded:
            self._write_local(la, whole=True)
        else:
            sizes = self.c.sampler.sizes
            parts = la.view(len(sizes), sizes[0]).unbind(0) if self.c.sampler.same_rank else la.split(sizes)
            torch._foreach_copy_([a.log_alpha.data for a in self.c.axes], list(parts))
        sharding.written([a.log_alpha for a in self.c.axes])  # DeepSpeed's fp32 master copies too

    def _land(self, la: torch.Tensor, target: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`la` (all logits, float32) moved by -μ·∂C/∂logit, scaled so the largest move is |μ| <= 1 logit
        unit, with μ such that C = target (or as near as one such step gets); returns (moved logits, μ).

        μ solves the monotone C(μ) = target on [-1, 1]: C is evaluated on a grid of μ at once (one outer
        product, one sigmoid, one matrix-vector product), the cell where it crosses the target is gridded
        again, and a secant step in that cell gives μ; a target out of reach ends at μ = ±1. About 30 ops
        whatever the number of layers, no host sync, and no iteration that can diverge where the sigmoids
        saturate (a plain Newton step does)."""
        cfg = self.c.config
        # (d_in + d_out) / Σ, so C = weight · P(g > 0)
        weight = self.c.constant("share", la.device, lambda: self.c.rank_weight / self.c.total_weight)
        shifted = la - cfg.temperature * math.log(-cfg.gamma / cfg.zeta)
        p = torch.sigmoid(shifted)
        direction = torch.addcmul(p, p, p, value=-1.0).mul_(weight)  # p (1 - p) w: -∂C/∂logit
        direction.div_(direction.max().clamp_min_(1e-30))
        n, step = GRID_POINTS, 2.0 / (GRID_POINTS - 1)
        cells = self.c.constant("cells", la.device, lambda: torch.arange(n, dtype=torch.float32))  # grid index 0..n-1

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


BUDGETS = {"schedule": ScheduleBudget, "paper": PaperBudget}
