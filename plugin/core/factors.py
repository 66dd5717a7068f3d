"""An adapter's whole update on the original base weight as stock LoRA factors (export and weighting)."""
from __future__ import annotations

import torch

from .layer import ForgeLinear, eval_mode


@torch.no_grad()
def stock_factors(layer: ForgeLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') with `B' A'` = the layer's whole update on the original base weight."""
    with eval_mode(layer):
        b, a = layer.factors(adapter)
    dtype = torch.promote_types(b.dtype, torch.float32)  # at least fp32; fp64 factors stay fp64
    b, a = b.to(dtype) * layer.scaling[adapter], a.to(dtype)
    for axis in layer.forge_axes.get(adapter, []):
        b, a = axis.export_factors(b, a)
    return b, a
