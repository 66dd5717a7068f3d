"""Delta-LoRA: the frozen weight moves by the delta of the low-rank product.

`DeltaLoRAConfig` (config.py), the two propagation axes (layer.py: folded, in_place.py: in place),
the fused folded branch (fused.py), the base-weight fingerprint (fingerprint.py) and the controller
(model.py).
"""
from ..registry import register_method
from .config import DeltaLoRAConfig

__all__ = ["DeltaLoRAConfig", "METHOD"]

METHOD = register_method(DeltaLoRAConfig, title="Delta-LoRA", example="{update_ratio: 2, start_step: 500}")
