"""A record, saved with an adapter, of the settings its forward depends on beyond its weights.

The forward multiplies `B A x` by the scaling `s` (lora_alpha / r, or / √r with use_rslora, or the
alpha_pattern entry), which lives only in adapter_config.json. An edited or removed `lora_alpha`
would load without a word and give other outputs; with this record (`lora_forge_forward`, per
layer: [r, s]) the load refuses in one line instead. Adapters saved before the record existed load
as before (nothing to compare).
"""
from __future__ import annotations

import torch

from .errors import ForgeConfigError
from .layer import STATE, Axis

NAME = "lora_forge_forward"


class ForwardRecord(Axis):
    """Saves [r, scaling] of this layer's adapter and refuses a load whose config disagrees."""

    tensors = {NAME: STATE}

    def __init__(self, layer, adapter: str, config) -> None:
        super().__init__(layer, adapter, config)
        getattr(layer, NAME)[adapter] = torch.tensor(self._now(), dtype=torch.float64,
                                                     device=layer.get_base_layer().weight.device)

    def _now(self) -> list[float]:
        return [float(self.layer.r[self.adapter]), float(self.layer.scaling[self.adapter])]

    def refresh(self) -> None:
        saved = getattr(self.layer, NAME)[self.adapter]
        if saved.device.type == "meta":
            return
        (r0, s0), (r, s) = saved.tolist(), self._now()
        if r0 != r or abs(s0 - s) > 1e-6 * max(abs(s), 1e-12):
            raise ForgeConfigError(
                f"lora_alpha: {self.layer.forge_name} was trained with r={r0:g} and scaling {s0:g} (lora_alpha / r) but "
                f"this config gives r={r:g} and scaling {s:g}; adapter_config.json was edited (lora_alpha, r, "
                "use_rslora or alpha_pattern): restore the values it was saved with")
