"""What `import loraforge` registers with its hosts: config types with PEFT, the optimizer hooks, and
PEFT's adapter selection made to see through FSDP1's wrapper names."""
from __future__ import annotations

from .core.config import install_target_error_naming, register_config
from .core.driver import install_optimizer_hooks
from .core.sharding import install_peft_fsdp1_names
from .cora.config import CoRAConfig
from .delta_lora.config import DeltaLoRAConfig
from .salora.config import SaLoRAConfig

CONFIGS = {cls.method: register_config(cls) for cls in (SaLoRAConfig, DeltaLoRAConfig, CoRAConfig)}
install_optimizer_hooks()
install_target_error_naming()
install_peft_fsdp1_names()
