"""`loraforge export ADAPTER --out DIR`: a saved loraforge adapter written as a stock PEFT LoRA adapter."""
from __future__ import annotations

import json
import os

from .export import export_lora
from .io import load_adapter


def base_of(adapter_dir: str) -> str | None:
    """The base model an adapter was trained on, from its adapter_config.json (None if not recorded)."""
    from loraforge_cli import UsageError

    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise UsageError(f"no adapter_config.json in {adapter_dir!r}; pass the folder of a saved adapter")
    with open(path) as f:
        return json.load(f).get("base_model_name_or_path") or None


def export_args(args) -> int:
    """`loraforge export` with parsed arguments (see loraforge_cli)."""
    from loraforge_cli import UsageError
    from transformers import AutoModelForCausalLM

    recorded = base_of(args.adapter)
    base = args.base or recorded
    if base is None:
        raise UsageError(f"{args.adapter}/adapter_config.json records no base_model_name_or_path; "
                         "pass the base model folder with --base")
    if not os.path.isdir(base):
        source = "--base" if args.base else f"base_model_name_or_path in {args.adapter}/adapter_config.json"
        raise UsageError(f"no base model folder {base!r} ({source}); pass the folder the adapter was trained on "
                         "with --base")
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base), args.adapter)
    ranks = export_lora(model, args.out)
    print(f"wrote a stock PEFT LoRA adapter ({len(ranks)} modules, ranks {min(ranks.values())}-{max(ranks.values())}) "
          f"from base {base} to {args.out}")
    return 0


def main(argv: list[str]) -> int:
    from loraforge_cli import parse

    return export_args(parse("export", argv))
