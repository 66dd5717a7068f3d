"""Loading a saved loraforge adapter back with its own type."""
from __future__ import annotations

import os

from peft import PeftModel


def saved_method(path: str) -> str | None:
    """The loraforge method an adapter folder was saved with, or None for a stock PEFT adapter."""
    from .files import read_adapter_config

    peft_type = read_adapter_config(path)["peft_type"]
    return peft_type[len("LORAFORGE_"):].lower() if str(peft_type).startswith("LORAFORGE_") else None


def load_adapter(base_model, path: str, adapter_name: str = "default", is_trainable: bool = False) -> PeftModel:
    """`PeftModel.from_pretrained` with loraforge's types registered (importing loraforge registers them).

    Works for stock PEFT adapters too, so evaluation code can take either.
    """
    from .. import registry  # noqa: F401  (registers the config classes with PEFT)
    from .config import ForgeConfigError
    from .files import DamagedFileError, check_adapter_fits, check_adapter_folder

    if os.path.isdir(path):
        check_adapter_folder(path)  # one line for a missing, truncated or damaged file
        check_adapter_fits(path, base_model)
    try:
        return PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name, is_trainable=is_trainable)
    except ForgeConfigError as exc:  # the saved config and weights disagree (e.g. an edited adapter_config.json)
        raise DamagedFileError(f"{path}: {exc}") from None
