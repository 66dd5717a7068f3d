"""What `import loraforge` registers with its hosts: config types with PEFT, the optimizer hooks, PEFT's
`add_weighted_adapter` for loraforge sources, a default callback of every transformers Trainer, and
PEFT's adapter selection made to see through FSDP1's wrapper names."""
from __future__ import annotations

from .core.config import install_target_error_naming, register_config
from .core.driver import install_optimizer_hooks
from .core.sharding import install_peft_fsdp1_names
from .core.trainer import install_default_callback
from .core.weighted import install_weighted_adapters
from .cora.config import CoRAConfig
from .delta_lora.config import DeltaLoRAConfig
from .salora.config import SaLoRAConfig

CONFIGS = {cls.method: register_config(cls) for cls in (SaLoRAConfig, DeltaLoRAConfig, CoRAConfig)}
install_optimizer_hooks()
install_target_error_naming()
install_weighted_adapters()
install_default_callback()
install_peft_fsdp1_names()
