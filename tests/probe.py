"""A probe method that uses every hook of the driving protocol (tests only)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraforge.core.config import ForgeConfig
from loraforge.core.controller import Controller
from loraforge.core.layer import TRAINABLE, Axis
from loraforge.registry import register_method


class ProbeAxis(Axis):
    """Scales each rank by a trainable per-rank parameter stored in `lora_gate_logits`."""

    tensors = {"lora_gate_logits": TRAINABLE}

    def init_factors(self):
        r = self.layer.r[self.adapter]
        self.layer.lora_gate_logits[self.adapter] = torch.nn.Parameter(torch.ones(r))

    def rank_gate(self):
        return self.layer.lora_gate_logits[self.adapter]


class ProbeController(Controller):
    loss_weight = 0.5
    group_lr = 0.123

    def __init__(self, driver):
        super().__init__(driver)
        self.steps_seen: list[int] = []
        self.max_steps_seen = None

    def begin(self, max_steps):
        self.max_steps_seen = max_steps

    def gates(self):
        return [layer.lora_gate_logits[self.adapter] for layer in self.layers]

    def regularization_loss(self):
        return self.loss_weight * sum((g ** 2).sum() for g in self.gates())

    def param_groups(self, lr, weight_decay):
        return [{"params": self.gates(), "lr": self.group_lr, "weight_decay": 0.0, "name": "probe"}]

    def on_step_end(self, step, max_steps):
        self.steps_seen.append(step)

    def log_values(self):
        return {"probe/steps": float(len(self.steps_seen))}


@dataclass
class ProbeConfig(ForgeConfig):
    method = "probe"

    def axes(self):
        return [ProbeAxis]

    def controllers(self):
        return [ProbeController]


class RefusingController(ProbeController):
    needs_trainer = "the probe needs its loss term"


@dataclass
class RefusingProbeConfig(ProbeConfig):
    method = "refusing_probe"

    def controllers(self):
        return [RefusingController]


register_method(ProbeConfig)
register_method(RefusingProbeConfig)
