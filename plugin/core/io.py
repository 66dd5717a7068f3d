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
    """Load a saved adapter onto `base_model`: `PeftModel.from_pretrained` with loraforge's types registered
    (importing loraforge registers every method's config with PEFT, `registry.register_method`).

    Works for stock PEFT adapters too, so evaluation code can take either.

    Args:
        base_model (`torch.nn.Module`): the base model the adapter was trained on, freshly loaded.
        path (`str`): the adapter folder (`adapter_config.json` and the adapter weights).
        adapter_name (`str`, defaults to `"default"`): the name the adapter gets in the model.
        is_trainable (`bool`, defaults to `False`): load it to train further (else frozen, for inference).

    Returns:
        `PeftModel`: the model with the adapter, of its saved method with all its state (gates,
        snapshots, step counts).

    Example:

        ```py
        >>> from transformers import AutoModelForCausalLM
        >>> model = loraforge.load_adapter(AutoModelForCausalLM.from_pretrained("base"), "outputs/salora")
        ```
    """
    from .errors import ForgeConfigError
    from .files import DamagedFileError, check_adapter_fits, check_adapter_folder

    if os.path.isdir(path):
        check_adapter_folder(path)  # one line for a missing, truncated or damaged file
        check_adapter_fits(path, base_model)
    try:
        return PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name, is_trainable=is_trainable)
    except ForgeConfigError as exc:  # the saved config and weights disagree (e.g. an edited adapter_config.json)
        raise DamagedFileError(f"{path}: {exc}") from None
