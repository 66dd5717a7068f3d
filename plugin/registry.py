"""What `import loraforge` registers with its hosts: config types with PEFT, the optimizer hooks."""
from __future__ import annotations

from .core.config import install_target_error_naming, register_config
from .core.driver import install_optimizer_hooks
from .cora.config import CoRAConfig
from .delta_lora.config import DeltaLoRAConfig
from .salora.config import SaLoRAConfig

CONFIGS = {cls.method: register_config(cls) for cls in (SaLoRAConfig, DeltaLoRAConfig, CoRAConfig)}
install_optimizer_hooks()
install_target_error_naming()
