"""Delta-LoRA's training dynamics: take the snapshot after step K, propagate after every step t > K.

Only post-step work, so the global optimizer hook drives it under any trainer or a hand loop; the
step count is core's `layer.lora_forge_step` (restored with checkpoints, so a resume continues the
same trajectory).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..core import finite, sharding
from ..core.controller import Controller
from .layer import DeltaPropagation


class DeltaLoRAController(Controller):
    supports_sharded_weights = True  # factors and W are read and written through core/sharding.py

    def __init__(self, driver) -> None:
        super().__init__(driver)
        self.config = driver.config
        self.start_step = int(self.config.start_step)
        # Created at the latest in the pre-step hook of the first update: with K = 0 the snapshot is
        # the initial factors.
        self._catch_up(driver.step)

    @property
    def axes(self) -> list[DeltaPropagation]:
        # The driver's layers and their axes are fixed for its lifetime (a new adapter makes a new
        # driver), so the per-step work does not rebuild this list.
        if getattr(self, "_axes", None) is None:
            self._axes = [ax for layer in self.layers for ax in layer.forge_axes.get(self.adapter, [])
                          if isinstance(ax, DeltaPropagation)]
        return self._axes

    def _catch_up(self, step: int) -> None:
        missing = [ax for ax in self.axes if not ax.taken]
        if step == self.start_step and missing:
            read = dict(zip(map(id, self.axes), self.whole_factors()))  # one call for all layers
            for ax in missing:
                ax.snapshot(step, read[id(ax)])
        elif step > self.start_step and missing:
            raise RuntimeError(
                f"Delta-LoRA: the adapter has taken {step} optimizer steps, past start_step={self.start_step}, but "
                f"{missing[0].layer.forge_name} holds no snapshot (B_K, A_K), so W's update cannot be continued. "
                "Resume from a checkpoint saved with this adapter, or keep the start_step it was trained with.")

    def begin(self, max_steps: Optional[int]) -> None:
        self._catch_up(self.driver.step)

    def plan(self, max_steps: Optional[int]) -> None:
        if max_steps is not None and max_steps <= self.start_step:
            warnings.warn(
                f"Delta-LoRA: start_step={self.start_step} >= max_steps={max_steps}, so W will never move and this "
                "run is plain LoRA. Lower start_step (the paper uses 10 to 2000 steps, about the warm-up length).",
                stacklevel=2)

    def on_step_end(self, step: int, max_steps: Optional[int]) -> None:
        merged = [layer.forge_name for layer in self.layers if layer.merged]
        if merged:
            raise RuntimeError(
                f"Delta-LoRA cannot train with the adapter merged into the base weights ({merged[0]}, ...): its "
                "factors get no gradient and W would take the update twice. Call model.unmerge_adapter() before "
                "training and merge only at the end.")
        self._catch_up(step)  # the snapshot at K; refuses a state past K without one
        if step > self.start_step and not getattr(self.driver, "step_skipped", False):  # skipped: nothing moved
            # Only in-place propagation writes W (it refuses quantised bases, so W's own dtype is a float one);
            # `ax.weight` would dequantise a bnb base, and its dtype is not what a write would overflow.
            if all(type(ax).after_step is DeltaPropagation.after_step for ax in self.axes):
                return  # folded: nothing to do after a step (and nothing to read)
            factors = self.whole_factors()
            applied = [(*f, *ax.applied) for ax, f in zip(self.axes, factors) if getattr(ax, "applied", None) is not None]
            w_dtype = self.axes[0].layer.get_base_layer().weight.dtype
            if applied and not finite.bounded_update(applied, max(abs(ax.coef) for ax in self.axes), w_dtype):
                return finite.count_bad_step(step, "W += λ·s·(B A - B_K A_K) would overflow W (the factors blew up)")
            for ax, f in zip(self.axes, factors):
                ax.after_step(f)  # in place: W += λ·s·(P_{t+1} - P_t); folded: nothing

    def whole_factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B·diag(ĝ), A) of every axis, whole (`DeltaPropagation.factors`): the ungated ones read in one
        call, one collective when sharded (core/sharding.py)."""
        plain = [ax for ax in self.axes if not ax.gated()]
        read = iter(sharding.gather_many([sharding.tensor_of(ax.layer, name, ax.adapter) for ax in plain
                                          for name in ("lora_B", "lora_A")]))
        return [ax.factors() if ax.gated() else (next(read), next(read)) for ax in self.axes]

    @torch.no_grad()
    def log_values(self) -> dict[str, float]:
        """||λ·s·(B A - B_K A_K)||_F over all layers: how far the (effective) W has moved from W_0."""
        if not any(ax.taken for ax in self.axes):
            return {"delta_lora/w_shift_norm": 0.0}
        total = sum(ax.shift_sq_norm(f) for ax, f in zip(self.axes, self.whole_factors()))
        return {"delta_lora/w_shift_norm": max(0.0, total) ** 0.5}

    def on_train_end(self, output_dir: Optional[str]) -> None:
        if self.driver.step <= self.start_step:
            warnings.warn(
                f"Delta-LoRA: training ended at step {self.driver.step} <= start_step={self.start_step}; nothing was "
                "propagated into W (the result is plain LoRA).", stacklevel=2)

    def export_metadata(self) -> dict:
        taken = [int(ax.layer.lora_delta_steps[self.adapter][1]) for ax in self.axes]
        return {"delta_lora": {
            "update_ratio": float(self.config.update_ratio),
            "start_step": self.start_step,
            "propagation": self.config.propagation,
            "steps": self.driver.step,
            "snapshot_step": max(taken) if taken else -1,
            "note": "rank-2r factors on the original base: B' = [(1+λ)·s·B, -λ·s·B_K], A' = [A; A_K]",
        }}
