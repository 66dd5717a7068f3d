"""Loading a saved loraforge adapter back with its own type."""
from __future__ import annotations

import json
import os

from peft import PeftModel
from peft.utils import CONFIG_NAME


def saved_method(path: str) -> str | None:
    """The loraforge method an adapter folder was saved with, or None for a stock PEFT adapter."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        peft_type = json.load(f).get("peft_type", "")
    return peft_type[len("LORAFORGE_"):].lower() if str(peft_type).startswith("LORAFORGE_") else None


def load_adapter(base_model, path: str, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained` with loraforge's types registered (importing loraforge registers them).

    Works for stock PEFT adapters too, so evaluation code can take either.
    """
    from .. import registry  # noqa: F401  (registers the config classes with PEFT)

    return PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name, is_trainable=is_trainable)
